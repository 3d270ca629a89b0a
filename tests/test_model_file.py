"""The exported model (lsgd_jax.training.model_file): ``lsgd-jax export`` writes it, damaged
or foreign files get one clear error, and ``--init-from`` starts a run from it."""

import hashlib
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from helpers import (
    ROOT,
    TRAINED,
    as_flags,
    error_line,
    run_script,
    small_tmpfs,
    tampered_model,
)
from PIL import Image

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import eval_history, read_metrics

TINY = TRAINED
TINY_FLAGS = as_flags(TINY)
NON_FINITE = (r"layer \['params'\]\['stem_conv'\]\['kernel'\] holds 4 non-finite values "
              r"\(NaN or Inf\) of 432")


# ---------------------------------------------------------------- export, load, predict


# ---------------------------------------------------------------- export, load, predict
def test_export_writes_the_weights_and_their_description(run_dir, model_path):
    from lsgd_jax.artifacts.readback import restore_run
    from lsgd_jax.training.model_file import load_model

    meta = json.load(open(os.path.join(os.path.dirname(model_path), "model.json")))
    result = read_metrics(run_dir, "result")[-1]
    last_checkpoint = read_metrics(run_dir, "checkpoint")[-1]
    assert meta["model"] == "resnet8" and meta["num_classes"] == 10 and meta["step"] == 12
    assert meta["image_size"] == 32 and meta["eval_resize"] == 32 and meta["channels"] == 3
    assert meta["class_descriptions"] is None  # synthetic data: nothing describes its classes
    assert meta["result"]["median_top1_error"] == result["median_top1_error"]
    assert meta["state_sha256"] == last_checkpoint["state_sha256"]
    assert meta["eval"]["top1_error"] == eval_history(run_dir)[12]["top1_error"]
    assert meta["file_sha256"] == hashlib.sha256(open(model_path, "rb").read()).hexdigest()
    model, variables, loaded_meta = load_model(model_path)
    state = restore_run(run_dir, log=lambda m: None).state
    for name, tree in (("params", state.params), ("batch_stats", state.batch_stats)):
        for a, b in zip(jax.tree.leaves(jax.device_get(tree)), jax.tree.leaves(variables[name])):
            np.testing.assert_array_equal(a, b)  # bit for bit
    assert loaded_meta == meta


def _model_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("model."))


