"""Image preprocessing of Goyal et al. (2017), section 5.1, on the host with PIL.

Train: scale and aspect-ratio augmentation (a random-resized crop covering 8-100 % of
the image area with aspect ratio in [3/4, 4/3]) resized to 224, and a horizontal flip.
Eval: shorter side to 256, center crop 224 (fb.resnet.torch). The output is uint8 RGB;
the per-channel mean/std normalization runs on the device (see ``IMAGENET_MEAN``).

Randomness is a pure function of ``(seed, epoch, example id)`` (a counter-based hash),
so augmentation is reproducible and independent of the number of processes, of the
decoding threads, and of the order in which examples are decoded.

Speed: JPEG decoding is the cost. ``Image.draft`` lets libjpeg decode directly at
1/2, 1/4 or 1/8 scale (in the DCT domain) when the crop, once resized to 224, would
need at most that resolution; the crop window is chosen first from the header size, so
only the needed resolution is decoded. PIL releases the GIL while decoding and
resizing, so threads scale over cores.

The train crop's resize has two implementations (``resizer``): ``"pil"``, PIL's
antialiased bilinear filter on the exact (fractional) crop box, and ``"opencv"``,
OpenCV's 2-tap bilinear ``cv2.resize`` of the crop box rounded to whole pixels of the
decoded image. Both use the same crop box from the same draws and the same decoded
pixels (with ``"opencv"``, OpenCV decodes YCbCr JPEGs at PIL's DCT scale, with the same
libjpeg-turbo result, and PIL the rest); OpenCV's resize takes about a quarter of PIL's
time, and its decode about 15 % less, which makes the train transform about 1.3-1.45x
faster per core. After DCT scaling the remaining downscale is
under 2x, so the 2-tap filter loses little; the pixels differ from PIL's by about 2
levels on average (``tests/test_data_augment.py`` states the tolerance). The eval
transform always uses PIL.
"""

from __future__ import annotations

import importlib.util
import io
import math

import numpy as np
from PIL import Image

# OpenCV (optional, the ``data`` extra: the faster train transform) is imported on first
# use, so that the sources and processes that never use it do not pay for its import.
cv2 = None
_REDUCED: dict = {}


def _cv2():
    global cv2
    if cv2 is None:
        import cv2 as module

        # One thread per call: the decoding threads or worker processes are the parallelism.
        module.setNumThreads(1)
        _REDUCED.update({1: module.IMREAD_COLOR, 2: module.IMREAD_REDUCED_COLOR_2,
                         4: module.IMREAD_REDUCED_COLOR_4, 8: module.IMREAD_REDUCED_COLOR_8})
        cv2 = module
    return cv2

RESIZERS = ("auto", "opencv", "pil")

# Per-channel RGB statistics of ImageNet in 0-255 units (fb.resnet.torch's values x 255).
IMAGENET_MEAN: tuple[float, ...] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, ...] = (58.395, 57.12, 57.375)

AREA_RANGE = (0.08, 1.0)
RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# 4 uniforms per crop attempt (area, log-ratio, x, y), one for the flip, then 4 for
# colour jitter (order, brightness, contrast, saturation) and 6 for PCA lighting (three
# Box-Muller normals). Draws are indexed, so the crop and flip are the same whether or
# not the optional transforms are on.
_FLIP = 4 * CROP_ATTEMPTS
_JITTER = _FLIP + 1
_LIGHTING = _JITTER + 4
NUM_TRAIN_UNIFORMS = _LIGHTING + 6

# fb.resnet.torch's PCA of ImageNet's RGB pixels (in [0, 1] units), used by its
# Lighting(0.1) transform (after Krizhevsky et al. 2012).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])
_GRAY = np.array([0.299, 0.587, 0.114])
_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

