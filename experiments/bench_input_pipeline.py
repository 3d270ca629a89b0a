"""Input pipeline throughput: the train transform per core, the GIL, threads against processes.

    python experiments/bench_input_pipeline.py [--num-images 192] [--rounds 3] [--skip-tf]

Generated JPEGs (``lsgd_jax.bench.samples``): ``photo`` (500x375, quality 90, 4:2:0,
about ImageNet's average size) and ``hard`` (quality 95, 4:4:4, long side up to
1,000 px). One run prints, side by side:

1. the train transform's candidates on both kinds, one thread, on the same files and
   the same uniform draws (so the same crop boxes): images per CPU-second of this
   process, which is what one core delivers even when other work shares the cores,
   and the pixels' distance to today's PIL transform;
2. the share of the transform's time that holds the GIL (py-spy ``--gil`` against
   py-spy's on-CPU samples of the same loop, both in a child process) and the ceiling
   of one process that follows: images/s on one thread / GIL share;
3. the rate with 1, 2, ... decoding threads in one process and 1, 2, ... worker
   processes (``WorkerTrainIterator``, shared memory), the workers' and the training
   process's CPU time per image, and the projection to 16 cores and the cores needed
   for 7,000 and 32,000 images/s;
4. TensorFlow's ``decode_and_crop_jpeg`` (it decodes only the crop's rows) and the
   tfds ArrayRecord path end to end, at 1 thread and 1 worker, if TensorFlow and tfds
   are installed (``--skip-tf`` skips them);
5. reading from files (the folder source, warm page cache): the train transform of a
   file read with ``open``/``read`` against the same bytes in memory, the share of the
   read, and the folder source's ``get_batch`` on one thread;
6. evaluation from those files: images/s (wall) of the padded evaluation batches decoded
   by 1 and 2 threads of this process and by 1 and 2 worker processes.

Timings on a machine shared with other work vary; the best of ``--rounds`` is reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from lsgd_jax.bench.samples import KINDS, sample_jpegs
from lsgd_jax.data.augment import (
    _FLIP,
    NUM_TRAIN_UNIFORMS,
    _crop_resize,
    decode_train,
    example_uniforms,
    random_resized_crop_box,
)

SIZE = 224


# ------------------------------------------------------------------ transform candidates
def _flip(out, u):
    return out[:, ::-1] if u[_FLIP] < 0.5 else out


def pil_full_decode(data, u):
    """No DCT scaling: full-resolution decode, PIL resize."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    x, y, w, h = random_resized_crop_box(img.size[0], img.size[1], u)
    return _flip(np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR,
                                       box=(x, y, x + w, y + h))), u)


def _dct_scaled_crop(decode, data, width, height, u):
    """Crop box from the header size; ``decode(min_w, min_h)`` returns an RGB array at a
    DCT scale whose size covers the crop at SIZE; OpenCV resize of the rounded box."""
    import cv2

    x, y, w, h = random_resized_crop_box(width, height, u)
    scale = min(1.0, max(SIZE / w, SIZE / h))
    rgb = decode(math.ceil(width * scale), math.ceil(height * scale))
    sx, sy = rgb.shape[1] / width, rgb.shape[0] / height
    x0, y0 = int(round(x * sx)), int(round(y * sy))
    x1, y1 = max(int(round((x + w) * sx)), x0 + 1), max(int(round((y + h) * sy)), y0 + 1)
    return _flip(cv2.resize(rgb[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), u)


def simplejpeg_opencv(data, u):
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return _dct_scaled_crop(lambda mw, mh: simplejpeg.decode_jpeg(
        data, fastdct=True, fastupsample=True, min_width=mw, min_height=mh),
        data, width, height, u)


def pil_decode_opencv_resize(data, u):
    """PIL decodes (with draft), OpenCV resizes."""
    img = Image.open(io.BytesIO(data))
    box = random_resized_crop_box(img.size[0], img.size[1], u)
    return _flip(_crop_resize(img, box, SIZE, "opencv"), u)


def make_tf_transform():
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    def transform(data: bytes, u):
        shape = tf.io.extract_jpeg_shape(data).numpy()
        x, y, w, h = random_resized_crop_box(int(shape[1]), int(shape[0]), u)
        img = tf.image.decode_and_crop_jpeg(data, [y, x, h, w], channels=3)
        img = tf.image.resize(img, (SIZE, SIZE), method="bilinear", antialias=True)
        return _flip(tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8).numpy(), u)

    return transform


