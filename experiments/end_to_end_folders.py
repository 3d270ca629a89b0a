"""End to end on this host: an ImageNet-like JPEG folder, decoded by worker processes,
training ResNet-50 bf16 (no TensorFlow anywhere).

    python experiments/end_to_end_folders.py --root /tmp/e2e [--train-files 4096] [--steps 300]
    python experiments/end_to_end_folders.py --root /tmp/e2e --tiny     # CPU dry run

1. Writes ``ROOT/data/train/<wnid>/*.JPEG`` and ``ROOT/data/val/<wnid>/*.JPEG``: photo-like
   JPEGs (``lsgd_jax.bench.samples.photo_like_jpeg``, quality 95, 4:2:0, about 90 KB),
   sides drawn around 400x350 as ImageNet's average, in parallel on every core; reused
   if present.
2. The input alone: ``WorkerTrainIterator`` over the folder with the run's decoding
   workers, images/s and the workers' images per core-second (their CPU time).
3. The step alone: ``experiments/bench_train_step.py`` with the same model, batch and dtype.
4. The run: ``train_and_evaluate`` with ``--data folder``; end-to-end images/s and the
   input-wait share from its records (after the first ``--skip-steps``), and the
   evaluation's images/s (the restored run evaluated twice, the second timed).

Prints the figures and appends them as one JSON line to ``--json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _write_class(args) -> int:
    from lsgd_jax.bench.samples import photo_like_jpeg

    root, split, wnid, count, seed, (w0, w1), (h0, h1) = args
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, split, wnid)
    os.makedirs(folder, exist_ok=True)
    total = 0
    for i in range(count):
        # Quality 95 brings the mean to ~92 KB at these sides (ImageNet's mean: ~110 KB).
        data = photo_like_jpeg(rng, int(rng.integers(w0, w1 + 1)),
                               int(rng.integers(h0, h1 + 1)), quality=95)
        with open(os.path.join(folder, f"{wnid}_{i}.JPEG"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def write_folder(root: str, *, train: int, val: int, classes: int, tiny: bool) -> dict:
    """The data set under ``root`` (kept: a second call reuses it); its size in figures."""
    done = os.path.join(root, "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    sides = ((40, 64), (32, 56)) if tiny else ((300, 500), (250, 450))
    wnids = [f"n{k:08d}" for k in range(classes)]
    jobs = [(root, split, w, n // classes + (k < n % classes), (split == "val") * 100_000 + k, *sides)
            for split, n in (("train", train), ("val", val)) for k, w in enumerate(wnids)]
    t = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        total = sum(pool.map(_write_class, jobs, chunksize=4))
    facts = {"files": train + val, "mean_kb": total / (train + val) / 1e3,
             "mean_side": [sum(s) / 2 for s in sides], "write_s": time.perf_counter() - t}
    with open(done, "w") as f:
        json.dump(facts, f)
    return facts


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def input_alone(data_dir: str, *, workers: int, batch: int, batches: int, size: int) -> dict:
    from lsgd_jax.data import get_source
    from lsgd_jax.data.workers import WorkerTrainIterator

    with get_source("folder", split="train", data_dir=data_dir, image_size=size) as src:
        it = WorkerTrainIterator(src, decode_workers=workers, global_batch_size=batch, seed=0)
        try:
            next(it)
            cpu0 = sum(_cpu_seconds(p) for p in it.pids)
            t = time.perf_counter()
            for _ in range(batches):
                next(it)
            wall = time.perf_counter() - t
            cpu = sum(_cpu_seconds(p) for p in it.pids) - cpu0
        finally:
            it.close()
    return {"input_alone_img_per_s": batch * batches / wall,
            # None when the workers' CPU time is below the clock's resolution (a dry run)
            "worker_img_per_core_s": batch * batches / cpu if cpu >= 0.1 else None,
            "workers": workers}


def step_alone(model: str, batch_per_device: int, dtype: str, size: int, classes: int,
               tiny: bool, json_path: str) -> float | None:
    steps = ["--steps", "2", "--warmup-steps", "1", "--repeats", "1"] if tiny else [
        "--steps", "20", "--warmup-steps", "5", "--repeats", "2"]
    command = [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--model", model,
               "--batch-per-device", str(batch_per_device), "--dtype", dtype, "--image-size",
               str(size), "--num-classes", str(classes), "--json", json_path,
               "--bn-group-size", str(min(32, batch_per_device)), "--label", "step_alone",
               *steps]
    if subprocess.run(command).returncode:
        return None
    with open(json_path) as f:
        rows = [json.loads(line) for line in f if line.strip().startswith("{")]
    return next((r["img_per_s"] for r in reversed(rows) if r.get("label") == "step_alone"), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="where the data set and the run go")
    p.add_argument("--train-files", type=int, default=4096)
    p.add_argument("--val-files", type=int, default=1024)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip-steps", type=int, default=40, help="records before this step "
                   "(compiling, warming up) are left out of the rates")
    p.add_argument("--batch-per-device", type=int, default=256)
    p.add_argument("--decode-workers", type=int, default=None, help="default: cores - 1")
    p.add_argument("--json", default=None, help="append the figures here as one JSON line")
    p.add_argument("--tiny", action="store_true", help="a CPU dry run: tiny images and model")
    args = p.parse_args()

    import jax

    from lsgd_jax.artifacts.readback import evaluate_run, restore_run
    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.loop import train_and_evaluate
    from lsgd_jax.training.metrics import read_metrics

    tiny = args.tiny
    if tiny:
        args.train_files, args.val_files, args.classes = 96, 32, 4
        args.steps, args.skip_steps, args.batch_per_device = 6, 2, 8
    model, size, dtype = ("resnet18", 32, "float32") if tiny else ("resnet50", 224, "bfloat16")
    data_dir = os.path.join(args.root, "data")
    facts = write_folder(data_dir, train=args.train_files, val=args.val_files,
                         classes=args.classes, tiny=tiny)
    print(f"data: {facts['files']:,} JPEGs, mean {facts['mean_kb']:.0f} KB, sides around "
          f"{facts['mean_side'][0]:.0f}x{facts['mean_side'][1]:.0f} (written in "
          f"{facts['write_s']:.0f} s)")
    devices = jax.device_count()
    batch = args.batch_per_device * devices
    workers = args.decode_workers if args.decode_workers is not None else max(
        1, (os.cpu_count() or 2) - 1)
    out = {"label": "end_to_end_folders", "device": jax.devices()[0].device_kind,
           "devices": devices, "cores": os.cpu_count(), "batch": batch, "model": model,
           "dtype": dtype, "data_mean_kb": facts["mean_kb"]}

    out.update(input_alone(data_dir, workers=workers, batch=batch, batches=3 if tiny else 20,
                           size=size))
    per_core = out["worker_img_per_core_s"]
    print(f"input alone: {out['input_alone_img_per_s']:,.0f} images/s with {workers} decoding "
          f"workers; " + (f"{per_core:,.0f} images per worker core-second" if per_core else
                          "too short to time the workers' CPU"))

    out["step_alone_img_per_s"] = step_alone(model, args.batch_per_device, dtype, size,
                                             args.classes, tiny,
                                             os.path.join(args.root, "step.jsonl"))
    print(f"step alone: {out['step_alone_img_per_s'] or float('nan'):,.0f} images/s")

    workdir = os.path.join(args.root, f"run_{int(time.time())}")
    config = TrainConfig(data="folder", data_dir=data_dir, model=model, dtype=dtype,
                         image_size=size, num_classes=args.classes, batch_size=batch,
                         num_steps=args.steps, eval_every_epochs=90, median_evals=1,
                         decode_workers=workers, log_every_steps=2 if tiny else 20,
                         bn_group_size=4 if tiny else 32)
    t = time.perf_counter()
    train_and_evaluate(config, workdir)
    out["run_s"] = time.perf_counter() - t
    records = [r for r in read_metrics(workdir, "train") if r["step"] > args.skip_steps]
    rates = [r["images_per_second"] for r in records]
    waits = [r["input_wait_fraction"] for r in records]
    out["end_to_end_img_per_s"] = float(np.median(rates)) if rates else None
    out["input_wait_fraction"] = float(np.mean(waits)) if waits else None

    run = restore_run(workdir, log=lambda m: None)
    evaluate_run(run)  # compiles the evaluation step
    t = time.perf_counter()
    result = evaluate_run(run)
    out["eval_img_per_s"] = result["count"] / (time.perf_counter() - t)
    out["eval_decoding"] = f"{workers} worker process{'es' * (workers != 1)}"

    step = out["step_alone_img_per_s"]
    e2e = out["end_to_end_img_per_s"]
    print(f"end to end: {e2e or float('nan'):,.0f} images/s"
          + (f" = {e2e / step:.3f}x the step alone" if e2e and step else "")
          + f"; input wait {100 * (out['input_wait_fraction'] or 0):.1f} % of the time")
    print(f"evaluation: {out['eval_img_per_s']:,.0f} images/s (decoded by {workers} worker "
          f"processes)")
    if step and per_core:
        need = step / out["worker_img_per_core_s"] + 1
        print(f"cores to feed the step: about {need:.0f} ({out['worker_img_per_core_s']:,.0f} "
              f"images per worker core-second, plus one for the training process)")
        out["cores_needed"] = need
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
