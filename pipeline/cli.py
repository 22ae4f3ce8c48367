"""Command line: `python -m pipeline run|...`; user errors become one line and exit status 2.

Each subcommand reads the same stages file; nothing else parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train through the stages of a stages file")
    run.add_argument("file", type=Path, nargs="?", help="the stages file, e.g. stages.yaml (not needed with --resume)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any key, e.g. --set train.optimizer.lr=0.1 --set stages.1.epochs=5",
    )
    run.add_argument("--out", type=Path, default=None, help="folder the run folder is made in (default: run.out_dir)")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.pt (its config.yaml is used)",
    )
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train import run_training

    if args.resume is not None:
        config_path = args.resume / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"--resume {args.resume}: not a run folder (no config.yaml in it)")
    elif args.file is None:
        raise UserError("run: give a stages file (python -m pipeline run stages.yaml) or --resume RUN_DIR")
    else:
        config_path = args.file
    cfg = load_config(config_path, args.overrides)
    run_training(cfg, out_dir=args.out, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a clean stop; the last checkpoint is whole (files are written atomically)
        print("interrupted", file=sys.stderr)
        return 130