def _leave_free(folder, free):
    """Fill ``folder``'s file system until ``free`` bytes are left (tmpfs counts pages)."""
    filler = os.path.join(folder, "filler")
    if os.path.exists(filler):
        os.remove(filler)
    stat = os.statvfs(folder)
    with open(filler, "wb") as f:
        f.write(b"x" * (stat.f_bavail * stat.f_frsize - free))


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_half_pair(run_dir, model_path,
                                                                      tmp_path, capsys):
    """A 1.2 MB tmpfs filled until the weights do not fit, then until they fit but their
    description does not, then over an older pair: status 2, one line naming the output
    folder and the room, no temporary file, no lone or mixed file; the older pair intact."""
    from lsgd_jax.cli.main import export_main
    from lsgd_jax.training.model_file import load_model

    with small_tmpfs(tmp_path / "disk", "1200k") as disk:
        out = str(disk / "model.msgpack")
        weights = -(-os.path.getsize(model_path) // 4096) * 4096  # its pages
        for free, older in ((weights - 8 * 4096, False), (weights, False), (weights, True)):
            if older:  # an older pair (step 8) at the destination
                _leave_free(disk, 2**20)
                assert export_main(["--workdir", run_dir, "--step", "8", "--out", out]) == 0
                before = {n: (disk / n).read_bytes() for n in _model_files(disk)}
            _leave_free(disk, free)
            capsys.readouterr()
            assert export_main(["--workdir", run_dir, "--out", out]) == 2
            line = error_line(capsys.readouterr().err)
            assert line.startswith(f"error: --out {out}: no room in the output folder {disk}: "
                                   "model.msgpack and model.json need "), line
            assert f"KiB, {free // 1024} KiB are free" in line
            assert "resum" not in line and "workdir" not in line
            if older:
                assert {n: (disk / n).read_bytes() for n in _model_files(disk)} == before
                assert load_model(out)[2]["step"] == 8
            else:
                assert _model_files(disk) == []
            assert sorted(os.listdir(disk)) == ["filler", *_model_files(disk)]
        os.remove(disk / "filler")
        assert export_main(["--workdir", run_dir, "--out", out]) == 0
        assert _model_files(disk) == ["model.json", "model.msgpack"]
        assert (disk / "model.msgpack").read_bytes() == open(model_path, "rb").read()


@pytest.mark.parametrize("older", [False, True], ids=["new", "over_an_older_pair"])
def test_a_failed_rename_of_the_description_undoes_the_weights(model_path, tmp_path,
                                                                monkeypatch, older):
    """The weights are renamed into place first: when the description's rename fails, the
    older weights come back (or the new ones go), and no temporary file is left."""
    import lsgd_jax.training.model_file as model_file

    out = str(tmp_path / "model.msgpack")
    if older:
        shutil.copy(model_path, out)
        shutil.copy(model_file.sidecar_path(model_path), model_file.sidecar_path(out))
    before = {n: (tmp_path / n).read_bytes() for n in _model_files(tmp_path)}
    replace = os.replace

    def failing(src, dst):
        if dst.endswith(".json"):
            raise OSError(5, "Input/output error", dst)
        replace(src, dst)

    monkeypatch.setattr(model_file.os, "replace", failing)
    with pytest.raises(model_file.ExportError, match=r"cannot write model.msgpack and "
                                                     r"model.json in the output folder"):
        model_file.write_pair(out, b"new weights", b"{}")
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_a_damaged_or_foreign_model_file_gets_a_clear_error(model_path, tmp_path):
    from lsgd_jax.training.model_file import ModelFileError, load_model

    def flip(data):  # one byte in the middle of the arrays
        data[len(data) // 2] ^= 0x01

    damaged = tampered_model(model_path, tmp_path, edit_bytes=flip)
    with pytest.raises(ModelFileError, match="is damaged or not the one") as e:
        load_model(damaged)
    assert damaged in str(e.value) and "\n" not in str(e.value)
    result = run_script("predict.py", "--model", damaged, os.path.join(ROOT, "README.md"))
    assert result.returncode == 2 and damaged in error_line(result.stderr)
    newer = tampered_model(model_path, tmp_path, edit_meta=lambda m: m.update(format_version=2))
    with pytest.raises(ModelFileError, match="version 2; this lsgd-jax reads"):
        load_model(newer)
    other = tampered_model(model_path, tmp_path, edit_meta=lambda m: m.update(model="resnet20"))
    with pytest.raises(ModelFileError, match="resnet20"):
        load_model(other)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(str(tmp_path / "none.msgpack"))


def test_a_model_file_whose_arrays_do_not_fit_names_the_layer(model_path, tmp_path):
    from flax import serialization

    from lsgd_jax.training.model_file import ModelFileError, load_model

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = content["variables"]["params"]["stem_conv"]["kernel"]
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel[..., :1, :]
    payload = serialization.msgpack_serialize(content)

    def rewrite(data):
        data[:] = payload

    bad = tampered_model(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
        file_sha256=hashlib.sha256(payload).hexdigest()))
    with pytest.raises(ModelFileError, match=r"\['params'\]\['stem_conv'\]\['kernel'\] has "
                                             r"shape \(3, 3, 1, 16\)"):
        load_model(bad)


def _non_finite(model_path, tmp_path):
    """A copy of the model file whose stem kernel holds 3 NaN and 1 Inf, its SHA-256
    recorded: a file that is whole, but whose weights are not finite."""
    from flax import serialization

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = np.array(content["variables"]["params"]["stem_conv"]["kernel"])
    kernel.flat[[0, 7, 9]] = np.nan
    kernel.flat[20] = -np.inf
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel
    payload = serialization.msgpack_serialize(content)

    def rewrite(data):
        data[:] = payload

    return tampered_model(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
        file_sha256=hashlib.sha256(payload).hexdigest()))


