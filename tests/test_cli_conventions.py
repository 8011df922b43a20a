"""The command line's conventions: help text on every option, --threads and --no-progress on every
command that computes, JSON without float noise, and the README's Python snippet runs as written."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from dualgraph.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMPUTING = ("certify", "dump", "train", "verify", "run-instances")


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "dualgraph"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def test_every_option_has_help():
    missing = [f"{name}: {a.option_strings or a.dest}" for name, p in _subparsers(build_parser())
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, missing


@pytest.mark.parametrize("command", COMPUTING)
def test_computing_commands_take_threads_and_no_progress(command):
    parsers = dict(_subparsers(build_parser()))
    options = {o for a in parsers[f"dualgraph {command}"]._actions for o in a.option_strings}
    assert {"--threads", "--no-progress"} <= options


def test_json_has_no_float_noise(capsys):
    assert main(["certify", "--limit", "25", "--json", "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert not re.search(r"\d\.\d{13,}", text), text
    assert json.loads(text)["n"] == 25


def test_bad_thread_counts_are_one_line_errors(capsys):
    assert main(["certify", "--limit", "2", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dualgraph: error: --threads must be >= 1, got 0"


@pytest.mark.parametrize("model", ["no_such_model.onnx", "no_such_zoo_name"])
def test_a_missing_model_is_named_before_missing_options(model, capsys):
    """A mistyped path is the user's real problem; asking for --dataset and --eps would hide it."""
    assert main(["certify", model, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dualgraph: error: '{model}' is neither a file nor a zoo model; zoo models:"), err
    assert "\n" not in err


def test_the_readme_python_snippet_runs_as_written():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "Certifier(graph)" in b)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["result"].certified.shape == (20,)


def test_the_readme_plugin_snippet_passes_the_checker():
    """The README's plugin example is what users copy: its relaxation must pass ``check_op``
    (run here under a domain of its own, beside the installed example package)."""
    from dualgraph.op_registry import remove_op
    from dualgraph.testing import check_op
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "define_op(\"Softplus\"" in b)
    snippet = snippet.replace('domain="com.example.dualgraph"', 'domain="tests.readme"')
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    op = namespace["softplus"]
    try:
        assert op.key == ("tests.readme", "Softplus")
        check_op(op)
    finally:
        remove_op(op.key)
