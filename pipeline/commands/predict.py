"""`python -m pipeline predict`: the top-k classes of new images, through the run's own validation loader.

A file that cannot be decoded is named in a warning, left out and listed at the end; the rest are predicted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataError, UserError
from pipeline.files import write_text
from pipeline.options import whole, write_or_fail

if TYPE_CHECKING:
    import torch

    from pipeline.data import Loader

HELP = "the top-k classes of image files and folders, with a checkpoint"
OUTPUT_FORMATS = (".csv", ".jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files and folders (recursive)")
    parser.add_argument("--topk", type=whole(), default=5, help="classes per image (default 5; at most the classes)")
    parser.add_argument(
        "--tta", default="none", metavar="none|flip|flip+crops", help="test-time augmentation, as eval's (default none)"
    )
    parser.add_argument("--img-size", default=None, metavar="N", help="input size (default: as the run validated)")
    parser.add_argument("--batch-size", type=whole(), default=None, help="default: the last stage's batch size")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (runs trained with train.ema)")
    parser.add_argument(
        "--workers", type=whole(0), default=None, help="loader workers (default: the run's data.workers)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.csv|FILE.jsonl",
        help="the predictions file (default: CSV on stdout, the summary on stderr)",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit status 0 when at least one image was predicted (the others are named), 2 when none could be."""
    fmt = output_format(args.out)
    result = run_predict(
        args.target,
        args.paths,
        topk=args.topk,
        tta=args.tta,
        img_size=args.img_size,
        batch_size=args.batch_size,
        use_ema=args.ema,
        workers=args.workers,
        device_name=args.device,
    )
    if args.out is None:
        sys.stdout.write(format_rows(result.rows, "csv"))
    else:
        write_or_fail(f"--out {args.out}: cannot write", lambda: write_text(args.out, format_rows(result.rows, fmt)))
    say = sys.stderr if args.out is None else sys.stdout  # stdout carries the rows when there is no --out
    n = len(result.rows) + len(result.skipped)
    print(
        f"predicted {len(result.rows)} of {n} image(s) with {result.checkpoint} ({result.weights} weights, "
        f"{result.img_size}px, TTA {result.tta})",
        file=say,
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) that could not be read:", file=say)
        for path in result.skipped:
            print(f"  {path}", file=say)
    if args.out is not None:
        print(f"wrote {args.out}", file=say)
    return 0


@dataclass
class Prediction:
    """One image: its path as found, and its top-k class names and probabilities, best first."""

    path: str
    classes: list[str]
    probs: list[float]


@dataclass
class PredictResult:
    """What `predict` found: the predicted rows, the files it could not read, and how it predicted."""

    rows: list[Prediction]  # in the order the images were found
    skipped: list[str]  # files that could not be read, in that order too
    checkpoint: Path
    img_size: int
    tta: str
    weights: str  # raw | ema


def output_format(out: Path | None) -> str | None:
    """`--out`'s format from its suffix: csv or jsonl (None: CSV on stdout)."""
    if out is None:
        return None
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: expected a .csv or .jsonl file")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name ending in .csv or .jsonl")
    return out.suffix.lower()[1:]