def candidates(with_tf: bool) -> dict:
    out = {
        "PIL decode+draft, PIL resize (resizer=pil)": lambda d, u: decode_train(d, u, resizer="pil"),
        "PIL decode+draft, OpenCV resize": pil_decode_opencv_resize,
        "OpenCV decode at PIL's scale+resize (resizer=opencv)":
            lambda d, u: decode_train(d, u, resizer="opencv"),
        "PIL full-resolution decode, PIL resize": pil_full_decode,
    }
    try:
        import simplejpeg  # noqa: F401

        out["simplejpeg fast DCT-scaled decode, OpenCV resize"] = simplejpeg_opencv
    except ImportError:
        print("(simplejpeg not installed: skipping it)")
    if with_tf:
        try:
            out["TF decode_and_crop_jpeg (crop rows only), resize"] = make_tf_transform()
        except ImportError:
            print("(TensorFlow not installed: skipping decode_and_crop_jpeg)")
    return out


def per_cpu_second(fn, blobs, uniforms, rounds) -> tuple[float, list]:
    """Best images per CPU-second of this process, one thread; and the outputs."""
    fn(blobs[0], uniforms[0])
    best, outs = 0.0, []
    for _ in range(rounds):
        c = time.process_time()
        outs = [fn(b, u) for b, u in zip(blobs, uniforms)]
        best = max(best, len(blobs) / (time.process_time() - c))
    return best, outs


def bench_transforms(files, rounds, with_tf) -> dict:
    print("\n1. Train transform, one thread: images per CPU-second (one core), and |pixels -"
          " PIL's| (mean / 99th percentile, 0-255)")
    print(f"{'':54s}" + "".join(f"{k:>24s}" for k in files))
    rates = {}
    reference = {}
    for name, fn in candidates(with_tf).items():
        row = f"{name:54s}"
        for kind, (blobs, uniforms) in files.items():
            rate, outs = per_cpu_second(fn, blobs, uniforms, rounds)
            if kind not in reference:
                reference[kind] = outs
            d = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
                                for a, b in zip(outs, reference[kind])])
            rates[(name, kind)] = rate
            row += f"{rate:9.0f} ({d.mean():4.1f}/{np.percentile(d, 99):3.0f})    "
        print(row)
    return rates


# ------------------------------------------------------------------ the GIL
def gil_probe(kind: str, seconds: float, resizer: str) -> None:
    """Child process: runs the transform on one thread for ``seconds`` (py-spy samples it)."""
    blobs = sample_jpegs(kind, 48, seed=1)
    uniforms = example_uniforms(0, 0, np.arange(len(blobs)), NUM_TRAIN_UNIFORMS)
    transform_loop(blobs, uniforms, seconds, resizer)


def transform_loop(blobs, uniforms, seconds, resizer):
    t, c, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t < seconds:
        for b, u in zip(blobs, uniforms):
            decode_train(b, u, resizer=resizer)
        n += len(blobs)
    print(n / (time.process_time() - c), flush=True)  # images per CPU-second


def _loop_samples(raw_path: str) -> int:
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if "transform_loop" in stack:
                total += int(count)
    return total


