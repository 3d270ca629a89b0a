"""Image data sets read from their folders: ``DIR/train/<class>/*``, ``DIR/val/...``.

The layout that torchvision's ``ImageFolder``, timm and DALI's file reader read. Nothing
is converted: the files are read with plain ``open``/``read`` and decoded by the
ImageNet path's own code (``imagenet.ImageNetSource``'s transforms and bad-file
handling), so neither TensorFlow nor tfds is imported.

* Classes are the sorted names of ``train/``'s folders (torchvision's ``ImageFolder``
  order, and tfds ``imagenet2012``'s: its labels are the sorted wnids). Within a class,
  files are in sorted name order; the split is the classes' files one after another.
* Files are matched by extension, case-insensitive (``.jpeg``, ``.jpg``, ``.png``);
  hidden files and others are skipped and counted.
* The validation split is ``val/`` or ``validation/``: class folders, or a flat folder
  labelled by a file (:func:`read_val_labels`).
* The index (sorted relative paths, labels, sizes) is built once and kept in the run's
  workdir; a run checks it cheaply against the folders (their modification times) and
  lists again only when they changed, or when asked (``relist``). Its fingerprint is
  the split's identity, which a resume and the processes of one run must agree on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import re
from typing import Any

import numpy as np

from lsgd_jax.data.augment import AREA_RANGE, RATIO_RANGE
from lsgd_jax.data.folder_index import FolderIndex, KeptIndex
from lsgd_jax.data.imagenet import ImageNetSource  # its module imports no TensorFlow
from lsgd_jax.data.source import identity

log = logging.getLogger(__name__)

EXTENSIONS = (".jpeg", ".jpg", ".png")
WNID = re.compile(r"n\d{8}")
IMAGENET_CLASSES = 1000
VAL_DIRS = ("val", "validation")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
# `wnid description` a line: Kaggle's download, and the `synset_words.txt` that Caffe's
# and many ImageNet scripts ship ("n01440764 tench, Tinca tinca").
DESCRIPTION_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


# ---------------------------------------------------------------------------- layout
def has_class_folders(data_dir) -> bool:
    """True when ``data_dir/train`` holds at least one (non-hidden) folder: how
    ``--data imagenet`` tells a folder of files from a tfds data dir."""
    train = os.path.join(str(data_dir), "train") if data_dir else None
    if not train or not os.path.isdir(train):
        return False
    with os.scandir(train) as entries:
        return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def split_dir(data_dir: str, split: str) -> str:
    """The folder of ``split`` ("train" or "validation"): ``train/``; ``val/`` or
    ``validation/``."""
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a folder; give the folder that "
                                "holds train/ and val/ (or validation/)")
    names = ("train",) if split == "train" else VAL_DIRS if split in ("validation", "val") else ()
    if not names:
        raise ValueError(f"a folder data set has the splits train and validation, not {split!r}")
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"{data_dir} has no {' or '.join(n + '/' for n in names)} folder; "
                            f"a folder data set is {data_dir}/train/<class>/* and "
                            f"{data_dir}/val/ (class folders, or flat with --val-labels)")


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _list_dir(path: str) -> tuple[list[tuple[str, int]], int, int]:
    """``path``'s image files as sorted (name, size), and the hidden and other entries
    skipped."""
    files, hidden, other = [], 0, 0
    with os.scandir(path) as entries:
        for e in entries:
            if e.name.startswith("."):
                hidden += 1
            elif _is_image(e.name) and e.is_file():
                files.append((e.name, e.stat().st_size))
            else:
                other += 1
    files.sort()
    return files, hidden, other


def train_classes(data_dir: str, *, imagenet: bool = False) -> list[str]:
    """The sorted class folder names of ``data_dir/train``; with ``imagenet``, checked to be
    ImageNet's 1,000 wnids."""
    classes = _subdirs(split_dir(data_dir, "train"))
    train = os.path.join(data_dir, "train")
    if not classes:
        raise ValueError(f"{train} holds no class folders; a folder data set is "
                         f"{train}/<class>/<image files>")
    if imagenet:
        odd = [c for c in classes if not WNID.fullmatch(c)]
        if len(classes) != IMAGENET_CLASSES or odd:
            shown = ", ".join(odd[:5] or classes[:5])
            raise ValueError(
                f"--data imagenet reads ImageNet's {IMAGENET_CLASSES:,} class folders named "
                f"like n01440764; {train} holds {len(classes):,}"
                + (f", {len(odd)} of them not so named ({shown})" if odd else "")
                + ". For another class-folder data set use --data folder")
    return classes