def test_a_model_file_with_non_finite_weights_is_refused_naming_the_layer(
        model_path, tmp_path, monkeypatch, capsys):
    """load_model refuses it, so predict exits 2 before anything is compiled (and
    --init-from too: test_a_bad_init_from_file_is_refused_before_anything_is_compiled);
    the training command says so in one line."""
    import lsgd_jax.artifacts.predict as predict
    from lsgd_jax.cli.main import predict_main
    from lsgd_jax.training.model_file import ModelFileError, load_model

    bad = _non_finite(model_path, tmp_path)
    with pytest.raises(ModelFileError, match=NON_FINITE):
        load_model(bad)

    def classify(*args, **kwargs):
        raise AssertionError("compiled the prediction of a non-finite model")

    monkeypatch.setattr(predict, "classify", classify)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert predict_main(["--model", bad, str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search(NON_FINITE, error_line(captured.err))
    result = run_script("imagenet_resnet50.py", "--workdir", str(tmp_path / "cli"), *TINY_FLAGS,
                     "--init-from", bad, "--cpu-devices", "8")
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert line.startswith(f"error: --init-from {bad}: ") and re.search(NON_FINITE, line)
    assert "compiling" not in result.stdout


# ---------------------------------------------------------------- --init-from
def _prepared(tmp_path, name, **changes):
    from lsgd_jax.training.loop import _prepare

    run = _prepare(TrainConfig(**TINY | changes), str(tmp_path / name), lambda msg: None)
    run.ckpts.close()
    return run


def test_init_from_reproduces_the_exported_parameters_at_step_0(model_path, tmp_path):
    from lsgd_jax.training.model_file import load_model

    _, variables, _ = load_model(model_path)
    run = _prepared(tmp_path, "same", init_from=model_path, seed=3)
    assert int(run.state.step) == 0
    for name, tree in (("params", run.state.params), ("batch_stats", run.state.batch_stats)):
        for a, b in zip(jax.tree.leaves(jax.device_get(tree)), jax.tree.leaves(variables[name])):
            np.testing.assert_array_equal(a, b)
    # A fresh optimizer: the momentum buffer is zero.
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(run.state.opt_state)
               if np.ndim(x) > 0)


def test_init_from_with_other_classes_keeps_a_fresh_classifier(model_path, tmp_path):
    from lsgd_jax.training.model_file import load_model

    _, variables, _ = load_model(model_path)
    run = _prepared(tmp_path, "seven", init_from=model_path, num_classes=7)
    fresh = _prepared(tmp_path, "scratch", num_classes=7)
    params = jax.device_get(run.state.params)
    np.testing.assert_array_equal(params["fc"]["kernel"],
                                  jax.device_get(fresh.state.params["fc"]["kernel"]))
    assert params["fc"]["kernel"].shape == (64, 7)
    np.testing.assert_array_equal(params["stem_conv"]["kernel"],
                                  variables["params"]["stem_conv"]["kernel"])


def test_init_from_refuses_another_model_naming_it(model_path, tmp_path):
    from lsgd_jax.training.model_file import ModelFileError

    with pytest.raises(ModelFileError, match="holds a resnet8 but this run trains a resnet20"):
        _prepared(tmp_path, "other", init_from=model_path, model="resnet20")
    result = run_script("imagenet_resnet50.py", "--workdir", str(tmp_path / "cli"), *TINY_FLAGS,
                     "--init-from", str(tmp_path / "missing.msgpack"), "--cpu-devices", "8")
    assert result.returncode == 2
    assert str(tmp_path / "missing.msgpack") in error_line(result.stderr)


def test_a_bad_init_from_file_is_refused_before_anything_is_compiled(model_path, tmp_path,
                                                                     monkeypatch):
    """Missing, damaged, another format version, another model, a layer of another shape:
    one line naming the file (and the layer, with the shape the model needs), raised
    before the fresh state is compiled, from the verdict every process shares. Another
    class count is no error: the check passes and the run goes on to compile."""
    from flax import serialization

    import lsgd_jax.training.init_from as init_from
    import lsgd_jax.training.loop as train
    from lsgd_jax.training.model_file import ModelFileError

    class Compiled(Exception):
        pass

    def create_train_state(*args, **kwargs):
        raise Compiled

    monkeypatch.setattr(train, "create_train_state", create_train_state)
    verdicts = []

    def from_process_0(text):  # one process: the verdict it would share
        verdicts.append(text)
        return text

    monkeypatch.setattr(init_from, "from_process_0", from_process_0)

    def flip(data):
        data[len(data) // 2] ^= 0x01

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = content["variables"]["params"]["stem_conv"]["kernel"]
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel[..., :1, :]
    gray = serialization.msgpack_serialize(content)  # a 1-channel model; this run has 3

    def rewrite(data):
        data[:] = gray

    cases = [
        (lambda: str(tmp_path / "none.msgpack"), {}, "does not exist"),
        (lambda: tampered_model(model_path, tmp_path, edit_bytes=flip), {}, "is damaged"),
        (lambda: tampered_model(model_path, tmp_path, edit_meta=lambda m: m.update(format_version=2)),
         {}, "version 2; this lsgd-jax reads"),
        (lambda: model_path, {"model": "resnet20"}, "holds a resnet8 but this run trains"),
        (lambda: tampered_model(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
            channels=1, file_sha256=hashlib.sha256(gray).hexdigest())), {},
         r"layer \['params'\]\['stem_conv'\]\['kernel'\] has shape \(3, 3, 1, 16\), the "
         r"model needs \(3, 3, 3, 16\)"),
        (lambda: _non_finite(model_path, tmp_path), {}, NON_FINITE),
    ]
    for make, changes, message in cases:
        path = make()
        with pytest.raises(ModelFileError, match=message) as e:
            _prepared(tmp_path, "bad", init_from=path, **changes)
        text = str(e.value)
        assert text.startswith("--init-from") and path in text and "\n" not in text, text
        assert verdicts[-1] == text
    with pytest.raises(Compiled):
        _prepared(tmp_path, "seven", init_from=model_path, num_classes=7)
    assert verdicts[-1] == ""
