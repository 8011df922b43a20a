"""CLI tests of `dualgraph verify`, `dualgraph run-instances` and the VNN-COMP scripts."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualgraph.cli import main

REPO = Path(__file__).resolve().parents[1]
VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp2021"
SCRIPTS = REPO / "scripts" / "vnncomp"
FAST = ["--attack-restarts", "8", "--attack-steps", "50", "--attack-rounds", "2"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_verify import check_counterexample  # noqa: E402


def shared_test_dir() -> Path:
    if not VNNCOMP.is_dir():
        pytest.skip(f"../shared/vnncomp2021 not found (looked in {VNNCOMP}); the benchmark instances are not available")
    return VNNCOMP / "test"


def test_verify_unsat_prints_and_writes(tmp_path, capsys):
    d = shared_test_dir()
    results = tmp_path / "out.txt"
    rc = main(["verify", str(d / "test_nano.onnx"), str(d / "test_nano.vnnlib"), "--timeout", "30",
               "--results", str(results), *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and out == "unsat\n" and results.read_text() == "unsat\n"
    assert err.startswith("dualgraph: unsat in ") and "bounds (paper)" in err


def test_verify_sat_writes_counterexample(tmp_path, capsys, monkeypatch):
    d = shared_test_dir()
    results = tmp_path / "out.txt"
    threads = []
    monkeypatch.setattr("torch.set_num_threads", threads.append)  # do not change the test session's setting
    rc = main(["verify", str(d / "test_sat.onnx"), str(d / "test_prop.vnnlib"), "--results", str(results),
               "--threads", "1", *FAST])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith("sat\n((X_0 ") and out == results.read_text()
    check_counterexample(d / "test_sat.onnx", d / "test_prop.vnnlib", out)
    assert threads == [1]


@pytest.mark.parametrize("bad", ["vnnlib", "onnx"])
def test_verify_error_is_one_line_and_written(tmp_path, capsys, bad):
    d = shared_test_dir()
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    onnx_path = junk if bad == "onnx" else d / "test_nano.onnx"
    vnnlib_path = tmp_path / "missing.vnnlib" if bad == "vnnlib" else d / "test_nano.vnnlib"
    results = tmp_path / "out.txt"
    rc = main(["verify", str(onnx_path), str(vnnlib_path), "--results", str(results)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and results.read_text() == "error\n"
    assert err.startswith("dualgraph: error: ") and err.count("\n") == 1


def test_verify_timeout(tmp_path, capsys):
    d = shared_test_dir()
    rc = main(["verify", str(d / "test_nano.onnx"), str(d / "test_nano.vnnlib"), "--timeout", "1e-9"])
    assert rc == 0 and capsys.readouterr().out == "timeout\n"


def test_bad_threads_is_a_user_error(capsys):
    d = shared_test_dir()
    rc = main(["verify", str(d / "test_nano.onnx"), str(d / "test_nano.vnnlib"), "--threads", "0"])
    assert rc == 2 and "--threads must be >= 1" in capsys.readouterr().err


def test_run_instances_summary_and_csv(tmp_path, capsys):
    d = shared_test_dir()
    out = tmp_path / "results.csv"
    rc = main(["run-instances", str(d / "test_instances.csv"), "--out", str(out), "--no-progress",
               "--results-dir", str(tmp_path / "res"), *FAST])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "5 instances: sat 1, unsat 4, unknown 0, timeout 0, error 0" in stdout
    assert "median" in stdout and f"results written to {out}" in stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["instance"]: r["answer"] for r in rows} == {
        "test_nano/test_nano": "unsat", "test_tiny/test_tiny": "unsat", "test_small/test_small": "unsat",
        "test_sat/test_prop": "sat", "test_unsat/test_prop": "unsat"}
    assert sorted(p.name for p in (tmp_path / "res").iterdir())[0] == "test_nano__test_nano.txt"


def test_run_instances_missing_csv(capsys):
    assert main(["run-instances", "/nonexistent/instances.csv", "--no-progress"]) == 2
    assert "cannot read VNN-COMP instances CSV" in capsys.readouterr().err


# ---- the competition scripts ------------------------------------------------------------------
def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DUALGRAPH_THREADS"] = "1"
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=120)


def test_competition_scripts(tmp_path):
    d = shared_test_dir()
    onnx_path, vnnlib_path = str(d / "test_tiny.onnx"), str(d / "test_tiny.vnnlib")
    assert _script("prepare_instance.sh", "v1", "test", onnx_path, vnnlib_path).returncode == 0
    results = tmp_path / "res.txt"
    run = _script("run_instance.sh", "v1", "test", onnx_path, vnnlib_path, str(results), "30")
    assert run.returncode == 0, run.stderr
    assert results.read_text() == "unsat\n"


def test_competition_scripts_reject_bad_arguments(tmp_path):
    d = shared_test_dir()
    onnx_path, vnnlib_path = str(d / "test_tiny.onnx"), str(d / "test_tiny.vnnlib")
    assert _script("prepare_instance.sh", "v2", "test", onnx_path, vnnlib_path).returncode == 1
    assert _script("prepare_instance.sh", "v1", "test", onnx_path, str(tmp_path / "none.vnnlib")).returncode == 1
    assert _script("run_instance.sh", "v1", "test", onnx_path).returncode == 1
    results = tmp_path / "res.txt"
    run = _script("run_instance.sh", "v1", "test", str(tmp_path / "none.onnx"), vnnlib_path, str(results), "30")
    assert run.returncode == 2 and results.read_text() == "error\n"
