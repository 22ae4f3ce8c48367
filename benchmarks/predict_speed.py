"""`predict` against `eval` on the same images: images/s of each, back to back in one process.

Both run as the command line runs them (the checkpoint loaded, the folder read through the run's
validation loader, the outputs written), alternating, after one untimed pass of each; prints medians
and the ratio predict / eval.

    python benchmarks/predict_speed.py RUN_DIR|CKPT [--data FOLDER] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.commands.eval import run_eval  # noqa: E402
from pipeline.commands.predict import format_rows, run_predict  # noqa: E402
from pipeline.data import resolve_workers  # noqa: E402
from pipeline.data.demo import demo_root  # noqa: E402
from pipeline.files import write_json, write_text  # noqa: E402
from pipeline.inference import last_stage, load_member, resolve_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, metavar="RUN_DIR|CKPT")
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder (default: the run's data.val)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each, alternating")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the last stage's")
    parser.add_argument("--workers", type=int, default=None, help="default: the run's data.workers")
    parser.add_argument("--tta", default="none", help="none, flip or flip+crops, for both")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(args.target)
    member = load_member(checkpoint, torch.device("cpu"), use_ema=False)
    stage = last_stage(member.config)
    val = member.config["data"]["val"]
    data = args.data or (demo_root() / "val" if val == "demo" else Path(val))
    out = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    common = {"tta": args.tta, "batch_size": args.batch_size, "workers": args.workers}

    def run_evaluation() -> tuple[int, float]:
        start = time.perf_counter()
        result, _ = run_eval(args.target, data=data, out=out / "eval", **common)
        return result["samples"], time.perf_counter() - start

    def run_prediction() -> tuple[int, float]:
        start = time.perf_counter()
        result = run_predict(args.target, [data], **common)
        write_text(out / "predictions.csv", format_rows(result.rows, "csv"))
        return len(result.rows), time.perf_counter() - start

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; {checkpoint}")
    run_evaluation(), run_prediction()  # warm-up: file cache, imports, allocator
    evals, predicts = [], []
    for _ in range(args.repeats):
        n_eval, seconds = run_evaluation()
        evals.append(n_eval / seconds)
        n_pred, seconds = run_prediction()
        predicts.append(n_pred / seconds)
        assert n_eval == n_pred, (n_eval, n_pred)  # the same images, every one read by both
    ratios = [p / e for p, e in zip(predicts, evals)]
    row = {
        "images": n_eval,
        "img_size": stage.val_size or stage.img_size,
        "batch_size": args.batch_size or stage.batch_size,
        "workers": resolve_workers(stage.data.workers if args.workers is None else args.workers),
        "tta": args.tta,
        "eval_images_per_s": round(statistics.median(evals), 1),
        "predict_images_per_s": round(statistics.median(predicts), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }
    print()
    columns = ["images", "size", "batch", "workers", "TTA", "eval img/s (median)", "predict img/s (median)"]
    columns += ["median ratio", "per-pass ratios"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    print(
        f"| {row['images']} | {row['img_size']} | {row['batch_size']} | {row['workers']} | {row['tta']} | "
        f"{row['eval_images_per_s']} | {row['predict_images_per_s']} | {row['ratio']} | "
        f"{', '.join(f'{r:.3f}' for r in row['ratios'])} |"
    )
    if args.json:
        write_json(args.json, row)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
