"""Input pipeline throughput: train transform images/s per CPU core on ImageNet-like JPEGs.

    python experiments/bench_input_pipeline.py [--num-images 256] [--rounds 3]

Generates ~500x375 quality-90 JPEGs with photo-like content (smooth color fields plus
texture, so that file sizes are near ImageNet's ~110 KB average) in a temporary
directory, then measures the full train transform (decode, random-resized crop to 224,
flip; ``lsgd_jax.data.augment.decode_train``):

1. on the encoded bytes in memory, with 1 thread and with all cores;
2. the same without ``Image.draft`` (full-resolution decode), for comparison;
3. TensorFlow's ``decode_and_crop_jpeg`` + bilinear resize (if TensorFlow is installed);
4. end to end: a tfds ArrayRecord data set read by ``TrainIterator`` over
   ``ImageNetSource`` (the training path), with 1 and all decoding threads.

Prints images/s and images/s per core. Timings on a machine shared with other work
vary; the best of ``--rounds`` is reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from lsgd_jax.data.augment import (
    CROP_ATTEMPTS,
    NUM_TRAIN_UNIFORMS,
    decode_train,
    example_uniforms,
    random_resized_crop_box,
)


def photo_like_jpeg(rng: np.random.Generator, width=500, height=375, quality=90) -> bytes:
    """Smooth color field + mid-frequency texture + fine noise, encoded as JPEG."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        f = rng.uniform(0.005, 0.03, 4)
        img[..., c] = 128 + 70 * np.sin(f[0] * x + f[1] * y) * np.cos(f[2] * x - f[3] * y)
    coarse = rng.normal(0, 40, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    img += np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def transform_no_draft(data: bytes, u, size=224) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    x, y, w, h = random_resized_crop_box(img.size[0], img.size[1], u)
    out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h)))
    return out[:, ::-1] if u[4 * CROP_ATTEMPTS] < 0.5 else out


def make_tf_transform():
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    def transform(data: bytes, u, size=224):
        shape = tf.io.extract_jpeg_shape(data).numpy()
        x, y, w, h = random_resized_crop_box(int(shape[1]), int(shape[0]), u)
        img = tf.image.decode_and_crop_jpeg(data, [y, x, h, w], channels=3)
        img = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8).numpy()
        return img[:, ::-1] if u[4 * CROP_ATTEMPTS] < 0.5 else img

    return transform


def rate(fn, blobs, uniforms, threads, rounds) -> tuple[float, float]:
    """Best (images per wall second, images per CPU second of this process)."""
    best, best_cpu = 0.0, 0.0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, blobs[:threads * 4], uniforms[:threads * 4]))  # warm up
        for _ in range(rounds):
            t, c = time.perf_counter(), time.process_time()
            list(pool.map(fn, blobs, uniforms))
            best = max(best, len(blobs) / (time.perf_counter() - t))
            best_cpu = max(best_cpu, len(blobs) / (time.process_time() - c))
    return best, best_cpu


def report(name, rates, cores):
    # images/s per CPU second is what one core delivers, even when other work shares them.
    ips, per_cpu_s = rates
    print(f"{name:<46s} {cores:>2d} thread(s): {ips:7.1f} images/s  {ips / cores:6.1f} /core"
          f"  ({per_cpu_s:6.1f} per CPU-second)")


def bench_tfds(blobs, cores, rounds, batch):
    import tensorflow_datasets as tfds

    from lsgd_jax.data import TrainIterator
    from lsgd_jax.data.imagenet import ImageNetSource

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

    with tempfile.TemporaryDirectory() as tmp:
        BenchJpegs(data_dir=tmp, file_format="array_record").download_and_prepare()
        for threads in sorted({1, cores}):
            src = ImageNetSource(split="train", data_dir=tmp, builder_name="bench_jpegs",
                                 decode_threads=threads)
            it = TrainIterator(src, global_batch_size=batch, seed=0)
            next(it)
            best, best_cpu = 0.0, 0.0
            for _ in range(rounds):
                t, c = time.perf_counter(), time.process_time()
                n = 0
                for _ in range(max(1, len(blobs) // batch)):
                    n += len(next(it)["label"])
                best = max(best, n / (time.perf_counter() - t))
                best_cpu = max(best_cpu, n / (time.process_time() - c))
            src.close()
            report("tfds ArrayRecord -> TrainIterator (end to end)", (best, best_cpu), threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-tf", action="store_true", help="skip the TensorFlow variants")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    rng = np.random.default_rng(0)
    blobs = [photo_like_jpeg(rng) for _ in range(args.num_images)]
    uniforms = list(example_uniforms(0, 0, np.arange(len(blobs)), NUM_TRAIN_UNIFORMS))
    print(f"{len(blobs)} JPEGs 500x375 q90, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} KB;"
          f" {cores} CPU cores; output 224x224x3 uint8")

    for threads in sorted({1, cores}):
        report("PIL + draft (decode_train)", rate(decode_train, blobs, uniforms, threads,
                                                  args.rounds), threads)
    jitter_lighting = functools.partial(decode_train, color_jitter_strength=0.4,
                                        lighting_std=0.1)
    for threads in sorted({1, cores}):
        report("PIL + draft + colour jitter 0.4 + lighting 0.1",
               rate(jitter_lighting, blobs, uniforms, threads, args.rounds), threads)
    for threads in sorted({1, cores}):
        report("PIL, full-resolution decode", rate(transform_no_draft, blobs, uniforms,
                                                   threads, args.rounds), threads)
    if not args.skip_tf:
        try:
            tf_transform = make_tf_transform()
        except ImportError:
            print("TensorFlow not installed: skipping its variants")
        else:
            report("TF decode_and_crop_jpeg + resize", rate(tf_transform, blobs, uniforms, 1,
                                                             args.rounds), 1)
            bench_tfds(blobs, cores, args.rounds, args.batch_size)


if __name__ == "__main__":
    main()
