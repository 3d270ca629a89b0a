"""Prepares the manually downloaded ILSVRC2012 archives as tfds ArrayRecord files.

    python experiments/prepare_imagenet.py --manual-dir ~/ilsvrc2012 --data-dir ~/tensorflow_datasets

``--manual-dir`` must hold ``ILSVRC2012_img_train.tar`` (138 GB) and
``ILSVRC2012_img_val.tar`` (6.3 GB) from image-net.org (registration required).
The result (about 150 GB) goes to ``DATA_DIR/imagenet2012/<version>/`` in the
ArrayRecord format, whose random access lets every epoch's global shuffle be divided
among all processes anew (Remark 4). Training then takes ``--data-dir DATA_DIR``.
Run it once, on one machine (or on shared storage all hosts can read); it is
single-process in tfds and takes several hours.
"""

from __future__ import annotations

import argparse
import os
import sys

REQUIRED = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual-dir", required=True,
                        help="folder holding " + " and ".join(REQUIRED))
    parser.add_argument("--data-dir", required=True, help="tfds data dir to write to")
    parser.add_argument("--builder", default="imagenet2012",
                        help="tfds builder name (default: imagenet2012)")
    args = parser.parse_args(argv)

    manual_dir = os.path.expanduser(args.manual_dir)
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(manual_dir, f))]
    if missing:
        parser.error(
            f"{', '.join(missing)} not found in --manual-dir {manual_dir}. Download them from "
            "https://image-net.org/download-images (ILSVRC2012, 'Training images (Task 1 & 2)' "
            "and 'Validation images (all tasks)') into that folder."
        )

    try:
        # tfds 4.9.10 imports it when preparing a packaged builder, without declaring it
        # for Python >= 3.9.
        import importlib_resources  # noqa: F401
    except ImportError:
        parser.error("tfds needs the package importlib_resources: pip install importlib_resources")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from lsgd_jax.training.extras import MissingExtraError, require

    try:
        tfds = require("data", "tensorflow_datasets", purpose="preparing ImageNet")
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    builder = tfds.builder(
        args.builder, data_dir=os.path.expanduser(args.data_dir), file_format="array_record"
    )
    if builder.is_prepared():
        print(f"{args.builder} is already prepared in {builder.data_dir}")
        return 0
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    splits = {str(name): split.num_examples for name, split in builder.info.splits.items()}
    print(f"prepared {args.builder} in {builder.data_dir}: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
