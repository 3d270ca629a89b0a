"""``lsgd-jax predict`` (lsgd_jax.artifacts.predict): an exported model on image files, the
same answers as evaluation, any image format, and a warning on images unlike the training
data."""

import os
import tempfile

import jax
import numpy as np
import pytest
from helpers import (
    TRAINED,
    as_flags,
    tampered_model,
    validation_images,
)
from PIL import Image

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import eval_history

TINY = TRAINED
TINY_FLAGS = as_flags(TINY)


# ---------------------------------------------------------------- export, load, predict


def test_predict_agrees_with_evaluation_on_the_same_images(run_dir, model_path, tmp_path):
    """Every validation image, through files: the same top-1 and top-5 errors as the run's
    evaluation, and probabilities equal to the eval step's within 1e-6."""
    from lsgd_jax.artifacts.predict import classify, load_images, make_predict
    from lsgd_jax.training.model_file import load_model

    paths, labels = validation_images(str(tmp_path / "images"))
    model, variables, meta = load_model(model_path)
    results, errors = classify(paths, model, variables, meta, batch_size=16)
    assert not errors and len(results) == 40
    top1 = sum(results[p][0][0] != str(y) for p, y in zip(paths, labels))
    top5 = sum(str(y) not in [name for name, _ in results[p]] for p, y in zip(paths, labels))
    last = eval_history(run_dir)[12]
    assert top1 == round(last["top1_error"] * 40) and top5 == round(last["top5_error"] * 40)
    # The eval transform of a stored image gives back its pixels (PNG, size = model size).
    from lsgd_jax.data import open_source

    source = open_source(TrainConfig(**TINY), "validation")
    images = source.get_batch(np.arange(40), seed=0, epoch=0, train=False)["image"]
    np.testing.assert_array_equal(load_images(paths, meta), images)
    from lsgd_jax.artifacts.readback import restore_run

    state = restore_run(run_dir, log=lambda m: None).state
    from lsgd_jax.engine.step import _normalize

    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         _normalize(images, source.pixel_mean, source.pixel_std, np.float32),
                         train=False)
    np.testing.assert_allclose(make_predict(model, variables, meta)(images),
                               jax.nn.softmax(logits), atol=1e-6)


def test_predict_reads_jpeg_png_cmyk_and_grayscale_and_names_a_non_image(model_path, tmp_path,
                                                                      capsys):
    from lsgd_jax.cli.main import predict_main

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 400, 3), np.uint8))
    files = {"a.jpg": rgb, "b.png": rgb, "c_cmyk.jpg": rgb.convert("CMYK"),
             "d_gray.jpg": rgb.convert("L"), "e_rgba.png": rgb.convert("RGBA"),
             "f_palette.png": rgb.convert("P")}
    paths = []
    for name, image in files.items():
        paths.append(str(tmp_path / name))
        image.save(paths[-1])
    (tmp_path / "notes.txt").write_text("not an image")
    paths.insert(2, str(tmp_path / "notes.txt"))
    status = predict_main(["--model", model_path, *paths])
    captured = capsys.readouterr()
    assert status == 1  # some files were not classified
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == [p for p in paths if "notes" not in p]
    for line in lines:
        assert line.count("%") == 5  # the top 5, with probabilities
    err = [line for line in captured.err.splitlines() if "notes.txt" in line]
    assert len(err) == 1 and "not classified" in err[0]


