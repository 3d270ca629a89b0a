"""The folder source: listing, labels, the kept index, bad files, errors, and no TensorFlow.

The same pixels as the tfds path are checked in ``test_data_folders_tfds.py``.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import run_bounded
from tiny_images import CLASSES, CORRUPT, NUM, TRUNCATED, file_name, sorted_examples, write_folder

from lsgd_jax.data import BadDataError, get_source
from lsgd_jax.data import folders as F

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"))


def open_folder(data_dir, split="train", **kwargs):
    kwargs = {"image_size": 16, "eval_resize": 20, "max_bad_fraction": 0.1,
              "decode_threads": 2, **kwargs}
    return get_source("folder", split=split, data_dir=str(data_dir), **kwargs)


def bad_ids():
    return sorted(k for k, (i, _, _) in enumerate(sorted_examples()) if i in (CORRUPT, TRUNCATED))


# ---------------------------------------------------------------------------- listing
def test_classes_are_sorted_folders_and_files_sorted_within_them(data_dir):
    with open_folder(data_dir) as src:
        assert src.classes == list(CLASSES) and src.num_classes == 4
        assert src.num_examples == NUM
        assert [p.decode() for p in src.index.paths] == [rel for _, _, rel in sorted_examples()]
        assert src.index.labels.tolist() == [label for _, label, _ in sorted_examples()]
        sizes = [os.path.getsize(os.path.join(data_dir, "train", rel))
                 for _, _, rel in sorted_examples()]
        assert src.index.sizes.tolist() == sizes
        # .JPEG, .jpg, .jpeg and .JPG all match; the hidden file and the .txt are skipped.
        assert src.index.skipped == {"hidden": 1, "other": 1}


def test_bad_files_are_replaced_named_and_counted_as_on_the_tfds_path(data_dir, caplog):
    with open_folder(data_dir) as src:
        batch = src.get_batch(np.arange(NUM), seed=0, epoch=0, train=False)
        assert sorted(src.bad_examples) == bad_ids()
        names = {rel for k, (_, _, rel) in enumerate(sorted_examples()) if k in bad_ids()}
        assert set(src.bad_examples.values()) == names
        for k in bad_ids():  # replaced by the next example, with its label
            np.testing.assert_array_equal(batch["image"][k], batch["image"][k + 1])
            assert batch["label"][k] == batch["label"][k + 1]
    with open_folder(data_dir, max_bad_fraction=0.03) as src:
        with pytest.raises(BadDataError, match=r"2 of 40 examples .* max_bad_fraction=0.03"):
            src.get_batch(np.arange(NUM), seed=0, epoch=0, train=True)


def test_a_file_that_cannot_be_read_is_bad_like_an_undecodable_one(tmp_path):
    root = write_folder(tmp_path / "d")
    with open_folder(root) as src:
        os.remove(src.index.path(3))
        src.get_batch(np.arange(8), seed=0, epoch=0, train=True)
        assert 3 in src.bad_examples


# ---------------------------------------------------------------------------- flat val
def _flat(tmp_path, labels_text=None, name="labels.txt"):
    root = write_folder(tmp_path / "flat", flat_val=True)
    path = os.path.join(root, name)
    if labels_text is not None:
        with open(path, "w") as f:
            f.write(labels_text)
    return root, path


def _check_flat(src):
    expected = {file_name(i): i % 4 for i in range(NUM)}
    got = {p.decode(): int(y) for p, y in zip(src.index.paths, src.index.labels)}
    assert got == expected
    assert [p.decode() for p in src.index.paths] == sorted(expected)


def test_flat_val_labelled_by_a_file_class_list(tmp_path):
    root = write_folder(tmp_path / "flat", flat_val=True)
    with open_folder(root, "validation", val_labels=os.path.join(root, "val_labels.txt")) as src:
        _check_flat(src)


def test_another_label_file_is_read_even_with_a_kept_index(tmp_path):
    root = write_folder(tmp_path / "flat", flat_val=True)
    index_dir = str(tmp_path / "idx")
    with open_folder(root, "validation", index_dir=index_dir,
                     val_labels=os.path.join(root, "val_labels.txt")) as src:
        _check_flat(src)
    other = os.path.join(root, "other_labels.txt")
    with open(other, "w") as f:
        f.write("".join(f"{file_name(i)} {CLASSES[0]}\n" for i in range(NUM)))
    with open_folder(root, "validation", index_dir=index_dir, val_labels=other) as src:
        assert set(src.index.labels.tolist()) == {0}


def test_flat_val_labelled_by_kaggles_csv_found_beside_it(tmp_path):
    rows = "".join(f"{os.path.splitext(file_name(i))[0]},{CLASSES[i % 4]} 1 2 3 4 "
                   f"{CLASSES[i % 4]} 5 6 7 8\n" for i in reversed(range(NUM)))
    root, _ = _flat(tmp_path, "ImageId,PredictionString\n" + rows, F.KAGGLE_VAL_LABELS)
    with open_folder(root, "validation") as src:  # found without --val-labels
        _check_flat(src)
    # Kaggle's own layout: the CSV three levels above ILSVRC/Data/CLS-LOC/{train,val}.
    deep = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    os.makedirs(deep.parent)
    os.rename(root, deep)
    os.rename(deep / F.KAGGLE_VAL_LABELS, tmp_path / "kaggle" / F.KAGGLE_VAL_LABELS)
    with open_folder(deep, "validation") as src:
        _check_flat(src)


def test_flat_val_labelled_one_class_a_line_in_sorted_file_order(tmp_path):
    order = sorted(range(NUM), key=file_name)
    root, path = _flat(tmp_path, "".join(f"{CLASSES[i % 4]}\n" for i in order))
    with open_folder(root, "validation", val_labels=path) as src:
        _check_flat(src)


def test_class_descriptions_come_from_a_synset_file_beside_the_data(tmp_path):
    from lsgd_jax.data import class_descriptions
    from lsgd_jax.training.config import TrainConfig

    root = write_folder(tmp_path / "ILSVRC" / "Data" / "CLS-LOC")
    config = TrainConfig(data="folder", data_dir=root)
    assert class_descriptions(config) is None  # nothing beside it: wnids only
    kaggle = tmp_path / "LOC_synset_mapping.txt"  # where Kaggle's download keeps it
    kaggle.write_text("".join(f"{c} the class {c}, a synonym\n" for c in reversed(CLASSES)))
    assert class_descriptions(config) == [f"the class {c}, a synonym" for c in CLASSES]
    # One class not described: none are (a partial list would misname the rest).
    kaggle.write_text("".join(f"{c} the class {c}\n" for c in CLASSES[1:]))
    assert class_descriptions(config) is None
    (tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "synset_words.txt").write_text(
        "".join(f"{c} words {c}\n" for c in CLASSES))  # nearer the data: found first
    assert class_descriptions(config) == [f"words {c}" for c in CLASSES]
    assert class_descriptions(config.replace(data_dir=str(tmp_path / "gone"))) is None
    assert class_descriptions(TrainConfig(data="fashion_mnist")) is None


def test_tfds_validation_labels_are_found_without_importing_tfds():
    code = ("import sys; from lsgd_jax.data.folders import tfds_validation_labels as t; "
            "p = t(); print(p); assert 'tensorflow_datasets' not in sys.modules; "
            "assert p is None or sum(1 for _ in open(p)) == 50000")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    pytest.importorskip("tensorflow_datasets")
    assert out.stdout.strip().endswith(os.path.join("imagenet2012", "validation_labels.txt"))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case, match", [
    ("missing", r"--data-dir '.*nowhere' is not a folder"),
    ("no_train", r"has no train/ folder"),
    ("no_classes", r"train holds no class folders"),
    ("no_val", r"has no val/ or validation/ folder"),
    ("extra_val_class", r"val has other classes than .*train: 1 not in train \(n99999999\)"),
    ("flat_unlabelled", r"val holds no class folders; label its files with --val-labels"),
    ("unknown_file", r"labels.txt names 1 file\(s\) that the flat validation folder does "
                     r"not hold, e.g. \['nope.JPEG'\]"),
    ("unknown_class", r"labels.txt names 1 class\(es\) that .*train has no folder for, "
                      r"e.g. \['n12345678'\]"),
    ("unlabelled_file", r"gives no class for 1 of the validation folder's files"),
    ("line_count", r"one class a line, 39 lines, for the 40 image files"),
])
def test_bad_layouts_fail_in_one_line_naming_the_value(tmp_path, case, match):
    root = str(tmp_path / "d")
    val_labels = None
    if case == "no_classes":
        os.makedirs(os.path.join(root, "train"))
    elif case not in ("missing", "no_train"):
        write_folder(root, flat_val=case in ("flat_unlabelled", "unknown_file", "unknown_class",
                                             "unlabelled_file", "line_count"))
    if case == "no_val":
        import shutil

        shutil.rmtree(os.path.join(root, "val"))
    if case == "extra_val_class":
        os.makedirs(os.path.join(root, "val", "n99999999"))
    lines = [f"{file_name(i)} {CLASSES[i % 4]}" for i in range(NUM)]
    if case == "unknown_file":
        lines.append(f"nope.JPEG {CLASSES[0]}")
    if case == "unknown_class":
        lines[0] = f"{file_name(0)} n12345678"
    if case == "unlabelled_file":
        lines = lines[1:]
    if case == "line_count":
        lines = [CLASSES[i % 4] for i in range(NUM - 1)]
    if case in ("unknown_file", "unknown_class", "unlabelled_file", "line_count"):
        val_labels = os.path.join(root, "labels.txt")
        with open(val_labels, "w") as f:
            f.write("\n".join(lines) + "\n")
    if case == "missing":
        root = str(tmp_path / "nowhere")
    split = "train" if case in ("missing", "no_train", "no_classes") else "validation"
    if case == "no_train":
        os.makedirs(root)
    with pytest.raises((ValueError, OSError)) as e:
        open_folder(root, split, val_labels=val_labels).close()
    assert len(str(e.value).splitlines()) == 1
    assert e.match(match)


def test_imagenet_from_folders_holds_them_to_imagenets_classes(data_dir, tmp_path):
    # The tiny set has 4 classes: --data imagenet reads it as files, and refuses it.
    with pytest.raises(ValueError, match=r"--data imagenet reads ImageNet's 1,000 class folders "
                       r"named like n01440764; .*train holds 4. For another class-folder data "
                       r"set use --data folder"):
        get_source("imagenet", split="train", data_dir=data_dir, image_size=16)
    odd = write_folder(tmp_path / "odd", extras=False)
    os.rename(os.path.join(odd, "train", CLASSES[0]), os.path.join(odd, "train", "cat"))
    with pytest.raises(ValueError, match=r"holds 4, 1 of them not so named \(cat\)"):
        get_source("imagenet", split="train", data_dir=odd, image_size=16)


def test_imagenet_checks_pass_on_a_thousand_wnid_folders_with_the_same_val_classes(tmp_path):
    wnids = [f"n{k:08d}" for k in range(1000)]
    for split in ("train", "val"):
        for w in wnids:
            os.makedirs(tmp_path / split / w)
            (tmp_path / split / w / "a.JPEG").write_bytes(b"x")
    assert F.train_classes(str(tmp_path), imagenet=True) == wnids
    os.remove(tmp_path / "val" / wnids[7] / "a.JPEG")
    os.rmdir(tmp_path / "val" / wnids[7])
    with pytest.raises(ValueError, match=rf"1 missing \({wnids[7]}\)"):
        F.build_index(str(tmp_path), "validation", classes=wnids, imagenet=True)
    # A plain folder data set accepts a validation split without some classes.
    assert len(F.build_index(str(tmp_path), "validation", classes=wnids)) == 999


# ---------------------------------------------------------------------------- the index
def test_the_index_is_kept_checked_cheaply_and_relisted_when_the_folders_change(tmp_path,
                                                                               monkeypatch):
    root = write_folder(tmp_path / "d")
    index_dir = str(tmp_path / "work" / "data_index")
    os.makedirs(index_dir)
    with open(os.path.join(index_dir, "folder_index_train.npz"), "wb") as f:
        f.write(b"PK")  # the earlier format's file: replaced
    with open_folder(root, index_dir=index_dir) as src:
        first = src.identity
    assert os.listdir(index_dir) == ["folder_index_train.bin"]
    assert os.path.isfile(os.path.join(index_dir, "folder_index_train.bin"))
    listings = []
    real = F.build_index
    monkeypatch.setattr(F, "build_index", lambda *a, **k: listings.append(1) or real(*a, **k))
    with open_folder(root, index_dir=index_dir) as src:  # kept and unchanged: not listed
        assert src.identity == first and listings == []
    with open_folder(root, index_dir=index_dir, relist=True) as src:  # asked: listed again
        assert src.identity == first and listings == [1]
    new = os.path.join(root, "train", CLASSES[2], "img_99.JPEG")
    with open(os.path.join(root, "train", CLASSES[2], file_name(2)), "rb") as f:
        data = f.read()
    with open(new, "wb") as f:
        f.write(data)
    with open_folder(root, index_dir=index_dir) as src:  # a folder changed: listed again
        assert listings == [1, 1]
        assert src.num_examples == NUM + 1 and src.identity["fingerprint"] != first["fingerprint"]


def test_the_kept_index_is_one_file_whose_arrays_are_mapped_and_checked(tmp_path):
    root = write_folder(tmp_path / "d")
    listed = F.build_index(root, "train", classes=F.train_classes(root))
    kept = str(tmp_path / "index.bin")
    listed.save(kept)
    loaded = F.FolderIndex.load(kept)
    assert loaded is not None and loaded.file == kept
    for name in ("paths", "labels", "sizes"):
        array = getattr(loaded, name)
        assert isinstance(array, np.memmap) and not array.flags.writeable
        np.testing.assert_array_equal(array, getattr(listed, name))
        assert array.dtype == getattr(listed, name).dtype
    assert (loaded.classes, loaded.root, loaded.stamps, loaded.skipped) == (
        listed.classes, listed.root, listed.stamps, listed.skipped)
    assert loaded.fingerprint() == listed.fingerprint() == loaded._digest()
    # Damaged files are not an index: the run lists the folders again.
    data = open(kept, "rb").read()
    for name, damaged in (("truncated", data[:-3]), ("empty", b""),
                          ("flipped label", data[:-12] + bytes([data[-12] ^ 1]) + data[-11:]),
                          ("another format", b"PK\x03\x04" + data[4:])):
        with open(kept, "wb") as f:
            f.write(damaged)
        assert F.FolderIndex.load(kept) is None, name
    assert F.FolderIndex.load(str(tmp_path / "absent.bin")) is None


def test_workers_map_the_kept_index_instead_of_receiving_it_pickled(tmp_path):
    import pickle

    from lsgd_jax.data.pipeline import TrainIterator
    from lsgd_jax.data.workers import WorkerTrainIterator

    root = write_folder(tmp_path / "d")
    index_dir = str(tmp_path / "work" / "data_index")
    with open_folder(root, index_dir=index_dir) as src:
        opener, options = src.worker_opener()
        assert isinstance(options["index"], F.KeptIndex)
        assert options["index"].file == os.path.join(index_dir, "folder_index_train.bin")
        assert len(pickle.dumps(options)) < 2000  # no array travels; the file is mapped
        with opener(**options) as opened:  # what a worker does
            assert isinstance(opened.index.paths, np.memmap)
            assert opened.identity == src.identity
        reference = TrainIterator(src, global_batch_size=8, seed=3)
        expected = [next(reference) for _ in range(4)]
        it = WorkerTrainIterator(src, decode_workers=2, global_batch_size=8, seed=3)
        try:
            for want in expected:
                got = next(it)
                np.testing.assert_array_equal(got["image"], want["image"])
                np.testing.assert_array_equal(got["label"], want["label"])
        finally:
            it.close()
        # The file replaced under the run by another listing: the worker says so.
        os.remove(os.path.join(root, "train", sorted_examples()[0][2]))
        with open_folder(root, index_dir=index_dir):  # listed again, kept in its place
            pass
        with pytest.raises(FileNotFoundError, match=r"folder_index_train\.bin is gone, damaged "
                                                    r"or no longer the one this run opened"):
            opener(**options)
    with open_folder(root) as src:  # no index_dir: the index lives in memory, and travels
        _, options = src.worker_opener()
        assert isinstance(options["index"], F.FolderIndex) and options["index"].file is None


def test_a_moved_copy_has_the_same_identity(tmp_path):
    import shutil

    root = write_folder(tmp_path / "a")
    with open_folder(root, index_dir=str(tmp_path / "idx")) as src:
        before = src.identity
    shutil.move(root, tmp_path / "b")
    with open_folder(tmp_path / "b", index_dir=str(tmp_path / "idx")) as src:
        assert src.identity == before
        assert src.index.root == os.path.abspath(tmp_path / "b" / "train")
        first = src.index.path(0)
    with open(first, "ab") as f:  # the same names, one file longer
        f.write(b"\0")
    with open_folder(tmp_path / "b", relist=True) as src:
        assert src.identity["examples"] == before["examples"]
        assert src.identity["fingerprint"] != before["fingerprint"]


# ---------------------------------------------------------------------------- no TensorFlow
BLOCKER = """
import importlib.abc, sys

