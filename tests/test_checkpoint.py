"""Checkpoints (lsgd_jax.training.checkpoint): what counts as damage, and the one
verification that resume and read-back share."""

import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgd_jax.training.checkpoint import (
    CheckpointMismatchError,
    Checkpoints,
    CorruptCheckpointError,
    read_checkpoint,
    state_sha256,
)

CONFIG = {"batch_size": 32, "base_lr": 0.1}


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a small state at step 3, with its SHA-256 and configuration."""
    state = {"w": jnp.sin(jnp.arange(4096.0)).reshape(64, 64), "step": jnp.asarray(3, jnp.int32)}
    ckpts = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    ckpts.save(3, state, position={"position": {"epoch": 0, "step": 3}},
               meta={"config": CONFIG, "state_sha256": state_sha256(state)})
    ckpts.close()
    return str(tmp_path / "checkpoints"), state


def test_the_one_verification_reads_an_intact_checkpoint(saved):
    directory, state = saved
    restored, position, meta = read_checkpoint(directory, 3, state, config=CONFIG)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert position["position"] == {"epoch": 0, "step": 3}
    assert meta["state_sha256"] == state_sha256(state)


def test_the_one_verification_names_the_damage(saved):
    directory, state = saved
    step_dir = os.path.join(directory, "3")
    chunk = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
                key=os.path.getsize)
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="step 3 is damaged") as error:
        read_checkpoint(directory, 3, state)
    assert error.value.path and error.value.path.startswith(step_dir)


def test_a_hash_that_differs_is_damage_and_another_recipe_is_not(saved):
    directory, state = saved
    with pytest.raises(CheckpointMismatchError, match="batch_size: checkpoint has 32"):
        read_checkpoint(directory, 3, state, config=CONFIG | {"batch_size": 64})
    meta_path = os.path.join(directory, "3", "meta", "metadata")
    meta = json.load(open(meta_path))
    json.dump(meta | {"state_sha256": "0" * 64}, open(meta_path, "w"))
    with pytest.raises(CorruptCheckpointError, match="SHA-256 .* differs from the 000000"):
        read_checkpoint(directory, 3, state)


def test_a_missing_file_is_damage_naming_it_and_other_errors_pass_through(saved):
    directory, state = saved

    def unavailable(abstract):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):  # says nothing of the bytes
        read_checkpoint(directory, 3, state, restore=unavailable)
    missing = os.path.join(directory, "3", "state", "manifest.ocdbt")
    os.remove(missing)
    with pytest.raises(CorruptCheckpointError, match="the file is missing") as error:
        read_checkpoint(directory, 3, state)
    assert error.value.path == missing


def test_resume_and_read_back_use_the_one_verification(saved, monkeypatch):
    """Both readers go through read_checkpoint: a verification changed there changes both."""
    from lsgd_jax.artifacts import readback
    from lsgd_jax.training import checkpoint

    directory, state = saved
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        raise CorruptCheckpointError(args[1], None, "refused by the test")

    monkeypatch.setattr(checkpoint, "read_checkpoint", counted)
    monkeypatch.setattr(readback, "read_checkpoint", counted)
    ckpts = Checkpoints(directory, keep=2)
    try:
        assert ckpts._try_restore(3, state, CONFIG)[0] == checkpoint._DAMAGED
    finally:
        ckpts.close()
    with pytest.raises(readback.UnreadableCheckpointError, match="refused by the test"):
        readback.read_verified(directory, state, step=3, log=lambda m: None)
    assert calls == [3, 3]
    assert jax.tree.structure(state)  # the state itself was never touched


def test_only_proven_damage_counts_as_damage():
    from lsgd_jax.training.checkpoint import CorruptCheckpointError, proven_damage

    def wrapped(inner):
        try:
            raise Exception("Encountered error while reading array index") from inner
        except Exception as e:  # noqa: BLE001
            return e

    damaged = [CorruptCheckpointError(6, None, "SHA"), json.JSONDecodeError("x", "{", 0),
               FileNotFoundError(errno.ENOENT, "No such file"),
               wrapped(ValueError('OUT_OF_RANGE: Requested byte range [0, 40) is not valid')),
               wrapped(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream")),
               ValueError("DATA_LOSS: checksum mismatch")]
    not_damaged = [OSError(errno.EIO, "Input/output error"), PermissionError(errno.EACCES, "x"),
                   MemoryError(), wrapped(ValueError("UNKNOWN: Input/output error")),
                   ValueError("RESOURCE_EXHAUSTED: out of memory"),
                   wrapped(ValueError("PERMISSION_DENIED: x")), RuntimeError("anything else")]
    assert [proven_damage(e) for e in damaged] == [True] * len(damaged)
    assert [proven_damage(e) for e in not_damaged] == [False] * len(not_damaged)
