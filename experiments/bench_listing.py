"""How long the folder source takes to list a data set, and to check a kept index.

    python experiments/bench_listing.py [--files 200000] [--classes 1000] [--root /tmp/x]

Writes a tree of ``--files`` small files in ``--classes`` class folders (ImageNet's
layout: ``train/<wnid>/<wnid>_<n>.JPEG``, a few bytes each: listing reads names and
sizes, never the contents), then times, each the best of ``--rounds``:

* the full listing (``folders.build_index``: a directory scan per class, a ``stat`` per
  file for its size, in 8 threads), with a warm dentry/inode cache;
* the cheap check of a kept index (``folders.unchanged``: a ``stat`` per folder), and
  loading the kept index from its file.

The tree is removed afterwards unless ``--keep`` (writing ImageNet's count took 2 minutes
on this project's loaded 2-core VM, removing it more than 15). On a local disk with warm caches this
measures the CPU cost; a network file system adds its round trips per directory and per
``stat``, which the per-file figure lets one extrapolate to 1,281,167 files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from lsgd_jax.data import folders

IMAGENET_TRAIN = 1_281_167


def write_tree(root: str, files: int, classes: int) -> None:
    wnids = [f"n{k:08d}" for k in range(classes)]
    for split in ("train", "val"):
        for w in wnids:
            os.makedirs(os.path.join(root, split, w), exist_ok=True)
    for i in range(files):
        w = wnids[i % classes]
        with open(os.path.join(root, "train", w, f"{w}_{i}.JPEG"), "wb") as f:
            f.write(b"\xff\xd8")
    for w in wnids:
        with open(os.path.join(root, "val", w, f"{w}_val.JPEG"), "wb") as f:
            f.write(b"\xff\xd8")


def best_of(rounds: int, fn):
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default=None, help="where to write the tree (default: a "
                        "new folder under the temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the tree")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench_listing_")
    try:
        t = time.perf_counter()
        write_tree(root, args.files, args.classes)
        print(f"wrote {args.files:,} files in {args.classes:,} class folders under {root} in "
              f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f}")
        classes = folders.train_classes(root)
        listing, index = best_of(args.rounds, lambda: folders.build_index(
            root, "train", classes=classes))
        assert len(index) == args.files
        kept = os.path.join(root, "index.npz")
        index.save(kept)
        check, ok = best_of(args.rounds, lambda: folders.unchanged(
            index, os.path.abspath(os.path.join(root, "train"))))
        assert ok
        load, _ = best_of(args.rounds, lambda: folders.FolderIndex.load(kept))
        per_file = listing / args.files
        print(f"full listing: {listing:.2f} s ({1e6 * per_file:.1f} µs a file; at this rate "
              f"ImageNet's {IMAGENET_TRAIN:,} training files: {per_file * IMAGENET_TRAIN:.0f} s)")
        print(f"cheap check of a kept index ({args.classes + 1:,} folders): {1e3 * check:.1f} ms;"
              f" loading the kept index ({os.path.getsize(kept) / 1e6:.1f} MB): "
              f"{1e3 * load:.0f} ms (ImageNet's: about "
              f"{load * IMAGENET_TRAIN / args.files:.1f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
