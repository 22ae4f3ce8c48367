"""What starting an epoch costs the DALI loader, against the number of training files.

The DALI loader builds one pipeline per epoch over that epoch's file order. This times, for
datasets of N files (symbolic links to one small JPEG, in 10 class folders of a temporary
directory), `set_epoch` + `iter()` + the first batch, i.e. the file order, the reader's file
list and the pipeline build, on the CPU backend; the median of `--repeats` epochs.

    python benchmarks/dali_epoch_setup.py [--files 5000,50000,300000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.dali import DALILoader  # noqa: E402
from pipeline.data.index import ImageFolderIndex  # noqa: E402
from pipeline.data.spec import LoaderSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="5000,50000,300000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec = LoaderSpec(img_size=32, batch_size=64, train=True, device=torch.device("cpu"), seed=0, workers=1)
    print("| files | epoch start (s), median | per 100,000 files (s) |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "one.jpg"
        Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)).save(jpeg)
        for n in (int(v) for v in args.files.split(",")):
            root = Path(tmp) / str(n)
            classes = [f"c{k}" for k in range(10)]
            samples = []
            for k, c in enumerate(classes):
                (root / c).mkdir(parents=True)
                for i in range(k, n, 10):
                    path = root / c / f"{i}.jpg"
                    os.symlink(jpeg, path)
                    samples.append((str(path), k))
            loader = DALILoader(ImageFolderIndex.of(root, classes, samples), spec)
            times = []
            for epoch in range(args.repeats):
                start = time.perf_counter()
                loader.set_epoch(epoch)
                next(iter(loader))
                times.append(time.perf_counter() - start)
            loader.close()
            t = statistics.median(times)
            print(f"| {n} | {t:.3f} | {t / n * 1e5:.3f} |", flush=True)


if __name__ == "__main__":
    main()