def gil_share(kind: str, resizer: str, seconds: float = 6.0):
    """(GIL-held samples / on-CPU samples) of the transform loop, and its images per
    CPU-second."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        return None
    counts, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for gil in (True, False):
            raw = os.path.join(tmp, f"gil{gil}.txt")
            cmd = [py_spy, "record", "-r", "250", "-f", "raw", "-o", raw, *(["--gil"] if gil else []),
                   "--", sys.executable, os.path.abspath(__file__), "--gil-probe", kind,
                   "--resizer", resizer, "--probe-seconds", str(seconds)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
            if result.returncode != 0 or not os.path.exists(raw):
                print(f"(py-spy failed: {result.stderr.strip()[-300:]})")
                return None
            counts.append(_loop_samples(raw))
            numbers = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
            rates.append(float(numbers[-1]))
    return counts[0] / max(counts[1], 1), float(np.mean(rates))


def bench_gil(kinds, resizers):
    print("\n2. GIL: share of the transform's on-CPU time that holds it (py-spy --gil / on-CPU"
          " samples), and the one-process ceiling = images per CPU-second / share (each"
          " image holds the GIL share/rate seconds, and only one thread can)")
    shares = {}
    for resizer in resizers:
        for kind in kinds:
            got = gil_share(kind, resizer)
            if got is None:
                print("py-spy unavailable: GIL share not measured")
                return shares
            share, rate = got
            shares[(resizer, kind)] = share
            print(f"  resizer={resizer:7s} {kind:6s}: GIL held {100 * share:5.1f} % at "
                  f"{rate:5.0f} images per CPU-second -> one process tops out near "
                  f"{rate / max(share, 1e-9):8,.0f} images/s")
    return shares


# ------------------------------------------------------------------ threads and processes
class MemoryJpegSource:
    """JPEG bytes in memory, decoded like ``ImageNetSource`` (threads or worker processes)."""

    num_classes, pixel_mean, pixel_std = 1000, (0.0,) * 3, (1.0,) * 3

    def __init__(self, blobs, resizer="opencv", threads=1):
        self.blobs, self.resizer = blobs, resizer
        self.num_examples, self.image_shape = len(blobs), (SIZE, SIZE, 3)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)

    def worker_opener(self):
        return MemoryJpegSource, {"blobs": self.blobs, "resizer": self.resizer}

    def report_bad_to(self, report) -> None:
        """The workers' interface; these generated files are all decodable."""

    def decode_into(self, ids, *, seed, epoch, train, images, labels, map_fn=None):
        uniforms = example_uniforms(seed, epoch, ids, NUM_TRAIN_UNIFORMS)

        def one(i, u):
            return decode_train(self.blobs[i], u, resizer=self.resizer)

        for k, out in enumerate((map_fn or self._pool.map)(one, [int(i) for i in ids], uniforms)):
            images[k], labels[k] = out, int(ids[k]) % 1000

    def get_batch(self, ids, *, seed, epoch, train):
        images = np.empty((len(ids), SIZE, SIZE, 3), np.uint8)
        labels = np.empty(len(ids), np.int32)
        self.decode_into(ids, seed=seed, epoch=epoch, train=train, images=images, labels=labels)
        return {"image": images, "label": labels}

    def note_bad(self, i, name, error, shard=None):
        raise RuntimeError(f"generated image {i} undecodable: {error}")

    def close(self):
        self._pool.shutdown()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(it, batches, batch):
    """(images/s, training-process CPU s per image, worker CPU s per image or 0)."""
    next(it)
    next(it)  # warm: the workers' slots are full
    pids = getattr(it, "pids", [])
    progress = getattr(it, "_progress", None)
    done0 = int(progress.sum()) if pids else 0
    cpu0 = sum(_cpu_seconds(p) for p in pids)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, main_cpu = time.perf_counter() - t, time.process_time() - c
    worker = 0.0
    if pids:  # images the workers finished meanwhile (they run ahead of the consumer)
        worker = (sum(_cpu_seconds(p) for p in pids) - cpu0) / max(int(progress.sum()) - done0, 1)
    return batches * batch / wall, main_cpu / (batches * batch), worker


def bench_scaling(blobs, counts, batch, batches, rounds):
    from lsgd_jax.data import TrainIterator
    from lsgd_jax.data.workers import WorkerTrainIterator

    print(f"\n3. Threads against processes (photo files, resizer=opencv, batches of {batch}):"
          " images/s (best of rounds); CPU ms per image of the training process and of a"
          " worker")
    results = {}
    for threads in counts:
        source = MemoryJpegSource(blobs, threads=threads)
        best = (0.0, 0.0, 0.0)
        for _ in range(rounds):
            it = TrainIterator(source, global_batch_size=batch, seed=0)
            best = max(best, _timed(it, batches, batch))
        source.close()
        results[("threads", threads)] = best[0]
        print(f"  {threads:2d} thread(s) in one process: {best[0]:7.0f} images/s "
              f"({best[0] / results[('threads', counts[0])]:4.2f}x), "
              f"{1e3 * best[1]:5.2f} CPU ms/image")
    source = MemoryJpegSource(blobs)
    for workers in counts:
        it = WorkerTrainIterator(source, decode_workers=workers, global_batch_size=batch, seed=0)
        best = (0.0, 0.0, 0.0)
        try:
            for _ in range(rounds):
                best = max(best, _timed(it, batches, batch))
        finally:
            it.close()
        rate, main_ms, worker_ms = best[0], 1e3 * best[1], 1e3 * best[2]
        results[("workers", workers)] = rate
        results[("worker_ms", workers)] = worker_ms
        results[("main_ms", workers)] = main_ms
        print(f"  {workers:2d} worker process(es):         {rate:7.0f} images/s "
              f"({rate / results[('workers', counts[0])]:4.2f}x); training process "
              f"{main_ms:5.3f} CPU ms/image, a worker {worker_ms:5.2f} "
              f"(ratio 1/{worker_ms / max(main_ms, 1e-9):.0f})")
    return results