# Errors by which PIL reports undecodable data (UnidentifiedImageError is an OSError;
# truncated files raise OSError on load; some corrupt headers raise the others).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_AUGMENT_STREAM = 0xA06_3E47
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective, well-mixing map of uint64 (wraps on overflow)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def example_uniforms(seed: int, epoch: int, ids, count: int) -> np.ndarray:
    """Uniform [0, 1) numbers, shape ``(len(ids), count)``, a function of (seed, epoch, id).

    Counter-based (hash of the key and the draw index) rather than a stateful
    generator, so any example's draws can be computed alone and in any order.
    """
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix64(np.full(ids.shape, seed, dtype=np.uint64) + np.uint64(_AUGMENT_STREAM))
        key = _mix64(key ^ np.uint64(epoch) * _GOLDEN)
        key = _mix64(key ^ ids * _GOLDEN)
        draws = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(key[:, None] + draws[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_box(
    width: int,
    height: int,
    u: np.ndarray,
    *,
    area_range: tuple[float, float] = AREA_RANGE,
    ratio_range: tuple[float, float] = RATIO_RANGE,
) -> tuple[int, int, int, int]:
    """Crop ``(x, y, w, h)`` for scale and aspect-ratio augmentation (section 5.1).

    Tries up to ``CROP_ATTEMPTS`` (area fraction, aspect ratio) pairs, the ratio drawn
    log-uniformly; the first that fits is placed uniformly. If none fits (very elongated
    images), falls back to the largest centered crop whose ratio lies in the range.
    ``u`` holds ``NUM_TRAIN_UNIFORMS`` uniforms (see ``example_uniforms``).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    for k in range(CROP_ATTEMPTS):
        ua, ur, ux, uy = u[4 * k : 4 * k + 4]
        target = area * (area_range[0] + (area_range[1] - area_range[0]) * ua)
        ratio = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x = min(int(ux * (width - w + 1)), width - w)
            y = min(int(uy * (height - h + 1)), height - h)
            return x, y, w, h
    ratio = width / height
    if ratio < ratio_range[0]:
        w, h = width, int(round(width / ratio_range[0]))
    elif ratio > ratio_range[1]:
        w, h = int(round(height * ratio_range[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, *, size: int, resize: int) -> tuple[float, ...]:
    """Crop ``(x, y, w, h)`` equal to "shorter side to ``resize``, center crop ``size``"."""
    side = min(width, height) * size / resize
    return (width - side) / 2, (height - side) / 2, side, side


def resolve_resizer(resizer: str) -> str:
    """``"auto"``: ``"opencv"`` when OpenCV is installed, else ``"pil"``."""
    if resizer not in RESIZERS:
        raise ValueError(f"unknown resizer {resizer!r}; valid: {', '.join(RESIZERS)}")
    installed = cv2 is not None or importlib.util.find_spec("cv2") is not None
    if resizer == "auto":
        return "opencv" if installed else "pil"
    if resizer == "opencv" and not installed:
        raise ValueError("resizer 'opencv' needs OpenCV: pip install opencv-python-headless "
                         "(in the data extra), or use resizer 'pil'")
    return resizer


def _opencv_resize(rgb: np.ndarray, box, size: int) -> np.ndarray:
    """``box`` (in ``rgb``'s pixels, fractional) rounded to whole pixels, resized bilinearly."""
    x, y, w, h = box
    height, width = rgb.shape[:2]
    x0, y0 = min(int(round(x)), width - 1), min(int(round(y)), height - 1)
    x1, y1 = max(int(round(x + w)), x0 + 1), max(int(round(y + h)), y0 + 1)
    cv2 = _cv2()
    return cv2.resize(rgb[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_LINEAR)


def _opencv_decode(data: bytes, img: Image.Image, width: int):
    """``img`` (opened and drafted by PIL, not decoded) decoded by OpenCV at the draft's
    DCT scale, BGR: PIL's pixels, as both call libjpeg-turbo alike, in about 15 % less
    time. ``None`` (decode with PIL) where the two might differ: not a YCbCr JPEG, or a
    file without its end marker (PIL fails on a truncated file; OpenCV would fill it in).
    """
    if img.format != "JPEG" or img.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    cv2 = _cv2()
    flag = _REDUCED.get(round(width / img.size[0]))
    if flag is None:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape != (img.size[1], img.size[0], 3):
        return None
    return bgr


def _crop_resize(img: Image.Image, box, size: int, resizer: str = "pil",
                 data: bytes | None = None) -> np.ndarray:
    """Decodes only the needed resolution of ``img``, crops ``box`` and resizes to size
    (``data``: ``img``'s bytes, which OpenCV may decode instead of PIL)."""
    x, y, w, h = box
    width, height = img.size
    # Smallest uniform scale at which the crop still covers size x size pixels.
    scale = max(size / w, size / h)
    if scale < 1.0 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    sx, sy = img.size[0] / width, img.size[1] / height
    scaled_box = (x * sx, y * sy, w * sx, h * sy)
    if resizer == "opencv" and data is not None:
        bgr = _opencv_decode(data, img, width)
        if bgr is not None:  # resizing acts on each channel alone: reorder after it
            return _opencv_resize(bgr, scaled_box, size)[..., ::-1]
    if img.mode != "RGB":  # CMYK and grayscale JPEGs, PNG (palette, RGBA, ...).
        img = img.convert("RGB")
    if resizer == "opencv":
        return _opencv_resize(np.asarray(img), scaled_box, size)
    out = img.resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(x * sx, y * sy, (x + w) * sx, (y + h) * sy),
    )
    return np.asarray(out, dtype=np.uint8)


def color_jitter(image: np.ndarray, u: np.ndarray, strength: float) -> np.ndarray:
    """fb.resnet.torch's ColorJitter: brightness, contrast, saturation in a random order.

    Each is a blend ``x·α + other·(1 − α)`` with α uniform in [1 − s, 1 + s]: with
    black (brightness), the mean gray level (contrast) and the pixel's gray
    (saturation). ``u``: 4 uniforms (order, then the three α). Float32 in, float32 out.
    """
    alphas = 1.0 + strength * (2.0 * u[1:4] - 1.0)
    for which in _ORDERS[min(int(u[0] * 6), 5)]:
        alpha = np.float32(alphas[which])
        if which == 0:
            image = image * alpha
        else:
            gray = image @ _GRAY.astype(np.float32)
            other = gray.mean() if which == 1 else gray[..., None]
            image = image * alpha + other * (1.0 - alpha)
    return image


def pca_lighting(image: np.ndarray, u: np.ndarray, std: float) -> np.ndarray:
    """fb.resnet.torch's Lighting: add ``eigvec · (α ⊙ eigval)``, α ~ N(0, std²), to every
    pixel (0-255 units). ``u``: 6 uniforms, three Box-Muller normals."""
    u1, u2 = np.maximum(u[0:6:2], 1e-12), u[1:6:2]
    alpha = std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL) * 255.0
    return image + rgb.astype(np.float32)


def decode_train(data: bytes, u: np.ndarray, *, size: int = 224, color_jitter_strength: float = 0.0,
                 lighting_std: float = 0.0, resizer: str = "pil", **crop_kwargs) -> np.ndarray:
    """Encoded image -> uint8 ``(size, size, 3)``: random-resized crop and flip, then the
    optional colour jitter (fb.resnet.torch: 0.4) and PCA lighting (0.1), off by default.
    ``resizer``: ``"pil"`` or ``"opencv"`` (see the module docstring; not ``"auto"``).

    Raises one of ``DECODE_ERRORS`` when the data cannot be decoded.
    """
    img = Image.open(io.BytesIO(data))
    box = random_resized_crop_box(img.size[0], img.size[1], u, **crop_kwargs)
    out = _crop_resize(img, box, size, resizer, data)
    if u[_FLIP] < 0.5:
        out = out[:, ::-1]
    if color_jitter_strength or lighting_std:
        x = out.astype(np.float32)
        if color_jitter_strength:
            x = color_jitter(x, u[_JITTER:_JITTER + 4], color_jitter_strength)
        if lighting_std:
            x = pca_lighting(x, u[_LIGHTING:_LIGHTING + 6], lighting_std)
        # uint8 out, as the pipeline delivers it: rounded and clipped (fb.resnet.torch
        # works on unclipped floats; the difference is confined to saturated pixels).
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def decode_eval(data: bytes, *, size: int = 224, resize: int = 256) -> np.ndarray:
    """Encoded image -> uint8 ``(size, size, 3)``: shorter side to ``resize``, center crop."""
    img = Image.open(io.BytesIO(data))
    box = center_crop_box(img.size[0], img.size[1], size=size, resize=resize)
    return _crop_resize(img, box, size)
