"""Section 5.1 preprocessing on the host: crop sampling, draft decoding, eval crop."""

import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lsgd_jax.data.augment import (
    CROP_ATTEMPTS,
    NUM_TRAIN_UNIFORMS,
    center_crop_box,
    decode_eval,
    decode_train,
    example_uniforms,
    random_resized_crop_box,
)


def smooth_image(width, height, seed=0):
    """A smooth RGB image (like a photo: low frequencies), so resampling errors are small."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(0.004, 0.015, 3)
        chans.append(127 + 120 * np.sin(a * x + b * y + c * x * y / max(width, height)))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def jpeg_bytes(array, quality=95, mode=None):
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_uniforms_are_a_function_of_seed_epoch_id():
    ids = np.arange(2000)
    u = example_uniforms(1, 2, ids, 5)
    assert u.shape == (2000, 5) and u.min() >= 0 and u.max() < 1
    # tolerance: mean of 10,000 uniforms, 5 standard errors ~ 0.015.
    assert abs(u.mean() - 0.5) < 0.015
    np.testing.assert_array_equal(example_uniforms(1, 2, ids[[7, 3]], 5), u[[7, 3]])
    assert not np.any(example_uniforms(1, 3, ids, 5) == u)
    assert not np.any(example_uniforms(2, 2, ids, 5) == u)


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 2000), st.integers(8, 2000), st.integers(0, 2**31))
def test_random_resized_crop_box_respects_area_and_ratio(width, height, seed):
    u = example_uniforms(seed, 0, [0], NUM_TRAIN_UNIFORMS)[0]
    x, y, w, h = random_resized_crop_box(width, height, u)
    assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= width and y + h <= height
    fallback = True
    for k in range(CROP_ATTEMPTS):  # independently recompute the first accepted attempt
        area = width * height * (0.08 + 0.92 * u[4 * k])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[4 * k + 1])
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= width and 0 < ch <= height:
            assert (w, h) == (cw, ch)
            fallback = False
            break
    if fallback:  # centered crop with the ratio clamped into [3/4, 4/3]
        assert (x, y) == ((width - w) // 2, (height - h) // 2)
        assert w == width or h == height


def reference_crop_resize(array, box, size):
    """Full-resolution decode, crop and bilinear resize: what the draft path approximates."""
    x, y, w, h = box
    return np.asarray(Image.fromarray(array).resize(
        (size, size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h)), np.float64)


@pytest.mark.parametrize("seed", range(6))
def test_train_decode_matches_full_resolution_reference(seed):
    array = smooth_image(500, 375, seed)
    data = jpeg_bytes(array, quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    u = example_uniforms(seed, 0, [seed], NUM_TRAIN_UNIFORMS)[0]
    out = decode_train(data, u, size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    ref = reference_crop_resize(decoded, random_resized_crop_box(500, 375, u), 64)
    if u[4 * CROP_ATTEMPTS] < 0.5:
        ref = ref[:, ::-1]
    # tolerance: DCT-domain downscaling vs full decode + bilinear, smooth image, 0-255 units.
    assert np.abs(out - ref).mean() < 1.5


def test_eval_decode_is_resize_256_center_crop_224():
    array = smooth_image(500, 375, 9)
    data = jpeg_bytes(array, quality=95)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    resized = decoded.resize((round(500 * 256 / 375), 256), Image.Resampling.BILINEAR)
    left = (resized.size[0] - 224) // 2
    ref = np.asarray(resized, np.float64)[16:240, left:left + 224]
    out = decode_eval(data)
    assert out.shape == (224, 224, 3)
    # tolerance: half-pixel crop placement and resampling differences, 0-255 units.
    assert np.abs(out - ref).mean() < 2.0
    assert center_crop_box(500, 375, size=224, resize=256) == pytest.approx(
        ((500 - 328.125) / 2, (375 - 328.125) / 2, 328.125, 328.125))


@pytest.mark.parametrize("kind", ["cmyk", "png", "gray", "rgba_png"])
def test_other_encodings_decode_to_rgb(kind):
    array = smooth_image(96, 80, 3)
    buf = io.BytesIO()
    if kind == "cmyk":
        data = jpeg_bytes(array, mode="CMYK")
    elif kind == "gray":
        data = jpeg_bytes(array, mode="L")
    else:
        Image.fromarray(array).convert("RGBA" if kind == "rgba_png" else "RGB").save(buf, "PNG")
        data = buf.getvalue()
    u = example_uniforms(0, 0, [1], NUM_TRAIN_UNIFORMS)[0]
    out = decode_train(data, u, size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    ev = decode_eval(data, size=32, resize=40)
    expected = np.asarray(Image.fromarray(array).convert("L" if kind == "gray" else "RGB")
                          .convert("RGB").resize((48, 40), Image.Resampling.BILINEAR),
                          np.float64)[4:36, 8:40]
    # tolerance: JPEG (CMYK/gray) or lossless (PNG) round trip plus resampling.
    assert np.abs(ev - expected).mean() < 6.0


@pytest.mark.parametrize("data", [b"", b"not an image at all", jpeg_bytes(smooth_image(64, 48))[:300]])
def test_undecodable_data_raises_decode_errors(data):
    from lsgd_jax.data.augment import DECODE_ERRORS

    with pytest.raises(DECODE_ERRORS):
        decode_train(data, np.full(NUM_TRAIN_UNIFORMS, 0.5), size=16)


def test_color_jitter_blends_as_fb_resnet_torch():
    from lsgd_jax.data.augment import color_jitter

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 5, 3)).astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    # u = (order, brightness, contrast, saturation); 0.5 gives α = 1 (no change).
    np.testing.assert_allclose(color_jitter(x, np.array([0.0, 1.0, 0.5, 0.5]), 0.4), 1.4 * x,
                               rtol=1e-6)
    np.testing.assert_allclose(color_jitter(x, np.array([0.0, 0.5, 0.0, 0.5]), 0.4),
                               0.6 * x + 0.4 * gray.mean(), rtol=1e-5)
    np.testing.assert_allclose(color_jitter(x, np.array([0.0, 0.5, 0.5, 1.0]), 0.4),
                               1.4 * x - 0.4 * gray[..., None], rtol=1e-5, atol=1e-3)
    # Order matters: brightness then saturation = saturation then brightness (both linear
    # in x), but contrast then brightness differs from brightness then contrast only by
    # the blend's offset, which brightness scales: checked through the first and last order.
    u = np.array([0.0, 1.0, 0.0, 0.5])      # brightness (α 1.4), then contrast (α 0.6)
    first = color_jitter(x, u, 0.4)
    np.testing.assert_allclose(first, 0.6 * (1.4 * x) + 0.4 * (1.4 * gray.mean()), rtol=1e-5)
    u[0] = 0.99                              # order (2, 1, 0): saturation, contrast, brightness
    last = color_jitter(x, u, 0.4)
    np.testing.assert_allclose(last, 1.4 * (0.6 * x + 0.4 * gray.mean()), rtol=1e-5)


def test_pca_lighting_adds_the_eigenvector_combination():
    from lsgd_jax.data.augment import PCA_EIGVAL, PCA_EIGVEC, pca_lighting

    x = np.full((2, 2, 3), 100.0, np.float32)
    # Box-Muller with u1 = e^-0.5, u2 = 0 gives the normal 1, so α = std on every axis.
    u = np.array([math.exp(-0.5), 0.0] * 3)
    shift = PCA_EIGVEC @ (0.1 * PCA_EIGVAL) * 255
    np.testing.assert_allclose(pca_lighting(x, u, 0.1), x + shift.astype(np.float32), rtol=1e-6)
    # Over many examples the shift has mean 0 and the per-axis std of the paper's 0.1.
    draws = example_uniforms(0, 0, np.arange(4000), 6)
    shifts = np.stack([pca_lighting(np.zeros((1, 1, 3), np.float32), d, 0.1)[0, 0]
                       for d in draws])
    alphas = np.linalg.solve(PCA_EIGVEC, shifts.T / 255).T / PCA_EIGVAL
    # tolerance: 4000 samples, standard error of the std ~1.1 %, of the mean ~0.0016.
    np.testing.assert_allclose(alphas.std(axis=0), 0.1, rtol=0.05)
    np.testing.assert_allclose(alphas.mean(axis=0), 0.0, atol=0.01)


def test_jitter_and_lighting_are_off_by_default_and_keep_the_crop():
    # Mid-range pixels, so that no jitter saturates the crop.
    data = jpeg_bytes((smooth_image(120, 90) * 0.4 + 60).astype(np.uint8))
    u = example_uniforms(3, 1, [7], NUM_TRAIN_UNIFORMS)[0]
    plain = decode_train(data, u, size=32)
    np.testing.assert_array_equal(decode_train(data, u, size=32, color_jitter_strength=0.0,
                                               lighting_std=0.0), plain)
    both = decode_train(data, u, size=32, color_jitter_strength=0.4, lighting_std=0.1)
    assert both.dtype == np.uint8 and not np.array_equal(both, plain)
    # The same crop and flip, then jitter, then lighting, rounded and clipped to uint8.
    from lsgd_jax.data.augment import color_jitter, pca_lighting

    x = color_jitter(plain.astype(np.float32), u[4 * CROP_ATTEMPTS + 1:4 * CROP_ATTEMPTS + 5],
                     0.4)
    x = pca_lighting(x, u[4 * CROP_ATTEMPTS + 5:4 * CROP_ATTEMPTS + 11], 0.1)
    np.testing.assert_array_equal(both, np.clip(np.rint(x), 0, 255).astype(np.uint8))


def test_jitter_and_lighting_settings_are_checked():
    from lsgd_jax.training.config import TrainConfig

    with pytest.raises(ValueError, match="--color-jitter must be a number in \\[0, 1\\).*got 1.5"):
        TrainConfig(color_jitter=1.5)
    with pytest.raises(ValueError, match="--lighting must be a number in \\[0, 1\\).*got -0.1"):
        TrainConfig(lighting=-0.1)


# ------------------------------------------------------------------ the OpenCV resize
cv2 = pytest.importorskip("cv2")


def gradient(width, height):
    """R rises 1 level per pixel along x, G along y (mod 256 would break the linearity:
    the images are at most 256 px)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 / (width - 1), y * 255 / (height - 1),
                     np.full(x.shape, 128)], -1).round().astype(np.uint8)


