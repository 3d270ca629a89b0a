"""Generated image files, with no TensorFlow: the tiny ImageNet-like set of the reader's
tests, as encoded bytes (``encode``) or written as a folder data set (``write_folder``).

Ordinary JPEGs, a CMYK JPEG, PNG data under a .JPEG name, a grayscale JPEG, a corrupt
file and a truncated JPEG. Each example is a flat color that encodes its number, so a
decoded crop tells which example it came from.
"""

import io
import os

import numpy as np
from PIL import Image

NUM = 40
CORRUPT, TRUNCATED, CMYK, PNG, GRAY = 5, 17, 8, 23, 30
CLASSES = ("n00000000", "n00000001", "n00000002", "n00000003")  # example i has label i % 4


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


def file_name(i: int) -> str:
    # Mixed extension case: files are matched case-insensitively.
    return f"img_{i:02d}." + ("JPEG", "jpg", "jpeg", "JPG")[i % 4]


def sorted_examples() -> list[tuple[int, int, str]]:
    """(example, label, relative path) in the folder data set's order: class by class,
    file names sorted."""
    rows = [(CLASSES[i % 4], file_name(i), i) for i in range(NUM)]
    return [(i, CLASSES.index(c), f"{c}/{name}") for c, name, i in sorted(rows)]


def write_folder(root, *, flat_val: bool = False, extras: bool = True) -> str:
    """The examples as ``root/train/<class>/img_NN.<ext>`` and the same files in
    ``root/val/`` (class folders, or flat with ``root/val_labels.txt`` as `file class`
    lines); with ``extras``, a hidden file and a text file that the listing skips."""
    root = str(root)
    for split in ("train", "val"):
        for i, _, rel in sorted_examples():
            path = os.path.join(root, split, os.path.basename(rel) if flat_val and split == "val"
                                else rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(encode(i))
    if extras:
        for name in (".DS_Store", "notes.txt"):
            with open(os.path.join(root, "train", CLASSES[0], name), "w") as f:
                f.write("not an image")
    if flat_val:
        with open(os.path.join(root, "val_labels.txt"), "w") as f:
            for i in range(NUM):
                f.write(f"{file_name(i)} {CLASSES[i % 4]}\n")
    return root
