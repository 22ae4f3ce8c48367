"""Stop requests: SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to checkpoint and stop.

Under torchrun the processes agree on every save-and-stop decision with one small collective.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.errors import Stopped


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to stop: it checkpoints at the next
    optimizer step and exits with a message saying how to resume. A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (the last checkpoint stays whole)
        self.requested = signum
        # os.write, not print: the handler may run in the middle of another write to stderr
        os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next step, after a checkpoint\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agree(self, due: bool, device: torch.device) -> bool:
        """Whether to checkpoint now: `due` here, or a stop asked for, on any process. Every process
        takes part (one small collective under torchrun), so all of them save and stop at the same
        step; a process that did not get the signal itself stops too."""
        flags = torch.tensor([int(due), int(self.requested is not None)], device=device)
        due_any, stop_any = distributed.max_all(flags).tolist()
        if stop_any and self.requested is None:
            self.requested = signal.SIGTERM  # another process was told to stop
        return bool(due_any or stop_any)

    def stopped(self, run_dir: Path, where: str) -> Stopped:
        name = signal.Signals(self.requested).name
        return Stopped(
            f"stopped by {name} at {where}; checkpoint saved. Resume with: python -m pipeline run --resume {run_dir}",
            128 + int(self.requested),
        )