def projections(scaling: dict, counts: list) -> None:
    """From CPU time, which other work on the cores does not distort as it does wall time:
    a worker's CPU ms per image with the most workers measured (their contention for
    memory and caches included) and the training process's own CPU ms per image."""
    top = counts[-1]
    worker_ms, main_ms = scaling[("worker_ms", top)], scaling[("main_ms", top)]
    per_core = 1e3 / worker_ms
    ceiling = 1e3 / max(main_ms, 1e-9)
    print(f"\n4. Projection from CPU time ({top} workers: {worker_ms:.2f} CPU ms per image in a "
          f"worker, {main_ms:.3f} in the training process, so that process alone could take "
          f"{ceiling:,.0f} images/s):")
    for cores in (16,):
        rate = min((cores - 1) * per_core, ceiling)
        print(f"  {cores} cores ({cores - 1} workers + the training process): {rate:,.0f} images/s")
    for target in (7_000, 32_000):
        workers = math.ceil(target / per_core)
        note = "" if target <= ceiling else (f" (beyond one training process's {ceiling:,.0f}:"
                                             " needs several processes, as 8 GPUs have)")
        print(f"  {target:,} images/s needs {workers} worker cores + 1 = {workers + 1} cores{note}")
    if 2 in counts:
        print(f"  measured wall-clock speedup of 2 workers over 1: "
              f"{scaling[('workers', 2)] / scaling[('workers', 1)]:.2f}x (threads: "
              f"{scaling[('threads', 2)] / scaling[('threads', 1)]:.2f}x); wall rates need idle "
              "cores")


