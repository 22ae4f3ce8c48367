"""Command line: `python -m pipeline run|...`; user errors become one line and exit status 2.

Each subcommand reads the same stages file; nothing else parses arguments. A command is a module
of `pipeline.commands` with its `HELP`, its `add_arguments(parser)` and its `cmd_*(args)`.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.commands import bench_loader, check_data, compare, export, lr_find, plan, predict, run
from pipeline.commands import eval as evaluate
from pipeline.errors import DataError, UserError
from pipeline.options import Parser

# name: (module, what runs it), in the order --help lists them
COMMANDS = {
    "run": (run, run.cmd_run),
    "plan": (plan, plan.cmd_plan),
    "lr-find": (lr_find, lr_find.cmd_lr_find),
    "bench-loader": (bench_loader, bench_loader.cmd_bench_loader),
    "eval": (evaluate, evaluate.cmd_eval),
    "predict": (predict, predict.cmd_predict),
    "export": (export, export.cmd_export),
    "compare": (compare, compare.cmd_compare),
    "check-data": (check_data, check_data.cmd_check_data),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, _) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad option: its one line is printed; `--help` exits 0 as it is
        if e.code != 2:
            raise
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except UserError as e:
        rank = int(os.environ.get("RANK", 0))  # under torchrun: rank 0 speaks for all, but a file is one rank's
        if rank == 0 or isinstance(e, DataError):
            print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except Exception as e:
        from torch.distributed import DistError  # torch is loaded by now

        peer_lost = int(os.environ.get("WORLD_SIZE", 1)) > 1 and any(
            word in str(e) for word in ("Connection closed by peer", "NCCL", "gloo", "process group")
        )
        if not (isinstance(e, DistError) or peer_lost):
            raise
        # another process of the torchrun job failed first; its own message says why
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"error (rank {os.environ.get('RANK', 0)}): the job's process group failed: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a clean stop; the last checkpoint is whole (files are written atomically)
        print("interrupted", file=sys.stderr)
        return 130
