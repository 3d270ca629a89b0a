"""After training: evaluate a checkpoint, export the model, predict on images, start from it.

One small run (ResNet-8, 10 synthetic classes, 12 steps on 8 fake CPU devices) serves
every test; tests that damage files work on copies of its workdir.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from helpers import small_tmpfs
from PIL import Image

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import eval_history, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(data="synthetic", model="resnet8", image_size=32, batch_size=32, bn_group_size=4,
            synthetic_examples=128, synthetic_eval_examples=40, eval_batch_size=16,
            dtype="float32", epochs=3, warmup_epochs=1, decay_epochs=(2,), log_every_steps=4,
            num_classes=10)
TINY_FLAGS = ["--data", "synthetic", "--model", "resnet8", "--image-size", "32",
              "--batch-size", "32", "--bn-group-size", "4", "--synthetic-examples", "128",
              "--synthetic-eval-examples", "40", "--eval-batch-size", "16", "--dtype", "float32",
              "--warmup-epochs", "1", "--decay-epochs", "2", "--num-classes", "10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lsgd_jax.training.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(TrainConfig(**TINY), workdir, log=lambda msg: None)
    return workdir


@pytest.fixture(scope="module")
def model_path(run_dir, tmp_path_factory):
    from lsgd_jax.cli.main import export_main

    out = str(tmp_path_factory.mktemp("model") / "model.msgpack")
    assert export_main(["--workdir", run_dir, "--out", out]) == 0
    return out


def _tree_snapshot(path):
    """Every file and folder under ``path`` with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _script(name, *args, timeout=180):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _validation_images(folder, count=40):
    """The synthetic validation images as PNG files (lossless), with their labels."""
    from lsgd_jax.data import open_source

    source = open_source(TrainConfig(**TINY), "validation")
    batch = source.get_batch(np.arange(count), seed=0, epoch=0, train=False)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(batch["image"]):
        paths.append(os.path.join(folder, f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths, batch["label"]


# ---------------------------------------------------------------- evaluate
def test_evaluate_gives_the_runs_last_top1_exactly_and_changes_nothing(run_dir, capsys):
    from lsgd_jax.cli.main import evaluate_main

    last = list(eval_history(run_dir).values())[-1]
    result_before = read_metrics(run_dir, "result")
    before = _tree_snapshot(os.path.join(run_dir, "checkpoints"))
    # Another eval batch size (24: the last batch is padded), the same images scored once.
    assert evaluate_main(["--workdir", run_dir, "--eval-batch-size", "24"]) == 0
    out = capsys.readouterr().out
    record = read_metrics(run_dir, "eval")[-1]
    assert record["source"] == "evaluate" and record["step"] == 12 == last["step"]
    assert record["top1_error"] == last["top1_error"]  # exactly
    assert record["top5_error"] == last["top5_error"] and record["count"] == 40
    assert record["eval_batch_size"] == 24 and record["epoch"] == 3.0
    assert f"top-1 error {100 * last['top1_error']:.2f}%" in out
    assert _tree_snapshot(os.path.join(run_dir, "checkpoints")) == before
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    # The run's own history (and so its result) does not count the read-back.
    assert list(eval_history(run_dir).values())[-1] == last
    assert read_metrics(run_dir, "result") == result_before


def test_evaluate_on_another_device_count_and_an_older_step(run_dir):
    history = eval_history(run_dir)
    result = _script("evaluate.py", "--workdir", run_dir, "--step", "8", "--cpu-devices", "2",
                     "--eval-batch-size", "6", "--no-record")
    assert result.returncode == 0, result.stderr
    assert f"top-1 error {100 * history[8]['top1_error']:.2f}%" in result.stdout
    assert f"top-5 error {100 * history[8]['top5_error']:.2f}%" in result.stdout
    assert "on 2 devices" in result.stdout


def test_a_read_back_record_does_not_replace_the_runs_evaluation(tmp_path):
    from lsgd_jax.training.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write("eval", 12, top1_error=0.5)
    writer.write("eval", 12, top1_error=0.25, source="evaluate")
    assert eval_history(str(tmp_path))[12]["top1_error"] == 0.5


def _copy(run_dir, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(run_dir, target)
    return target


def test_evaluate_bad_input_is_one_line_and_status_2(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _script("evaluate.py", "--workdir", str(empty))
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert str(empty / "checkpoints") in line and "holds no checkpoint" in line
    result = _script("evaluate.py", "--workdir", run_dir, "--step", "5")
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert os.path.join(run_dir, "checkpoints", "5") in line and "[4, 8, 12]" in line
    result = _script("evaluate.py", "--workdir", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "does not exist" in _error_line(result.stderr)


def test_a_failed_multi_host_launch_is_one_line_and_status_2(tmp_path, capsys):
    """evaluate and export start their processes under main_guard, as training does."""
    from lsgd_jax.cli.main import evaluate_main, export_main

    launch = ["--num-processes", "2", "--process-id", "1"]  # no --coordinator-address
    for main, extra in ((evaluate_main, []), (export_main, ["--out", str(tmp_path / "m")])):
        assert main(["--workdir", str(tmp_path), *extra, *launch]) == 2
        line = _error_line(capsys.readouterr().err)
        assert "coordinator_address=None" in line and "num_processes=2" in line, line


def test_a_damaged_checkpoint_is_refused_or_skipped_and_never_moved(run_dir, tmp_path):
    from lsgd_jax.cli.main import evaluate_main

    work = _copy(run_dir, tmp_path)
    ckpts = os.path.join(work, "checkpoints")
    # The saved hash no longer matches the state: the SHA-256 check must catch it.
    meta_path = os.path.join(ckpts, "12", "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["state_sha256"] = "0" * 64
    json.dump(meta, open(meta_path, "w"))
    # A save in progress of a run using the workdir (orbax's temporary name).
    in_progress = os.path.join(ckpts, "13.orbax-checkpoint-tmp-1")
    os.makedirs(os.path.join(in_progress, "state"))
    before = _tree_snapshot(ckpts)
    result = _script("evaluate.py", "--workdir", work, "--step", "12", "--no-record")
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert "step 12 is damaged" in line and "SHA-256" in line and "nothing was changed" in line
    # Without --step: a warning names the damaged one, the previous one is evaluated.
    assert evaluate_main(["--workdir", work, "--no-record"]) == 0 or pytest.fail()
    assert _tree_snapshot(ckpts) == before  # nothing moved, the save in progress untouched
    # A missing file of the state.
    os.remove(os.path.join(ckpts, "8", "state", "manifest.ocdbt"))
    result = _script("evaluate.py", "--workdir", work, "--step", "8", "--no-record")
    assert result.returncode == 2
    assert os.path.join(ckpts, "8", "state", "manifest.ocdbt") in _error_line(result.stderr)


def test_evaluate_falls_back_to_the_previous_verified_checkpoint(run_dir, tmp_path, capsys):
    from lsgd_jax.artifacts.readback import restore_run

    work = _copy(run_dir, tmp_path)
    meta_path = os.path.join(work, "checkpoints", "12", "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["state_sha256"] = "f" * 64
    json.dump(meta, open(meta_path, "w"))
    logged = []
    restored = restore_run(work, log=logged.append)
    assert restored.step == 8
    assert len(logged) == 1 and "step 12 is damaged" in logged[0]
    assert os.path.isdir(os.path.join(work, "checkpoints", "12"))


def test_evaluate_reads_a_workdir_in_use_without_its_lock_or_disturbing_it(run_dir, tmp_path):
    """A run of 24 steps, a checkpoint every step; evaluation while it trains. Its first 12
    steps are those of the finished run (same seed and schedule), so its checkpoint at
    step 12 must have the same SHA-256."""
    from lsgd_jax.cli.main import evaluate_main

    work = str(tmp_path / "live")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments", "imagenet_resnet50.py"),
         "--workdir", work, *TINY_FLAGS, "--epochs", "6", "--checkpoint-every-steps", "1",
         "--log-every-steps", "1", "--cpu-devices", "8"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not any(r["kind"] == "checkpoint" for r in read_metrics(work)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the run saved no checkpoint in time"
            time.sleep(0.1)
        lock = json.load(open(os.path.join(work, ".lock")))
        assert evaluate_main(["--workdir", work]) == 0
        # Still the run's lock, and the run was still going when the evaluation ended.
        assert json.load(open(os.path.join(work, ".lock")))["pid"] == lock["pid"] == proc.pid
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert not [n for n in os.listdir(os.path.join(work, "checkpoints")) if "corrupt" in n]
    live = {r["step"]: r["state_sha256"] for r in read_metrics(work, "checkpoint")}
    done = {r["step"]: r["state_sha256"] for r in read_metrics(run_dir, "checkpoint")}
    assert live[12] == done[12] and max(live) == 24
    assert read_metrics(work, "result")[-1]["step"] == 24
    assert [r for r in read_metrics(work, "eval") if r.get("source") == "evaluate"]


def test_a_lars_run_is_read_back_with_the_lars_state(tmp_path):
    """evaluate and export restore onto the run's own optimizer's state (--optimizer):
    LARS's tree differs from goyal_sgd's, so a goyal_sgd target cannot stand in."""
    from lsgd_jax.artifacts.readback import evaluate_run, restore_run
    from lsgd_jax.cli.main import export_main
    from lsgd_jax.rules.lars import lars
    from lsgd_jax.rules.optim import goyal_sgd
    from lsgd_jax.training.loop import train_and_evaluate

    workdir = str(tmp_path / "lars")
    train_and_evaluate(TrainConfig(**TINY | dict(optimizer="lars", epochs=1, decay_epochs=())),
                       workdir, log=lambda msg: None)
    restored = restore_run(workdir, log=lambda msg: None)
    assert restored.step == 4 and restored.config.optimizer == "lars"
    want = jax.tree.structure(lars(0.0).init(restored.state.params))
    assert jax.tree.structure(restored.state.opt_state) == want
    assert want != jax.tree.structure(goyal_sgd(0.0).init(restored.state.params))
    result = evaluate_run(restored)
    assert result["top1_error"] == eval_history(workdir)[4]["top1_error"]
    assert export_main(["--workdir", workdir, "--out", str(tmp_path / "lars.msgpack")]) == 0


# ---------------------------------------------------------------- export, load, predict
def test_export_writes_the_weights_and_their_description(run_dir, model_path):
    from lsgd_jax.artifacts.readback import restore_run
    from lsgd_jax.training.model_file import load_model

    meta = json.load(open(os.path.join(os.path.dirname(model_path), "model.json")))
    result = read_metrics(run_dir, "result")[-1]
    last_checkpoint = read_metrics(run_dir, "checkpoint")[-1]
    assert meta["model"] == "resnet8" and meta["num_classes"] == 10 and meta["step"] == 12
    assert meta["image_size"] == 32 and meta["eval_resize"] == 32 and meta["channels"] == 3
    assert meta["result"]["median_top1_error"] == result["median_top1_error"]
    assert meta["state_sha256"] == last_checkpoint["state_sha256"]
    assert meta["eval"]["top1_error"] == eval_history(run_dir)[12]["top1_error"]
    assert meta["file_sha256"] == hashlib.sha256(open(model_path, "rb").read()).hexdigest()
    model, variables, loaded_meta = load_model(model_path)
    state = restore_run(run_dir, log=lambda m: None).state
    for name, tree in (("params", state.params), ("batch_stats", state.batch_stats)):
        for a, b in zip(jax.tree.leaves(jax.device_get(tree)), jax.tree.leaves(variables[name])):
            np.testing.assert_array_equal(a, b)  # bit for bit
    assert loaded_meta == meta


def _model_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("model."))


def _leave_free(folder, free):
    """Fill ``folder``'s file system until ``free`` bytes are left (tmpfs counts pages)."""
    filler = os.path.join(folder, "filler")
    if os.path.exists(filler):
        os.remove(filler)
    stat = os.statvfs(folder)
    with open(filler, "wb") as f:
        f.write(b"x" * (stat.f_bavail * stat.f_frsize - free))


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_half_pair(run_dir, model_path,
                                                                      tmp_path, capsys):
    """A 1.2 MB tmpfs filled until the weights do not fit, then until they fit but their
    description does not, then over an older pair: status 2, one line naming the output
    folder and the room, no temporary file, no lone or mixed file; the older pair intact."""
    from lsgd_jax.cli.main import export_main
    from lsgd_jax.training.model_file import load_model

    with small_tmpfs(tmp_path / "disk", "1200k") as disk:
        out = str(disk / "model.msgpack")
        weights = -(-os.path.getsize(model_path) // 4096) * 4096  # its pages
        for free, older in ((weights - 8 * 4096, False), (weights, False), (weights, True)):
            if older:  # an older pair (step 8) at the destination
                _leave_free(disk, 2**20)
                assert export_main(["--workdir", run_dir, "--step", "8", "--out", out]) == 0
                before = {n: (disk / n).read_bytes() for n in _model_files(disk)}
            _leave_free(disk, free)
            capsys.readouterr()
            assert export_main(["--workdir", run_dir, "--out", out]) == 2
            line = _error_line(capsys.readouterr().err)
            assert line.startswith(f"error: --out {out}: no room in the output folder {disk}: "
                                   "model.msgpack and model.json need "), line
            assert f"KiB, {free // 1024} KiB are free" in line
            assert "resum" not in line and "workdir" not in line
            if older:
                assert {n: (disk / n).read_bytes() for n in _model_files(disk)} == before
                assert load_model(out)[2]["step"] == 8
            else:
                assert _model_files(disk) == []
            assert sorted(os.listdir(disk)) == ["filler", *_model_files(disk)]
        os.remove(disk / "filler")
        assert export_main(["--workdir", run_dir, "--out", out]) == 0
        assert _model_files(disk) == ["model.json", "model.msgpack"]
        assert (disk / "model.msgpack").read_bytes() == open(model_path, "rb").read()


@pytest.mark.parametrize("older", [False, True], ids=["new", "over_an_older_pair"])
def test_a_failed_rename_of_the_description_undoes_the_weights(model_path, tmp_path,
                                                                monkeypatch, older):
    """The weights are renamed into place first: when the description's rename fails, the
    older weights come back (or the new ones go), and no temporary file is left."""
    import lsgd_jax.training.model_file as model_file

    out = str(tmp_path / "model.msgpack")
    if older:
        shutil.copy(model_path, out)
        shutil.copy(model_file.sidecar_path(model_path), model_file.sidecar_path(out))
    before = {n: (tmp_path / n).read_bytes() for n in _model_files(tmp_path)}
    replace = os.replace

    def failing(src, dst):
        if dst.endswith(".json"):
            raise OSError(5, "Input/output error", dst)
        replace(src, dst)

    monkeypatch.setattr(model_file.os, "replace", failing)
    with pytest.raises(model_file.ExportError, match=r"cannot write model.msgpack and "
                                                     r"model.json in the output folder"):
        model_file.write_pair(out, b"new weights", b"{}")
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_predict_agrees_with_evaluation_on_the_same_images(run_dir, model_path, tmp_path):
    """Every validation image, through files: the same top-1 and top-5 errors as the run's
    evaluation, and probabilities equal to the eval step's within 1e-6."""
    from lsgd_jax.artifacts.predict import classify, load_images, make_predict
    from lsgd_jax.training.model_file import load_model

    paths, labels = _validation_images(str(tmp_path / "images"))
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


def _tamper(model_path, tmp_path, edit_meta=None, edit_bytes=None):
    folder = tmp_path / "tampered"
    folder.mkdir(exist_ok=True)
    target = str(folder / "model.msgpack")
    shutil.copy(model_path, target)
    shutil.copy(model_path.replace(".msgpack", ".json"), str(folder / "model.json"))
    if edit_bytes:
        data = bytearray(open(target, "rb").read())
        edit_bytes(data)
        open(target, "wb").write(bytes(data))
    if edit_meta:
        meta = json.load(open(folder / "model.json"))
        edit_meta(meta)
        json.dump(meta, open(folder / "model.json", "w"))
    return target


def test_a_damaged_or_foreign_model_file_gets_a_clear_error(model_path, tmp_path):
    from lsgd_jax.training.model_file import ModelFileError, load_model

    def flip(data):  # one byte in the middle of the arrays
        data[len(data) // 2] ^= 0x01

    damaged = _tamper(model_path, tmp_path, edit_bytes=flip)
    with pytest.raises(ModelFileError, match="is damaged or not the one") as e:
        load_model(damaged)
    assert damaged in str(e.value) and "\n" not in str(e.value)
    result = _script("predict.py", "--model", damaged, os.path.join(ROOT, "README.md"))
    assert result.returncode == 2 and damaged in _error_line(result.stderr)
    newer = _tamper(model_path, tmp_path, edit_meta=lambda m: m.update(format_version=2))
    with pytest.raises(ModelFileError, match="version 2; this lsgd-jax reads"):
        load_model(newer)
    other = _tamper(model_path, tmp_path, edit_meta=lambda m: m.update(model="resnet20"))
    with pytest.raises(ModelFileError, match="resnet20"):
        load_model(other)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(str(tmp_path / "none.msgpack"))


def test_a_model_file_whose_arrays_do_not_fit_names_the_layer(model_path, tmp_path):
    from flax import serialization

    from lsgd_jax.training.model_file import ModelFileError, load_model

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = content["variables"]["params"]["stem_conv"]["kernel"]
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel[..., :1, :]
    payload = serialization.msgpack_serialize(content)

    def rewrite(data):
        data[:] = payload

    bad = _tamper(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
        file_sha256=hashlib.sha256(payload).hexdigest()))
    with pytest.raises(ModelFileError, match=r"\['params'\]\['stem_conv'\]\['kernel'\] has "
                                             r"shape \(3, 3, 1, 16\)"):
        load_model(bad)


def _non_finite(model_path, tmp_path):
    """A copy of the model file whose stem kernel holds 3 NaN and 1 Inf, its SHA-256
    recorded: a file that is whole, but whose weights are not finite."""
    from flax import serialization

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = np.array(content["variables"]["params"]["stem_conv"]["kernel"])
    kernel.flat[[0, 7, 9]] = np.nan
    kernel.flat[20] = -np.inf
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel
    payload = serialization.msgpack_serialize(content)

    def rewrite(data):
        data[:] = payload

    return _tamper(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
        file_sha256=hashlib.sha256(payload).hexdigest()))


NON_FINITE = (r"layer \['params'\]\['stem_conv'\]\['kernel'\] holds 4 non-finite values "
              r"\(NaN or Inf\) of 432")


def test_a_model_file_with_non_finite_weights_is_refused_naming_the_layer(
        model_path, tmp_path, monkeypatch, capsys):
    """load_model refuses it, so predict exits 2 before anything is compiled (and
    --init-from too: test_a_bad_init_from_file_is_refused_before_anything_is_compiled);
    the training command says so in one line."""
    import lsgd_jax.artifacts.predict as predict
    from lsgd_jax.cli.main import predict_main
    from lsgd_jax.training.model_file import ModelFileError, load_model

    bad = _non_finite(model_path, tmp_path)
    with pytest.raises(ModelFileError, match=NON_FINITE):
        load_model(bad)

    def classify(*args, **kwargs):
        raise AssertionError("compiled the prediction of a non-finite model")

    monkeypatch.setattr(predict, "classify", classify)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert predict_main(["--model", bad, str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search(NON_FINITE, _error_line(captured.err))
    result = _script("imagenet_resnet50.py", "--workdir", str(tmp_path / "cli"), *TINY_FLAGS,
                     "--init-from", bad, "--cpu-devices", "8")
    assert result.returncode == 2, result.stderr[-2000:]
    line = _error_line(result.stderr)
    assert line.startswith(f"error: --init-from {bad}: ") and re.search(NON_FINITE, line)
    assert "compiling" not in result.stdout


# ---------------------------------------------------------------- --init-from
def _prepared(tmp_path, name, **changes):
    from lsgd_jax.training.loop import _prepare

    run = _prepare(TrainConfig(**TINY | changes), str(tmp_path / name), lambda msg: None)
    run.ckpts.close()
    return run


def test_init_from_reproduces_the_exported_parameters_at_step_0(model_path, tmp_path):
    from lsgd_jax.training.model_file import load_model

    _, variables, _ = load_model(model_path)
    run = _prepared(tmp_path, "same", init_from=model_path, seed=3)
    assert int(run.state.step) == 0
    for name, tree in (("params", run.state.params), ("batch_stats", run.state.batch_stats)):
        for a, b in zip(jax.tree.leaves(jax.device_get(tree)), jax.tree.leaves(variables[name])):
            np.testing.assert_array_equal(a, b)
    # A fresh optimizer: the momentum buffer is zero.
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(run.state.opt_state)
               if np.ndim(x) > 0)


def test_init_from_with_other_classes_keeps_a_fresh_classifier(model_path, tmp_path):
    from lsgd_jax.training.model_file import load_model

    _, variables, _ = load_model(model_path)
    run = _prepared(tmp_path, "seven", init_from=model_path, num_classes=7)
    fresh = _prepared(tmp_path, "scratch", num_classes=7)
    params = jax.device_get(run.state.params)
    np.testing.assert_array_equal(params["fc"]["kernel"],
                                  jax.device_get(fresh.state.params["fc"]["kernel"]))
    assert params["fc"]["kernel"].shape == (64, 7)
    np.testing.assert_array_equal(params["stem_conv"]["kernel"],
                                  variables["params"]["stem_conv"]["kernel"])


def test_init_from_refuses_another_model_naming_it(model_path, tmp_path):
    from lsgd_jax.training.model_file import ModelFileError

    with pytest.raises(ModelFileError, match="holds a resnet8 but this run trains a resnet20"):
        _prepared(tmp_path, "other", init_from=model_path, model="resnet20")
    result = _script("imagenet_resnet50.py", "--workdir", str(tmp_path / "cli"), *TINY_FLAGS,
                     "--init-from", str(tmp_path / "missing.msgpack"), "--cpu-devices", "8")
    assert result.returncode == 2
    assert str(tmp_path / "missing.msgpack") in _error_line(result.stderr)


def test_a_bad_init_from_file_is_refused_before_anything_is_compiled(model_path, tmp_path,
                                                                     monkeypatch):
    """Missing, damaged, another format version, another model, a layer of another shape:
    one line naming the file (and the layer, with the shape the model needs), raised
    before the fresh state is compiled, from the verdict every process shares. Another
    class count is no error: the check passes and the run goes on to compile."""
    from flax import serialization

    import lsgd_jax.training.init_from as init_from
    import lsgd_jax.training.loop as train
    from lsgd_jax.training.model_file import ModelFileError

    class Compiled(Exception):
        pass

    def create_train_state(*args, **kwargs):
        raise Compiled

    monkeypatch.setattr(train, "create_train_state", create_train_state)
    verdicts = []

    def from_process_0(text):  # one process: the verdict it would share
        verdicts.append(text)
        return text

    monkeypatch.setattr(init_from, "from_process_0", from_process_0)

    def flip(data):
        data[len(data) // 2] ^= 0x01

    content = serialization.msgpack_restore(open(model_path, "rb").read())
    kernel = content["variables"]["params"]["stem_conv"]["kernel"]
    content["variables"]["params"]["stem_conv"]["kernel"] = kernel[..., :1, :]
    gray = serialization.msgpack_serialize(content)  # a 1-channel model; this run has 3

    def rewrite(data):
        data[:] = gray

    cases = [
        (lambda: str(tmp_path / "none.msgpack"), {}, "does not exist"),
        (lambda: _tamper(model_path, tmp_path, edit_bytes=flip), {}, "is damaged"),
        (lambda: _tamper(model_path, tmp_path, edit_meta=lambda m: m.update(format_version=2)),
         {}, "version 2; this lsgd-jax reads"),
        (lambda: model_path, {"model": "resnet20"}, "holds a resnet8 but this run trains"),
        (lambda: _tamper(model_path, tmp_path, edit_bytes=rewrite, edit_meta=lambda m: m.update(
            channels=1, file_sha256=hashlib.sha256(gray).hexdigest())), {},
         r"layer \['params'\]\['stem_conv'\]\['kernel'\] has shape \(3, 3, 1, 16\), the "
         r"model needs \(3, 3, 3, 16\)"),
        (lambda: _non_finite(model_path, tmp_path), {}, NON_FINITE),
    ]
    for make, changes, message in cases:
        path = make()
        with pytest.raises(ModelFileError, match=message) as e:
            _prepared(tmp_path, "bad", init_from=path, **changes)
        text = str(e.value)
        assert text.startswith("--init-from") and path in text and "\n" not in text, text
        assert verdicts[-1] == text
    with pytest.raises(Compiled):
        _prepared(tmp_path, "seven", init_from=model_path, num_classes=7)
    assert verdicts[-1] == ""


@pytest.mark.slow
def test_evaluate_and_export_on_two_processes(run_dir, model_path, tmp_path):
    """2 processes × 2 CPU devices (Gloo): the run's top-1, one record, one model file
    equal to the one-process export."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records_before = len(read_metrics(run_dir, "eval"))

    def launch(script, *args):
        procs = [subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "experiments", script), *args,
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), "--cpu-devices", "2"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        try:
            outs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out
        return outs

    outs = launch("evaluate.py", "--workdir", run_dir, "--eval-batch-size", "12")
    last = eval_history(run_dir)[12]
    assert f"top-1 error {100 * last['top1_error']:.2f}%" in outs[0] and "4 devices" in outs[0]
    assert "top-1 error" not in outs[1]  # process 0 reports
    records = read_metrics(run_dir, "eval")
    assert len(records) == records_before + 1 and records[-1]["num_processes"] == 2
    assert records[-1]["top1_error"] == last["top1_error"]
    out = str(tmp_path / "two.msgpack")
    launch("export.py", "--workdir", run_dir, "--out", out)
    assert open(out, "rb").read() == open(model_path, "rb").read()


def test_the_eval_transform_of_a_one_channel_model_and_of_imagenet(tmp_path):
    """Fashion-MNIST-sized files come back as their pixels; ImageNet's is resize 256, crop
    224 (decode_eval), made RGB from CMYK."""
    from lsgd_jax.artifacts.predict import load_image
    from lsgd_jax.data.augment import decode_eval

    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "item.png")
    small = {"image_size": 28, "eval_resize": 28, "channels": 1}
    np.testing.assert_array_equal(load_image(str(tmp_path / "item.png"), small),
                                  pixels[..., None])
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 500, 3), np.uint8))
    photo.convert("CMYK").save(tmp_path / "photo.jpg")
    imagenet = {"image_size": 224, "eval_resize": 256, "channels": 3}
    data = (tmp_path / "photo.jpg").read_bytes()
    out = load_image(str(tmp_path / "photo.jpg"), imagenet)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, decode_eval(data, size=224, resize=256))


def test_num_classes_for_synthetic_data_and_too_few_for_a_data_set():
    from lsgd_jax.data import open_source

    source = open_source(TrainConfig(**TINY | dict(num_classes=7)), "validation")
    assert source.num_classes == 7
    assert source.get_batch(np.arange(40))["label"].max() < 7
    with pytest.raises(ValueError, match="--num-classes 5 is fewer than the 10 classes of "
                                         "fashion_mnist; use at least 10"):
        open_source(TrainConfig(data="fashion_mnist", num_classes=5), "validation")
    with pytest.raises(ValueError, match=r"--num-classes must be an integer in \[1, 1000000\]"):
        TrainConfig(num_classes=0)


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

    fashion = _tamper(model_path, tmp_path, edit_meta=lambda m: m.update(data="fashion_mnist"))
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