# ---------------------------------------------------------------------------- labels
def tfds_validation_labels() -> str | None:
    """The ``validation_labels.txt`` that the installed tensorflow_datasets package ships
    (one wnid a line, in sorted file-name order), found without importing it."""
    try:
        spec = importlib.util.find_spec("tensorflow_datasets")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "imagenet2012", "validation_labels.txt")
        if os.path.isfile(path):
            return path
    return None


def find_val_labels(data_dir: str, val_labels: str | None, *, imagenet: bool) -> str | None:
    """The label file of a flat validation folder: ``val_labels``, else Kaggle's
    ``LOC_val_solution.csv`` in ``data_dir`` or up to three folders above it, else
    (ImageNet) tfds's."""
    if val_labels:
        if not os.path.isfile(val_labels):
            raise FileNotFoundError(f"--val-labels {val_labels!r} is not a file")
        return val_labels
    kaggle = _near(data_dir, (KAGGLE_VAL_LABELS,))
    if kaggle:
        return kaggle
    return tfds_validation_labels() if imagenet else None


def _near(data_dir: str, names) -> str | None:
    """The first of ``names`` in ``data_dir`` or up to three folders above it (where
    Kaggle's download keeps its files: three levels above ILSVRC/Data/CLS-LOC/)."""
    here = os.path.abspath(data_dir)
    for _ in range(4):
        for name in names:
            if os.path.isfile(os.path.join(here, name)):
                return os.path.join(here, name)
        here = os.path.dirname(here)
    return None


def class_descriptions(data_dir: str, classes: list[str]) -> list[str] | None:
    """Human-readable names of ``classes`` (e.g. ``tench, Tinca tinca`` for n01440764),
    from a ``wnid description`` file found beside the data (``DESCRIPTION_FILES``, in
    ``data_dir`` or up to three folders above it); ``None`` when there is none, or when it
    does not describe every class."""
    path = _near(data_dir, DESCRIPTION_FILES)
    if path is None:
        return None
    described = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, text = line.strip().partition(" ")
                if name and text.strip():
                    described[name] = text.strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not all(c in described for c in classes):
        return None
    return [described[c] for c in classes]


