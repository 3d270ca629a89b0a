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
