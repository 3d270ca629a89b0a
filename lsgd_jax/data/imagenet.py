"""ImageNet (tfds ``imagenet2012``) with random access over ArrayRecord files.

Random access (``builder.as_data_source``) is what makes Remark 4 exact: any process
can read any example, so each epoch's single global permutation is divided among all
processes anew (``sampler.shard_indices``). The images are read as their encoded bytes
(``tfds.decode.SkipDecoding``) and decoded with PIL in a thread pool
(``augment.decode_train`` / ``decode_eval``): the crop window is chosen from the header
and only the needed resolution is decoded.

Bad data: an undecodable (corrupt, truncated) image is logged with its id and file name,
counted, and replaced by the next decodable id (id + 1, id + 2, ... modulo the split
size) with the label of that replacement and the augmentation draws of the original id,
so the batch keeps its size and the stream stays deterministic. A record that the
ArrayRecord reader cannot read (a damaged block of a shard fails Riegeli's checksums) is
bad in the same way: it is logged with its shard's file name, counted and replaced. The
reader reads a batch at once and, when that fails, each of its records alone, so a
damaged block costs only the records stored in it and a resume gets past it. Once more
than ``max_bad_fraction`` of the split has been found bad, ``get_batch`` raises
``BadDataError``. A shard that cannot be opened at all (truncated, its index lost) is
``DamagedShardError``, found when the training process opens the split. CMYK,
grayscale and PNG data (whatever the file name) decode to RGB.

The data set is prepared once with ``experiments/prepare_imagenet.py``; tests build a
small builder with the same features and pass its name as ``builder_name``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Callable

import numpy as np

from lsgd_jax.data.augment import (
    AREA_RANGE,
    DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_TRAIN_UNIFORMS,
    RATIO_RANGE,
    decode_eval,
    decode_train,
    example_uniforms,
    resolve_resizer,
)
from lsgd_jax.data.source import BadDataError, identity

log = logging.getLogger(__name__)

PREPARE_HINT = (
    "Prepare it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a "
    "folder MANUAL_DIR, then run `python experiments/prepare_imagenet.py "
    "--manual-dir MANUAL_DIR --data-dir DATA_DIR` and pass the same DATA_DIR here "
    "(--data-dir)."
)


class DamagedShardError(BadDataError):
    """An ArrayRecord shard that cannot be opened at all (truncated, its index damaged)."""


class UnreadableRecord(Exception):
    """Stands for a record the reader could not read: its shard file and the reader's error."""

    def __init__(self, shard: str, error: str):
        super().__init__(error)
        self.shard = shard


def _read_errors() -> tuple:
    """What reading a record can raise: Riegeli's checks (RuntimeError), the file system,
    and a serialized example that protobuf cannot parse."""
    from google.protobuf.message import DecodeError

    return (RuntimeError, OSError, DecodeError)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _open_builder(builder_name: str, data_dir, builder_dir=None):
    import tensorflow_datasets as tfds  # deferred: hosts without TensorFlow never get here

    if builder_dir is not None:  # a decoding worker: the prepared folder, no registered class
        return tfds.builder_from_directory(builder_dir), tfds

    # tfds warns "Variant folder ... has no dataset_info.json" for a data set that is not
    # prepared (even for a folder that does not exist); the error below says it plainly.
    absl_logger = logging.getLogger("absl")
    quiet = _DropMessages("has no dataset_info.json")
    absl_logger.addFilter(quiet)
    try:
        return _builder(tfds, builder_name, data_dir)
    finally:
        absl_logger.removeFilter(quiet)


