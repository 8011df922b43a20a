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


def wide_graph(n_in: int = 20, width: int = 2000):
    module = torch.nn.Sequential(torch.nn.Linear(n_in, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                 torch.nn.ReLU(), torch.nn.Linear(width, 3))
    torch.manual_seed(0)
    for m in module:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=1 / m.in_features ** 0.5)
    return load_model(module, torch.zeros(2, n_in))


def test_a_direction_that_does_not_fit_the_budget_is_not_chosen():
    from dualgraph.errors import DualgraphError
    from dualgraph.input_sets import linf_ball
    from dualgraph.scheduler import BoundConfig, BoundScheduler
    graph = wide_graph()
    free = BoundScheduler(graph, BoundConfig())
    tight = BoundScheduler(graph, BoundConfig(max_memory=16 << 20))
    x = torch.rand(4, 20)
    peak, node = free.forward_peak_bytes(4, 4)
    assert free.forward_for(4, 4) and peak > 16 << 20  # cheaper by operation count, but large
    assert not tight.forward_for(4, 4)
    box = linf_ball(x, 0.05)
    raw = dict(rounding_allowance=False)  # the two directions' allowances differ a little
    a = BoundScheduler(graph, BoundConfig(**raw)).intermediate_bounds(box)
    b = BoundScheduler(graph, BoundConfig(max_memory=16 << 20, **raw)).intermediate_bounds(box)
    for v in a:
        assert torch.allclose(a[v].lower, b[v].lower, rtol=1e-4, atol=1e-4)
    forced = BoundScheduler(graph, BoundConfig(direction="forward", max_memory=16 << 20))
    with pytest.raises(DualgraphError, match=rf"needs about \d+ MB at node '{node}'"):
        forced.intermediate_bounds(box)


def test_rows_are_chunked_to_the_budget():
    """Backward rows of a 2000-unit layer: peak resident memory stays near the budget."""
    import threading
    from dualgraph.input_sets import linf_ball
    from dualgraph.scheduler import BoundConfig, BoundScheduler
    graph = wide_graph(n_in=784)
    budget = 48 << 20
    sched = BoundScheduler(graph, BoundConfig(direction="backward", max_memory=budget))
    box = linf_ball(torch.rand(8, 784), 0.01)
    page = 4096

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    sched.intermediate_bounds(linf_ball(torch.rand(1, 784), 0.01))  # warm up (allocator, caches)
    start, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss())
    t = threading.Thread(target=sample)
    t.start()
    try:
        sched.intermediate_bounds(box)
    finally:
        stop.set()
        t.join()
    assert peak[0] - start < 3 * budget, (peak[0] - start) / 2**20


def test_a_candidate_onnxruntime_does_not_confirm_is_refined_until_it_does(tmp_path, monkeypatch):
    """The IR the attack runs on is made to see outputs 0.05 more unsafe than onnxruntime
    (as a model whose two evaluations differ near the boundary would): its hit is not
    confirmed, and stepping deeper along the gradient finds a point onnxruntime confirms."""
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = VerifyModel(path)
    fast = model.forward_fast
    monkeypatch.setattr(model, "forward_fast", lambda x: fast(x) + torch.tensor([0.05, 0.0], dtype=x.dtype))
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
            "(assert (>= X_0 0.0))\n(assert (<= X_0 0.6))\n(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
            "(assert (>= Y_0 0.5))\n")
    config = VerifyConfig(attack_rounds=1, attack_restarts=1, attack_steps=200, relaxations=("paper",))
    result = verify_property(model, parse_vnnlib(text), 20.0, config)
    assert result.answer == "sat", result
    assert "refined in onnxruntime" in result.details["method"] and result.details["confirmed_by"] == "onnxruntime"
    assert 0.5 <= result.x[0] <= 0.6


def test_verify_on_a_large_input_convolutional_network_ends_inside_its_budget(tmp_path):
    """A detector-sized input (3x96x96): the answer, whatever it is, arrives within the limit + 1 s."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 24 * 24, 2))
    path = tmp_path / "conv.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 96, 96),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"])
    n = 3 * 96 * 96
    text = box_property(n, 0.02, "(assert (>= Y_0 1000.0))\n")
    start = time.monotonic()
    result = verify_instance(path, _write(tmp_path / "p.vnnlib", text), 4.0,
                             VerifyConfig(max_memory=256 << 20, attack_restarts=2, attack_steps=10))
    assert time.monotonic() - start < 4.0 + 1.0
    assert result.answer in ("unsat", "unknown", "timeout")


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_running_out_of_memory_is_a_one_line_error(direction, monkeypatch):
    """An allocation that fails inside a walk over the dual graph (which names the failing
    node first) still ends as the out-of-memory error with the size and what to do."""
    from dualgraph import dual_run, forward
    from dualgraph.errors import DualgraphError
    from dualgraph.scheduler import BoundConfig

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(forward.ForwardBounds if direction == "forward" else dual_run.DualRunner,
                        "run_node", fail)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    cert = Certifier(load_model(net, torch.zeros(1, 4)), BoundConfig(direction=direction))
    with pytest.raises(DualgraphError, match=r"^out of memory while bounding '.*' \(asked for 123456789 bytes\); "
                                             r"use a smaller --batch-size"):
        cert.lower_bounds(cert.input_set(torch.zeros(1, 4), 0.1), torch.eye(2)[None])
