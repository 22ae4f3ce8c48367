"""Write the built-in `demo` dataset to a folder, to look at it or to train on a copy of it.

python tools/make_demo_data.py OUT_DIR [--train 5000] [--val 1000] [--size 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.demo import CLASSES, make_demo_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--train", type=int, default=5000, help="training images")
    parser.add_argument("--val", type=int, default=1000, help="validation images")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--task", choices=["shape_texture", "shapes", "digits"], default="shape_texture", help="which labels"
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} already exists; choose a new folder", file=sys.stderr)
        return 2
    if min(args.train, args.val) < len(CLASSES) or args.size < 16:
        print(f"error: need at least {len(CLASSES)} images per split and --size >= 16", file=sys.stderr)
        return 2
    make_demo_dataset(args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed, task=args.task)
    print(f"wrote {args.train} train / {args.val} val images ({args.task}) to {args.out}")
    sets = f"--set data.train={args.out}/train --set data.val={args.out}/val"
    print(f"train on it with: python -m pipeline run stages.yaml {sets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
