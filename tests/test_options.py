"""Every numeric option of every command refuses zero and negative values it cannot use: one line,
exit status 2, before anything runs."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import COMMANDS, build_parser, main
from pipeline.options import percent, positive

NUMBERS_AS_TEXT = {  # options parsed as text and checked by the command: (command, option)
    ("run", "--budget"),
    ("plan", "--budget"),
    ("bench-loader", "--workers"),
    ("bench-loader", "--sizes"),
    ("eval", "--img-size"),
    ("predict", "--img-size"),
    ("export", "--img-size"),
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def checked_options():
    """(command, option, least): every option with a checked numeric type."""
    for command, parser in subparsers().items():
        for action in parser._actions:
            name = getattr(action.type, "__name__", "")
            if action.option_strings and (name.startswith("whole>=") or action.type in (positive, percent)):
                least = int(name.split(">=")[1]) if name.startswith("whole>=") else None
                yield command, action.option_strings[0], least


def minimal_argv(command: str) -> list[str]:
    """The command's positionals and required options, with values the parser takes."""
    argv = [command]
    for action in subparsers()[command]._actions:
        if not action.option_strings and action.dest != "help":
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], "5m"]
    return argv


def test_no_option_takes_a_bare_int_or_float():
    """A new numeric option must say what it can use (options.whole / positive / percent)."""
    bare = [
        (command, action.option_strings[0])
        for command, parser in subparsers().items()
        for action in parser._actions
        if action.type in (int, float)
    ]
    assert bare == []
    assert set(subparsers()) == set(COMMANDS)


def test_the_walk_finds_the_options():
    found = {(c, o) for c, o, _ in checked_options()}
    assert {("plan", "--final-size"), ("run", "--start-size"), ("lr-find", "--steps"), ("predict", "--topk")} <= found
    assert {("lr-find", "--start"), ("compare", "--target"), ("eval", "--workers")} <= found
    assert len(found) >= 17


@pytest.mark.parametrize("command,option,least", sorted(checked_options(), key=str))
def test_zero_and_negative_values_are_one_line_and_exit_2(command, option, least, capsys):
    for value in ("0", "-1") if least != 0 else ("-1",):
        assert main([*minimal_argv(command), f"{option}={value}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: argument {option}: "), err
        assert value in err[0] and f"python -m pipeline {command} --help" in err[0]
    if least == 0:  # zero is a value it can use (loader workers in the main process, the first stage)
        assert int(subparsers()[command]._option_string_actions[option].type("0")) == 0


def test_a_value_that_is_not_a_number_is_one_line(capsys):
    assert main(["lr-find", "x", "--steps", "many"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --steps: expected a whole number of 1 or more, got 'many' "
        "(see python -m pipeline lr-find --help)"
    ]
    assert main(["compare", "x", "--target", "inf"]) == 2
    assert "must be above 0, got inf" in capsys.readouterr().err
    assert main(["compare", "x", "--target", "100.5"]) == 2
    assert "at most 100, got 100.5" in capsys.readouterr().err


@pytest.fixture
def stages_file(tiny_config, write_yaml):
    return write_yaml(tiny_config)


def text_cases(stages_file, run_dir):
    """(command, option, argv) for the options parsed as text, each with a zero or negative value."""
    s, r = str(stages_file), str(run_dir)
    return [
        ("run", "--budget", ["run", s, "--budget", "0"]),
        ("run", "--budget", ["run", s, "--budget=-5m"]),
        ("plan", "--budget", ["plan", s, "--budget", "0s"]),
        ("bench-loader", "--workers", ["bench-loader", s, "--workers=-1"]),
        ("bench-loader", "--sizes", ["bench-loader", s, "--sizes", "0"]),
        ("eval", "--img-size", ["eval", r, "--img-size", "0"]),
        ("predict", "--img-size", ["predict", r, r, "--img-size=-8"]),
        ("export", "--img-size", ["export", r, "--img-size", "0"]),
    ]


def test_numbers_given_as_text_are_one_line_and_exit_2(stages_file, tiny_run, capsys):
    cases = text_cases(stages_file, tiny_run)
    assert {(c, o) for c, o, _ in cases} == NUMBERS_AS_TEXT
    for _, option, argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {option} "), (argv, err)
