"""Start training from an exported model (``--init-from MODEL.msgpack``): fine-tuning.

The fresh state's parameters and BN averages are replaced by the file's; its step
(0), optimizer state (zero momentum) and the schedule stay fresh, so the run follows
the paper's warmup and decays from the start. When the file's classifier has another
number of classes than this run (``--num-classes`` or the data set's), the classifier
(``fc``) keeps its fresh initialization; any other difference of layer or shape is an
error naming the layer, raised before anything is compiled (the shapes come from
``jax.eval_shape`` of the model's init), with the same verdict on every process.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax.parallel.agreement import from_process_0
from lsgd_jax.training.model_file import ModelFileError, check_tree, load_model

CLASSIFIER = "fc"  # the last layer of every lsgd_jax ResNet


def check_init_from(path: str, model, *, input_shape: tuple[int, ...], model_name: str,
                    log: Callable[[str], None] = print) -> tuple[dict, dict, tuple[str, ...]]:
    """Read and check model file ``path`` against ``model`` (as built for this run, with
    inputs of ``input_shape``) before anything is compiled: the file's header, format
    version, SHA-256 and model name, then each layer's shape against
    ``jax.eval_shape`` of ``model.init`` (traced, never compiled). Every process reads
    the file; process 0's verdict is every process's.

    Returns:
      The file's variables (host arrays), its description, and the layers that keep
      their fresh initialization (the classifier when its class count differs).

    Raises:
      ModelFileError (a ValueError): one line naming the file, or the layer and the shape
        the model needs.
    """
    error, loaded = "", None
    try:
        shapes = jax.eval_shape(lambda: model.init(
            jax.random.key(0), jnp.zeros(tuple(input_shape), jnp.float32), train=False))
        loaded = _read_and_check(path, shapes, model_name, log)
    except ModelFileError as e:
        text = str(e)
        error = text if text.startswith("--init-from") else f"--init-from {path}: {text}"
    agreed = from_process_0(error)
    if agreed or error:
        raise ModelFileError(agreed or f"process {jax.process_index()}: {error}")
    return loaded


def _read_and_check(path: str, shapes, model_name: str, log: Callable[[str], None]):
    """The file's variables, description and the layers kept fresh, checked against the
    ``shapes`` of this run's variables (``params``, ``batch_stats``)."""
    _, variables, meta = load_model(path)
    if meta["model"] != model_name:
        raise ModelFileError(f"--init-from {path} holds a {meta['model']} but this run trains "
                             f"a {model_name}; pass --model {meta['model']} or another file")
    fresh = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    classes = int(fresh["params"][CLASSIFIER]["kernel"].shape[-1])
    skip: tuple[str, ...] = ()
    if classes != int(meta["num_classes"]):
        skip = (f"['params']['{CLASSIFIER}']",)
    check_tree(fresh, variables, where=f"--init-from {path}", skip=skip)
    if skip:
        log(f"--init-from {path}: its classifier has {meta['num_classes']} classes, this run "
            f"{classes}: layer {CLASSIFIER} starts from a fresh initialization")
    return variables, meta, skip


def start_from_model(state, path: str, *, model_name: str,
                     log: Callable[[str], None] = print, checked=None):
    """``state`` (fresh, replicated) with the parameters and BN averages of model file
    ``path``; the classifier is kept fresh when its class count differs. ``checked``:
    what :func:`check_init_from` returned for ``path`` (read again when None).

    Raises:
      ModelFileError (a ValueError): a missing or damaged file, another model, or a layer
        whose shape differs (named).
    """
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    variables, meta, skip = checked or _read_and_check(path, fresh, model_name, log)

    def take(key_path, fresh_leaf):
        name = jax.tree_util.keystr(key_path)
        if any(name.startswith(s) for s in skip):
            return fresh_leaf
        value = variables
        for key in key_path:
            value = value[key.key]
        value = np.asarray(value, dtype=fresh_leaf.dtype)
        # Every process builds its own shards of the replicated array (multi-host safe).
        return jax.make_array_from_callback(value.shape, fresh_leaf.sharding,
                                            lambda index: value[index])

    loaded = jax.tree_util.tree_map_with_path(take, fresh)
    log(f"starting from the weights of {path} (step {meta.get('step')} of "
        f"{meta.get('workdir')}); fresh optimizer state and schedule")
    return state.replace(params=loaded["params"], batch_stats=loaded["batch_stats"])
