"""`python -m pipeline eval`: a checkpoint (or several, averaged) on a validation folder.

Top-1/top-5, per-class accuracy and a confusion matrix; test-time augmentation averages the softmax
over flipped (and corner-cropped) views, an ensemble averages it over checkpoints. `--img-size auto`
evaluates at the trained size and a few larger ones and keeps the best (FixRes).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.files import pyplot, write_json, write_png
from pipeline.options import whole

if TYPE_CHECKING:
    import torch

    from pipeline.inference import EvalSetup

HELP = "top-1/top-5, per-class accuracy and a confusion matrix of a checkpoint"
SIZE_FACTORS_PERCENT = (115, 130, 150)  # of the trained size: what `--img-size auto` tries besides it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder (default: the run's data.val)")
    parser.add_argument(
        "--img-size",
        default=None,
        metavar="N|auto",
        help="input size (default: the last stage's); auto: the best of 1, 1.15, 1.3 and 1.5 times it",
    )
    parser.add_argument(
        "--tta", choices=["none", "flip", "flip+crops"], default="none", help="test-time augmentation (default none)"
    )
    parser.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=[],
        metavar="CKPT",
        help="checkpoints or run folders to average with it",
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (runs trained with train.ema)")
    parser.add_argument("--batch-size", type=whole(), default=None, help="default: the last stage's batch size")
    parser.add_argument(
        "--workers", type=whole(0), default=None, help="loader workers (default: the run's data.workers)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/eval)")


def cmd_eval(args: argparse.Namespace) -> int:
    result, out_dir = run_eval(
        args.target,
        data=args.data,
        img_size=args.img_size,
        tta=args.tta,
        ensemble=args.ensemble,
        out=args.out,
        use_ema=args.ema,
        batch_size=args.batch_size,
        workers=args.workers,
        device_name=args.device,
    )
    if "sizes" in result:  # --img-size auto
        for row in result["sizes"]:
            print(f"{row['img_size']:>4}px: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%")
        print(f"chosen: {result['img_size']}px (the best top-1; on a tie, the smaller size)")
    print(format_report(result))
    members = len(result["checkpoints"])
    print(f"{members} checkpoint(s), {result['weights']} weights, {result['img_size']}px, TTA {result['tta']}")
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'confusion_matrix.png'}")
    return 0


def metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 (percent), per-class accuracy and the confusion matrix (rows: true class)."""
    import torch

    from pipeline.train.loop import topk_hits

    n, c = probs.shape
    top, hits = topk_hits(probs, labels)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(classes):
        count = int(confusion[i].sum())
        per_class[name] = {"samples": count, "top1": round(100.0 * int(confusion[i, i]) / count, 3) if count else None}
    return {
        "samples": n,
        "top1": round(100.0 * hits[:, 0].float().mean().item(), 3),
        "top5": round(100.0 * hits.any(dim=1).float().mean().item(), 3),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each true class sums to 1), counts written in the cells."""
    import torch

    plt = pyplot()

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    c = len(classes)
    side = min(16.0, max(4.5, 0.45 * c + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(c), classes, fontsize=8)
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    write_png(path, fig)


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'class':<24} {'samples':>8} {'top-1 %':>8}"]
    for name, row in result["per_class"].items():
        acc = "-" if row["top1"] is None else f"{row['top1']:.2f}"
        lines.append(f"{name[:24]:<24} {row['samples']:>8} {acc:>8}")
    lines.append(f"{'all':<24} {result['samples']:>8} {result['top1']:>8.2f}   top-5 {result['top5']:.2f}%")
    return "\n".join(lines)


def candidate_sizes(trained: int) -> list[int]:
    """The sizes `--img-size auto` tries: the trained size as it is, and 1.15, 1.3 and 1.5 times it
    rounded half up to a multiple of 8; increasing, without duplicates."""
    # integer arithmetic: 24 * 1.5 / 8 is a tie (4.5) that must round up, not to even
    scaled = {(trained * percent + 400) // 800 * 8 for percent in SIZE_FACTORS_PERCENT}
    return sorted(scaled | {trained})


def prepare(
    paths: list[Path],
    data: Path | None,
    tta: str,
    use_ema: bool,
    batch_size: int | None,
    workers: int | None,
    device: torch.device,
) -> EvalSetup:
    """Load the checkpoints and check that `data` (default: the run's data.val) has their classes."""
    from pipeline.data import scan_image_folder
    from pipeline.data.demo import demo_root
    from pipeline.inference import EvalSetup, last_stage, load_member
    from pipeline.train.step import resolve_precision

    members = [load_member(p, device, use_ema) for p in paths]
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise UserError(f"--ensemble {m.path}: its classes differ from {first.path}'s; members must share classes")
    val = first.config["data"]["val"]
    last = last_stage(first.config)
    field = "--data" if data is not None else f"data.val (from {first.path})"
    if data is None:
        data = demo_root() / "val" if val == "demo" else Path(val)
    index = scan_image_folder(data, field)
    if index.classes != first.classes:
        raise UserError(
            f"{field}: the class folders of {data} ({len(index.classes)}) are not the {len(first.classes)} classes "
            f"the checkpoint was trained on ({', '.join(first.classes[:5])}, ...)"
        )
    data_cfg = replace(last.data, cache=None, workers=last.data.workers if workers is None else workers)
    precision = resolve_precision(last.train.amp, device)  # as the run validated
    batch = batch_size or last.batch_size
    # the size the run validated at: its last stage's val_size, else its training size
    return EvalSetup(members, data, index, data_cfg, batch, last.val_size or last.img_size, tta, precision, device)


def evaluate_at(setup: EvalSetup, size: int) -> dict[str, Any]:
    """The metrics of the (averaged) models on the validation images at `size`."""
    from pipeline.inference import probabilities_at

    probs, labels = probabilities_at(setup, size)
    return metrics(probs, labels, setup.members[0].classes)


def search_sizes(setup: EvalSetup) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Evaluate at every candidate size the models can take; returns the metrics at the best (the
    highest top-1, the smaller size on a tie), that size and a row per evaluated size."""
    from pipeline.inference import AUTO, size_problem

    results: dict[int, dict[str, Any]] = {}
    for size in candidate_sizes(setup.run_size):
        problem = size_problem(setup, size)
        if problem is not None:
            print(f"warning: --img-size {AUTO}: skipping {size}px: {problem}", file=sys.stderr)
            continue
        results[size] = evaluate_at(setup, size)
    if not results:
        tried = ", ".join(map(str, candidate_sizes(setup.run_size)))
        raise UserError(f"--img-size {AUTO}: the model takes none of the sizes {tried} (see the warnings above)")
    best = max(results, key=lambda size: (results[size]["top1"], -size))
    rows = [{"img_size": size, "top1": r["top1"], "top5": r["top5"]} for size, r in results.items()]
    return results[best], best, rows


def run_eval(
    target: Path,
    data: Path | None = None,
    img_size: int | str | None = None,
    tta: str = "none",
    ensemble: list[Path] = (),
    out: Path | None = None,
    use_ema: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device_name: str = "auto",
) -> tuple[dict[str, Any], Path]:
    """Evaluate `target` (and the `ensemble` checkpoints with it) at `img_size` (default: the last
    stage's; "auto": the best of `candidate_sizes`); returns the result and its folder."""
    from pipeline.distributed import resolve_device
    from pipeline.inference import AUTO, TTA_MODES, check_img_size, resolve_checkpoint, run_folder

    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_MODES)}")
    img_size = check_img_size(img_size)
    device = resolve_device(device_name)
    paths = [resolve_checkpoint(target, use_ema)] + [resolve_checkpoint(p, use_ema) for p in ensemble]
    setup = prepare(paths, data, tta, use_ema, batch_size, workers, device)
    if img_size == AUTO:
        scores, size, rows = search_sizes(setup)
        searched = {"sizes": rows}
    else:
        size = img_size or setup.run_size
        scores, searched = evaluate_at(setup, size), {}
    result = {
        "checkpoints": [str(p) for p in paths],
        "weights": "ema" if use_ema else "raw",
        "data": str(setup.data),
        "img_size": size,
        **searched,
        "tta": tta,
        **scores,
    }
    out_dir = Path(out) if out is not None else run_folder(paths[0]) / "eval"
    write_json(out_dir / "eval.json", result)
    models = f"{len(paths)} checkpoints" if len(paths) > 1 else paths[0].name
    title = f"{models}, {size}px, TTA {tta}: top-1 {result['top1']:.2f}%"
    plot_confusion(result["confusion"], setup.members[0].classes, out_dir / "confusion_matrix.png", title)
    return result, out_dir
