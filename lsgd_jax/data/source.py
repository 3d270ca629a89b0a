"""What the training loop needs from a data set, and the factory that opens one.

A source maps example ids to preprocessed examples. The ids come from the sampler
(Remark 4's global shuffle, ``sampler.py``), so a source never decides the order.

``get_source`` imports TensorFlow and tfds only to open a tfds ImageNet split: the
folder, synthetic and Fashion-MNIST sources (and ``"imagenet"`` read from its folders)
run on hosts without them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

SOURCE_NAMES = ("imagenet", "folder", "fashion_mnist", "synthetic")


def identity(split: str, examples: int, what: str, content: object) -> dict:
    """A split's identity, as a checkpoint records it and the processes compare it.

    ``content`` is what identifies the data (JSON-serialisable, or bytes of a digest);
    ``what`` says in words what the fingerprint covers, for the error that names it.
    """
    import hashlib
    import json

    if not isinstance(content, (bytes, bytearray)):
        content = json.dumps(content, sort_keys=True).encode()
    return {"split": split, "examples": int(examples), "what": what,
            "fingerprint": hashlib.sha256(content).hexdigest()[:16]}


class BadDataError(RuntimeError):
    """More bad examples (undecodable images, unreadable records) than a source's
    ``max_bad_fraction`` allows, or a data file that cannot be read at all."""


@runtime_checkable
class Source(Protocol):
    """A data split with random access.

    Attributes:
      num_examples: number of examples in the split.
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of a preprocessed image.
      pixel_mean, pixel_std: per-channel statistics in the units of the uint8 images
        (0-255); the train/eval steps normalize on device with them.
      identity: the split's example count and fingerprint (:func:`identity`): a
        checkpoint records it, and a resume or a process with other data is refused.
    """

    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    identity: dict

    def get_batch(
        self, ids: np.ndarray, *, seed: int, epoch: int, train: bool
    ) -> dict[str, np.ndarray]:
        """Preprocessed examples ``ids`` in order.

        Returns ``{"image": uint8 (len(ids), H, W, C), "label": int32 (len(ids),)}``.
        With ``train=True`` the augmentation is a function of (seed, epoch, id);
        with ``train=False`` the result depends on the ids only.
        """
        ...

    def close(self) -> None:
        """Releases threads and files."""
        ...


def get_source(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    decode_threads: int | None = None,
    **kwargs,
) -> Source:
    """Opens split ``split`` of data set ``name``.

    Args:
      name: one of ``SOURCE_NAMES``.
      split: ``"train"`` or ``"validation"`` (``"test"`` is accepted for
        Fashion-MNIST and synthetic as a synonym of ``"validation"``).
      data_dir: where the data lies (for ImageNet, a folder whose ``train/`` holds class
        folders, read as files, or a tfds data dir; the folder data set's; the IDX files
        for Fashion-MNIST); ``None`` for the default place.
      image_size: side of the square output image; ``None`` for the data set's
        default (224 for ImageNet and synthetic, 28 for Fashion-MNIST).
      decode_threads: decoding threads of the ImageNet reader (``None``: all cores);
        accepted and unused by the in-memory sources, so a loop can pass it always.
      **kwargs: source-specific options (see ``FolderSource``, ``ImageNetSource``,
        ``FashionMNISTSource``, ``SyntheticSource``).
    """
    if decode_threads is not None and (not isinstance(decode_threads, int) or decode_threads < 1):
        raise ValueError(f"decode_threads must be a positive integer or None, got {decode_threads!r}")
    if name == "synthetic":
        from lsgd_jax.data.synthetic import SyntheticSource

        if data_dir is not None:
            raise ValueError(f"the synthetic source reads no files; got data_dir={data_dir!r}")
        if image_size is not None:
            kwargs["image_size"] = image_size
        return SyntheticSource(split=split, **kwargs)
    if name == "fashion_mnist":
        from lsgd_jax.data.fashion_mnist import FashionMNISTSource

        if image_size not in (None, 28):
            raise ValueError(f"Fashion-MNIST images are 28x28; got image_size={image_size}")
        return FashionMNISTSource(split=split, data_dir=data_dir, **kwargs)
    folder_options = ("imagenet", "index_dir", "relist", "val_labels", "log_fn")
    if name == "folder" or (name == "imagenet" and _has_class_folders(data_dir)):
        from lsgd_jax.data.folders import FolderSource  # plain files: no TensorFlow

        if image_size is not None:
            kwargs["image_size"] = image_size
        kwargs.pop("builder_name", None)
        kwargs["imagenet"] = name == "imagenet"
        if data_dir is None:
            raise ValueError("--data folder needs --data-dir: the folder that holds train/ and "
                             "val/ (or validation/)")
        return FolderSource(split=split, data_dir=data_dir, decode_threads=decode_threads,
                            **kwargs)
    for option in folder_options:
        kwargs.pop(option, None)
    if name == "imagenet":
        from lsgd_jax.data.imagenet import ImageNetSource  # imports TensorFlow and tfds

        if image_size is not None:
            kwargs["image_size"] = image_size
        return ImageNetSource(split=split, data_dir=data_dir, decode_threads=decode_threads, **kwargs)
    raise ValueError(f"unknown data set {name!r}; valid: {', '.join(SOURCE_NAMES)}")


def _has_class_folders(data_dir) -> bool:
    from lsgd_jax.data.folders import has_class_folders

    return has_class_folders(data_dir)
