"""Run folders: `<out_dir>/<name>-<YYYYmmdd-HHMMSS>[-N]`, made once per run and found again by `--resume auto`.

Only rank 0 makes one; the others learn its path from rank 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ConfigError, UserError


def new_run_dir(out_dir: Path, name: str) -> Path:
    """A fresh folder `<name>-<timestamp>` in `out_dir` (`-2`, `-3`, ... when that second is taken)."""
    base = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot create {run_dir} ({e.strerror or e})") from None
    return run_dir


def newest_run(out_dir: Path, name: str) -> Path | None:
    """The most recent run folder `<name>-<timestamp>[-N]` in `out_dir` that has a checkpoint."""
    pattern = re.compile(re.escape(name) + r"-\d{8}-\d{6}(-\d+)?")
    runs = [
        d
        for d in (out_dir.iterdir() if out_dir.is_dir() else [])
        if pattern.fullmatch(d.name) and (d / "checkpoints" / "last.pt").is_file()
    ]
    return max(runs, key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime, default=None)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """An advisory lock on `run_dir` (its `.lock` file holds the pid) for as long as the run lasts; the
    system drops it when the process dies. A second process on the same folder (a `--resume` while the
    run still runs) stops with one line naming the holder, before it touches anything. `hold` False
    (the other ranks of a torchrun job): nothing."""
    if not hold:
        yield
        return
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"{run_dir}: another process (pid {holder}) is training in this run folder; "
                "wait for it to end or stop it, then resume"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
