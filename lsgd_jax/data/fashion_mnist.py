"""Fashion-MNIST (28x28x1, 10 classes) read with numpy from the IDX ``.gz`` files.

The small real data set of the project: Debian's ``dataset-fashion-mnist`` package
installs the four files under ``/usr/share/datasets/fashion-mnist``; ``data_dir`` can
point anywhere else holding the same file names. No TensorFlow is needed.

Train augmentation (standard for 28-32 pixel images, small on purpose): pad 4 pixels
with zeros (the background value), take a random 28x28 crop, flip horizontally with
probability 1/2. Its randomness is a function of (seed, epoch, example id)
(``augment.example_uniforms``). Eval: the image as is. Images stay uint8; the device
normalizes with ``pixel_mean``/``pixel_std`` (the training set's statistics).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

from lsgd_jax.data.augment import example_uniforms
from lsgd_jax.data.source import identity

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean and standard deviation of all training pixels, 0-255 units (checked by a test).
PIXEL_MEAN: tuple[float, ...] = (72.940,)
PIXEL_STD: tuple[float, ...] = (90.021,)
PAD = 4
# The labels 0-9 (the data set's documentation).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, atomically (a half-written file never
    has the final name). Format: magic 0x0000 08 ndim, big-endian dims, then the bytes."""
    array = np.asarray(array)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path + ".tmp", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    os.replace(path + ".tmp", path)


def write_subset(source_dir: str, target_dir: str, sizes: dict[str, int], *,
                 seed: int = 0) -> str:
    """Class-balanced subsets of the splits in ``source_dir``, written as IDX files in
    ``target_dir`` (once: existing files are kept). ``sizes``: images per split, each a
    multiple of the 10 classes. Returns ``target_dir``, readable with ``data_dir=``."""
    names = [n for split in sizes for n in FILES[split]]
    if all(os.path.exists(os.path.join(target_dir, n)) for n in names):
        return target_dir
    os.makedirs(target_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, size in sizes.items():
        image_file, label_file = FILES[split]
        images = read_idx(os.path.join(source_dir, image_file), 3)
        labels = read_idx(os.path.join(source_dir, label_file), 1)
        if size % 10 or not 0 < size <= len(labels):
            raise ValueError(f"a {split} subset of {size} images must be a positive multiple "
                             f"of the 10 classes and at most {len(labels)}")
        ids = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:size // 10]
                                      for c in range(10)]))
        write_idx(os.path.join(target_dir, image_file), images[ids])
        write_idx(os.path.join(target_dir, label_file), labels[ids])
    return target_dir


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads an IDX file (big-endian header: magic 0x0000 08 ndim, then the dims)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A cut-short download or a file that is not gzip: name it, say what to do.
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {e}); reinstall dataset-fashion-mnist "
            "or point --data-dir at intact copies of the four IDX .gz files") from None
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 | ndim:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions "
            f"(magic {magic:#010x}, expected {0x0800 | ndim:#010x})"
        )
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, got {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


class FashionMNISTSource:
    """One split of Fashion-MNIST in memory (47 MB for the training split)."""

    num_classes = 10
    image_shape = (28, 28, 1)
    pixel_mean = PIXEL_MEAN
    pixel_std = PIXEL_STD

    def __init__(self, *, split: str = "train", data_dir: str | None = None):
        if split == "test":
            split = "validation"
        if split not in FILES:
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'validation' (or 'test')")
        data_dir = DEFAULT_DIR if data_dir is None else os.fspath(data_dir)
        paths = [os.path.join(data_dir, name) for name in FILES[split]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                f"`sudo apt-get install dataset-fashion-mnist` (files go to {DEFAULT_DIR}), "
                "or pass --data-dir pointing to a folder with "
                f"{', '.join(sum(FILES.values(), ()))}."
            )
        images = read_idx(paths[0], 3)
        labels = read_idx(paths[1], 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"{paths[0]} / {paths[1]}: expected N 28x28 images and N labels, got "
                f"images {images.shape} and labels {labels.shape}"
            )
        self.split = split
        self.num_examples = len(labels)
        self._images = images[..., None]
        self._labels = labels.astype(np.int32)
        # The decoded pixels and labels: a moved or recompressed copy is the same data.
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        digest.update(np.ascontiguousarray(labels).tobytes())
        self.identity = identity(split, self.num_examples, "SHA-256 of the decoded images "
                                 "and labels", digest.digest())

    def get_batch(self, ids, *, seed: int, epoch: int, train: bool):
        """See ``Source.get_batch``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
            raise IndexError(f"example ids must lie in [0, {self.num_examples}), got {ids}")
        images = self._images[ids]
        if train:
            images = _pad_crop_flip(images, example_uniforms(seed, epoch, ids, 3))
        return {"image": np.ascontiguousarray(images), "label": self._labels[ids]}

    def close(self) -> None:
        pass


def _pad_crop_flip(images: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Zero-pad by PAD, crop back to the original size at a random offset, random flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    dy = np.minimum((u[:, 0] * (2 * PAD + 1)).astype(np.int64), 2 * PAD)
    dx = np.minimum((u[:, 1] * (2 * PAD + 1)).astype(np.int64), 2 * PAD)
    flip = u[:, 2] < 0.5
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
