"""Host-side input, no jax: Remark 4's sampler, the sources, transforms, decoding workers.

Importing this package never imports jax, TensorFlow, tfds or grain: the ImageNet reader
(``lsgd_jax.data.imagenet``) is imported by ``get_source("imagenet", ...)`` only, so
the synthetic and Fashion-MNIST sources work on hosts without them, and the decoding
workers start without jax. Batches reach the devices through ``lsgd_jax.parallel.prefetch``.
"""

import os
from typing import Any, Callable

from lsgd_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lsgd_jax.data.pipeline import TrainIterator, eval_batches, num_eval_batches
from lsgd_jax.data.registry import get_source
from lsgd_jax.data.sampler import (
    Position,
    eval_indices,
    local_batch_size,
    shard_indices,
    steps_per_epoch,
)
from lsgd_jax.data.source import SOURCE_NAMES, BadDataError, Source

# Every process's value of one name, in process order (the coordination service's store).
Exchange = Callable[[str, Any], list]



def open_source(config, split: str, *, workdir: str | None = None, process_index: int = 0,
                process_count: int = 1, log=None, exchange: Exchange | None = None) -> Source:
    """Split ``split`` ("train" or "validation") of ``config.data``, with the config's options.

    A data set read from its folders keeps its index of files in ``workdir``. With several
    processes, process 0 opens it first (listing the files if need be, and keeping the
    index where the others find it on a shared workdir); the others open it after, or
    raise process 0's error. ``exchange`` (``lsgd_jax.parallel.agreement.exchange``: this
    layer imports no jax) carries that error to every process.
    """
    options: dict = {"data_dir": config.data_dir, "image_size": config.image_size}
    if config.data == "synthetic":
        options = {"image_size": config.image_size, "seed": config.seed,
                   "num_examples": (config.synthetic_examples if split == "train"
                                    else config.synthetic_eval_examples)}
        if getattr(config, "num_classes", None):
            options["num_classes"] = config.num_classes
    elif config.data in ("imagenet", "folder"):
        options.update(decode_threads=config.decode_threads, max_bad_fraction=config.max_bad_fraction,
                       builder_name=config.tfds_name, resizer=config.resizer,
                       val_labels=config.val_labels, relist=config.relist,
                       index_dir=workdir and os.path.join(workdir, "data_index"),
                       log_fn=log)
        if split == "train":
            options.update(color_jitter=config.color_jitter, lighting=config.lighting)
    source = _opened_in_turn(lambda: get_source(config.data, split=split, **options),
                             f"open_{split}", process_index, process_count, exchange)
    if log is not None and config.data in ("imagenet", "folder") and split == "train":
        how = ("read from its folders (no TensorFlow)" if hasattr(source, "index")
               else f"tfds {config.tfds_name}")
        log(f"data: {config.data} {config.data_dir or ''}, {how}: {source.num_examples:,} "
            f"training images of {source.num_classes:,} classes")
    wanted = getattr(config, "num_classes", None)
    if wanted is not None and wanted < source.num_classes:
        source.close()
        raise ValueError(f"--num-classes {wanted} is fewer than the {source.num_classes} "
                         f"classes of {config.data}; use at least {source.num_classes}")
    return source


def _needs(exchange: Exchange | None, process_count: int) -> Exchange:
    if exchange is None:
        raise ValueError(f"with {process_count} processes, the data layer needs exchange= "
                         "(lsgd_jax.parallel.agreement.exchange) to agree across them")
    return exchange


def _opened_in_turn(open_it, name: str, process_index: int, process_count: int,
                    exchange: Exchange | None):
    """``open_it()`` on process 0 first, then on the others; an error of process 0 is raised
    by every process, in the same words."""
    if process_count == 1:
        return open_it()
    exchange = _needs(exchange, process_count)

    error, source = "", None
    if process_index == 0:
        try:
            source = open_it()
        except (ValueError, OSError) as e:
            error = str(e) or type(e).__name__
    first = exchange(f"data_{name}", error)[0]
    if first:
        if source is not None:
            source.close()
        raise ValueError(first)
    return source if source is not None else open_it()


