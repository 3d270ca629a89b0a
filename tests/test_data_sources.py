"""The TensorFlow-free sources: Fashion-MNIST from IDX files and synthetic data."""

import gzip
import os
import sys

import numpy as np
import pytest

from lsgd_jax.data import get_source
from lsgd_jax.data.fashion_mnist import DEFAULT_DIR, PAD, FashionMNISTSource

HAVE_FMNIST = os.path.isfile(os.path.join(DEFAULT_DIR, "t10k-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


def write_idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    """A 12-image IDX data set whose pixels encode (example, row, column)."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (12, 28, 28), dtype=np.uint8)  # no 0: padding is visible
    labels = np.arange(12) % 10
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_fmnist_reads_idx_files_from_data_dir(tiny_fmnist):
    path, images, labels = tiny_fmnist
    src = get_source("fashion_mnist", split="test", data_dir=str(path))
    assert (src.num_examples, src.num_classes, src.image_shape) == (12, 10, (28, 28, 1))
    batch = src.get_batch(np.array([3, 0, 11]), seed=0, epoch=0, train=False)
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][..., 0], images[[3, 0, 11]])
    np.testing.assert_array_equal(batch["label"], labels[[3, 0, 11]])


def candidates(image):
    """Every pad-4 crop and flip of one 28x28 image, computed independently."""
    padded = np.zeros((36, 36), np.uint8)
    padded[PAD:PAD + 28, PAD:PAD + 28] = image
    out = []
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[dy:dy + 28, dx:dx + 28]
            out += [crop, crop[:, ::-1]]
    return out


def test_fmnist_train_augmentation_is_pad_crop_flip_per_example(tiny_fmnist):
    path, images, _ = tiny_fmnist
    src = FashionMNISTSource(split="train", data_dir=str(path))
    ids = np.arange(12)
    a = src.get_batch(ids, seed=3, epoch=1, train=True)["image"][..., 0]
    for i in ids:
        assert any(np.array_equal(a[i], c) for c in candidates(images[i]))
    # A function of (seed, epoch, id): the batch's composition and order do not matter.
    b = src.get_batch(ids[::-1][:5], seed=3, epoch=1, train=True)["image"][..., 0]
    np.testing.assert_array_equal(b, a[ids[::-1][:5]])
    # Other epochs draw other crops (12 images x 162 choices: equal by chance ~never).
    c = src.get_batch(ids, seed=3, epoch=2, train=True)["image"][..., 0]
    assert not np.array_equal(a, c)


@needs_fmnist
def test_fmnist_real_files_and_pixel_statistics():
    test = get_source("fashion_mnist", split="validation")
    assert test.num_examples == 10_000
    train = FashionMNISTSource(split="train")
    assert train.num_examples == 60_000
    pixels = train._images.astype(np.float64)
    # tolerance: the constants are rounded to 3 decimals.
    np.testing.assert_allclose(pixels.mean(), train.pixel_mean[0], atol=1e-3)
    np.testing.assert_allclose(pixels.std(), train.pixel_std[0], atol=1e-3)
    labels = train.get_batch(np.arange(60_000), seed=0, epoch=0, train=False)["label"]
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))


def test_fmnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        get_source("fashion_mnist", split="train", data_dir=str(tmp_path))


def test_fmnist_bad_file_and_arguments(tiny_fmnist):
    path, _, _ = tiny_fmnist
    with gzip.open(path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abcde")
    with pytest.raises(ValueError, match="not an IDX file"):
        FashionMNISTSource(split="train", data_dir=str(path))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        FashionMNISTSource(split="dev", data_dir=str(path))
    src = FashionMNISTSource(split="validation", data_dir=str(path))
    with pytest.raises(IndexError, match=r"\[0, 12\)"):
        src.get_batch(np.array([12]), seed=0, epoch=0, train=False)
    with pytest.raises(ValueError, match="28x28"):
        get_source("fashion_mnist", split="train", data_dir=str(path), image_size=32)


def test_synthetic_defaults_are_imagenet_shaped():
    src = get_source("synthetic", split="train")
    assert (src.num_examples, src.num_classes, src.image_shape) == (1_281_167, 1000, (224, 224, 3))
    assert get_source("synthetic", split="validation").num_examples == 50_000
    batch = src.get_batch(np.array([0, 1_281_166]), seed=0, epoch=0, train=True)
    assert batch["image"].shape == (2, 224, 224, 3) and batch["image"].dtype == np.uint8


def test_synthetic_is_a_function_of_seed_and_id():
    src = get_source("synthetic", split="train", image_size=16, num_classes=7, num_examples=50)
    a = src.get_batch(np.arange(50), seed=0, epoch=0, train=True)
    b = src.get_batch(np.array([9, 3]), seed=5, epoch=4, train=True)
    np.testing.assert_array_equal(b["image"], a["image"][[9, 3]])
    np.testing.assert_array_equal(b["label"], a["label"][[9, 3]])
    assert a["label"].min() >= 0 and a["label"].max() < 7
    assert len(np.unique(a["label"])) > 1 and not np.array_equal(a["image"][0], a["image"][1])
    other = get_source("synthetic", split="train", image_size=16, num_classes=7,
                       num_examples=50, seed=1)
    assert not np.array_equal(other.get_batch(np.arange(3), seed=0, epoch=0, train=True)["image"],
                              a["image"][:3])


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("cifar", {}, "unknown data set 'cifar'"),
        ("synthetic", {"split": "dev"}, "unknown split 'dev'"),
        ("synthetic", {"num_classes": 0}, "num_classes"),
        ("synthetic", {"data_dir": "/x"}, "reads no files"),
        ("fashion_mnist", {"decode_threads": 0}, "decode_threads must be a positive integer"),
    ],
)
def test_bad_source_arguments(name, kwargs, match):
    kwargs = {"split": "train", **kwargs}
    with pytest.raises(ValueError, match=match):
        get_source(name, **kwargs)


def test_small_sources_never_import_tensorflow():
    import subprocess

    code = (
        "import sys, numpy as np; from lsgd_jax.data import get_source, TrainIterator;"
        "s = get_source('synthetic', split='train', image_size=8, num_examples=16);"
        "next(TrainIterator(s, global_batch_size=4, seed=0));"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets', 'grain')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(__file__)))


def test_idx_files_round_trip_and_subsets_are_class_balanced(tmp_path):
    from lsgd_jax.data.fashion_mnist import FILES, read_idx, write_idx, write_subset

    rng = np.random.default_rng(0)
    source = tmp_path / "full"
    source.mkdir()
    for split, n in (("train", 200), ("validation", 50)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(str(source / FILES[split][0]), images)
        write_idx(str(source / FILES[split][1]), labels)
        np.testing.assert_array_equal(read_idx(str(source / FILES[split][0]), 3), images)
    assert not list(source.glob("*.tmp"))
    target = write_subset(str(source), str(tmp_path / "sub"), {"train": 40, "validation": 20})
    for split, size in (("train", 40), ("validation", 20)):
        src = FashionMNISTSource(split=split, data_dir=target)
        assert src.num_examples == size
        labels = src.get_batch(np.arange(size), seed=0, epoch=0, train=False)["label"]
        assert np.bincount(labels, minlength=10).tolist() == [size // 10] * 10
    with pytest.raises(ValueError, match="a train subset of 45 images must be a positive "
                                         "multiple of the 10 classes and at most 200"):
        write_subset(str(source), str(tmp_path / "bad"), {"train": 45})
