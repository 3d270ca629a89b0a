"""A tiny real tfds data set with imagenet2012's features, built from generated image files
(``tiny_images``).

Raw encoded bytes are kept: ordinary JPEGs, a CMYK JPEG, PNG data under a .JPEG name,
a grayscale JPEG, a corrupt file and a truncated JPEG. Each example is a flat color that
encodes its number, so a decoded crop tells which example it came from. Shared by the
reader's tests and the trainer's ImageNet-path test.
"""

import tensorflow_datasets as tfds
from tiny_images import (  # noqa: F401 (re-exported: the tests import them from here)
    CLASSES,
    CMYK,
    CORRUPT,
    GRAY,
    NUM,
    PNG,
    TRUNCATED,
    color,
    encode,
    sorted_examples,
)

BUILDER = "lsgd_tiny_imagenet"
SORTED_BUILDER = "lsgd_tiny_imagenet_sorted"


class LsgdTinyImagenet(tfds.core.GeneratorBasedBuilder):
    """imagenet2012's features, raw bytes kept as they are (tfds does not re-encode bytes)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=4),
                "file_name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM), "validation": self._generate_examples(NUM)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": encode(i), "label": i % 4, "file_name": f"n0000_{i}.JPEG"}


class LsgdTinyImagenetSorted(tfds.core.GeneratorBasedBuilder):
    """The same images in the order of their files in class folders (``tiny_images.
    write_folder``): class by class, file names sorted; tfds keeps that order."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(CLASSES)),
                "file_name": tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):
        for key, (i, label, name) in enumerate(sorted_examples()):
            yield key, {"image": encode(i), "label": label, "file_name": name}


def build_sorted(data_dir: str) -> str:
    """Prepare the sorted-order data set as ArrayRecord under ``data_dir``."""
    LsgdTinyImagenetSorted(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def build(data_dir: str) -> str:
    """Prepare the data set as ArrayRecord under ``data_dir``; returns ``data_dir``."""
    LsgdTinyImagenet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def damaged_copy(data_dir: str, to, how: str) -> tuple[str, str]:
    """A copy of the prepared data set whose train shard is damaged; returns the copy's data
    dir and the shard's path. ``how``: "block" overwrites 4 KiB in the middle of the
    records' bytes (the middle of this small file is its index, past the records);
    "truncate" cuts the file to half its size."""
    import glob
    import os
    import shutil

    from array_record.python.array_record_module import ArrayRecordReader

    shutil.copytree(data_dir, to)
    (shard,) = glob.glob(os.path.join(str(to), BUILDER, "*", "*-train.array_record-*"))
    if how == "truncate":
        os.truncate(shard, os.path.getsize(shard) // 2)
        return str(to), shard
    reader = ArrayRecordReader(shard)
    stored = sum(len(r) for r in reader.read_all())
    reader.close()
    with open(shard, "r+b") as f:
        f.seek(stored // 2)
        f.write(b"\xff" * 4096)
    return str(to), shard


def unreadable_ids(shard: str) -> list[int]:
    """The records of a single-shard split that ArrayRecord cannot read, one at a time
    (their ids: the split is that one shard)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(shard, options="readahead_buffer_size:0")
    bad = []
    for i in range(NUM):
        try:
            reader.read([i])
        except RuntimeError:
            bad.append(i)
    reader.close()
    return bad
