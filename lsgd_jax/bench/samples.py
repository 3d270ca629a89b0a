"""Generated JPEGs that resemble ImageNet's, for benchmarks and tests (no data set needed).

``photo`` files: 500x375, quality 90, 4:2:0 chroma subsampling, a smooth colour field
plus 8-pixel-block texture and fine noise, so that they are about ImageNet's average
size (~110 KB). ``hard`` files: quality 95 without chroma subsampling (4:4:4), long
side 500 px for 60 % of them and up to 1,000 px for the rest, aspect ratio 4:3 or 3:4,
as the larger ImageNet photos are: more bytes and more pixels to decode per image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

KINDS = ("photo", "hard")


def photo_like_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375,
                    quality: int = 90, subsampling: int = 2) -> bytes:
    """Smooth colour field + mid-frequency texture + fine noise, encoded as JPEG
    (``subsampling``: PIL's 0 = 4:4:4, 2 = 4:2:0)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        f = rng.uniform(0.005, 0.03, 4)
        img[..., c] = 128 + 70 * np.sin(f[0] * x + f[1] * y) * np.cos(f[2] * x - f[3] * y)
    coarse = rng.normal(0, 40, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    img += np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def sample_jpegs(kind: str, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of ``kind`` (``KINDS``), a function of ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    if kind == "photo":
        return [photo_like_jpeg(rng) for _ in range(count)]
    out = []
    for _ in range(count):
        long = 500 if rng.uniform() < 0.6 else int(rng.integers(501, 1001))
        short = long * 3 // 4
        w, h = (long, short) if rng.uniform() < 0.7 else (short, long)
        out.append(photo_like_jpeg(rng, w, h, quality=95, subsampling=0))
    return out
