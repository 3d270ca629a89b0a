"""Classify image files with an exported model (:mod:`lsgd_jax.training.model_file`).

Each file goes through the eval transform of the model's data set
(:func:`lsgd_jax.data.augment.decode_eval`: shorter side to ``meta["eval_resize"]``,
centre crop ``meta["image_size"]``; 256 and 224 for ImageNet, the model's own size
for the small data sets), becomes RGB (CMYK, grayscale, palette and RGBA images
included) or grayscale for a one-channel model, and is normalized on the device with
the model's mean and std, as in evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOP_K = 5

# What the training images of each data set look like: predict says it, and warns when an
# image is far from it. ``side``: the training images' own size (None: they vary);
# ``dark_background``: objects light on black, as Fashion-MNIST's garments.
LOOKS = {
    "fashion_mnist": dict(text="a light garment centred on a black background", side=28,
                          dark_background=True),
    "imagenet": dict(text="photos of many sizes", side=None, dark_background=False),
    "synthetic": dict(text="random noise", side=None, dark_background=False),
}
# An image's shorter side more than this many times the training images', or under their
# side over it, is "far" in size; a grayscale model's image whose channels differ by more
# than COLOUR_LEVELS (of 255) on average is in colour; a dark-background data set's image
# whose border averages more than LIGHT_BORDER is on a light background.
SIZE_FACTOR = 4
COLOUR_LEVELS = 12
LIGHT_BORDER = 96


def expectation(meta: dict) -> str:
    """One line: what the model expects, from its description (``model_file``)."""
    data, size = meta.get("data"), int(meta["image_size"])
    colours = "grayscale" if int(meta["channels"]) == 1 else "colour (RGB)"
    looks = LOOKS.get(data, {}).get("text")
    return (f"model: {meta['model']} trained on {data or 'its data set'} images, "
            f"{size}×{size} {colours}" + (f", {looks}" if looks else "")
            + f"; each file is resized (shorter side to {int(meta['eval_resize'])}), "
            f"centre-cropped to {size}×{size}" + (" and made grayscale" if colours ==
                                                  "grayscale" else "")
            + ". Images unlike the training data get answers that mean little.")


def unlike_training(path: str, image: np.ndarray, meta: dict) -> str:
    """How the file ``path`` (whose eval transform is ``image``) differs a lot from the
    model's training images, in words ("" when it does not)."""
    from PIL import Image

    looks = LOOKS.get(meta.get("data"), {})
    reasons = []
    with Image.open(path) as original:
        width, height = original.size
        side = looks.get("side")
        if side and (min(width, height) > SIZE_FACTOR * side
                     or min(width, height) * SIZE_FACTOR < side):
            reasons.append(f"{width}×{height} pixels, the training images {side}×{side}")
        if int(meta["channels"]) == 1:
            rgb = np.asarray(original.convert("RGB").resize((64, 64)), np.float32)
            spread = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean()
            if spread > COLOUR_LEVELS:
                reasons.append("in colour, the training images grayscale")
    if looks.get("dark_background"):
        border = np.concatenate([image[0].ravel(), image[-1].ravel(), image[:, 0].ravel(),
                                 image[:, -1].ravel()])
        if border.mean() > LIGHT_BORDER:
            reasons.append("on a light background, the training images on black (the model "
                           "sees it with its contrast reversed)")
    return "; ".join(reasons)


def load_image(path: str, meta: dict) -> np.ndarray:
    """uint8 ``(size, size, channels)``: the eval transform of the image file ``path``.

    Raises one of ``lsgd_jax.data.augment.DECODE_ERRORS`` (or OSError) for a file that is
    not an image PIL can decode.
    """
    from lsgd_jax.data.augment import decode_eval

    with open(path, "rb") as f:
        data = f.read()
    image = decode_eval(data, size=int(meta["image_size"]), resize=int(meta["eval_resize"]))
    if meta["channels"] == 1:  # ITU-R 601 luma, as PIL's "L" conversion
        from PIL import Image

        image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    return image


def load_images(paths: Sequence[str], meta: dict) -> np.ndarray:
    """uint8 ``(len(paths), size, size, channels)``; raises on the first unreadable file."""
    return np.stack([load_image(p, meta) for p in paths])


def normalize(images: Any, meta: dict) -> jax.Array:
    """uint8 images -> ``(x − mean) / std`` in float32, the model's input (the same
    arithmetic as the train and eval steps)."""
    from lsgd_jax.engine.step import _normalize

    return _normalize(jnp.asarray(images), tuple(meta["pixel_mean"]), tuple(meta["pixel_std"]),
                      jnp.float32)


def make_predict(model: Any, variables: dict, meta: dict):
    """``fn(uint8 images) -> float32 probabilities (N, classes)``, jitted."""

    @jax.jit
    def probabilities(variables, images):
        logits = model.apply(variables, normalize(images, meta), train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return lambda images: np.asarray(probabilities(variables, images))


def top_k(probabilities: np.ndarray, meta: dict, k: int = TOP_K) -> list[list[tuple[str, float]]]:
    """Per image, the ``k`` most probable classes (names when known, with the first words
    of their description when the model has them: ``n01440764 (tench)``) with
    probabilities; ties go to the lower class index."""
    names = meta.get("classes")
    described = meta.get("class_descriptions")

    def name(i: int) -> str:
        text = names[i] if names and i < len(names) else str(i)  # --num-classes past them
        if described and i < len(described):
            text += f" ({described[i].split(',')[0].strip()})"
        return text

    out = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(name(int(i)), float(row[i])) for i in order])
    return out


def classify(paths: Sequence[str], model: Any, variables: dict, meta: dict, *,
             batch_size: int = 64, unlike: dict[str, str] | None = None,
             ) -> tuple[dict[str, list], dict[str, str]]:
    """Top-5 of every readable file of ``paths``; returns (results by path, errors by path).
    ``unlike``: filled with how each image differs a lot from the training images, where
    it does (:func:`unlike_training`)."""
    from lsgd_jax.data.augment import DECODE_ERRORS

    predict = make_predict(model, variables, meta)
    results, errors, ready = {}, {}, []
    for path in paths:
        try:
            ready.append((path, load_image(path, meta)))
            if unlike is not None and (reason := unlike_training(path, ready[-1][1], meta)):
                unlike[path] = reason
        except DECODE_ERRORS as e:  # OSError covers a missing file and a non-image
            errors[path] = _reason(e)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        probs = predict(np.stack([image for _, image in chunk]))
        for (path, _), best in zip(chunk, top_k(probs, meta)):
            results[path] = best
    return results, errors


def _reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL can identify"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}"