def train_stream(source: Source, config, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, position=None, log=print,
                 exchange: Exchange | None = None) -> TrainIterator:
    """This process's training batches: decoded by worker processes (``workers.py``) when
    ``config.decode_workers`` (default: ``workers.default_decode_workers()``) is above 0
    and the source supports it, else in this process. Logs the choice; ``close()`` it."""
    from lsgd_jax.data.workers import (
        WorkerTrainIterator,
        default_decode_workers,
        local_process_count,
        usable_cores,
    )

    kwargs = dict(global_batch_size=global_batch_size, seed=config.seed,
                  process_index=process_index, process_count=process_count, position=position)
    workers, cores = config.decode_workers, usable_cores()
    flag = "default" if workers is None else workers
    if workers is None:
        workers = default_decode_workers(cores)
    if not hasattr(source, "worker_opener"):  # in-memory sources: nothing to decode
        log(f"input: {config.data}, in the training process")
        return TrainIterator(source, **kwargs)
    resize = getattr(source, "resizer", "?")
    if workers:
        processes = local_process_count()
        share = (f"{cores} cores of this host's {os.cpu_count()} for each of its "
                 f"{processes} processes" if processes > 1 else f"{cores} cores")
        log(f"input: {workers} decoding worker process{'es' * (workers != 1)} per process "
            f"({share}; --decode-workers {flag}), resize {resize}")
        return _started_everywhere(lambda: WorkerTrainIterator(source, decode_workers=workers,
                                                               **kwargs), process_count,
                                  exchange)
    log(f"input: in the training process ({getattr(source, 'decode_threads', '?')} decoding "
        f"threads, resize {resize}; --decode-workers {flag})")
    return TrainIterator(source, **kwargs)


def decode_workers_of(config) -> int:
    """The decoding worker processes per process that ``config`` asks for (``--decode-workers``,
    or its default from this process's cores)."""
    from lsgd_jax.data.workers import default_decode_workers, usable_cores

    workers = config.decode_workers
    return default_decode_workers(usable_cores()) if workers is None else workers


def eval_stream(source: Source, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1, decode_workers: int = 0, log=None):
    """This process's padded evaluation batches (``eval_batches``), decoded by
    ``decode_workers`` worker processes where the source supports them, else in this
    process; the same batches either way. ``close()`` it when done early."""
    kwargs = dict(global_batch_size=global_batch_size, process_index=process_index,
                  process_count=process_count)
    if decode_workers and hasattr(source, "worker_opener"):
        from lsgd_jax.data.workers import WorkerEvalIterator

        try:
            return WorkerEvalIterator(source, decode_workers=decode_workers, **kwargs)
        except ValueError as e:  # no room for its ring: the same batches from threads
            if log is not None:
                log(f"evaluation decoded in this process's threads: {e}")
    return eval_batches(source, **kwargs)


def _started_everywhere(start, process_count: int, exchange: Exchange | None):
    """``start()``, or on every process the ``ValueError`` of the first process whose
    ``start()`` raised one (its /dev/shm share refused): the others would otherwise wait
    for it at the first step."""
    error, started = "", None
    try:
        started = start()
    except ValueError as e:
        error = str(e)
    if process_count > 1:
        error = next((e for e in _needs(exchange, process_count)("decode_workers_started", error)
                      if e), "")
    if error:
        if started is not None:
            started.close()
        raise ValueError(error)
    return started


def class_names(config) -> list[str] | None:
    """The label names of the run's data set: the class folders' names for a data set read
    from its folders (wnids for ImageNet), else its metadata's where it has them (tfds for
    ImageNet, only where tfds and the data set are on this host), else None."""
    if config.data in ("folder", "imagenet"):
        from lsgd_jax.data.folders import has_class_folders, train_classes

        try:
            if config.data == "folder" or has_class_folders(config.data_dir):
                return train_classes(config.data_dir)
        except (OSError, ValueError):  # the folder is not on this host: indices then
            return None
    if config.data == "fashion_mnist":
        from lsgd_jax.data.fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    if config.data == "imagenet":
        try:
            import tensorflow_datasets as tfds

            builder = tfds.builder(config.tfds_name, data_dir=config.data_dir)
            return list(builder.info.features["label"].names)
        except Exception:  # no tfds, or the data set is not on this host: indices then
            return None
    return None


def class_descriptions(config) -> list[str] | None:
    """Human-readable names of the run's classes where a file beside the data gives them
    (``folders.class_descriptions``: Kaggle's ``LOC_synset_mapping.txt`` or a
    ``synset_words.txt``, for a data set read from its folders), else None."""
    if config.data not in ("folder", "imagenet") or not config.data_dir:
        return None
    from lsgd_jax.data.folders import class_descriptions as described
    from lsgd_jax.data.folders import has_class_folders

    if config.data == "imagenet" and not has_class_folders(config.data_dir):
        return None  # tfds: its metadata names the classes by wnid only
    names = class_names(config)  # the class folders' names; None: not on this host
    return described(config.data_dir, names) if names else None


__all__ = [
    "BadDataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Position",
    "SOURCE_NAMES",
    "Source",
    "TrainIterator",
    "class_descriptions",
    "class_names",
    "decode_workers_of",
    "eval_batches",
    "eval_indices",
    "eval_stream",
    "get_source",
    "local_batch_size",
    "num_eval_batches",
    "open_source",
    "shard_indices",
    "steps_per_epoch",
    "train_stream",
]
