"""How long the folder source takes to list a data set, and to check a kept index.

    python experiments/bench_listing.py [--files 200000] [--classes 1000] [--root /tmp/x]

Writes a tree of ``--files`` small files in ``--classes`` class folders (ImageNet's
layout: ``train/<wnid>/<wnid>_<n>.JPEG``, a few bytes each: listing reads names and
sizes, never the contents), then times, each the best of ``--rounds``:

* the full listing (``folders.build_index``: a directory scan per class, a ``stat`` per
  file for its size, in 8 threads), with a warm dentry/inode cache;
* the cheap check of a kept index (``folders.unchanged``: a ``stat`` per folder), and
  loading the kept index from its file;
* what a decoding worker's copy of ImageNet's train index (1,281,167 entries, made in
  memory: no files needed) costs it: received pickled, as workers were handed it before,
  or mapped from the kept file (``folders.KeptIndex``, what they do now). Each variant
  runs in a fresh process that touches every entry, as an epoch does, and reports its
  private (anonymous) memory and its proportional share (PSS) from
  ``/proc/self/smaps_rollup``; two such processes run at once, as two workers would.

The tree is removed afterwards unless ``--keep`` (writing ImageNet's count took 2 minutes
on this project's loaded 2-core VM, removing it more than 15). On a local disk with warm caches this
measures the CPU cost; a network file system adds its round trips per directory and per
``stat``, which the per-file figure lets one extrapolate to 1,281,167 files.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time

import numpy as np

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


def imagenet_sized_index(root: str) -> folders.FolderIndex:
    """An index with ImageNet's train count and path lengths (``n01440764/n01440764_10026.JPEG``)."""
    wnids = [f"n{k:08d}" for k in range(1000)]
    paths = np.array([f"{wnids[i % 1000]}/{wnids[i % 1000]}_{i}.JPEG"
                      for i in range(IMAGENET_TRAIN)], dtype=np.bytes_)
    return folders.FolderIndex(root=root, classes=wnids, paths=paths,
                               labels=np.arange(IMAGENET_TRAIN) % 1000,
                               sizes=np.full(IMAGENET_TRAIN, 110_000), skipped={},
                               stamps={})


def _memory_kb() -> dict:
    with open("/proc/self/smaps_rollup") as f:
        rows = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(rows[k].split()[0]) for k in ("Anonymous", "Pss")}


def _worker_copy(payload, barrier, out):
    """In a fresh process: open the index as a worker would, touch every entry, report."""
    before = _memory_kb()
    index = pickle.loads(payload)
    if isinstance(index, folders.KeptIndex):
        index = index.open()
    touched = int(index.labels.sum()) + int(index.sizes.sum())
    touched += int(index.paths.view(np.uint8).sum())
    barrier.wait()  # both processes hold the index: PSS splits the shared pages
    after = _memory_kb()
    barrier.wait()
    out.put({k: (after[k] - before[k]) / 1024 for k in after} | {"touched": touched})


def worker_memory(root: str) -> None:
    index = imagenet_sized_index(root)
    kept = os.path.join(root, "folder_index_train.bin")
    index.save(kept)
    ctx = multiprocessing.get_context("spawn")
    print(f"a worker's copy of an ImageNet-sized train index ({IMAGENET_TRAIN:,} entries, "
          f"file {os.path.getsize(kept) / 1e6:.1f} MB), two workers at once, each touching "
          "every entry:")
    for name, handed in (("pickled (before)", index),
                         ("mapped from the kept file (now)", folders.KeptIndex(
                             kept, index.fingerprint()))):
        payload = pickle.dumps(handed)
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_worker_copy, args=(payload, barrier, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        anon = max(g["Anonymous"] for g in got)
        pss = max(g["Pss"] for g in got)
        print(f"  {name:32s} handed over {len(payload):10,} bytes; each worker: "
              f"{anon:6.1f} MiB private, {pss:6.1f} MiB PSS")


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
    parser.add_argument("--only-worker-memory", action="store_true",
                        help="only the workers' memory for the index (no tree written)")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench_listing_")
    if args.only_worker_memory:
        try:
            worker_memory(root)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
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
        kept = os.path.join(root, "index.bin")
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
        worker_memory(root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