def read_val_labels(path: str, files: list[str]) -> list[str]:
    """The class of each of ``files`` (a flat folder's image names, sorted), from ``path``.

    Accepted: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the class
    is the string's first word), a two-column ``file class`` list (space, tab or comma;
    the file with or without its extension), or one class a line in the files' sorted
    order (tfds's ``validation_labels.txt``).
    """
    with open(path, encoding="utf-8") as f:
        rows = [line.strip() for line in f if line.strip()]
    if rows and rows[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        pairs = [(r.split(",", 1)[0], r.split(",", 1)[1].split()[0]) for r in rows[1:]]
    elif rows and all(len(re.split(r"[\s,]+", r)) == 1 for r in rows):
        if len(rows) != len(files):
            raise ValueError(f"{path} gives one class a line, {len(rows):,} lines, for the "
                             f"{len(files):,} image files of the flat validation folder: "
                             "they must be as many (one a file, in sorted file-name order)")
        return rows
    else:
        pairs = []
        for r in rows:
            words = re.split(r"[\s,]+", r)
            if len(words) < 2:
                raise ValueError(f"{path}: line {r!r} is not `file class`; accepted: "
                                 "`file class` lines, one class a line, or Kaggle's "
                                 f"{KAGGLE_VAL_LABELS}")
            pairs.append((words[0], words[1]))
    by_name = {}
    for name, cls in pairs:
        by_name[name] = cls
        by_name.setdefault(os.path.splitext(name)[0], cls)
    unknown = sorted({n for n, _ in pairs} - set(files)
                     - {os.path.splitext(f)[0] for f in files})
    if unknown:
        raise ValueError(f"{path} names {len(unknown):,} file(s) that the flat validation "
                         f"folder does not hold, e.g. {unknown[:3]}; it must label the "
                         "folder's own files")
    classes = [by_name.get(f, by_name.get(os.path.splitext(f)[0])) for f in files]
    missing = [f for f, c in zip(files, classes) if c is None]
    if missing:
        raise ValueError(f"{path} gives no class for {len(missing):,} of the validation "
                         f"folder's files, e.g. {missing[:3]}")
    return [c for c in classes if c is not None]  # all of them, as checked above


# ---------------------------------------------------------------------------- index
def _stamp(path: str) -> int:
    return os.stat(path).st_mtime_ns


def build_index(data_dir: str, split: str, *, classes: list[str], val_labels: str | None = None,
                imagenet: bool = False, threads: int = 8) -> FolderIndex:
    """Lists ``split`` of the folder data set ``data_dir`` (labels: indices into
    ``classes``, the train split's sorted folder names)."""
    root = os.path.abspath(split_dir(data_dir, split))
    folders = _subdirs(root)
    stamps: dict[str, Any] = {".": _stamp(root)}
    if folders:
        extra = sorted(set(folders) - set(classes))
        if extra or (imagenet and set(folders) != set(classes)):
            missing = sorted(set(classes) - set(folders))
            raise ValueError(
                f"{root} has other classes than {os.path.join(data_dir, 'train')}: "
                + (f"{len(extra)} not in train ({', '.join(extra[:5])})" if extra else "")
                + ("; " if extra and missing else "")
                + (f"{len(missing)} missing ({', '.join(missing[:5])})" if missing else "")
                + "; both splits need the same class folders")
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # a network FS overlaps
            listed = list(pool.map(_list_dir, [os.path.join(root, c) for c in folders]))
        paths, labels, sizes = [], [], []
        hidden = other = 0
        label_of = {c: k for k, c in enumerate(classes)}
        for c, (files, h, o) in zip(folders, listed):
            paths += [f"{c}/{name}" for name, _ in files]
            sizes += [size for _, size in files]
            labels += [label_of[c]] * len(files)
            hidden, other = hidden + h, other + o
            stamps[c] = _stamp(os.path.join(root, c))
    else:  # a flat folder: labelled by a file
        files, hidden, other = _list_dir(root)
        labels_file = find_val_labels(data_dir, val_labels, imagenet=imagenet)
        if split == "train" or labels_file is None:
            raise ValueError(
                f"{root} holds no class folders" + ("" if split == "train" else
                "; label its files with --val-labels FILE: Kaggle's LOC_val_solution.csv, "
                "`file class` lines, or one class a line in sorted file-name order"))
        names = [name for name, _ in files]
        named = read_val_labels(labels_file, names)
        unknown = sorted(set(named) - set(classes))
        if unknown:
            raise ValueError(f"{labels_file} names {len(unknown)} class(es) that "
                             f"{os.path.join(data_dir, 'train')} has no folder for, e.g. "
                             f"{unknown[:3]}; valid: the train folder's class names")
        label_of = {c: k for k, c in enumerate(classes)}
        paths, sizes = names, [size for _, size in files]
        labels = [label_of[c] for c in named]
        stamps["labels"] = [os.path.abspath(labels_file), _stamp(labels_file)]
    if not paths:
        raise ValueError(f"{root} holds no image files ({', '.join(EXTENSIONS)}, any case)")
    return FolderIndex(root=root, classes=classes, paths=np.array(paths, dtype=np.bytes_),
                       labels=np.array(labels), sizes=np.array(sizes),
                       skipped={"hidden": hidden, "other": other}, stamps=stamps)


def unchanged(index: FolderIndex, root: str) -> bool:
    """The cheap check: the index was listed from ``root`` and no listed folder (nor the
    label file) changed since. A file rewritten in place keeps its folder's time: a full
    re-list (``relist``) finds that."""
    if index.root != root:
        return False
    try:
        for name, stamp in index.stamps.items():
            if name == "labels":
                if _stamp(stamp[0]) != stamp[1]:
                    return False
            elif _stamp(os.path.normpath(os.path.join(root, name))) != stamp:
                return False
    except OSError:
        return False
    return True


def open_index(data_dir: str, split: str, *, index_dir: str | None = None,
               relist: bool = False, val_labels: str | None = None, imagenet: bool = False,
               log_fn=None) -> FolderIndex:
    """The index of ``split``: the one kept in ``index_dir`` when the cheap check passes,
    else listed anew (and kept there)."""
    say = log_fn or log.info
    classes = train_classes(data_dir, imagenet=imagenet)
    root = os.path.abspath(split_dir(data_dir, split))
    kept = os.path.join(index_dir, f"folder_index_{split}.bin") if index_dir else None
    if kept and not relist:
        index = FolderIndex.load(kept)
        if index is not None and index.classes == classes and unchanged(index, root):
            if not val_labels or index.stamps.get("labels", [None])[0] == os.path.abspath(
                    val_labels):
                return index
    index = build_index(data_dir, split, classes=classes, val_labels=val_labels,
                        imagenet=imagenet)
    skipped = index.skipped
    say(f"{root}: listed {len(index):,} image files of {len(classes):,} classes"
        + (f" (skipped {skipped['hidden']:,} hidden and {skipped['other']:,} other entries)"
           if skipped["hidden"] or skipped["other"] else ""))
    if kept:
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        index.save(kept)
        # The earlier format's file (its fingerprint is the same: resumes still match);
        # tidying it up never stops a run that has just kept its index.
        with contextlib.suppress(OSError):
            os.remove(os.path.join(os.path.dirname(kept), f"folder_index_{split}.npz"))
    return index


def index_identity(split: str, index: FolderIndex) -> dict:
    return identity(split, len(index), "the sorted relative paths, labels and sizes of the "
                    "folder's image files, and the class names", index.fingerprint().encode())


# ---------------------------------------------------------------------------- source
class FolderSource(ImageNetSource):
    """One split of a folder data set, decoded exactly as ``ImageNetSource`` decodes
    (the same transforms, bad-file handling and ``max_bad_fraction``).

    Args:
      data_dir: the folder holding ``train/`` and ``val/`` (or ``validation/``).
      split: ``"train"`` or ``"validation"``.
      imagenet: hold the folder to ImageNet's checks (1,000 wnid classes, the same
        classes in both splits).
      index_dir: where the index is kept (the run's workdir); ``None``: listed anew.
      relist: list the files again even if the kept index passes the cheap check.
      val_labels: the label file of a flat validation folder.
      index: an index already built, or a ``KeptIndex`` (how a decoding worker opens the
        split: it maps the parent's kept file instead of receiving the arrays pickled).
      Other arguments: as ``ImageNetSource``.
    """

    def __init__(self, *, data_dir, split="train", imagenet=False, index_dir=None,
                 relist=False, val_labels=None, index=None, image_size=224,
                 eval_resize=256, decode_threads=None, max_bad_fraction=1e-3,
                 area_range=None, ratio_range=None, color_jitter=0.0, lighting=0.0,
                 resizer="auto", log_fn=None):
        area_range = tuple(area_range or AREA_RANGE)
        ratio_range = tuple(ratio_range or RATIO_RANGE)
        resizer = self._configure(
            image_size=image_size, eval_resize=eval_resize, decode_threads=decode_threads,
            max_bad_fraction=max_bad_fraction, area_range=area_range,
            ratio_range=ratio_range, color_jitter=color_jitter, lighting=lighting,
            resizer=resizer)
        if isinstance(index, KeptIndex):
            index = index.open()
        elif index is None:
            index = open_index(str(data_dir), split, index_dir=index_dir, relist=relist,
                               val_labels=val_labels, imagenet=imagenet, log_fn=log_fn)
        self.index, self.split = index, split
        self.builder_name = str(data_dir)  # names the data set in the bad-data messages
        self.num_examples = len(index)
        self.num_classes = len(index.classes)
        self.classes = list(index.classes)
        self.identity = index_identity(split, index)
        self._data_dir = index.root
        self._worker_options = dict(
            data_dir=str(data_dir), split=split, image_size=image_size,
            eval_resize=eval_resize, decode_threads=1, max_bad_fraction=max_bad_fraction,
            area_range=area_range, ratio_range=ratio_range, color_jitter=color_jitter,
            lighting=lighting, resizer=resizer)

    def _read_one(self, j: int):
        name = self.index.paths[j].decode()
        data: bytes | OSError
        try:
            with open(os.path.join(self.index.root, name), "rb") as f:
                data = f.read()
        except OSError as e:  # unreadable: bad like an undecodable image
            data = e
        return {"image": data, "label": int(self.index.labels[j]), "file_name": name}

    def _read(self, ids):
        return [self._read_one(j) for j in ids]

    def _try_decode(self, data, u):
        if isinstance(data, OSError):
            return data
        return super()._try_decode(data, u)

    def worker_opener(self):
        """``(callable, kwargs)`` that opens this split in a decoding worker process,
        with this index (no listing there): the kept file, mapped by each worker, or the
        arrays themselves when the index is in memory only (no ``index_dir``)."""
        index = self.index
        shared = KeptIndex(index.file, index.fingerprint()) if index.file else index
        return FolderSource, dict(self._worker_options, index=shared)