# ------------------------------------------------------------------ tfds end to end
def bench_tfds(blobs, rounds, batch, counts):
    import tensorflow_datasets as tfds

    from lsgd_jax.data import TrainIterator
    from lsgd_jax.data.imagenet import ImageNetSource
    from lsgd_jax.data.workers import WorkerTrainIterator

    class BenchJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, b in enumerate(blobs):
                yield i, {"image": b, "label": i % 1000, "file_name": f"{i}.JPEG"}

    print("\n5. tfds ArrayRecord -> TrainIterator end to end (photo files):")
    with tempfile.TemporaryDirectory() as tmp:
        BenchJpegs(data_dir=tmp, file_format="array_record").download_and_prepare()
        for resizer in ("pil", "opencv"):
            for mode, n in [("threads", c) for c in counts] + [("workers", c) for c in counts]:
                src = ImageNetSource(split="train", data_dir=tmp, builder_name="bench_jpegs",
                                     decode_threads=n, resizer=resizer)
                best = (0.0, 0.0, 0.0)
                for _ in range(rounds):
                    it = (TrainIterator(src, global_batch_size=batch, seed=0) if mode == "threads"
                          else WorkerTrainIterator(src, decode_workers=n,
                                                   global_batch_size=batch, seed=0))
                    best = max(best, _timed(it, max(1, len(blobs) // batch), batch))
                    it.close()
                src.close()
                print(f"  resizer={resizer:6s} {n:2d} {mode:8s}: {best[0]:7.0f} images/s, "
                      f"training process {1e3 * best[1]:5.2f} CPU ms/image")


def eval_rates(root, rounds) -> None:
    """6.: wall images/s of one evaluation pass over the folder ``root``'s train split,
    threads against worker processes; best of ``rounds``."""
    from lsgd_jax.data import eval_batches
    from lsgd_jax.data.folders import FolderSource
    from lsgd_jax.data.workers import WorkerEvalIterator

    batch = 32
    opts = dict(data_dir=root, split="train", resizer="opencv")

    def one_pass(make):
        t = time.perf_counter()
        count = sum(int(b["mask"].sum()) for b in make())
        return count / (time.perf_counter() - t)

    rates = {}
    for threads in (1, 2):
        with FolderSource(decode_threads=threads, **opts) as source:
            rates[f"{threads} thread(s)"] = max(one_pass(lambda: eval_batches(
                source, global_batch_size=batch)) for _ in range(rounds))
    print(f"\n6. Evaluation, {source.num_examples} images in batches of {batch} (wall "
          f"images/s, best of {rounds})")
    per_core = 0.0

    def workers_pass(source, workers):
        nonlocal per_core
        it = WorkerEvalIterator(source, global_batch_size=batch, decode_workers=workers)
        try:
            t, count = time.perf_counter(), 0
            for _ in range(len(it._eval_ids)):
                count += int(next(it)["mask"].sum())
            wall = time.perf_counter() - t
            cpu = sum(_cpu_seconds(p) for p in it.pids)  # their whole life: opening included
        finally:
            it.close()
        per_core = max(per_core, count / cpu)
        return count / wall

    with FolderSource(decode_threads=1, **opts) as source:
        for workers in (1, 2):
            rates[f"{workers} worker process(es)"] = max(workers_pass(source, workers)
                                                         for _ in range(rounds))
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:9.0f}")
    print(f"  2 workers / 1 worker: {rates['2 worker process(es)'] / rates['1 worker process(es)']:.2f}x;"
          f" 2 workers / 2 threads: {rates['2 worker process(es)'] / rates['2 thread(s)']:.2f}x;"
          f" {per_core:.0f} images per worker CPU-second (best)")


def bench_files(blobs, rounds) -> None:
    """5.: the same transform from files (written once, then read warm) and from memory."""
    from lsgd_jax.data.folders import FolderSource

    print("\n5. From files (a folder data set, warm page cache), one thread: images per "
          "CPU-second")
    root = tempfile.mkdtemp(prefix="bench_files_")
    try:
        paths = []
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, "n00000000"))
        for i, b in enumerate(blobs):
            paths.append(os.path.join(root, "train", "n00000000", f"img_{i:05d}.JPEG"))
            with open(paths[-1], "wb") as f:
                f.write(b)
        with open(os.path.join(root, "val", "n00000000", "img.JPEG"), "wb") as f:
            f.write(blobs[0])

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        for p in paths:  # warm the page cache
            read(p)

        class InMemory(FolderSource):  # the same source, its bytes in memory
            def _read_one(self, j):
                return {"image": blobs[j], "label": 0, "file_name": str(j)}

        ids = np.arange(len(blobs))
        opts = dict(data_dir=root, split="train", decode_threads=1, resizer="opencv")
        best = {"memory": 0.0, "files": 0.0, "read": 0.0}
        with InMemory(**opts) as memory, FolderSource(**opts) as files:
            for src in (memory, files):
                src.get_batch(ids[:4], seed=0, epoch=0, train=True)
            for _ in range(rounds):  # interleaved: the load of a shared machine hits both
                for name, src in (("memory", memory), ("files", files)):
                    c = time.process_time()
                    src.get_batch(ids, seed=0, epoch=0, train=True)
                    best[name] = max(best[name], len(ids) / (time.process_time() - c))
                c = time.process_time()
                for p in paths:
                    read(p)
                best["read"] = max(best["read"], len(ids) / (time.process_time() - c))
        share = best["files"] / best["read"]
        print(f"  FolderSource.get_batch, bytes in memory          {best['memory']:9.0f}")
        print(f"  FolderSource.get_batch, open/read of the files   {best['files']:9.0f}"
              f"   ({best['files'] / best['memory']:.3f}x memory; the read is "
              f"{100 * share:.1f} % of the time)")
        eval_rates(root, rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round (3.)")
    parser.add_argument("--max-workers", type=int, default=None,
                        help="most threads/processes in 3. (default: the cores)")
    parser.add_argument("--skip-tf", action="store_true", help="skip the TensorFlow variants")
    parser.add_argument("--skip-gil", action="store_true", help="skip the py-spy measurement")
    parser.add_argument("--only-files", action="store_true", help="only 5. (reading from files)")
    parser.add_argument("--gil-probe", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--resizer", default="opencv", help=argparse.SUPPRESS)
    parser.add_argument("--probe-seconds", type=float, default=6.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gil_probe:
        return gil_probe(args.gil_probe, args.probe_seconds, args.resizer)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    files = {}
    for kind in KINDS:
        blobs = sample_jpegs(kind, args.num_images, seed=0)
        files[kind] = (blobs, example_uniforms(0, 0, np.arange(len(blobs)), NUM_TRAIN_UNIFORMS))
        sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
        print(f"{kind}: {len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} KB,"
              f" mean {np.mean([w * h for w, h in sizes]) / 1e3:.0f} kpixels")
    print(f"{cores} CPU cores, load average {load:.2f} at the start; output {SIZE}x{SIZE}x3 uint8")

    if args.only_files:
        return bench_files(files["photo"][0], args.rounds)
    bench_transforms(files, args.rounds, not args.skip_tf)
    if not args.skip_gil:
        bench_gil(KINDS, ("pil", "opencv"))
    top = args.max_workers or cores
    counts = sorted({1, 2, top} & set(range(1, top + 1)))
    scaling = bench_scaling(files["photo"][0], counts, args.batch_size, args.batches, args.rounds)
    projections(scaling, counts)
    if not args.skip_tf:
        try:
            bench_tfds(files["photo"][0], args.rounds, args.batch_size, [1])
        except ImportError:
            print("tfds not installed: skipping the end-to-end path")
    bench_files(files["photo"][0], args.rounds)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