@settings(max_examples=40, deadline=None)
@given(st.integers(64, 256), st.integers(64, 256), st.integers(0, 2**31 - 1))
def test_opencv_resize_takes_the_same_crop_box_from_the_same_draws(width, height, seed):
    buf = io.BytesIO()
    Image.fromarray(gradient(width, height)).save(buf, "PNG")  # lossless
    u = example_uniforms(seed, 0, [0], NUM_TRAIN_UNIFORMS)[0]
    pil = decode_train(buf.getvalue(), u, size=32, resizer="pil").astype(np.float64)
    fast = decode_train(buf.getvalue(), u, size=32, resizer="opencv").astype(np.float64)
    # On a linear ramp both filters return the ramp over the crop box: the mean of R (G)
    # is the box's centre in x (y). Tolerance: the box rounded to whole pixels moves each
    # edge by <= 1/2 px, i.e. <= 255/(side-1)/2 <= 2 levels, plus 0.5 of rounding.
    for c, side in ((0, width), (1, height)):
        assert abs(pil[..., c].mean() - fast[..., c].mean()) <= 255 / (side - 1) / 2 + 0.5
    # ... and the same flip: R increases in the same direction.
    assert np.sign(np.diff(pil[..., 0].mean(0)).sum()) == np.sign(np.diff(fast[..., 0].mean(0)).sum())