class BatchWatch:
    """Wraps the validation loader: advances the progress bar and notes where a batch whose every image
    failed to decode stopped it (the tv2 loader raises there; the batches before it stand). A pass that
    yields nothing at all raises DataError (`inference.predict` needs a batch)."""

    def __init__(self, bar, batch_size: int, total: int):
        self.bar, self.batch_size, self.total = bar, batch_size, total
        self.failed_at: int | None = None  # the index of that batch
        self.empty = False  # the loader left every file out (DALI drops undecodable files itself)

    def __call__(self, loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(loader)
        k = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                if k == 0:
                    self.empty = True
                    raise DataError("no image of this pass could be decoded") from None
                return
            except DataError:
                self.failed_at = k
                self.bar.update(self._files_in(k))
                if k == 0:
                    raise  # nothing predicted this pass: the caller goes on after this batch
                return
            self.bar.update(self._files_in(k))
            k += 1
            yield batch

    def _files_in(self, k: int) -> int:
        return min(self.batch_size, self.total - k * self.batch_size)


def readable(files: list[str], backend: str) -> list[bool]:
    """Which files may be images (the scan's header check; DALI also leaves GIF out): the others are named
    in a warning now, and never reach the loader."""
    from pipeline.data.folder import header_problem, warn_skipped

    with ThreadPoolExecutor(max_workers=16) as pool:  # one small read a file: I/O bound
        problems = list(pool.map(header_problem, files, chunksize=256))
    if backend == "dali":
        from pipeline.data.dali import UNSUPPORTED

        problems = [
            why or ("DALI cannot decode GIF (data.backend tv2 can)" if Path(f).suffix.lower() in UNSUPPORTED else None)
            for f, why in zip(files, problems)
        ]
    for f, why in zip(files, problems):
        if why:
            warn_skipped(f, why)
    return [why is None for why in problems]


def run_predict(
    target: Path,
    paths: list[Path],
    topk: int = 5,
    tta: str = "none",
    img_size: int | str | None = None,
    batch_size: int | None = None,
    use_ema: bool = False,
    workers: int | None = None,
    device_name: str = "auto",
) -> PredictResult:
    """Predict every image under `paths` with `target` (a run folder's best.pt, or a checkpoint) at
    `img_size` (default: the size the run validated at), through the run's validation loader."""
    import torch

    from pipeline.data.index import ImageFolderIndex
    from pipeline.distributed import resolve_device
    from pipeline.inference import (
        AUTO,
        TTA_MODES,
        EvalSetup,
        check_img_size,
        collect_images,
        last_stage,
        load_member,
        probabilities_at,
        resolve_checkpoint,
        size_problem,
    )
    from pipeline.report import epoch_bar
    from pipeline.train.step import resolve_precision

    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta}: expected one of {', '.join(TTA_MODES)}")
    if topk < 1:
        raise UserError(f"--topk {topk}: need at least 1")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: need at least 1")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: need 0 or more")
    size = check_img_size(img_size)
    if size == AUTO:
        raise UserError(f"--img-size {AUTO}: predict takes one size; eval --img-size auto finds the best")
    device = resolve_device(device_name)
    checkpoint = resolve_checkpoint(target, use_ema)
    member = load_member(checkpoint, device, use_ema)
    stage = last_stage(member.config)
    data_cfg = replace(
        stage.data, cache=None, on_error="skip", workers=stage.data.workers if workers is None else workers
    )
    files = collect_images(paths)
    todo = [(f, position) for position, (f, ok) in enumerate(zip(files, readable(files, data_cfg.backend))) if ok]
    setup = EvalSetup(
        members=[member],
        data=paths[0],
        index=ImageFolderIndex.of(paths[0], member.classes, todo),  # a sample's label is its position in `files`
        data_cfg=data_cfg,
        batch_size=batch_size or stage.batch_size,
        run_size=stage.val_size or stage.img_size,
        tta=tta,
        precision=resolve_precision(stage.train.amp, device),
        device=device,
    )
    size = size or setup.run_size
    problem = size_problem(setup, size)
    if problem is not None:
        raise UserError(f"--img-size {size}: {problem}")
    probs, positions = [], []
    with epoch_bar(len(todo), "predict", enabled=sys.stderr.isatty()) as bar:
        while todo:  # one pass, unless a whole batch cannot be decoded: then on after it
            watch = BatchWatch(bar, setup.batch_size, len(todo))
            try:
                left = ImageFolderIndex.of(setup.index.root, member.classes, todo)
                p, labels = probabilities_at(replace(setup, index=left), size, watch)
                probs.append(p)
                positions.append(labels)
            except DataError:
                if watch.failed_at is None and not watch.empty:
                    raise
            if watch.failed_at is None:
                break
            todo = todo[(watch.failed_at + 1) * setup.batch_size :]  # its files were named as the loader met them
    if not probs:
        raise UserError(f"none of the {len(files)} image(s) could be read (each is named above)")
    probs_all, order = torch.cat(probs), torch.cat(positions).tolist()
    top = probs_all.topk(min(topk, probs_all.shape[1]), dim=1)
    rows = {
        position: Prediction(files[position], [member.classes[c] for c in classes], values)
        for position, classes, values in zip(order, top.indices.tolist(), top.values.tolist())
    }
    return PredictResult(
        rows=[rows[k] for k in sorted(rows)],
        skipped=[f for k, f in enumerate(files) if k not in rows],
        checkpoint=checkpoint,
        img_size=size,
        tta=tta,
        weights="ema" if use_ema else "raw",
    )


def format_rows(rows: list[Prediction], fmt: str) -> str:
    """CSV (path, class_1, prob_1, ..., class_k, prob_k) or JSON lines ({"path", "classes", "probs"})."""
    if fmt == "jsonl":
        return "".join(
            json.dumps({"path": r.path, "classes": r.classes, "probs": [round(p, 6) for p in r.probs]}) + "\n"
            for r in rows
        )
    k = max((len(r.classes) for r in rows), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *(f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob"))])
    for r in rows:
        writer.writerow([r.path, *(v for c, p in zip(r.classes, r.probs) for v in (c, f"{p:.6f}"))])
    return buffer.getvalue()
