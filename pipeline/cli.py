"""Command line: `python -m pipeline run|...`; user errors become one line and exit status 2.

Each subcommand reads the same stages file; nothing else parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import DataError, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train through the stages of a stages file")
    run.add_argument("file", type=Path, nargs="?", help="the stages file, e.g. stages.yaml (not needed with --resume)")
    add_set(run)
    run.add_argument("--out", type=Path, default=None, help="folder the run folder is made in (default: run.out_dir)")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.pt (its config.yaml is used); auto: the newest "
        "run of FILE's run.name in its out_dir, or a new run if there is none",
    )
    add_budget(run)
    plan = sub.add_parser("plan", help="the stages that fill a time budget on this machine, measured")
    plan.add_argument("file", type=Path, help="the stages file (its model, data and keys; its stages are replaced)")
    add_budget(plan, required=True)
    plan.add_argument("--out", type=Path, default=None, help="where to write the plan (default FILE.plan.yaml)")
    add_set(plan)
    find = sub.add_parser("lr-find", help="LR range test on one stage's exact training setup")
    find.add_argument("file", type=Path, help="the stages file")
    find.add_argument("--stage", type=int, default=0, help="which stage's size, batch, AMP and Mixup (default 0)")
    find.add_argument("--start", type=float, default=1e-7, help="first LR (default 1e-7)")
    find.add_argument("--end", type=float, default=10.0, help="last LR (default 10)")
    find.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    find.add_argument("--mode", choices=["exp", "linear"], default="exp", help="how the LR rises (default exp)")
    find.add_argument("--out", type=Path, default=None, help="folder the output folder is made in")
    find.add_argument("--apply", action="store_true", help="write FILE.lr-find.yaml with the stage's lr set")
    add_set(find)
    bench = sub.add_parser("bench-loader", help="every stage's loaders against what its model step consumes")
    bench.add_argument("file", type=Path, help="the stages file")
    bench.add_argument(
        "--backends", default="tv2,cache,dali,classic", help="tv2, cache (tv2 + data.cache: decoded), dali, classic"
    )
    bench.add_argument("--workers", default="0,1,2", help="worker counts to try (DALI: threads, at least 1)")
    bench.add_argument("--batches", type=int, default=40, help="timed batches per setting, after 5 warm-up batches")
    bench.add_argument(
        "--repeats", type=int, default=1, help="measure every setting this many times, in turn; report medians"
    )
    bench.add_argument(
        "--sizes", default=None, help="image sizes to measure instead of the file's stages (batch of its last stage)"
    )
    bench.add_argument(
        "--data",
        default=None,
        metavar="PATH|synthetic",
        help="an ImageFolder instead of data.train; synthetic: 3,000 generated 160x160 JPEGs",
    )
    bench.add_argument("--out", type=Path, default=None, help="folder the output folder is made in")
    bench.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    bench.add_argument(
        "--apply", action="store_true", help="write FILE.bench-loader.yaml with each stage's fastest loader"
    )
    add_set(bench)
    ev = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a checkpoint")
    ev.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    ev.add_argument("--data", type=Path, default=None, help="an ImageFolder (default: the run's data.val)")
    ev.add_argument(
        "--img-size",
        default=None,
        metavar="N|auto",
        help="input size (default: the last stage's); auto: the best of 1, 1.15, 1.3 and 1.5 times it",
    )
    ev.add_argument(
        "--tta", choices=["none", "flip", "flip+crops"], default="none", help="test-time augmentation (default none)"
    )
    ev.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=[],
        metavar="CKPT",
        help="checkpoints or run folders to average with it",
    )
    ev.add_argument("--ema", action="store_true", help="use the EMA weights (runs trained with train.ema)")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the last stage's batch size")
    ev.add_argument("--workers", type=int, default=None, help="loader workers (default: the run's data.workers)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/eval)")
    pred = sub.add_parser("predict", help="the top-k classes of image files and folders, with a checkpoint")
    pred.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    pred.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files and folders (recursive)")
    pred.add_argument("--topk", type=int, default=5, help="classes per image (default 5; at most the classes)")
    pred.add_argument(
        "--tta", default="none", metavar="none|flip|flip+crops", help="test-time augmentation, as eval's (default none)"
    )
    pred.add_argument("--img-size", default=None, metavar="N", help="input size (default: as the run validated)")
    pred.add_argument("--batch-size", type=int, default=None, help="default: the last stage's batch size")
    pred.add_argument("--ema", action="store_true", help="use the EMA weights (runs trained with train.ema)")
    pred.add_argument("--workers", type=int, default=None, help="loader workers (default: the run's data.workers)")
    pred.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pred.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.csv|FILE.jsonl",
        help="the predictions file (default: CSV on stdout, the summary on stderr)",
    )
    exp = sub.add_parser("export", help="a checkpoint as safetensors + timm config.json, TorchScript or ONNX")
    exp.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    exp.add_argument(
        "--format", default="safetensors", metavar="safetensors|torchscript|onnx", help="(default safetensors)"
    )
    exp.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with train.ema)")
    exp.add_argument("--img-size", default=None, metavar="N", help="input size (default: as the run validated)")
    exp.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: RUN_DIR/export)")
    cmp = sub.add_parser("compare", help="runs side by side: a table and overlaid validation curves")
    cmp.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="two or more run folders")
    cmp.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default ./compare)")
    cmp.add_argument(
        "--target", type=float, default=None, help="top-1 (%%) for 'time to target' (default: the lowest final top-1)"
    )
    check = sub.add_parser("check-data", help="class counts, image modes, sizes, bad files, train/val duplicates")
    check.add_argument("path", type=Path, help="an ImageFolder, or a folder with train/ and val/ ImageFolders")
    check.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    check.add_argument("--workers", type=int, default=None, help="decoding processes (default: every core)")
    return parser


def add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any key, e.g. --set train.optimizer.lr=0.1 --set stages.1.epochs=5",
    )


def add_budget(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--budget",
        default=None,
        required=required,
        metavar="DURATION",
        help="wall time to fill, e.g. 20m, 1h30m, 900s: the stages are planned from speeds measured here",
    )
    parser.add_argument(
        "--final-size", type=int, default=None, help="with --budget: the size to end at (default: the file's largest)"
    )
    parser.add_argument(
        "--start-size",
        type=int,
        default=None,
        help="with --budget: the size the ramp starts at (default: half the final size where that is measured to "
        "pay, else no ramp); larger for fine detail",
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.budget import format_plan, parse_duration, plan_budget
    from pipeline.config import load_config

    budget = parse_duration(args.budget)
    cfg = load_config(args.file, args.overrides)
    plan, _ = plan_budget(cfg.raw, budget, args.final_size, args.start_size)
    print(format_plan(plan, budget))
    command = f"python -m pipeline plan {args.file} --budget {args.budget}"
    target = write_applied(plan.raw, args.file, "plan", out=args.out, comment=command)
    print(f"wrote {target}; train with: python -m pipeline run {target}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.lr_finder import run_lr_find
    from pipeline.train.range_test import recommended_lr

    if not 0 < args.start < args.end <= 1e4:
        raise UserError(f"--start {args.start:g} / --end {args.end:g}: need 0 < start < end <= 1e4")
    if args.steps < 5:
        raise UserError(f"--steps {args.steps}: need at least 5")
    cfg = load_config(args.file, args.overrides)
    result, out_dir = run_lr_find(
        cfg, args.stage, args.out, start=args.start, end=args.end, steps=args.steps, mode=args.mode
    )
    print(f"{len(result.lrs)} steps; stopped: {result.stop_reason}")
    for name, lr in result.suggestions.items():
        print(f"  {name:>8}: {lr:.3g}")
    lr = recommended_lr(result, f"stages.{args.stage}.lr")
    print(f"recommended ({result.recommendation}): lr {lr:.3g}; set it with --set stages.{args.stage}.lr={lr:.3g}")
    print(f"wrote {out_dir / 'lr_find.csv'} and {out_dir / 'lr_find.png'}")
    if args.apply:
        raw = cfg.raw
        stage = raw["stages"][args.stage]
        if isinstance(stage.get("optimizer"), dict):
            stage["optimizer"].pop("lr", None)  # one spelling only, so the shortcut is what counts
        stage["lr"] = float(f"{lr:.3g}")
        target = write_applied(raw, args.file, "lr-find")
        print(f"wrote {target} (stages.{args.stage}.lr: {lr:.3g}); train with: python -m pipeline run {target}")
    return 0


def write_applied(raw: dict, file: Path, tool: str, out: Path | None = None, comment: str | None = None) -> Path:
    """A configuration a tool made from FILE: `out`, else FILE.<tool>.yaml beside FILE (`--apply`;
    `plan`), `comment` as its first line. FILE itself is never rewritten."""
    import yaml

    from pipeline.files import write_text

    target = out or file.with_name(f"{file.stem}.{tool}.yaml")
    if target.resolve() == file.resolve():
        if out is not None:
            raise UserError(f"--out {target}: that is the stages file itself; choose another name")
        target = file.with_name(f"{file.stem}.{tool}-2.yaml")
    text = (f"# {comment}\n" if comment else "") + yaml.safe_dump(raw, sort_keys=False)
    option = "--out" if tool == "plan" else "--apply"
    write_or_fail(f"{option}: cannot write {target}", lambda: write_text(target, text))
    return target


def write_or_fail(what: str, write) -> None:
    """`write()` a file the user asked for; a failure is one line: `what` (naming the option and the
    file) and the reason."""
    try:
        write()
    except OSError as e:
        raise UserError(f"{what} ({e.strerror or e})") from None


def int_list(text: str, option: str, least: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values or min(values) < least:
        raise UserError(f"{option} {text}: need integers >= {least}")
    return values


def cmd_bench_loader(args: argparse.Namespace) -> int:
    import yaml

    from pipeline import loader_bench as lb
    from pipeline.files import write_json
    from pipeline.train.preflight import prepare
    from pipeline.train.rundir import new_run_dir

    backends = lb.check_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    workers = int_list(args.workers, "--workers", 0)
    if args.batches < 1 or args.repeats < 1:
        raise UserError(f"--batches {args.batches} / --repeats {args.repeats}: need at least 1")
    if (args.sizes or args.data) and args.apply:
        raise UserError("--apply writes settings for the file's own stages and data: drop --sizes and --data")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    sizes = int_list(args.sizes, "--sizes", 8) if args.sizes else None
    cfg = lb.bench_config(args.file, args.overrides, args.data, sizes)
    device, datasets, num_classes = prepare(cfg)
    out_dir = new_run_dir(Path(args.out or cfg.run.out_dir), f"{cfg.run.name}-bench-loader")
    print(f"{len(datasets.train)} training images in {datasets.train.root}; device {device}")
    rows = lb.run_bench(cfg, datasets.train, num_classes, device, backends, workers, args.batches, args.repeats)
    print()
    print(lb.format_table(rows))
    verdict_list = lb.verdicts(rows)
    print()
    for v in verdict_list:
        cache = " (cache: decoded)" if v.backend == "cache" else ""
        print(f"{v.img_size:>4}px: {v.text}; recommended: {v.backend}{cache}, workers {v.workers}")
    write_json(out_dir / "bench_loader.json", rows)
    if args.json:
        write_or_fail(f"--json {args.json}: cannot write", lambda: write_json(args.json, rows))
    lb.plot(rows, out_dir / "bench_loader.png")
    print(f"wrote {out_dir / 'bench_loader.json'} and {out_dir / 'bench_loader.png'}")
    if args.apply:
        raw = lb.apply_settings(cfg.raw, verdict_list, [(s.img_size, s.batch_size) for s in cfg.stages])
        if "cache_size" not in (yaml.safe_load(args.file.read_text()).get("data") or {}):
            raw["data"]["cache_size"] = "auto"  # as the file had it: sized again if its stages change
        target = write_applied(raw, args.file, "bench-loader")
        print(f"wrote {target}; train with: python -m pipeline run {target}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import format_report, run_eval

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: need at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: need 0 or more")
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


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit status 0 when at least one image was predicted (the others are named), 2 when none could be."""
    from pipeline.files import write_text
    from pipeline.predict import format_rows, output_format, run_predict

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


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import (
        EXPORT_INSTALL,
        TOLERANCE,
        TORCHSCRIPT_NOTE,
        check_batch,
        check_export,
        load_export,
        write_export,
    )

    job = load_export(args.target, args.format, args.ema, args.img_size, args.out)
    images, source = check_batch(job)
    write_or_fail(f"--out {job.out}: cannot write", lambda: write_export(job))
    arch, classes = job.member.config["model"]["arch"], len(job.member.classes)
    print(f"exported {job.member.path} ({arch}, {classes} classes, {job.weights} weights, {job.img_size}px)")
    print(f"wrote {job.model_file} and {job.config_file}")
    if job.fmt == "torchscript":
        print(TORCHSCRIPT_NOTE)
    difference = check_export(job, images)
    if difference is None:
        print(f"not checked: onnxruntime is not installed ({EXPORT_INSTALL})")
        return 0
    print(f"checked on {source}: largest |logit difference| to the PyTorch model {difference:.3g}")
    if difference > TOLERANCE:
        print(f"warning: the export differs from the PyTorch model by more than {TOLERANCE:g}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import format_table, run_compare

    if args.target is not None and not 0 < args.target <= 100:
        raise UserError(f"--target {args.target}: a top-1 accuracy in percent, in (0, 100]")
    result, files = run_compare(args.runs, args.out, args.target)
    print(format_table(result))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit status 0 when nothing would stop or spoil training, 1 when something would."""
    from pipeline.check_data import check_dataset, format_report, problems
    from pipeline.files import write_json

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: need at least 1")
    report = check_dataset(args.path, args.workers)
    print(format_report(report))
    if args.json:
        write_or_fail(f"--json {args.json}: cannot write", lambda: write_json(args.json, report))
    return 1 if problems(report) else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.run import run_training

    if args.budget is not None:
        return run_budget(args)
    for option, value in (("--final-size", args.final_size), ("--start-size", args.start_size)):
        if value is not None:
            raise UserError(f"{option}: only with --budget")
    if args.resume == Path("auto"):
        if args.file is None:
            raise UserError("--resume auto: give the stages file too (its run.name and out_dir find the run)")
        from pipeline.train.rundir import newest_run

        cfg = load_config(args.file, args.overrides)
        args.resume = newest_run(Path(args.out or cfg.run.out_dir), cfg.run.name)
        if args.resume is None:
            print(f"--resume auto: no run named {cfg.run.name!r} with a checkpoint yet; starting a new one")
            run_training(cfg, out_dir=args.out)
            return 0
        print(f"--resume auto: {args.resume}")
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


def run_budget(args: argparse.Namespace) -> int:
    """`run FILE --budget D`: plan (the measuring counts against the budget), run the plan, then
    predicted against actual seconds."""
    import dataclasses
    import time

    from pipeline.budget import actual_seconds, format_outcome, format_plan, parse_duration, plan_budget
    from pipeline.config import load_config, parse_config
    from pipeline.files import write_json
    from pipeline.train.run import run_training

    begin = time.perf_counter()
    budget = parse_duration(args.budget)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(
            "--budget under torchrun: each process would measure and plan on its own; plan first "
            "(python -m pipeline plan FILE --budget D), then torchrun ... run FILE.plan.yaml"
        )
    if args.resume is not None:
        raise UserError("--budget plans a new run; continue a run with --resume alone")
    if args.file is None:
        raise UserError("run --budget: give the stages file (python -m pipeline run stages.yaml --budget 20m)")
    cfg = load_config(args.file, args.overrides)
    plan, speeds = plan_budget(cfg.raw, budget, args.final_size, args.start_size, measuring_counts=True)
    print(format_plan(plan, budget))
    spent = time.perf_counter() - begin
    run_dir = run_training(parse_config(plan.raw), out_dir=args.out)
    total = time.perf_counter() - begin
    actual = actual_seconds(run_dir, len(plan.stage_seconds))
    start = total - spent - sum(actual)  # the run's own start and end
    print(format_outcome(plan, actual, start, spent, budget))
    report = {
        "budget_s": budget,
        "planning_s": round(spent, 2),
        "predicted_s": {"start": round(plan.start_s, 2), "stages": [round(s, 2) for s in plan.stage_seconds]},
        "actual_s": {"start": round(start, 2), "stages": [round(s, 2) for s in actual]},
        "total_s": round(total, 2),
        "speeds": dataclasses.asdict(speeds),
    }
    write_or_fail(f"cannot write {run_dir / 'budget.json'}", lambda: write_json(run_dir / "budget.json", report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "run": cmd_run,
            "plan": cmd_plan,
            "lr-find": cmd_lr_find,
            "bench-loader": cmd_bench_loader,
            "eval": cmd_eval,
            "predict": cmd_predict,
            "export": cmd_export,
            "check-data": cmd_check_data,
            "compare": cmd_compare,
        }
        return commands[args.command](args)
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
