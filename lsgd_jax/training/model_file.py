"""A trained model in one file: ``export_model`` writes it, ``load_model`` reads it.

``MODEL.msgpack`` (Flax's msgpack serialization) holds::

  {"format": "lsgd-jax model", "format_version": 1, "model": NAME,
   "variables": {"params": ..., "batch_stats": ...}}

the parameters and the BN running averages that evaluation uses, as float32 arrays.
``MODEL.json`` beside it says how to use them: the model's name, classes (names when
the data set's metadata has them; human-readable ones in ``class_descriptions`` when a
file beside the data gives them), image size, channels and eval transform, the
pixel mean and std, the compute dtype, the checkpoint's step and ``state_sha256``,
the run's result (the paper's metric) from ``metrics.jsonl``, and the SHA-256 of
the msgpack file, checked by every load. ``load_model`` needs nothing else: any
JAX program on any number of devices can apply the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from lsgd_jax.data import class_descriptions, class_names

FORMAT = "lsgd-jax model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, damaged, or not one this version can load."""


def sidecar_path(path: str) -> str:
    """``model.msgpack`` -> ``model.json``: where the model file's description lies."""
    root, ext = os.path.splitext(path)
    return (root if ext == ".msgpack" else path) + ".json"


def export_model(run, out: str) -> dict:
    """Write ``run``'s (a :class:`lsgd_jax.artifacts.readback.RestoredRun`) parameters and BN averages
    to ``out`` and its description to ``sidecar_path(out)`` (:func:`write_pair`); returns
    the description.

    Raises:
      ExportError (a ValueError): the pair could not be written; every process raises it.
    """
    from flax import serialization

    from lsgd_jax._version import __version__
    from lsgd_jax.parallel.agreement import from_process_0
    from lsgd_jax.training.metrics import eval_history, read_metrics

    host = jax.tree.map(lambda x: np.asarray(jax.device_get(
        x.addressable_data(0) if isinstance(x, jax.Array) else x)),
        {"params": run.state.params, "batch_stats": run.state.batch_stats})
    payload = serialization.msgpack_serialize({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": run.facts.model,
        "variables": serialization.to_state_dict(host)})
    results = [r for r in read_metrics(run.workdir, "result")]
    evaluated = eval_history(run.workdir).get(run.step)
    facts = run.facts
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lsgd_jax_version": __version__,
        "model": facts.model, "num_classes": facts.num_classes,
        "classes": class_names(run.config),
        "class_descriptions": class_descriptions(run.config), "image_size": facts.image_size,
        "channels": facts.channels, "eval_resize": facts.eval_resize,
        "pixel_mean": list(facts.pixel_mean), "pixel_std": list(facts.pixel_std),
        "dtype": facts.dtype, "data": facts.data,
        "tfds_name": facts.tfds_name if facts.data == "imagenet" else None,
        "step": run.step, "state_sha256": run.meta.get("state_sha256"),
        "result": ({k: v for k, v in results[-1].items() if k not in ("kind", "time")}
                   if results else None),
        "eval": ({k: evaluated[k] for k in ("top1_error", "top5_error", "count")
                  if k in evaluated} if evaluated else None),
        "workdir": run.workdir,
        "file_sha256": hashlib.sha256(payload).hexdigest(),
    }
    error = ""
    if jax.process_index() == 0:  # one writer; every process holds the same arrays
        try:
            write_pair(out, payload, (json.dumps(meta, indent=2) + "\n").encode())
        except ExportError as e:
            error = str(e)
    error = from_process_0(error)  # every process exits with the writer's verdict
    if error:
        raise ExportError(error)
    return meta


class ExportError(ValueError):
    """The model file and its description could not be written (no room, not writable);
    nothing at the destination was changed."""


