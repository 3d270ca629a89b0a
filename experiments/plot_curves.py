"""Plot training and validation curves of one or more runs into a PNG.

    python experiments/plot_curves.py runs/kn256 runs/kn8k --reference runs/kn256
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.plotting import plot_runs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (with metrics.jsonl)")
    parser.add_argument("-o", "--output", default=None,
                        help="PNG to write (default: curves.png in the first run's directory)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names")
    parser.add_argument("--reference", default=None, help="run drawn in black underneath")
    parser.add_argument("--title", default=None)
    parser.add_argument("--smooth", type=int, default=1, help="moving average over logged points")
    args = parser.parse_args()
    missing = [w for w in args.workdirs + ([args.reference] if args.reference else [])
               if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}")
    labels = args.labels.split(",") if args.labels else None
    try:
        path = plot_runs(args.workdirs, args.output, labels=labels, reference=args.reference,
                         title=args.title, smooth=args.smooth)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
