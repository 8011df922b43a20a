"""Fuzzing the command line: random flag combinations, corrupted ONNX bytes, mutated VNN-LIB
text. Whatever the input, a command ends with exit code 0 (it worked) or 2 (a one-line
error on stderr), never with a traceback or another exception.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualgraph.cli import main
from dualgraph.models import HERE as ZOO_DIR

MODEL = ZOO_DIR / "digits_small.onnx"          # input [N, 1, 8, 8], 10 outputs
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run_cli(args: list[str], capsys) -> int:
    """``main(args)``'s exit code (argparse's usage errors included: ``main`` returns them too);
    anything escaping is a bug. Checks the one-line-error contract on failure."""
    code = main(args)
    out = capsys.readouterr()
    assert code in (0, 1, 2), (args, code)
    assert "Traceback" not in out.err, (args, out.err)
    if code == 2:
        errors = [line for line in out.err.splitlines() if line.startswith("dualgraph: error:")]
        assert len(errors) == 1, (args, out.err)
    return code


NUMBERS = st.sampled_from(["0", "-1", "1", "0.1", "-0.3", "nan", "inf", "-inf", "1e300", "3", "abc", ""])


@st.composite
def certify_args(draw) -> list[str]:
    args = ["certify", str(MODEL), "--dataset", "digits", "--limit", draw(st.sampled_from(["3", "0", "-2", "x"]))]
    for flag in draw(st.lists(st.sampled_from(["--eps", "--batch-size", "--proj", "--delta", "--timeout",
                                               "--mean", "--std", "--max-memory", "--proj-seed"]),
                              max_size=3, unique=True)):
        args += [flag, draw(NUMBERS)]
    for flag in draw(st.lists(st.sampled_from(["--no-clip", "--json"]), max_size=2, unique=True)):
        args.append(flag)
    args += draw(st.sampled_from([[], ["--norm", "l2"], ["--relaxation", "crown"], ["--dtype", "float64"],
                                  ["--device", "gpu"], ["--device", "cuda"], ["--split", "train"]]))
    return args


@FUZZ
@given(args=certify_args())
def test_random_certify_flags(args, capsys):
    run_cli(args, capsys)


@st.composite
def dump_args(draw) -> list[str]:
    args = ["dump", str(MODEL)]
    args += draw(st.lists(st.sampled_from(["--dual", "--bounds", "--no-simplify"]), max_size=3, unique=True))
    args += ["--format", draw(st.sampled_from(["text", "json", "dot"]))]
    if draw(st.booleans()):
        args += ["--eps", draw(NUMBERS)]
    if draw(st.booleans()):
        args += ["--dataset", "digits", "--limit", draw(st.sampled_from(["2", "0", "-1"]))]
    return args


@FUZZ
@given(args=dump_args())
def test_random_dump_flags(args, capsys):
    run_cli(args, capsys)


@FUZZ
@given(data=st.data())
def test_corrupted_onnx_bytes(data, tmp_path_factory, capsys):
    blob = bytearray(MODEL.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]), label="corruption")
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 20), label="flips")):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(bytes(blob))
    run_cli(["dump", str(path)], capsys)
    run_cli(["certify", str(path), "--dataset", "digits", "--limit", "2", "--eps", "0.05"], capsys)


def _property(lo: float, hi: float) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))" for i in range(64)]
    lines.append("(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))")
    return "\n".join(lines) + "\n"


TOKENS = ["(", ")", "assert", "declare-const", "X_99", "Y_-1", "Real", "and", "or", ">=", "<=", "1e999", "nan",
          "-", "0.5", ";", "\n", "\x00", "é"]


@FUZZ
@given(data=st.data())
def test_mutated_vnnlib(data, tmp_path_factory, capsys):
    text = _property(0.2, 0.3)
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        i = data.draw(st.integers(0, len(text)), label="at")
        if data.draw(st.booleans(), label="delete"):
            text = text[:i] + text[i + data.draw(st.integers(1, 30)):]
        else:
            text = text[:i] + " " + data.draw(st.sampled_from(TOKENS)) + " " + text[i:]
    path = tmp_path_factory.mktemp("vnnlib") / "prop.vnnlib"
    path.write_text(text, encoding="utf-8")
    run_cli(["verify", str(MODEL), str(path), "--timeout", "5", "--attack-restarts", "2", "--attack-steps", "10"],
            capsys)


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "x"])
def test_verify_timeouts_are_checked(timeout, tmp_path, capsys):
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_property(0.2, 0.3))
    assert run_cli(["verify", str(MODEL), str(prop), "--timeout", timeout], capsys) == 2


def test_nothing_left_behind_by_a_failed_verify(tmp_path, capsys):
    results = tmp_path / "out.txt"
    assert run_cli(["verify", str(MODEL), str(tmp_path / "missing.vnnlib"), "--results", str(results)], capsys) == 2
    assert not results.exists() or results.read_text() == "error\n"