def write_pair(out: str, payload: bytes, description: bytes) -> None:
    """Put ``payload`` at ``out`` and ``description`` at ``sidecar_path(out)``, as a pair.

    Both are written to temporary names and synced first, then renamed into place,
    the weights first; a failure removes the temporary files and puts back what was
    at ``out`` before (or removes the new weights), so the destination holds either
    the old pair or the new one, never one of each.

    Raises:
      ExportError (a ValueError): one line naming the output folder and the cause
        (with the space needed and free when the disk is full).
    """
    pair = [(out, payload), (sidecar_path(out), description)]
    temps: list[str] = []
    try:
        for path, data in pair:
            temps.append(f"{path}.tmp-{os.getpid()}")
            with open(temps[-1], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _rename_pair(out, temps)
    except OSError as e:
        for tmp in temps:
            _remove_quietly(tmp)
        raise ExportError(_write_failure(out, e, (len(payload), len(description)))) from None
    _sync_folder(os.path.dirname(os.path.abspath(out)))


def _rename_pair(out: str, temps: list[str]) -> None:
    """Rename the synced ``temps`` (weights, description) onto ``out`` and its sidecar;
    when the second rename fails, ``out`` gets back its earlier content (or goes)."""
    kept = f"{out}.old-{os.getpid()}"
    had_old = os.path.exists(out)
    if had_old:
        try:
            os.link(out, kept)  # a second name for the old weights: no data copied
        except OSError:  # a file system without hard links
            shutil.copyfile(out, kept)
    try:
        os.replace(temps[0], out)
        try:
            os.replace(temps[1], sidecar_path(out))
        except OSError:
            if had_old:
                os.replace(kept, out)
            else:
                _remove_quietly(out)
            raise
    finally:
        if had_old:
            _remove_quietly(kept)


def _write_failure(out: str, error: OSError, sizes: tuple[int, ...]) -> str:
    folder = os.path.dirname(os.path.abspath(out))
    names = f"{os.path.basename(out)} and {os.path.basename(sidecar_path(out))}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:  # whole blocks of the file system, as it counts them
            fs = os.statvfs(folder)
            block = fs.f_frsize or 4096
            need = sum(-(-size // block) * block for size in sizes)
            room = f"need {_kib(need)}, {_kib(fs.f_bavail * fs.f_frsize)} are free"
        except OSError:
            room = f"need {_kib(sum(sizes))}"
        return (f"--out {out}: no room in the output folder {folder}: {names} {room}; free "
                "some space there or give --out in another folder (nothing there was changed)")
    return (f"--out {out}: cannot write {names} in the output folder {folder} "
            f"({error.strerror or type(error).__name__}); give --out in a writable folder "
            "(nothing there was changed)")


def _kib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 10 * 2**20 else f"{-(-size // 1024)} KiB"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _sync_folder(folder: str) -> None:
    """Make the renames durable (best effort: some file systems refuse a folder's fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_model(path: str, *, dtype: Any = None) -> tuple[Any, dict, dict]:
    """The model of an exported file, ready for ``model.apply(variables, x, train=False)``.

    ``x``: images normalized with ``meta["pixel_mean"]``/``meta["pixel_std"]`` (see
    :func:`lsgd_jax.artifacts.predict.normalize`). ``dtype`` overrides the compute dtype saved in
    ``meta["dtype"]``. The variables are host (numpy) arrays; ``jax.device_put`` them
    replicated to run on several devices.

    Raises:
      ModelFileError (a ValueError): a missing file or description, a damaged file,
        another format version, arrays that do not fit the named model (the message
        names the first layer that differs), or a NaN or Inf in a layer (named).
    """
    from flax import serialization

    from lsgd_jax.models import MODEL_NAMES, get_model

    meta_path = sidecar_path(path)
    for p, what in ((path, "model file"), (meta_path, "model description")):
        if not os.path.isfile(p):
            raise ModelFileError(f"{what} {p} does not exist; give a file written by "
                                 "`lsgd-jax export` (MODEL.msgpack with MODEL.json beside it)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ModelFileError(f"model description {meta_path} is damaged ({e}); export the "
                             "model again") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{meta_path} is format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this lsgd-jax reads {FORMAT!r} version "
            f"{FORMAT_VERSION} (export the model again with this version)")
    with open(path, "rb") as f:
        payload = f.read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("file_sha256"):
        raise ModelFileError(
            f"model file {path} is damaged or not the one {meta_path} describes: its SHA-256 "
            f"{digest[:12]}… differs from the {str(meta.get('file_sha256'))[:12]}… recorded; "
            "export the model again")
    try:
        content = serialization.msgpack_restore(payload)
    except Exception as e:
        raise ModelFileError(f"model file {path} cannot be decoded ({type(e).__name__}); "
                             "export the model again") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT or content.get(
            "format_version") != FORMAT_VERSION or content.get("model") != meta.get("model"):
        raise ModelFileError(
            f"model file {path} is not an lsgd-jax model of format version {FORMAT_VERSION} "
            f"for {meta.get('model')!r} as {meta_path} says; export the model again")
    if meta.get("model") not in MODEL_NAMES:
        raise ModelFileError(f"{meta_path} names model {meta.get('model')!r}; this lsgd-jax "
                             f"knows {', '.join(MODEL_NAMES)}")
    model = get_model(meta["model"], num_classes=int(meta["num_classes"]),
                      dtype=dtype or meta["dtype"], bn_group_size=None)
    shape = (1, meta["image_size"], meta["image_size"], meta["channels"])
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(shape, np.float32),
                                                 train=False))
    variables = content["variables"]
    check_tree(expected, variables, where=path)
    variables = {k: variables[k] for k in expected}
    check_finite(variables, where=path)
    return model, variables, meta


def check_finite(variables: Any, *, where: str) -> None:
    """Raise ModelFileError naming the first layer (tree order) that holds a NaN or an
    Inf, with how many: such weights only give NaN, in training and in prediction."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(leaf)
        if array.dtype.kind not in "fc":
            continue
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ModelFileError(
                f"model file {where}: layer {jax.tree_util.keystr(key_path)} holds {bad} "
                f"non-finite value{'s' if bad != 1 else ''} (NaN or Inf) of {array.size}; "
                "its weights cannot be used: export a checkpoint whose weights are finite")


def check_tree(expected: Any, actual: Any, *, where: str, skip: tuple[str, ...] = ()) -> None:
    """Raise ModelFileError naming the first layer of ``actual`` whose arrays differ in
    name or shape from ``expected`` (nested dicts); paths starting with ``skip`` are not
    compared."""
    want = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): np.shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(actual)[0]}
    for name in sorted(set(want) | set(have)):
        if any(name.startswith(s) for s in skip):
            continue
        if name not in have:
            raise ModelFileError(f"{where} lacks layer {name} (shape {want[name]}) of the model")
        if name not in want:
            raise ModelFileError(f"{where} has layer {name} that the model does not have")
        if tuple(want[name]) != tuple(have[name]):
            raise ModelFileError(f"{where}: layer {name} has shape {tuple(have[name])}, the "
                                 f"model needs {tuple(want[name])}")
