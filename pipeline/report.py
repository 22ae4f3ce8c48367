"""What a run tells the user: metrics.jsonl, progress bars, the summary table and summary.json.

Metrics are appended line by line; summaries are written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.files import write_text


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line (`kind`: step | epoch), appended and flushed."""

    def __init__(self, path: Path | None):
        """`None`: a log that keeps nothing (the ranks other than 0 under torchrun)."""
        self.path = path
        self._file = open(path, "a", buffering=1) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @staticmethod
    def keep_before(path: Path, stage: int, epoch: int, step: int = 0) -> None:
        """On resume: drop the records of what will be trained again, from batch `step` of epoch
        `epoch` of stage `stage` on (that epoch's own record included)."""
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if _before(line, stage, epoch, step)]
        write_text(path, "".join(line + "\n" for line in kept))


def _before(line: str, stage: int, epoch: int, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line torn by the crash being resumed from
        return False
    where = (record["stage"], record["epoch"])
    if record.get("kind") == "step" and where == (stage, epoch):
        return record["step"] < step
    if record.get("kind") == "lr_find":  # not run again on resume
        return record["stage"] <= stage
    return where < (stage, epoch)


def epoch_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, file=sys.stderr)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: one row per stage, then the totals."""
    header = f"{'stage':>5} {'size':>5} {'batch':>6} {'epochs':>6} {'seconds':>8} {'img/s':>8} {'val top-1':>9}"
    rows = [header, "-" * len(header)]
    for i, s in enumerate(summary["stages"]):
        rows.append(
            f"{i:>5} {s['img_size']:>5} {s['batch_size']:>6} {s['epochs']:>6} {s['seconds']:>8.1f} "
            f"{s['train_images_per_s']:>8.0f} {s['val_top1']:>8.2f}%"
        )
    rows.append("-" * len(header))
    rows.append(
        f"total {summary['seconds']:.1f} s; final val top-1 {summary['final_val_top1']:.2f}%, "
        f"best {summary['best_val_top1']:.2f}%"
    )
    return "\n".join(rows)
