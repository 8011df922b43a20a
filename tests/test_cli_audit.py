"""The command line under a user's mistakes, as the sixteenth session's CLI audit tried them:
every one is a single ``dualgraph: error:`` line and exit code 2 (argparse's own usage errors
included), no traceback, checked before any long work starts, so that no answer is lost to a
bad output path, and nothing is silently ignored or silently wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dualgraph.cli import main
from dualgraph.errors import DualgraphError
from dualgraph.models import HERE as ZOO_DIR
from dualgraph.vnnlib import parse_vnnlib

DIGITS = str(ZOO_DIR / "digits_small.onnx")


def one_line_error(args: list[str], capsys) -> str:
    """Run the CLI; it must fail with exactly one line on stderr, the error, and no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (args, code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dualgraph: error: "), err
    return err.strip()


def instances_csv(tmp_path, text: str) -> str:
    path = tmp_path / "instances.csv"
    path.write_text(text)
    return str(path)


# ---- argparse -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["certify", "--relaxation", "foo"], "argument --relaxation: invalid choice: 'foo'"),
    (["certify", "--eps", "abc"], "'abc' is not a radius"),
    (["certify", "--eps", "1/0"], "'1/0' is not a radius"),
    (["train", "--eps", "-0.1"], "eps must be a finite number >= 0"),
    (["train", "--eps-start", "nan"], "'nan' is not a radius"),
    (["verify"], "the following arguments are required: model, property"),
])
def test_usage_errors_are_one_line_with_a_pointer_to_help(args, fragment, capsys):
    err = one_line_error(args, capsys)
    assert fragment in err and f"(see 'dualgraph {args[0]} --help')" in err, err


