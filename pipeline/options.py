"""What several commands share: the parser whose errors are one line, the types of numeric options
(zero or a negative value is refused when it is parsed), the `--set` and `--budget` options, and the
files a user asks a command to write (`--apply`, `plan`'s stages, `--json`, `--out`), whose failures
are one line."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from pipeline.errors import ConfigError, UserError


class Parser(argparse.ArgumentParser):
    """argparse, with a bad option as one line (`error: argument --steps: must be 1 or more, got 0`,
    and where to read more) and exit status 2, as every other user error."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def whole(least: int = 1):
    """The type of an integer option that must be at least `least` (1: a count or a size)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {least} or more, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
        return value

    parse.__name__ = f"whole>={least}"  # what argparse and the option-walking test see
    return parse


def positive(text: str) -> float:
    """The type of a float option that must be above zero (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def percent(text: str) -> float:
    """The type of a top-1 option, in percent: above 0 and at most 100."""
    value = positive(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"a top-1 in percent: at most 100, got {text}")
    return value


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
        "--final-size",
        type=whole(),
        default=None,
        help="with --budget: the size to end at (default: the file's largest)",
    )
    parser.add_argument(
        "--start-size",
        type=whole(),
        default=None,
        help="with --budget: the size the ramp starts at (default: half the final size where that is measured to "
        "pay, else no ramp); larger for fine detail",
    )


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


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str, option: str = "--budget") -> float:
    """Seconds in `20m`, `1h30m`, `900s`, `1.5h` or a bare number of seconds."""
    value = str(text).strip().lower().replace(" ", "")
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.fullmatch(value)
        if not value or match is None or not any(match.groups()):
            raise ConfigError(f"{option} {text}: not a duration (e.g. 20m, 1h30m, 900s)") from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{option} {text}: must be a positive duration (e.g. 20m, 1h30m, 900s)")
    return seconds
