"""Run folders: `<out_dir>/<name>-<YYYYmmdd-HHMMSS>[-N]`, made once per run and found again by `--resume auto`.

Only rank 0 makes one; the others learn its path from rank 0.
"""

from __future__ import annotations

import contextlib
import errno
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
    """A lock on `run_dir` (its `.lock` file holds the pid) for as long as the run lasts. A second process
    on the same folder (a `--resume` while the run still runs) stops with one line naming the holder,
    before it touches anything. The lock is a POSIX record lock (`lockf`): it belongs to this process
    alone, so forked loader workers, which outlive a killed trainer by seconds, never hold it, and the
    system drops it the moment the trainer dies. `hold` False (the other ranks of a torchrun job):
    nothing."""
    if not hold:
        yield
        return
    with open(run_dir / ".lock", "a+") as f:
        _lock(f, run_dir)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _lock(f, run_dir: Path, wait_s: float = 2.0) -> None:
    """Take the lock, or stop with one line naming the live process that has it. A pid in the file that
    is not running (the holder has not written its own yet) is waited on for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        f.seek(0)
        holder = f.read().strip()
        alive = _running(holder)
        if alive or time.monotonic() >= deadline:
            who = f"pid {holder}" if alive else "a process that has not written its pid"
            raise UserError(
                f"{run_dir}: another process ({who}) is training in this run folder; "
                "wait for it to end or stop it, then resume"
            ) from None
        time.sleep(0.05)


def _running(pid: str) -> bool:
    """Whether `pid` (the text of the lock file) names a process that exists."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
