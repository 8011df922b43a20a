"""Every run honours its time budget; compressed competition files are read as they are."""

from __future__ import annotations

import gzip
import shutil
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph.api import Certifier, load_model
from dualgraph.certify import certify_dataset
from dualgraph.cli import main
from dualgraph.data import Dataset
from dualgraph.deadline import Deadline, DeadlineExceeded
from dualgraph.verification import VerifyConfig, VerifyModel, verify_instance, verify_property
from dualgraph.vnnlib import parse_vnnlib, read_vnnlib


def slow_mlp(path, width: int = 1536, depth: int = 4, n_in: int = 784) -> str:
    """A wide fully connected ReLU network: its exact bounds take many seconds."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, size = [], [], "x", n_in
    for k in range(depth):
        w = (rng.standard_normal((width, size)) / np.sqrt(size)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{k}")]
        nodes += [helper.make_node("Gemm", [prev, f"w{k}", f"b{k}"], [f"h{k}"], transB=1),
                  helper.make_node("Relu", [f"h{k}"], [f"r{k}"])]
        prev, size = f"r{k}", width
    w = (rng.standard_normal((2, size)) / np.sqrt(size)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "wo"))
    nodes.append(helper.make_node("Gemm", [prev, "wo"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def box_property(n_in: int, eps: float, body: str) -> str:
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    box = "".join(f"(assert (>= X_{i} {0.5 - eps}))\n(assert (<= X_{i} {0.5 + eps}))\n" for i in range(n_in))
    return decl + box + body


def test_verify_answers_within_its_time_limit(tmp_path):
    """The bounds of this network take far longer than the limit: the answer (timeout) comes
    within about a second of it, from inside the bound computation."""
    model = VerifyModel(slow_mlp(tmp_path / "slow.onnx"))
    props = parse_vnnlib(box_property(784, 0.05, "(assert (>= Y_0 1000.0))\n"))
    config = VerifyConfig(attack_rounds=1, attack_restarts=1, attack_steps=5)
    start = time.monotonic()
    result = verify_property(model, props, 1.5, config)
    took = time.monotonic() - start
    assert result.answer == "timeout", result
    assert took < 1.5 + 1.0, took


def test_certify_stops_at_its_deadline_and_reports_what_it_finished(tmp_path):
    cert = Certifier(load_model(slow_mlp(tmp_path / "slow.onnx", width=512, depth=3)))
    data = Dataset(torch.rand(40, 784), torch.zeros(40, dtype=torch.long), "random", 2)
    full = certify_dataset(cert, data.take(10), 0.01, batch_size=10, progress=False)
    per_batch = full.seconds
    start = time.monotonic()
    report = certify_dataset(cert, data, 0.01, batch_size=10, progress=False, deadline=Deadline(per_batch * 1.5))
    assert time.monotonic() - start < per_batch * 1.5 + 1.0
    assert 10 <= report.n < 40 and report.requested == 40 and report.to_json()["timed_out"]
    with pytest.raises(DeadlineExceeded):
        cert.scheduler.deadline = Deadline(0.0)
        try:
            cert.certify(data.images[:10], data.labels[:10], 0.01)
        finally:
            cert.scheduler.deadline = Deadline()


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_verify_timeout_must_be_positive(tmp_path, capsys, timeout):
    path = slow_mlp(tmp_path / "m.onnx", width=4, depth=1, n_in=2)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(box_property(2, 0.1, "(assert (>= Y_0 1000.0))\n"))
    assert main(["verify", path, str(prop), "--timeout", timeout]) == 2
    assert "--timeout must be a positive number" in capsys.readouterr().err


def test_gzipped_onnx_and_vnnlib_are_read_as_they_are(tmp_path):
    path = slow_mlp(tmp_path / "m.onnx", width=8, depth=2, n_in=3)
    text = box_property(3, 0.1, "(assert (>= Y_0 1000.0))\n")
    gz_model, gz_prop = tmp_path / "m.onnx.gz", tmp_path / "p.vnnlib.gz"
    with open(path, "rb") as f, gzip.open(gz_model, "wb") as g:
        shutil.copyfileobj(f, g)
    gz_prop.write_bytes(gzip.compress(text.encode()))
    assert read_vnnlib(gz_prop)[0].input_lo.tolist() == parse_vnnlib(text)[0].input_lo.tolist()
    plain = verify_instance(path, gz_prop, 20.0)
    packed = verify_instance(gz_model, gz_prop, 20.0)
    assert plain.answer == packed.answer == "unsat"
    assert Certifier(load_model(gz_model)).forward(torch.ones(1, 3)).shape == (1, 2)


def test_corrupt_gzip_and_non_utf8_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "p.vnnlib.gz"
    bad.write_bytes(b"not gzip at all")
    model = slow_mlp(tmp_path / "m.onnx", width=4, depth=1, n_in=2)
    assert main(["verify", model, str(bad)]) == 2
    assert "not a valid gzip file" in capsys.readouterr().err
    latin = tmp_path / "p.vnnlib"
    latin.write_bytes(b"; caf\xe9\n(declare-const X_0 Real)\n")
    assert main(["verify", model, str(latin)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
