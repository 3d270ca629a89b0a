"""The data sets by name: ``get_source`` opens one (the one place that names them all).

Each source's module is imported only when it is asked for, so the in-memory sources
work without the ImageNet reader's packages.
"""

from __future__ import annotations

from lsgd_jax.data.source import SOURCE_NAMES, Source


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