@pytest.mark.parametrize("kind, mean, p99", [("smooth", 0.5, 2), ("photo", 2.5, 16),
                                              ("hard", 4.0, 26)])
def test_opencv_resize_on_dct_scaled_jpegs_stays_within_tolerance_of_pil(kind, mean, p99):
    from lsgd_jax.bench.samples import sample_jpegs

    if kind == "smooth":
        blobs = [jpeg_bytes(smooth_image(500, 375, s), quality=95) for s in range(8)]
    else:
        blobs = sample_jpegs(kind, 8, seed=3)
    us = example_uniforms(1, 0, np.arange(len(blobs)), NUM_TRAIN_UNIFORMS)
    d = np.concatenate([
        np.abs(decode_train(data, u, resizer="pil").astype(np.int16)
               - decode_train(data, u, resizer="opencv").astype(np.int16)).ravel()
        for data, u in zip(blobs, us)])
    # Stated tolerance, 0-255 units: the mean and the 99th percentile of |pil - opencv|.
    # The generated photo-like files carry strong pixel noise (the worst case for a
    # 2-tap filter against PIL's antialiased one); measured: smooth 0.2 / 1, photo
    # 2.0 / 13, hard (q95, 4:4:4, up to 1,000 px) 3.3 / 21. A different crop box or a
    # missing flip gives a mean of tens of levels.
    assert d.mean() <= mean and np.percentile(d, 99) <= p99


