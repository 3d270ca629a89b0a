"""Start training from an exported model (``--init-from MODEL.msgpack``): fine-tuning.

The fresh state's parameters and BN averages are replaced by the file's; its step
(0), optimizer state (zero momentum) and the schedule stay fresh, so the run follows
the paper's warmup and decays from the start. When the file's classifier has another
number of classes than this run (``--num-classes`` or the data set's), the classifier
(``fc``) keeps its fresh initialization; any other difference of layer or shape is an
error naming the layer, raised before the first step.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from lsgd_jax.model_file import ModelFileError, check_tree, load_model

CLASSIFIER = "fc"  # the last layer of every lsgd_jax ResNet


def start_from_model(state, path: str, *, model_name: str,
                     log: Callable[[str], None] = print):
    """``state`` (fresh, replicated) with the parameters and BN averages of model file
    ``path``; the classifier is kept fresh when its class count differs.

    Raises:
      ModelFileError (a ValueError): a missing or damaged file, another model, or a layer
        whose shape differs (named).
    """
    _, variables, meta = load_model(path)
    if meta["model"] != model_name:
        raise ModelFileError(f"--init-from {path} holds a {meta['model']} but this run trains "
                             f"a {model_name}; pass --model {meta['model']} or another file")
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    classes = int(fresh["params"][CLASSIFIER]["kernel"].shape[-1])
    skip: tuple[str, ...] = ()
    if classes != int(meta["num_classes"]):
        skip = (f"['params']['{CLASSIFIER}']",)
        log(f"--init-from {path}: its classifier has {meta['num_classes']} classes, this run "
            f"{classes}: layer {CLASSIFIER} starts from a fresh initialization")
    check_tree(fresh, variables, where=f"--init-from {path}", skip=skip)

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
