"""Loader throughput per stage size, every backend against `classic` and against the model step.

The measurement quoted in BENCHMARKS.md: `python -m pipeline bench-loader` on the synthetic
dataset it makes for itself (3,000 JPEGs of 160x160 in 10 classes), at the default stages' sizes
and 128 px, 0 to 2 workers, every setting measured 3 times in turn (medians reported).

    python benchmarks/loader_backends.py [stages.yaml] [more bench-loader options]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

DEFAULTS = ["--data", "synthetic", "--sizes", "32,48,64,128", "--workers", "0,1,2", "--repeats", "3", "--batches", "40"]

if __name__ == "__main__":
    args = sys.argv[1:]
    file = args.pop(0) if args and not args[0].startswith("-") else "stages.yaml"
    sys.exit(main(["bench-loader", file, *DEFAULTS, *args]))
