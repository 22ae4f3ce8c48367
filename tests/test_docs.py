"""The docs stay true: every relative link and anchor resolves, docs/config.md lists exactly the keys
the config parser accepts, every command in README's table answers `--help`, and README stays short.

No training and no subprocesses: the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from pipeline import config
from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "config.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a code block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation other than `-` and `_`
    removed, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a Markdown text; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """The targets of the inline links and images outside code."""
    found = []
    for line in prose_lines(text):
        line = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)
        found += [m.group(1) for m in LINK.finditer(line)]
    return found


def broken_links(text: str, page: Path) -> list[str]:
    """The relative links of `text` (a page at `page`) that do not resolve: a missing file, or an
    `#anchor` that no heading of the Markdown target has."""
    broken = []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if path_part and not file.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and file.suffix == ".md":
            target_text = file.read_text() if path_part else text
            if anchor not in anchors(target_text):
                broken.append(f"{target}: no heading {anchor!r} in {file.relative_to(ROOT)}")
    return broken


def test_the_slugs_are_githubs():
    assert slug("Evaluating a checkpoint: `eval`") == "evaluating-a-checkpoint-eval"
    assert slug("Making train/val folders: `tools/split.py`") == "making-trainval-folders-toolssplitpy"
    assert slug("Planning from a time budget: `run --budget` against the final size only (CPU)") == (
        "planning-from-a-time-budget-run---budget-against-the-final-size-only-cpu"
    )
    assert slug("Size jumps: `train.size_jumps`") == "size-jumps-trainsize_jumps"
    assert anchors("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n") == {"a", "notes", "notes-1"}


def test_the_link_checker_flags_what_does_not_resolve():
    page = ROOT / "docs" / "made-up.md"
    text = (
        "# Title\n\n## A section\n\n"
        "[fine](config.md) [fine too](#a-section) [web](https://example.com/x#y) ![img](lr_find.png)\n"
        "[no file](no-such-page.md) [no heading](config.md#no-such-heading) [nor here](#nowhere)\n"
        "`[in code](no-such-file.md)`\n"
        "```\n[in a block](no-such-file.md)\n```\n"
    )
    assert broken_links(text, page) == [
        "no-such-page.md: no such file",
        "config.md#no-such-heading: no heading 'no-such-heading' in docs/config.md",
        "#nowhere: no heading 'nowhere' in docs/made-up.md",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page.read_text(), page) == []


def parser_keys() -> set[str]:
    """Every dotted key the config parser accepts, from its dataclasses and stage tables. A section that
    may be switched off (`train.mixup: off`) is a key of its own as well as its keys."""
    keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            nested = [o for o in options if dataclasses.is_dataclass(o)]
            if not nested or type(None) in options:
                keys.add(prefix + f.name)
            if nested:
                walk(nested[0], f"{prefix}{f.name}.")

    for name, cls in config.SECTIONS.items():
        walk(cls, f"{name}.")
    keys |= {f"stages.{k}" for k in config.STAGE_KEYS}
    keys |= {f"stages.{k}" for k in config.STAGE_SHORTCUTS}
    keys |= {f"stages.data.{k}" for k in config.STAGE_DATA_KEYS}
    return keys


KEY_SPAN = re.compile(r"`((?:run|data|model|train|stages)\.[\w.]+)`")


def documented_keys(text: str) -> set[str]:
    """The keys docs/config.md documents: each backticked dotted key in the first cell of a table row."""
    keys = set()
    for line in prose_lines(text):
        cells = line.strip().split("|")
        if line.strip().startswith("|") and len(cells) > 2:
            keys |= set(KEY_SPAN.findall(cells[1]))
    return keys


def test_the_parser_keys_are_found_from_the_code():
    keys = parser_keys()
    assert {"run.seed", "data.cache_size", "train.optimizer.lr", "train.mixup", "train.mixup.prob"} <= keys
    assert {"train.ema.decay", "train.size_jumps.final_share", "stages.img_size", "stages.lr"} <= keys
    assert {"stages.data.backend", "train.schedule.scope"} <= keys
    assert "train.optimizer" not in keys  # a section that cannot be switched off is only its keys
    assert "stages.data.train" not in keys  # the dataset is the same for every stage
    text = "| key | default |\n|---|---|\n| `run.seed`, `train.optimizer.lr` | `0` |\n| see `run.name` | |\n"
    assert documented_keys(text) == {"run.seed", "train.optimizer.lr", "run.name"}


def test_config_doc_lists_every_key_the_parser_accepts_and_no_other():
    documented = documented_keys(CONFIG_DOC.read_text())
    accepted = parser_keys()
    assert sorted(accepted - documented) == [], "keys the parser accepts that docs/config.md does not list"
    assert sorted(documented - accepted) == [], "keys docs/config.md lists that the parser does not accept"


def command_rows() -> list[tuple[str, list[str]]]:
    """README's command table: (the command in the row's first cell, the row's link targets)."""
    rows = []
    for line in prose_lines(README.read_text()):
        cells = line.strip().split("|")
        if not line.strip().startswith("|") or len(cells) < 3:
            continue
        m = re.match(r"\s*`((?:python|torchrun) [^`]*)`", cells[1])
        if m:
            rows.append((m.group(1), links(line)))
    return rows


def subcommands(capsys) -> list[str]:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    usage = capsys.readouterr().out
    return re.search(r"\{([\w,-]+)\}", usage).group(1).split(",")


def test_every_command_in_readme_exists_and_has_a_docs_page(capsys):
    rows = command_rows()
    commands = [cmd.split()[3] for cmd, _ in rows if cmd.startswith("python -m pipeline ")]
    assert sorted(set(subcommands(capsys))) == sorted(set(commands)), "README's table and the CLI differ"
    for command in commands:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0, command
        assert f"usage: python -m pipeline {command}" in capsys.readouterr().out
    for cmd, targets in rows:
        if cmd.startswith("python tools/"):
            assert (ROOT / cmd.split()[1]).is_file(), cmd
        pages = [t for t in targets if t.startswith("docs/") and t.partition("#")[0].endswith(".md")]
        assert pages, f"{cmd}: the row links to no docs page"


def test_an_unknown_command_is_refused(capsys):
    assert main(["no-such-command", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument command: invalid choice: 'no-such-command'"), err


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    # CI installs the project the way README says, and runs its test command
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r'pip install -e "(\.\[[^\]]+\])"', makefile).group(1)
    assert f'.venv/bin/pip install -e "{extras}"' in text
    assert "make test" in text and ".venv/bin/python -m pytest -q" in text and ".ci/run" in text