def _builder(tfds, builder_name: str, data_dir):
    try:
        builder = tfds.builder(builder_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown tfds data set {builder_name!r}: {e}") from None
    if not builder.is_prepared():
        where = os.path.join(str(builder.data_dir_root), builder_name)
        raise FileNotFoundError(
            f"tfds data set {builder_name!r} is not prepared under {where} "
            f"(data_dir={data_dir!r}). {PREPARE_HINT}"
        )
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise ValueError(
            f"{builder_name} in {builder.data_dir} is stored as {file_format}, which has no "
            "random access; Remark 4's global shuffle needs ArrayRecord. Prepare it again "
            "with file_format='array_record' (experiments/prepare_imagenet.py does)."
        )
    return builder, tfds


class ImageNetSource:
    """One split of a tfds image-classification data set, preprocessed per section 5.1.

    Args:
      split: ``"train"`` or ``"validation"`` (any split name of the builder).
      data_dir: tfds data dir (``None``: tfds's default, ``~/tensorflow_datasets``).
      builder_name: tfds builder with features ``image`` and ``label`` (ClassLabel),
        and optionally ``file_name``.
      image_size: output side (224).
      eval_resize: shorter side before the eval center crop (256).
      decode_threads: decoding threads (``None``: all cores). Results do not depend on it.
      max_bad_fraction: fail once more than this fraction of the split is bad (an
        image that cannot be decoded, a record that cannot be read).
      area_range, ratio_range: the train crop's area fraction and aspect ratio ranges.
      resizer: the train crop's resize, ``"auto"``, ``"opencv"`` or ``"pil"``
        (``augment.resolve_resizer``).
      builder_dir: the prepared data set's folder, read without its builder class (how
        decoding worker processes open it; ``builder_name`` then only names it).
    """

    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(
        self,
        *,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        builder_name: str = "imagenet2012",
        image_size: int = 224,
        eval_resize: int = 256,
        decode_threads: int | None = None,
        max_bad_fraction: float = 1e-3,
        area_range: tuple[float, float] = AREA_RANGE,
        ratio_range: tuple[float, float] = RATIO_RANGE,
        color_jitter: float = 0.0,
        lighting: float = 0.0,
        resizer: str = "auto",
        builder_dir: str | None = None,
    ):
        resizer = self._configure(
            image_size=image_size, eval_resize=eval_resize, decode_threads=decode_threads,
            max_bad_fraction=max_bad_fraction, area_range=area_range, ratio_range=ratio_range,
            color_jitter=color_jitter, lighting=lighting, resizer=resizer)
        builder, tfds = _open_builder(builder_name, data_dir, builder_dir)
        if split not in builder.info.splits:
            raise ValueError(
                f"{builder_name} has no split {split!r}; valid: {sorted(builder.info.splits)}"
            )
        self.split = split
        self.builder_name = builder_name
        self._records = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        self.num_examples = len(self._records)
        self.num_classes = builder.info.features["label"].num_classes
        # What tfds recorded when it prepared the split; a moved copy keeps it.
        info = builder.info.splits[split]
        self.identity = identity(
            split, self.num_examples, "tfds's record of the prepared split: name, version, "
            "shard lengths and bytes", {
                "name": builder.info.name, "version": str(builder.info.version),
                "shard_lengths": [int(n) for n in info.shard_lengths],
                "num_bytes": int(info.num_bytes)})
        # What a decoding worker process needs to open the same split, decoding alike.
        self._worker_options = dict(
            split=split, builder_name=builder_name, builder_dir=str(builder.data_dir),
            image_size=image_size, eval_resize=eval_resize, decode_threads=1,
            max_bad_fraction=max_bad_fraction, area_range=tuple(area_range),
            ratio_range=tuple(ratio_range), color_jitter=color_jitter, lighting=lighting,
            resizer=resizer)
        # Which shard file holds which ids (the split's files in order), to name the file of
        # a record that cannot be read.
        instructions = builder.info.splits[split].file_instructions
        self._shards = [(str(f.filename), int(f.examples_in_shard)) for f in instructions]
        self._shard_ends = np.cumsum([int(f.take) for f in instructions])
        self._data_dir = str(builder.data_dir)
        self._openable: set[int] = set()  # shards found to open
        if builder_dir is None:  # the training process checks every shard; its workers need not
            try:
                self._check_shards()
            except BaseException:
                self.close()
                raise

    def _configure(self, *, image_size, eval_resize, decode_threads, max_bad_fraction,
                   area_range, ratio_range, color_jitter, lighting, resizer) -> str:
        """Checks the decoding options and sets them, the thread pool and the bad-example
        records (shared with ``folders.FolderSource``); returns the resolved resizer."""
        if decode_threads is None:
            from lsgd_jax.data.workers import usable_cores

            decode_threads = usable_cores()
        if not isinstance(decode_threads, int) or decode_threads < 1:
            raise ValueError(f"decode_threads must be a positive integer, got {decode_threads!r}")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1), got {max_bad_fraction!r}")
        if not (isinstance(image_size, int) and 0 < image_size <= eval_resize):
            raise ValueError(
                f"need 0 < image_size <= eval_resize, got image_size={image_size!r}, "
                f"eval_resize={eval_resize!r}"
            )
        if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
            raise ValueError(f"area_range must satisfy 0 < lo <= hi <= 1, got {area_range}")
        if not 0.0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < lo <= hi, got {ratio_range}")
        for name, value in (("color_jitter", color_jitter), ("lighting", lighting)):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must lie in [0, 1) (fb.resnet.torch: 0.4 and 0.1), "
                                 f"got {value!r}")
        resizer = resolve_resizer(resizer)
        self.image_shape = (image_size, image_size, 3)
        self.max_bad_fraction = max_bad_fraction
        self._eval_resize = eval_resize
        self._crop_kwargs = {"area_range": tuple(area_range), "ratio_range": tuple(ratio_range),
                             "color_jitter_strength": float(color_jitter),
                             "lighting_std": float(lighting), "resizer": resizer}
        self.resizer, self.decode_threads = resizer, decode_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            decode_threads, thread_name_prefix="imagenet_decode"
        )
        self._lock = threading.Lock()
        self._bad: dict[int, str] = {}
        self._unreadable: dict[int, str] = {}  # bad ids whose record could not be read: shard
        return resizer

    @property
    def bad_examples(self) -> dict[int, str]:
        """Ids found bad so far, with their file names (or ``"?"``); for a record that
        could not be read, its shard's file."""
        with self._lock:
            return dict(self._bad)

    def _decode(self, data: bytes, u) -> np.ndarray:
        size = self.image_shape[0]
        if u is None:
            return decode_eval(data, size=size, resize=self._eval_resize)
        return decode_train(data, u, size=size, **self._crop_kwargs)

    def _try_decode(self, data, u):
        if isinstance(data, UnreadableRecord):  # nothing to decode: stays bad as read
            return data
        try:
            return self._decode(data, u)
        except DECODE_ERRORS as e:
            return e

    # ---------------------------------------------------------------- damaged shards
    def _shard_problem(self, k: int) -> str:
        """Why shard ``k`` cannot be opened, or "" when it opens with all its records."""
        from array_record.python.array_record_module import ArrayRecordReader

        path, expected = self._shards[k]
        if not os.path.isfile(path):
            return "the file is missing"
        try:
            reader = ArrayRecordReader(path, options="readahead_buffer_size:0")
        except _read_errors() as e:
            return _first_line(e)
        try:
            if reader.ok() and reader.num_records() == expected:
                return ""
            try:  # a reader that failed to open tells why only when asked for a record
                reader.read([0])
            except _read_errors() as e:
                return _first_line(e)
            return f"the reader finds {reader.num_records()} of its {expected} records"
        finally:
            try:
                reader.close()
            except _read_errors():  # closing a reader that failed to open raises again
                pass

    def _damaged(self, k: int, problem: str) -> str:
        root = os.path.dirname(os.path.dirname(self._data_dir))  # tfds: ROOT/name/version
        builder = "" if self.builder_name == "imagenet2012" else f" --builder {self.builder_name}"
        return (f"{self._shards[k][0]}: shard {k + 1} of {len(self._shards)} of "
                f"{self.builder_name}/{self.split} cannot be opened ({problem}). If it is damaged "
                f"or truncated, prepare the data set again: delete {self._data_dir} and run "
                f"`python experiments/prepare_imagenet.py --manual-dir MANUAL_DIR "
                f"--data-dir {root}{builder}` (or put back an intact copy of the file)")

    def _check_shards(self) -> None:
        """Every shard opens: one that cannot is named before any training starts."""
        problems = list(self._pool.map(self._shard_problem, range(len(self._shards))))
        for k, problem in enumerate(problems):
            if problem:
                raise DamagedShardError(self._damaged(k, problem))
        self._openable.update(range(len(self._shards)))

    def _check_shard(self, k: int) -> None:
        """Raises ``DamagedShardError`` when shard ``k`` cannot be opened (asked once)."""
        with self._lock:
            if k in self._openable:
                return
        problem = self._shard_problem(k)
        if problem:
            raise DamagedShardError(self._damaged(k, problem))
        with self._lock:
            self._openable.add(k)

    def _read(self, ids: list[int]) -> list:
        """The records of ``ids`` in order, an ``UnreadableRecord`` for each that cannot be
        read. A failed batch read does not say which record failed: each is then read alone."""
        try:
            records = self._records.__getitems__(ids)
            if all(r["image"] is not None for r in records):
                return records
        except _read_errors():
            pass
        return [self._read_one(j) for j in ids]

    def _read_one(self, j: int):
        try:
            record = self._records[j]
            # A reader that failed to open returns empty records instead of raising.
            error = "" if record["image"] is not None else "an empty record"
        except _read_errors() as e:
            record, error = None, _first_line(e)
        if not error:
            return record
        k = int(np.searchsorted(self._shard_ends, j, side="right"))
        self._check_shard(k)  # a file that cannot be opened at all is more than a bad record
        return UnreadableRecord(self._shards[k][0], error)

    def worker_opener(self):
        """``(callable, kwargs)`` that opens this split in a decoding worker process."""
        return ImageNetSource, dict(self._worker_options)

    def _mark_bad(self, i: int, record, error: Exception) -> None:
        if isinstance(error, UnreadableRecord):
            name = shard = error.shard
        else:
            name = record.get("file_name", b"?")
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            shard = None
        with self._lock:
            self._bad[int(i)] = name
        text = str(error) if shard else f"{type(error).__name__}: {error}"
        (self._report or self.note_bad)(int(i), name, text, shard)

    def note_bad(self, i: int, name: str, error: str, shard: str | None = None) -> None:
        """Records, logs and counts bad example ``i``: an undecodable image (``name``, its
        file name) or, with ``shard``, a record that could not be read from that shard
        file; raises ``BadDataError`` past ``max_bad_fraction``. (A worker process reports
        its finds here.)"""
        with self._lock:
            self._bad[int(i)] = name
            if shard:
                self._unreadable[int(i)] = shard
            count = len(self._bad)
        if shard:
            log.warning("%s/%s: unreadable record id=%d in shard %s (%s); %d bad so far",
                        self.builder_name, self.split, i, shard, error, count)
        else:
            log.warning("%s/%s: undecodable image id=%d file_name=%s (%s); %d bad so far",
                        self.builder_name, self.split, i, name, error, count)
        if count > self.max_bad_fraction * self.num_examples:
            raise BadDataError(self._too_many(count))

    def _too_many(self, count: int) -> str:
        """One line: how many are bad, which shard files are damaged, which images."""
        with self._lock:
            shards = sorted(set(self._unreadable.values()))
            images = sorted((i, n) for i, n in self._bad.items() if i not in self._unreadable)
        found = []
        if shards:
            found.append(f"{count - len(images)} unreadable record(s) in the damaged shard "
                         f"file(s) {', '.join(shards[:10])}"
                         + (f" and {len(shards) - 10} more" if len(shards) > 10 else ""))
        if images:
            found.append(f"{len(images)} undecodable image(s), ids and files: {images[:20]}")
        return (f"{count} of {self.num_examples} examples of {self.builder_name}/{self.split} "
                f"({100 * count / self.num_examples:.3g} %) are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction} allows: {'; '.join(found)}. "
                + (f"Prepare the data set again (delete {self._data_dir} and re-run "
                   "experiments/prepare_imagenet.py)" if shards else
                   "Check those files in the original archives")
                + " or raise --max-bad-fraction")

    _report: Callable[[int, str, str, str | None], None] | None = None

    def report_bad_to(self, report: Callable[[int, str, str, str | None], None]) -> None:
        """Send each bad example found from now on to ``report(i, name, error, shard)``
        instead of :meth:`note_bad` (a decoding worker passes its finds to the training
        process, whose source counts them against ``max_bad_fraction``)."""
        self._report = report

    def _replacement(self, i: int, u):
        """The next decodable example after ``i``: (image, label)."""
        for k in range(1, self.num_examples):
            j = (i + k) % self.num_examples
            with self._lock:
                known_bad = j in self._bad
            if known_bad:
                continue
            record = self._read_one(j)
            out = self._try_decode(record if isinstance(record, UnreadableRecord)
                                   else record["image"], u)
            if not isinstance(out, Exception):
                return out, record["label"]
            self._mark_bad(j, record, out)
        raise BadDataError(f"no decodable example in {self.builder_name}/{self.split}")

    def get_batch(self, ids, *, seed: int, epoch: int, train: bool):
        """See ``Source.get_batch``; decodes in the thread pool, order preserved."""
        ids = np.asarray(ids, dtype=np.int64)
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        labels = np.empty(len(ids), np.int32)
        self.decode_into(ids, seed=seed, epoch=epoch, train=train, images=images, labels=labels)
        return {"image": images, "label": labels}

    def decode_into(self, ids, *, seed: int, epoch: int, train: bool, images: np.ndarray,
                    labels: np.ndarray, map_fn=None) -> None:
        """``get_batch`` written into ``images`` and ``labels`` (a worker's shared memory).

        ``map_fn`` maps the per-image decode over the images in order (default: this
        source's thread pool; a worker process passes a plain serial map).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
            raise IndexError(f"example ids must lie in [0, {self.num_examples}), got {ids}")
        records = self._read(ids.tolist())
        unreadable = [isinstance(r, UnreadableRecord) for r in records]
        for k in np.flatnonzero(unreadable).tolist():  # counted as they are read, before any decoding
            self._mark_bad(int(ids[k]), None, records[k])
        if train:
            uniforms = list(example_uniforms(seed, epoch, ids, NUM_TRAIN_UNIFORMS))
        else:
            uniforms = [None] * len(ids)
        decoded = (map_fn or self._pool.map)(
            self._try_decode, [r if bad else r["image"] for r, bad in zip(records, unreadable)],
            uniforms)
        for k, out in enumerate(decoded):
            if isinstance(out, Exception):
                if not unreadable[k]:
                    self._mark_bad(int(ids[k]), records[k], out)
                out, label = self._replacement(int(ids[k]), uniforms[k])
            else:
                label = records[k]["label"]
            images[k] = out
            labels[k] = label

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