def test_class_names_come_from_the_tfds_metadata(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from tiny_imagenet import BUILDER, build

    from lsgd_jax.data import class_names

    data_dir = build(str(tmp_path / "tfds"))
    config = TrainConfig(data="imagenet", tfds_name=BUILDER, data_dir=data_dir)
    assert class_names(config) == ["0", "1", "2", "3"]  # ClassLabel(num_classes=4)'s names
    assert class_names(config.replace(tfds_name="no_such_data_set")) is None  # indices then
    assert class_names(TrainConfig(data="synthetic")) is None
    assert class_names(TrainConfig(data="fashion_mnist"))[9] == "Ankle boot"


def test_predict_says_what_the_model_expects_and_warns_once_on_unlike_images(model_path,
                                                                             tmp_path, capsys):
    """A model of Fashion-MNIST (its description says so) given photos: one line of what it
    expects, the answers, and one warning for all the photos that differ a lot."""
    from lsgd_jax.cli.main import predict_main

    fashion = tampered_model(model_path, tmp_path, edit_meta=lambda m: m.update(data="fashion_mnist"))
    photo = np.full((600, 450, 3), 230, np.uint8)  # a dark T-shirt on a light background
    photo[100:500, 80:370] = (30, 30, 60)
    garment = np.zeros((32, 32, 3), np.uint8)  # like the training images: light on black
    garment[6:26, 8:24] = 200
    paths = [str(tmp_path / n) for n in ("photo.jpg", "photo2.png", "garment.png")]
    Image.fromarray(photo).save(paths[0])
    Image.fromarray(photo).save(paths[1])
    Image.fromarray(garment).save(paths[2])
    assert predict_main(["--model", fashion, *paths]) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == paths
    err = captured.err.strip().splitlines()
    assert err[0].startswith("model: resnet8 trained on fashion_mnist images, 32×32 colour "
                             "(RGB), a light garment centred on a black background"), err
    warnings = [line for line in err if line.startswith("warning: ")]
    assert len(warnings) == 1 and len(err) == 2, err
    assert warnings[0].startswith("warning: 2 images of 3 differ a lot from the training images "
                                  f"({paths[0]}: 450×600 pixels, the training images 28×28; on "
                                  "a light background"), warnings[0]
    assert "and 1 more" in warnings[0]
    # Images like the training data: the line of what it expects, and no warning.
    assert predict_main(["--model", fashion, paths[2]]) == 0
    assert "warning" not in capsys.readouterr().err


def test_images_unlike_the_training_data_are_told_apart():
    from lsgd_jax.artifacts.predict import load_image, unlike_training

    meta = dict(model="resnet20", data="fashion_mnist", image_size=28, eval_resize=28,
                channels=1, pixel_mean=[72.94], pixel_std=[90.021])
    with tempfile.TemporaryDirectory() as folder:
        def reasons(array):
            path = os.path.join(folder, "x.png")
            Image.fromarray(array).save(path)
            return unlike_training(path, load_image(path, meta), meta)

        garment = np.zeros((28, 28), np.uint8)
        garment[4:24, 6:22] = 220
        assert reasons(garment) == ""
        assert reasons(np.kron(garment, np.ones((5, 5), np.uint8))) == (
            "140×140 pixels, the training images 28×28")
        assert "light background" in reasons(255 - garment)
        colour = np.zeros((28, 28, 3), np.uint8)
        colour[4:24, 6:22] = (220, 20, 20)
        assert reasons(colour) == "in colour, the training images grayscale"
        assert reasons(np.stack([garment] * 3, axis=-1)) == ""  # gray stored as RGB
        # ImageNet's images come in every size: a large photo is not unlike them.
        imagenet = dict(meta, data="imagenet", image_size=224, eval_resize=256, channels=3)
        path = os.path.join(folder, "big.png")
        Image.fromarray(np.full((1200, 1600, 3), 200, np.uint8)).save(path)
        assert unlike_training(path, load_image(path, imagenet), imagenet) == ""


def test_top_k_names_the_classes_and_their_descriptions_where_known():
    from lsgd_jax.artifacts.predict import top_k

    probs = np.array([[0.1, 0.6, 0.3]])
    assert top_k(probs, {"classes": None}, k=2) == [[("1", 0.6), ("2", 0.3)]]
    meta = {"classes": ["n01440764", "n01443537", "n01484850"],
            "class_descriptions": ["tench, Tinca tinca", "goldfish, Carassius auratus",
                                   "great white shark"]}
    assert [name for name, _ in top_k(probs, meta)[0]] == [
        "n01443537 (goldfish)", "n01484850 (great white shark)", "n01440764 (tench)"]
    # A model with more outputs than named classes (--num-classes): the rest by index.
    wide = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert top_k(wide, meta, k=2)[0][0][0] == "3"
