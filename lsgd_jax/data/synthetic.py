"""Synthetic ImageNet-shaped data: deterministic in (seed, example id), no files.

For throughput measurements and tests on hosts without the data set (or without
TensorFlow). Image and label of an example are a pure function of ``(seed, id)``, so a
batch is a pure function of the sampler's ids; augmentation is not applied (``epoch``
and ``train`` do not change the result).
"""

from __future__ import annotations

import numpy as np

import lsgd_jax.base.checks as checks
from lsgd_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lsgd_jax.data.source import identity

_SPLIT_SIZES = {"train": 1_281_167, "validation": 50_000}
_SPLIT_STREAM = {"train": 0, "validation": 1}


class SyntheticSource:
    """Uniform random uint8 images and labels (ImageNet's sizes by default)."""

    def __init__(
        self,
        *,
        split: str = "train",
        num_examples: int | None = None,
        num_classes: int = 1000,
        image_size: int = 224,
        channels: int = 3,
        seed: int = 0,
    ):
        if split == "test":
            split = "validation"
        if split not in _SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'validation'")
        for name, value in (("num_classes", num_classes), ("image_size", image_size),
                            ("channels", channels)):
            checks.integer(name, value)
        if num_examples is None:
            num_examples = _SPLIT_SIZES[split]
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split = split
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.image_shape = (image_size, image_size, channels)
        self._seed = seed
        # Generated from these alone: they are its identity.
        self.identity = identity(split, num_examples, "the synthetic set's parameters", {
            "examples": num_examples, "classes": num_classes, "shape": self.image_shape,
            "seed": seed})
        if channels == 3:
            self.pixel_mean, self.pixel_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            self.pixel_mean, self.pixel_std = (127.5,) * channels, (73.9,) * channels

    def _bits(self, i: int) -> np.random.PCG64:
        key = np.random.SeedSequence([self._seed, _SPLIT_STREAM[self.split], int(i)])
        return np.random.PCG64(key)

    def get_batch(self, ids, *, seed: int = 0, epoch: int = 0, train: bool = True):
        """See ``Source.get_batch``; ``seed``, ``epoch`` and ``train`` are unused."""
        del seed, epoch, train  # the data do not change between epochs
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
            raise IndexError(f"example ids must lie in [0, {self.num_examples}), got {ids}")
        image = np.empty((len(ids), *self.image_shape), np.uint8)
        label = np.empty((len(ids),), np.int32)
        num_bytes = int(np.prod(self.image_shape))
        for j, i in enumerate(ids):
            bits = self._bits(i)
            label[j] = np.random.Generator(bits).integers(self.num_classes)
            # Raw 64-bit words viewed as bytes: ~4x faster than integers(0, 256, uint8).
            words = bits.random_raw(-(-num_bytes // 8))
            image[j] = words.view(np.uint8)[:num_bytes].reshape(self.image_shape)
        return {"image": image, "label": label}

    def close(self) -> None:
        pass
