"""A tiny real tfds data set with imagenet2012's features, built from generated image files.

Raw encoded bytes are kept: ordinary JPEGs, a CMYK JPEG, PNG data under a .JPEG name,
a grayscale JPEG, a corrupt file and a truncated JPEG. Each example is a flat color that
encodes its number, so a decoded crop tells which example it came from. Shared by the
reader's tests and the trainer's ImageNet-path test.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM = 40
CORRUPT, TRUNCATED, CMYK, PNG, GRAY = 5, 17, 8, 23, 30
BUILDER = "lsgd_tiny_imagenet"


def color(i):
    return (20 + 5 * i, 235 - 5 * i, 60 + 3 * (i % 7)) if i != GRAY else (128, 128, 128)


def encode(i):
    w, h = (64, 48) if i % 2 else (48, 64)
    img = Image.new("RGB", (w, h), color(i))
    buf = io.BytesIO()
    if i == CMYK:
        img.convert("CMYK").save(buf, "JPEG", quality=95)
    elif i == PNG:
        img.save(buf, "PNG")
    elif i == GRAY:
        img.convert("L").save(buf, "JPEG", quality=95)
    else:
        # A textured corner so JPEGs are not trivially small; the center stays flat.
        a = np.asarray(img).copy()
        a[:4, :4] = np.random.default_rng(i).integers(0, 256, (4, 4, 3))
        Image.fromarray(a).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    if i == CORRUPT:
        return b"\x00garbage, not an image" * 8
    if i == TRUNCATED:
        return data[: len(data) // 2]
    return data


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