def test_eps_takes_a_fraction(capsys):
    assert main(["certify", "--eps", "2/255", "--limit", "5", "--json", "--no-progress", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["eps"] == pytest.approx(2 / 255)


def test_python_dash_m_runs_the_same_command_line():
    out = subprocess.run([sys.executable, "-m", "dualgraph", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dualgraph "), out


# ---- run-instances and verify: bad CSVs, limits and output paths, before any instance runs ----

@pytest.mark.parametrize("text, fragment", [
    ("onnx,vnnlib,timeout\na.onnx,b.vnnlib,10\n", "(a header row?"),
    ("a.onnx,b.vnnlib,-5\n", "timeout '-5' must be a positive number of seconds"),
    ("a.onnx,b.vnnlib,nan\n", "timeout 'nan' must be a positive number of seconds"),
    ("", "lists no instances"),
    ("# only a comment\n", "lists no instances"),
])
def test_a_bad_instances_csv_is_refused(text, fragment, tmp_path, capsys):
    assert fragment in one_line_error(["run-instances", instances_csv(tmp_path, text)], capsys)


def test_a_binary_instances_file_is_refused(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    shutil.copy(DIGITS, path)
    err = one_line_error(["run-instances", str(path)], capsys)
    assert "is not UTF-8 text" in err and "VNN-COMP instances CSV" in err, err


@pytest.mark.parametrize("extra, fragment", [
    (["--limit", "0"], "--limit must be a positive number of instances, got 0"),
    (["--limit", "-1"], "--limit must be a positive number of instances, got -1"),
    (["--max-timeout", "0"], "--max-timeout must be a positive number of seconds"),
    (["--max-timeout", "nan"], "--max-timeout must be a positive number of seconds"),
    (["--root", "/nonexistent-dualgraph-root"], "is not a folder"),
    (["--out", "/nonexistent-dualgraph-dir/r.csv"], "folder '/nonexistent-dualgraph-dir' does not exist"),
    (["--results-dir", DIGITS], "is a file, not a folder"),
])
def test_run_instances_checks_its_options_before_running(extra, fragment, tmp_path, capsys):
    """Each of these fails before the first instance (whose files do not even exist here)."""
    csv = instances_csv(tmp_path, "missing.onnx,missing.vnnlib,10\n")
    out = [] if "--out" in extra else ["--out", str(tmp_path / "results.csv")]
    assert fragment in one_line_error(["run-instances", csv, "--no-progress", *out, *extra], capsys)


def test_an_unwritable_output_is_named_before_verifying(tmp_path, capsys):
    """The model and property do not exist: the results path is checked first, so a long run's
    answer can never be lost at the end for want of a folder."""
    err = one_line_error(["verify", "missing.onnx", "missing.vnnlib", "--results",
                          str(tmp_path / "no-such-folder" / "r.txt")], capsys)
    assert "cannot write results file" in err and "does not exist" in err, err
    out = tmp_path / "r.txt"
    assert main(["run-instances", instances_csv(tmp_path, "m.onnx,p.vnnlib,5\n"), "--out", str(out),
                 "--no-progress"]) == 0  # the check leaves no file behind: the run writes it
    assert out.read_text().splitlines()[1].split(",")[3] == "error"


@pytest.mark.parametrize("flag, value", [("--alpha-steps", "-1"), ("--attack-restarts", "0"),
                                         ("--attack-steps", "-2"), ("--attack-rounds", "-1")])
def test_verify_names_the_flag_of_a_bad_count(flag, value, capsys):
    err = one_line_error(["verify", "m.onnx", "p.vnnlib", flag, value], capsys)
    assert err.startswith(f"dualgraph: error: {flag} must be at least"), err


# ---- certify, train, dump ------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["certify", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["certify", "--relaxation", "alpha", "--alpha-steps", "-1"], "--alpha-steps must be at least 0"),
    (["certify", "--relaxation", "alpha", "--alpha-lr", "-1"], "--alpha-lr must be a positive number"),
    (["certify", "--mean", "0.1", "0.2", "--std", "0.3"], "--mean needs 1 value (the input has one channel), got 2"),
    (["train", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train", "--optimizer", "sgd", "--momentum", "-1"], "--momentum must be a finite number >= 0"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["train", "--eval-limit", "-1"], "--eval-limit must be a positive number"),
    (["dump", DIGITS, "--eps", "0.1"], "--eps only take effect with --bounds"),
    (["dump", DIGITS, "--dataset", "digits"], "--dataset only take effect with --bounds"),
])
def test_bad_options_name_the_flag(args, fragment, capsys):
    assert fragment in one_line_error([*args, "--threads", "1"], capsys)


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    err = one_line_error(["train", "--out", str(target), "--epochs", "1", "--limit", "20", "--eval-limit", "10",
                          "--no-progress", "--threads", "1"], capsys)
    assert "is a file, not a folder" in err, err


def test_dump_takes_its_bound_inputs_from_one_source(tmp_path, capsys):
    vnnlib = tmp_path / "p.vnnlib"
    vnnlib.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n")
    err = one_line_error(["dump", DIGITS, "--bounds", "--vnnlib", str(vnnlib), "--dataset", "digits",
                          "--eps", "0.1"], capsys)
    assert "not both" in err, err


def test_dot_output_says_when_its_bounds_are_estimates(capsys):
    assert main(["dump", DIGITS, "--bounds", "--eps", "0.1", "--dataset", "digits", "--limit", "2",
                 "--proj", "5", "--format", "dot", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "bounds ESTIMATED with random projections (r = 5); not sound" in out
    assert main(["dump", DIGITS, "--bounds", "--eps", "0.1", "--dataset", "digits", "--limit", "2",
                 "--format", "dot", "--threads", "1"]) == 0
    assert "ESTIMATED" not in capsys.readouterr().out


def test_a_cascade_manifest_without_eps_asks_for_eps(tmp_path, capsys):
    shutil.copy(DIGITS, tmp_path / "stage0.onnx")
    manifest = tmp_path / "cascade.json"
    manifest.write_text(json.dumps({"kind": "cascade", "stages": ["stage0.onnx"]}))
    err = one_line_error(["certify", str(manifest), "--dataset", "digits", "--threads", "1"], capsys)
    assert "--eps is required: the manifest" in err and "got -1" not in err, err


# ---- models that output NaN ------------------------------------------------------------------

def _nan_model(path, inputs: list[int], outputs: int) -> None:
    """Flatten, then a Gemm whose first weight is NaN (every output is NaN)."""
    n = int(np.prod(inputs))
    w = np.ones((outputs, n), dtype=np.float32)
    w[0, 0] = np.nan
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)],
        "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])],
        [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_a_model_that_outputs_nan_is_named_not_blamed_on_the_frontend(tmp_path, capsys):
    model = tmp_path / "nan.onnx"
    _nan_model(model, [2], 1)
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
                    "(assert (<= Y_0 -1))\n")
    err = one_line_error(["verify", str(model), str(prop), "--timeout", "20"], capsys)
    assert "outputs NaN at the box centre" in err and "frontend bug" not in err, err


def test_certify_refuses_a_model_that_outputs_nan(tmp_path, capsys):
    model = tmp_path / "nan.onnx"
    _nan_model(model, [1, 8, 8], 10)
    err = one_line_error(["certify", str(model), "--dataset", "digits", "--eps", "0.01", "--limit", "5",
                          "--no-progress", "--threads", "1"], capsys)
    assert "the model outputs NaN on input 0" in err, err


# ---- VNN-LIB -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("", "no variables declared"),
    ("(declare-const X_0 Int)\n(declare-const Y_0 Real)\n", "(declare-const X_0 Int): only Real variables"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 -1e400))\n(assert (<= X_0 1))\n"
     "(assert (<= Y_0 0))\n", "input X_0 has no finite lower bound"),
])
def test_vnnlib_names_what_is_wrong(text, fragment):
    with pytest.raises(DualgraphError) as e:
        parse_vnnlib(text, "p.vnnlib")
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- bench ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["bench", "scaling", "--sizes", "abc", "--no-reference"], "--sizes: cannot read 'abc'"),
    (["bench", "scaling", "--sizes", "5", "--no-reference", "--in-process"], "positive multiples of 4"),
    (["bench", "train", "--modes", "foo", "--no-reference"], "--modes: cannot read 'foo'"),
    (["bench", "trust", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["bench", "certify", "--quick", "--batches", "0"], "--batches must be at least 1, got 0"),
    (["bench", "certify", "--quick", "--model", "/nonexistent-dualgraph.onnx"], "does not exist"),
])
def test_bench_options_are_checked(args, fragment, capsys):
    assert fragment in one_line_error(args, capsys)


def test_bench_certify_refuses_a_model_of_another_architecture(capsys):
    err = one_line_error(["bench", "certify", "--quick", "--batches", "1", "--batch-size", "2", "--model", DIGITS,
                          "--data-dir", "/nonexistent-dualgraph-mnist"], capsys)
    assert "--data-dir /nonexistent-dualgraph-mnist does not exist" in err, err
    err = one_line_error(["bench", "certify", "--quick", "--batches", "1", "--batch-size", "2", "--model", DIGITS],
                         capsys)
    assert "is not the paper's small MNIST model" in err, err