def test_eval_transform_is_pil_whatever_the_resizer():
    from lsgd_jax.bench.samples import sample_jpegs
    from lsgd_jax.data.imagenet import ImageNetSource

    data = sample_jpegs("photo", 1, seed=4)[0]  # 500x375: the eval crop needs no DCT scaling
    side = 375 * 224 / 256
    box = ((500 - side) / 2, (375 - side) / 2, (500 + side) / 2, (375 + side) / 2)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (224, 224), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_array_equal(decode_eval(data), expected)
    source = ImageNetSource.__new__(ImageNetSource)  # the decode path only, no data set
    source.image_shape, source._eval_resize = (224, 224, 3), 256
    for resizer in ("opencv", "pil"):
        source._crop_kwargs = {"resizer": resizer}
        np.testing.assert_array_equal(source._decode(data, None), expected)


def test_resizer_names_are_checked():
    from lsgd_jax.data.augment import resolve_resizer

    assert resolve_resizer("auto") == "opencv" and resolve_resizer("pil") == "pil"
    with pytest.raises(ValueError, match="unknown resizer 'cubic'; valid: auto, opencv, pil"):
        resolve_resizer("cubic")


def test_opencv_decodes_jpegs_to_pils_pixels_and_leaves_the_rest_to_pil():
    from lsgd_jax.bench.samples import sample_jpegs
    from lsgd_jax.data import augment
    from lsgd_jax.data.augment import DECODE_ERRORS, _crop_resize

    rotated = io.BytesIO()  # EXIF orientation 6: OpenCV would rotate it unless told not to
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth_image(300, 200, 1)).save(rotated, "JPEG", quality=90, exif=exif)
    blobs = sample_jpegs("photo", 6, seed=7) + sample_jpegs("hard", 6, seed=7) + [
        rotated.getvalue(), jpeg_bytes(smooth_image(300, 200, 2), mode="L"),
        jpeg_bytes(smooth_image(300, 200, 3), mode="CMYK")]
    us = example_uniforms(2, 1, np.arange(len(blobs)), NUM_TRAIN_UNIFORMS)
    used = []
    original = augment._opencv_decode

    def spy(*args):
        used.append(original(*args) is not None)
        return original(*args)

    augment._opencv_decode = spy
    try:
        for data, u in zip(blobs, us):
            img = Image.open(io.BytesIO(data))
            box = random_resized_crop_box(img.size[0], img.size[1], u)
            by_pil = _crop_resize(img, box, 64, "opencv")  # no bytes: PIL decodes
            by_opencv = _crop_resize(Image.open(io.BytesIO(data)), box, 64, "opencv", data)
            np.testing.assert_array_equal(by_opencv, by_pil)  # exact: the same libjpeg-turbo
    finally:
        augment._opencv_decode = original
    assert used == [True] * 13 + [False, False]  # grayscale and CMYK go to PIL
    truncated = blobs[0][: len(blobs[0]) * 2 // 3]
    with pytest.raises(DECODE_ERRORS):
        decode_train(truncated, us[0], resizer="opencv")


def test_without_opencv_auto_falls_back_to_pil(monkeypatch):
    import importlib.util

    from lsgd_jax.data import augment

    real = importlib.util.find_spec
    monkeypatch.setattr(augment, "cv2", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cv2" else real(name, *a))
    assert augment.resolve_resizer("auto") == "pil"
    with pytest.raises(ValueError, match="resizer 'opencv' needs OpenCV: pip install "
                                         "opencv-python-headless"):
        augment.resolve_resizer("opencv")