class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "grain"):
            raise ImportError(f"{name} may not be imported here")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
"""


def test_the_folder_path_runs_where_importing_tensorflow_raises(tmp_path):
    root = write_folder(tmp_path / "d")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        try:
            import tensorflow_datasets
        except ImportError as e:
            print("blocked:", e)
        else:
            raise SystemExit("the blocker did not block")
        from lsgd_jax.data import get_source
        from lsgd_jax.data.pipeline import TrainIterator
        from lsgd_jax.data.workers import WorkerTrainIterator
        kw = dict(split="train", data_dir={str(root)!r}, image_size=16, eval_resize=20,
                  max_bad_fraction=0.1, decode_threads=2)
        with get_source("folder", **kw) as src:
            in_process = TrainIterator(src, global_batch_size=8, seed=3)
            ref = [next(in_process)["image"] for _ in range(6)]
            it = WorkerTrainIterator(src, decode_workers=2, global_batch_size=8, seed=3)
            try:
                got = [next(it)["image"] for _ in range(6)]
            finally:
                it.close()
            assert all(np.array_equal(a, b) for a, b in zip(ref, got))
            assert sorted(src.bad_examples) == {bad_ids()!r}, src.bad_examples
        bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets",
                                                            "grain")]
        assert not bad, bad
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), TESTS,
                                                        os.environ.get("PYTHONPATH", "")])}
    out = run_bounded([sys.executable, "-c", script], timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "blocked:" in out.stdout and out.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------- the run
def test_the_run_opens_the_folder_keeps_its_index_and_names_its_classes(data_dir, tmp_path):
    from lsgd_jax.data import class_names, open_source
    from lsgd_jax.training.config import TrainConfig

    config = TrainConfig(data="folder", data_dir=data_dir, image_size=16, max_bad_fraction=0.1)
    lines = []
    with open_source(config, "train", workdir=str(tmp_path), log=lines.append) as src:
        assert src.num_examples == NUM
    assert os.path.isfile(tmp_path / "data_index" / "folder_index_train.bin")
    assert any(line.startswith(f"data: folder {data_dir}, read from its folders (no TensorFlow)"
                               f": {NUM} training images of 4 classes") for line in lines)
    assert class_names(config) == list(CLASSES)
    assert class_names(config.replace(data_dir=str(tmp_path / "gone"))) is None  # indices then
    assert TrainConfig(data="folder").model == "resnet50"


def test_process_zero_opens_first_and_its_error_is_every_processs(monkeypatch):
    from lsgd_jax.data import _opened_in_turn

    calls = []

    def fake_exchange(name, value):
        calls.append((name, value))
        return [first_error, value]

    def open_it():
        calls.append("opened")
        return "source"

    first_error = ""
    assert _opened_in_turn(open_it, "open_train", 1, 2, fake_exchange) == "source"
    assert calls == [("data_open_train", ""), "opened"]  # after process 0's answer

    def fail():
        raise FileNotFoundError("--data-dir '/x' is not a folder")

    first_error = "--data-dir '/x' is not a folder"
    with pytest.raises(ValueError, match=r"^--data-dir '/x' is not a folder$"):
        _opened_in_turn(lambda: pytest.fail("opened after process 0 failed"), "open_train", 1, 2,
                        fake_exchange)
    with pytest.raises(ValueError, match=r"^--data-dir '/x' is not a folder$"):
        _opened_in_turn(fail, "open_train", 0, 2, fake_exchange)
    # Several processes and no exchange to agree through: refused, never guessed.
    with pytest.raises(ValueError, match="needs exchange="):
        _opened_in_turn(open_it, "open_train", 1, 2, None)
    assert calls[-1] == ("data_open_train", "--data-dir '/x' is not a folder")


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_decoded_by_workers_is_eval_batches_on_every_process_count(data_dir):
    from lsgd_jax.data import eval_batches, eval_stream
    from lsgd_jax.data.workers import WorkerEvalIterator

    with open_folder(data_dir, "validation") as src:
        for processes, workers, batch in ((1, 2, 16), (2, 2, 12), (2, 1, 64)):
            for p in range(processes):
                kw = dict(global_batch_size=batch, process_index=p, process_count=processes)
                reference = list(eval_batches(src, **kw))
                it = eval_stream(src, decode_workers=workers, **kw)
                assert isinstance(it, WorkerEvalIterator)
                got = list(it)
                assert len(got) == len(reference) == -(-NUM // batch)
                for a, b in zip(got, reference):
                    for key in ("image", "label", "mask"):
                        np.testing.assert_array_equal(a[key], b[key])
                    assert a["mask"].dtype == np.float32
                assert it._finalizer is None or not it._finalizer.alive  # closed at the end
                assert it._seq_in == len(reference)  # no batch past the pass was decoded
        assert sorted(src.bad_examples) == bad_ids()  # found by the workers, counted here


def test_a_worker_that_dies_during_evaluation_is_reported(data_dir):
    import signal

    from lsgd_jax.data.workers import DecodeWorkerError, WorkerEvalIterator

    with open_folder(data_dir, "validation") as src:
        it = WorkerEvalIterator(src, global_batch_size=4, decode_workers=2)
        try:
            next(it)
            os.kill(it.pids[1], signal.SIGKILL)
            with pytest.raises(DecodeWorkerError, match=r"decode worker 1 \(pid \d+\) was "
                                                        r"killed by signal 9"):
                for _ in range(NUM):
                    next(it)
        finally:
            it.close()
