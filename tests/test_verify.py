"""Tests of verification mode (dualgraph.verification): answers on VNN-COMP instances, soundness
of unsat and sat, counterexamples checked independently in onnxruntime, run_instances."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dualgraph.errors import DualgraphError
from dualgraph import verification as verify_mod
from dualgraph import competition
from dualgraph.competition import read_instances, run_instances
from dualgraph.verification import VerifyConfig, VerifyModel, VerifyResult, verify_instance, verify_property
from dualgraph.vnnlib import parse_vnnlib, read_vnnlib

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp2021"
FAST = VerifyConfig(attack_restarts=8, attack_steps=50, attack_rounds=2)


def vnncomp(*parts: str) -> Path:
    if not VNNCOMP.is_dir():
        pytest.skip(f"../shared/vnncomp2021 not found (looked in {VNNCOMP}); the benchmark instances are not available")
    return VNNCOMP.joinpath(*parts)


# ---- helpers -----------------------------------------------------------------------------------
def parse_counterexample(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``sat`` + ``((X_0 v) ... (Y_0 v))`` -> (x, y), independently of dualgraph's writer."""
    lines = text.splitlines()
    assert lines[0] == "sat"
    pairs = re.findall(r"\((X|Y)_(\d+)\s+([^\s()]+)\)", "\n".join(lines[1:]))
    xs = {int(i): float(v) for k, i, v in pairs if k == "X"}
    ys = {int(i): float(v) for k, i, v in pairs if k == "Y"}
    assert sorted(xs) == list(range(len(xs))) and sorted(ys) == list(range(len(ys)))
    return np.array([xs[i] for i in range(len(xs))]), np.array([ys[i] for i in range(len(ys))])


def check_counterexample(onnx_path: Path, vnnlib_path_or_props, text: str) -> None:
    """The counterexample of a ``sat`` result file, checked with a fresh onnxruntime session:
    inside one input box, and the outputs inside one unsafe conjunction of that box."""
    x, y_written = parse_counterexample(text)
    props = vnnlib_path_or_props if isinstance(vnnlib_path_or_props, list) else read_vnnlib(vnnlib_path_or_props)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    y = sess.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].astype(np.float64).ravel()
    assert x.astype(np.float32).astype(np.float64).tolist() == x.tolist(), "X values are not the float32 inputs"
    np.testing.assert_allclose(y, y_written, rtol=0, atol=0)
    def inside_box(p) -> bool:
        lo_ok = np.where(p.open_lo if p.open_lo is not None else False, x > p.input_lo, x >= p.input_lo)
        hi_ok = np.where(p.open_hi if p.open_hi is not None else False, x < p.input_hi, x <= p.input_hi)
        return bool(np.all(lo_ok) and np.all(hi_ok))

    def inside(c) -> bool:  # strict rows strictly
        strict = c.strict if c.strict is not None else np.zeros(len(c.d), dtype=bool)
        return bool(np.all(np.where(strict, c.C @ y < c.d, c.C @ y <= c.d)))

    ok = [p for p in props if inside_box(p) and any(inside(c) for c in p.unsafe)]
    assert ok, "the counterexample does not violate the property"


def make_onnx(path: Path, layers: list[tuple[np.ndarray, np.ndarray]], rank1: bool = False,
              softmax: bool = False) -> Path:
    """A Gemm/ReLU network (ReLU between layers); input ``[n]`` (rank1) or ``[1, n]``."""
    n_in = layers[0][0].shape[1]
    nodes, inits = [], []
    cur = "x"
    if rank1:
        inits.append(numpy_helper.from_array(np.array([1, n_in], np.int64), "shape_in"))
        nodes.append(helper.make_node("Reshape", ["x", "shape_in"], ["x2"]))
        cur = "x2"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        cur = f"g{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    n_out = layers[-1][0].shape[0]
    if softmax:
        nodes.append(helper.make_node("Softmax", [cur], ["sm"], axis=1))
        cur = "sm"
    if rank1:
        inits.append(numpy_helper.from_array(np.array([n_out], np.int64), "shape_out"))
        nodes.append(helper.make_node("Reshape", [cur, "shape_out"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [n_in] if rank1 else [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n_out] if rank1 else [1, n_out])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def vnnlib_text(n_in: int, n_out: int, box: list[tuple[float, float]] | None, body: str) -> str:
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    head += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    if box:
        head += "".join(f"(assert (>= X_{i} {lo!r}))\n(assert (<= X_{i} {hi!r}))\n" for i, (lo, hi) in enumerate(box))
    return head + body


IDENTITY = [(np.eye(1), np.zeros(1))]                                   # y = x
TWIN_RELUS = [(np.array([[1.0], [1.0]]), np.zeros(2)),                   # y = relu(x) - relu(x) = 0
              (np.array([[1.0, -1.0]]), np.zeros(1))]


def answer(tmp_path: Path, layers, vnnlib: str, rank1: bool = False, config: VerifyConfig = FAST,
           timeout: float = 30.0, name: str = "net") -> tuple[VerifyResult, Path, list]:
    onnx_path = make_onnx(tmp_path / f"{name}.onnx", layers, rank1)
    props = parse_vnnlib(vnnlib)
    result = verify_property(VerifyModel(onnx_path), props, timeout, config)
    if result.answer == "sat":
        check_counterexample(onnx_path, props, result.result_text())
    return result, onnx_path, props


# ---- the competition's test/ instances ---------------------------------------------------------
# The truth: nano y = relu(x)/2 in [0, 0.5], tiny/small y in [0, 1] / [30.5, 78.5] (never the
# unsafe y <= -1 / y >= 100); test_sat / test_unsat are ACAS Xu property 3 (see test/README.md).
TEST_TRUTH = {"test_nano": "unsat", "test_tiny": "unsat", "test_small": "unsat", "test_sat": "sat",
              "test_unsat": "unsat"}


@pytest.mark.parametrize("row", range(5))
def test_vnncomp_test_instances(row):
    instances = read_instances(vnncomp("test", "test_instances.csv"))
    onnx_path, vnnlib_path, timeout = instances[row]
    result = verify_instance(onnx_path, vnnlib_path, timeout)
    assert result.answer == TEST_TRUTH[onnx_path.stem], result.details
    if result.answer == "sat":
        check_counterexample(onnx_path, vnnlib_path, result.result_text())


@pytest.mark.parametrize("net,prop,truth", [
    ("mnist-net_256x2", "prop_2_0.03", "unsat"),    # proved by the paper's bounds
    ("mnist-net_256x2", "prop_1_0.05", "sat"),      # PGD finds a counterexample at once
    ("mnist-net_256x6", "prop_11_0.05", "unsat"),   # needs the CROWN slopes
])
def test_mnistfc_instances(net, prop, truth):
    onnx_path, vnnlib_path = vnncomp("mnistfc", f"{net}.onnx"), vnncomp("mnistfc", f"{prop}.vnnlib")
    result = verify_instance(onnx_path, vnnlib_path, 120, FAST)
    assert result.answer == truth, result.details
    if truth == "sat":
        check_counterexample(onnx_path, vnnlib_path, result.result_text())
    else:
        assert result.details["worst_margin"][result.details["method"][8:-1]] > 0


# ---- small networks with known answers ---------------------------------------------------------
@pytest.mark.parametrize("rank1", [False, True])
def test_attack_finds_counterexample_away_from_centre(tmp_path, rank1):
    text = vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (>= Y_0 0.9))")
    result, _, _ = answer(tmp_path, IDENTITY, text, rank1)
    assert result.answer == "sat" and result.details["method"].startswith("attack")
    assert result.x[0] >= 0.9 and result.y[0] >= 0.9


def test_pgd_from_branch_and_bound_corners(tmp_path):
    """The corners a domain's bound points to are only starting points: a short descent from a
    safe corner reaches the unsafe set (y = x0 + x1 >= 1.5 on [-1, 1]^2 from (1, -1), y = 0),
    and the point is confirmed in onnxruntime; without steps the corner alone is checked."""
    from dualgraph.deadline import Deadline
    from dualgraph.falsify import Falsifier, Found
    props = parse_vnnlib(vnnlib_text(2, 1, [(-1.0, 1.0), (-1.0, 1.0)], "(assert (>= Y_0 1.5))"))
    model = VerifyModel(make_onnx(tmp_path / "sum.onnx", [(np.ones((1, 2)), np.zeros(1))]))
    def falsifier():
        return Falsifier(model, FAST, Deadline(30.0), {"unconfirmed": 0})

    corner = np.array([[1.0, -1.0]])
    falsifier().descend_from(props[0], corner, 0, "corner")  # no hit: returns
    with pytest.raises(Found) as found:
        falsifier().descend_from(props[0], corner, 10, "descent")
    assert found.value.method == "descent" and found.value.x.sum() >= 1.5 and found.value.x.max() <= 1.0
    # the descents' time budget (DESCENT_SHARE): right after one, the next only checks its corners
    spent = falsifier()
    never = parse_vnnlib(vnnlib_text(2, 1, [(-1.0, 1.0), (-1.0, 1.0)], "(assert (>= Y_0 3.0))"))[0]
    spent.descend_from(never, corner, 10, "never")  # y <= 2: all 10 steps, no hit
    spent.descend_from(props[0], corner, 10, "budget")


@pytest.mark.parametrize("rank1", [False, True])
def test_bounds_prove_unsat(tmp_path, rank1):
    text = vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (>= Y_0 1.5))")
    result, _, _ = answer(tmp_path, IDENTITY, text, rank1)
    assert result.answer == "unsat" and result.details["method"] == "bounds (paper)"
    assert result.result_text() == "unsat\n"


def test_input_splitting_proves_what_the_relaxation_cannot(tmp_path):
    # y = relu(x) - relu(x) = 0; one relaxation alone bounds y >= -0.5 at best on [-1, 1]
    text = vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (<= Y_0 -0.25))")
    result, onnx_path, props = answer(tmp_path, TWIN_RELUS, text)
    assert result.answer == "unsat" and result.details["method"] == "input splitting"
    assert result.details["open_after"] == {"paper": 1, "crown": 1, "alpha": 1}
    model = VerifyModel(onnx_path)
    neither = verify_property(model, props, 30, VerifyConfig(split_max_inputs=0, attack_rounds=1,
                                                             branch_and_bound=False))
    assert neither.answer == "unknown"
    # splitting the ReLUs instead of the input proves it too
    relu_splits = verify_property(model, props, 30, VerifyConfig(split_max_inputs=0, attack_rounds=1))
    assert relu_splits.answer == "unsat" and relu_splits.details["method"] == "branch and bound"


def test_optimised_tangent_lines_prove_what_the_chord_cannot(tmp_path):
    """``sigmoid(x) >= sigmoid(-2)`` on ``x in [-2, 3]``: the chord's parallel lines (paper,
    crown) fall short of it by more than 0.01, a tangent-side line of ``alpha`` reaches it; the
    property with 1e-3 to spare is ``unsat`` through the bounds alone (no input splitting)."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "sigmoid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "sigmoid.onnx"))
    floor = float(1 / (1 + np.exp(2.0)) - 1e-3)
    props = parse_vnnlib(vnnlib_text(1, 1, [(-2.0, 3.0)], f"(assert (<= Y_0 {floor!r}))"))
    config = VerifyConfig(attack_restarts=8, attack_steps=50, attack_rounds=1, split_max_inputs=0)
    chord = verify_property(VerifyModel(tmp_path / "sigmoid.onnx"), props, 30,
                            replace(config, relaxations=("paper", "crown")))
    assert chord.answer == "unknown"
    tangents = verify_property(VerifyModel(tmp_path / "sigmoid.onnx"), props, 30, config)
    assert tangents.answer == "unsat" and tangents.details["method"] == "bounds (alpha)", tangents.details


def test_mean_of_rows_proves_a_contradictory_conjunction(tmp_path):
    # Y_0 <= 1 and Y_0 >= 2 together: no single row is infeasible, their mean is
    text = vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (and (<= Y_0 1.0) (>= Y_0 2.0)))")
    result, _, _ = answer(tmp_path, IDENTITY, text)
    assert result.answer == "unsat" and result.details["method"] == "bounds (paper)"


def test_several_input_boxes(tmp_path):
    # box A: x in [-1, 0] (y <= 0.5 never), box B: x in [0.6, 1] (y >= 0.5 always)
    body = ("(assert (or (and (>= X_0 -1.0) (<= X_0 0.0) (>= Y_0 0.5))"
            " (and (>= X_0 0.6) (<= X_0 1.0) (>= Y_0 0.5))))")
    result, _, props = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, None, body))
    assert len(props) == 2 and result.answer == "sat" and result.details["boxes"] == 2
    assert 0.6 <= result.x[0] <= 1.0
    body_safe = ("(assert (or (and (>= X_0 -1.0) (<= X_0 0.0) (>= Y_0 0.5))"
                 " (and (>= X_0 0.6) (<= X_0 1.0) (<= Y_0 0.5))))")
    result, _, props = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, None, body_safe))
    assert len(props) == 2 and result.answer == "unsat"


def test_empty_conjunction_is_unsafe_everywhere(tmp_path):
    result, _, _ = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(0.25, 0.5)], "(assert (<= X_0 0.5))"))
    assert result.answer == "sat" and 0.25 <= result.x[0] <= 0.5


def test_false_assertions_are_unsat(tmp_path):
    result, _, props = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(0.0, 1.0)], "(assert false)"))
    assert props == [] and result.answer == "unsat"


def test_counterexample_is_cast_into_the_box(tmp_path):
    # float32(0.7) < 0.7: the attack's point on the lower face must be nudged up by one ulp
    text = vnnlib_text(1, 1, [(0.7, 0.9)], "(assert (<= Y_0 0.75))")
    result, _, _ = answer(tmp_path, IDENTITY, text)
    assert float(np.float32(0.7)) < 0.7
    assert result.answer == "sat"
    x = result.x[0]
    assert float(np.float32(x)) == x and 0.7 <= x <= 0.75


def test_timeout(tmp_path):
    result, _, _ = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (>= Y_0 1.5))"), timeout=0)
    assert result.answer == "timeout" and result.x is None
    late = verify_mod._finish(VerifyResult("unsat", 2.0), timeout=1.0)
    assert late.answer == "timeout" and late.details["late_answer"] == "unsat"


def test_property_must_fit_the_model(tmp_path):
    with pytest.raises(DualgraphError, match="2 inputs and 1 outputs but the model"):
        answer(tmp_path, IDENTITY, vnnlib_text(2, 1, [(0.0, 1.0)] * 2, "(assert (>= Y_0 1.5))"))


@pytest.mark.parametrize("body,expected", [
    ("(assert (>= Y_1 Y_0))", "unsat"),          # x_0 > x_1 on the box: y_0 > y_1 always
    ("(assert (>= Y_0 0.74))", "sat"),            # y_0 reaches e^1.1 / (e^1.1 + 1) = 0.750
])
def test_properties_over_softmax_outputs(tmp_path, body, expected):
    """A model ending in Softmax: VNN-LIB's Y are probabilities, bounded through the Softmax."""
    path = make_onnx(tmp_path / "sm.onnx", [(np.eye(2), np.zeros(2))], softmax=True)
    props = parse_vnnlib(vnnlib_text(2, 2, [(0.9, 1.0), (-0.1, 0.0)], body))
    result = verify_property(VerifyModel(path), props, 30.0, FAST)
    assert result.answer == expected, result.details
    if expected == "sat":
        check_counterexample(path, props, result.result_text())


def test_disagreement_with_onnxruntime_is_an_error(tmp_path, monkeypatch):
    model = VerifyModel(make_onnx(tmp_path / "id.onnx", IDENTITY))
    real = model.run_onnx
    monkeypatch.setattr(model, "run_onnx", lambda x: real(x) + 1.0)
    props = parse_vnnlib(vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (>= Y_0 1.5))"))
    with pytest.raises(DualgraphError, match="disagrees with onnxruntime"):
        verify_property(model, props, 30, FAST)


def test_a_model_that_agrees_with_onnxruntime_only_at_the_centre_is_an_error(tmp_path, monkeypatch):
    """onnxruntime computing another function that happens to agree at the box centre (a
    review's written-out layer norm with ``d^4`` for ``d^2``, fused by onnxruntime into its
    LayerNormalization kernel, at ``x = [a, -a, b, -b]`` with ``a^4 + b^4 = a^2 + b^2``) is
    caught at the random points of the box as well; the import-time checks that refuse this
    model first (``frontends/onnx_fusions.py``, the comparison with onnxruntime at load) are
    switched off to reach it."""
    from dualgraph.frontends import onnx as onnx_frontend, onnx_importer
    monkeypatch.setattr(onnx_importer, "check_fusions", lambda model: None)
    monkeypatch.setattr(onnx_frontend, "check_against_onnxruntime", lambda source, graph: None)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "p"], ["q"]), helper.make_node("ReduceMean", ["q"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["z"]), helper.make_node("Mul", ["z", "g"], ["zg"]),
             helper.make_node("Add", ["zg", "b"], ["y"])]
    inits = {"p": np.float32(4.0), "eps": np.float32(1e-5), "g": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}
    graph = helper.make_graph(nodes, "ln4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    path = tmp_path / "ln4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    a = 1.05
    b = np.sqrt((1 - np.sqrt(1 + 4 * (a ** 2 - a ** 4))) / 2)
    centre = np.array([a, -a, b, -b], np.float32)
    model = VerifyModel(path)
    at_centre = model.forward(torch.as_tensor(centre[None], dtype=torch.float64)).numpy()
    assert np.allclose(at_centre, model.run_onnx(centre[None].astype(np.float64)), rtol=1e-4, atol=1e-4)
    props = parse_vnnlib(vnnlib_text(4, 4, [(c - 0.3, c + 0.3) for c in centre.tolist()], "(assert (>= Y_0 9.0))"))
    with pytest.raises(DualgraphError, match="disagrees with onnxruntime on 'ln4.onnx' at a point of the box"):
        verify_property(model, props, 30, FAST)


def test_sat_needs_onnxruntime_to_agree(tmp_path, monkeypatch):
    # The attack's own evaluation lies (everything looks unsafe): nothing is confirmed,
    # and the bounds still prove the property.
    model = VerifyModel(make_onnx(tmp_path / "id.onnx", IDENTITY))
    monkeypatch.setattr(model, "forward_fast", lambda x: 10.0 + 0.0 * x.reshape(x.shape[0], -1).sum(1, keepdim=True))
    props = parse_vnnlib(vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (>= Y_0 1.5))"))
    result = verify_property(model, props, 30, FAST)
    assert result.answer == "unsat" and result.details["unconfirmed"] >= 1


# ---- soundness on random networks -------------------------------------------------------------
def _forward_np(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w.T.astype(np.float32).astype(np.float64) + b.astype(np.float32).astype(np.float64)
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), hidden=st.integers(2, 6), n_rows=st.integers(1, 2),
       n_conj=st.integers(1, 2), d=st.floats(-1.0, 1.0))
def test_random_networks_answers_are_sound(tmp_path, seed, hidden, n_rows, n_conj, d):
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(hidden, 2)), rng.normal(size=hidden) * 0.3),
              (rng.normal(size=(2, hidden)), rng.normal(size=2) * 0.3)]
    conjs = []
    for _ in range(n_conj):
        rows = [f"(<= (+ (* {float(c0)!r} Y_0) (* {float(c1)!r} Y_1)) {float(d)!r})"
                for c0, c1 in rng.normal(size=(n_rows, 2))]
        conjs.append("(and " + " ".join(rows) + ")")
    text = vnnlib_text(2, 2, [(-1.0, 0.5), (-0.5, 1.0)], f"(assert (or {' '.join(conjs)}))")
    config = VerifyConfig(attack_restarts=8, attack_steps=30, attack_rounds=1, split_max_boxes=4000, seed=seed % 100)
    result, _, props = answer(tmp_path, layers, text, config=config, timeout=5.0, name=f"net{seed}")
    if result.answer == "unsat":  # a dense grid of the box never reaches the unsafe region
        g0, g1 = np.meshgrid(np.linspace(-1.0, 0.5, 121), np.linspace(-0.5, 1.0, 121))
        y = _forward_np(layers, np.stack([g0.ravel(), g1.ravel()], 1))
        assert (props[0].violations(y).min(1) > -1e-6).all()
    assert result.answer in ("sat", "unsat", "unknown", "timeout")  # sat was checked in answer()


# ---- run_instances ----------------------------------------------------------------------------
def test_run_instances_loads_each_model_once_and_survives_errors(tmp_path, monkeypatch):
    test_dir = vnncomp("test")
    rows = ["test_nano.onnx,test_nano.vnnlib,60", "missing.onnx,test_nano.vnnlib,60",
            "test_nano.onnx,missing.vnnlib,60", "test_tiny.onnx,test_tiny.vnnlib,60",
            "test_nano.onnx,test_nano.vnnlib,60", "", "test_sat.onnx,test_prop.vnnlib,60"]
    instances = tmp_path / "instances.csv"
    instances.write_text("\n".join(rows) + "\n")
    loads = []
    real = competition.VerifyModel

    def counting(path, *args):
        loads.append(Path(path).name)
        return real(path, *args)
    monkeypatch.setattr(competition, "VerifyModel", counting)
    out, results_dir = tmp_path / "results.csv", tmp_path / "res"
    summary = run_instances(instances, root=test_dir, out=out, config=FAST, results_dir=results_dir, progress=False)
    assert sorted(loads) == ["missing.onnx", "test_nano.onnx", "test_sat.onnx", "test_tiny.onnx"]
    assert [r.answer for r in summary.rows] == ["unsat", "error", "error", "unsat", "unsat", "sat"]
    assert summary.counts == {"sat": 1, "unsat": 3, "unknown": 0, "timeout": 0, "error": 2}
    assert "does not exist" in summary.rows[1].message and "missing.vnnlib" in summary.rows[2].message
    assert "6 instances: sat 1, unsat 3, unknown 0, timeout 0, error 2" in summary.text()
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert [r["answer"] for r in table] == [r.answer for r in summary.rows]
    assert table[0]["instance"] == "test_nano/test_nano" and float(table[0]["seconds"]) >= 0
    assert (results_dir / "missing__test_nano.txt").read_text() == "error\n"
    check_counterexample(test_dir / "test_sat.onnx", test_dir / "test_prop.vnnlib",
                         (results_dir / "test_sat__test_prop.txt").read_text())


def test_result_files_of_equal_names_in_other_folders(tmp_path):
    """``a/net.onnx,p.vnnlib`` and ``b/net.onnx,p.vnnlib``: two result files and two names (the
    second overwrote the first: a review)."""
    for folder, bias in (("a", 0.0), ("b", 10.0)):
        (tmp_path / folder).mkdir()
        make_onnx(tmp_path / folder / "net.onnx", [(np.eye(1), np.array([bias]))])
    (tmp_path / "p.vnnlib").write_text(vnnlib_text(1, 1, [(0.0, 1.0)], "(assert (>= Y_0 5))"))
    instances = tmp_path / "instances.csv"
    (tmp_path / "p__2.vnnlib").write_text(vnnlib_text(1, 1, [(0.0, 1.0)], "(assert (>= Y_0 50))"))
    instances.write_text("a/net.onnx,p.vnnlib,10\nb/net.onnx,p.vnnlib,10\nb/net.onnx,p__2.vnnlib,10\n")
    summary = run_instances(instances, root=tmp_path, config=FAST, results_dir=tmp_path / "res", progress=False)
    assert [(r.instance, r.answer) for r in summary.rows] == [("net/p", "unsat"), ("net/p#2", "sat"),
                                                              ("net/p__2#2", "unsat")]
    assert (tmp_path / "res" / "net__p.txt").read_text() == "unsat\n"
    assert (tmp_path / "res" / "net__p__2.txt").read_text().startswith("sat\n")  # not the third's answer
    assert (tmp_path / "res" / "net__p__2__2.txt").read_text() == "unsat\n"


def test_read_instances_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a.onnx,b.vnnlib\n")
    with pytest.raises(DualgraphError, match="expected 'onnx,vnnlib,timeout'"):
        read_instances(bad)
    bad.write_text("a.onnx,b.vnnlib,soon\n")
    with pytest.raises(DualgraphError, match="not a number"):
        read_instances(bad)
    with pytest.raises(DualgraphError, match="cannot read VNN-COMP instances CSV"):
        read_instances(tmp_path / "none.csv")
    good = tmp_path / "good.csv"
    good.write_text("# comment\nm.onnx, p.vnnlib ,60\n")
    assert read_instances(good, root="/r") == [(Path("/r/m.onnx"), Path("/r/p.vnnlib"), 60.0)]


RELU = [(np.eye(1), np.zeros(1)), (np.eye(1), np.zeros(1))]               # y = relu(x)


@pytest.mark.parametrize("layers, box, body", [
    (RELU, [(-1.0, 1.0)], "(assert (< Y_0 0))"),                   # relu(x) < 0 nowhere; 0 only on the boundary
    (IDENTITY, None, "(assert (> X_0 0))\n(assert (< X_0 1))\n(assert (<= Y_0 0))"),   # x > 0 strictly
    (IDENTITY, None, "(assert (> X_0 -1))\n(assert (<= X_0 0))\n(assert (<= Y_0 -1))"),  # x = -1 is outside
])
def test_a_point_on_a_strict_boundary_is_no_counterexample(tmp_path, layers, box, body):
    """Strict comparisons: a property reachable only on the boundary of a strict output row
    or a strict input bound holds; ``verify`` may not prove it with closed relaxations, but it
    may not answer ``sat`` (found by a review: ``(< Y_0 0)`` on ``relu(x)`` was ``sat`` at
    ``x = 0``, ``Y_0 = 0``)."""
    result, _, _ = answer(tmp_path, layers, vnnlib_text(1, 1, box, body))
    assert result.answer != "sat", result.result_text()


def test_a_strict_property_inside_is_sat(tmp_path):
    """``x < 0`` for ``x`` in ``[-1, 1]``: a counterexample strictly inside (checked strictly)."""
    result, _, _ = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(-1.0, 1.0)], "(assert (< Y_0 0))"))
    assert result.answer == "sat"


def test_numbers_in_a_property_are_exact(tmp_path):
    """``(+ Y_0 1e20) <= (+ 3 1e20)`` is ``Y_0 <= 3``: every input of ``[1, 2]`` violates it (float64
    sums made it ``Y_0 <= 0``, a wrong ``unsat``); ``Y_0 <= 1073741823.9999999999`` is not met at
    ``2^30`` (rounded to nearest it was, a wrong ``sat``). Both found by a review."""
    result, _, _ = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(1.0, 2.0)], "(assert (<= (+ Y_0 1e20) (+ 3 1e20)))"))
    assert result.answer == "sat"
    result, _, _ = answer(tmp_path, IDENTITY, vnnlib_text(1, 1, [(2.0 ** 30, 2.0 ** 30 + 128)],
                                                          "(assert (<= Y_0 1073741823.9999999999))"), name="big")
    assert result.answer != "sat", result.result_text()


@pytest.mark.parametrize("layers, box, body, truth", [
    # y0 + y1 = 1 + 1e-20 (float32 1e-20): above the bound, though y0 + y1 rounds to it in float64
    ([(np.array([[1.0], [0.0]]), np.array([0.0, 1e-20]))], [(1.0, 1.0)],
     "(assert (<= (+ Y_0 Y_1) 1.000000000000000000005))", "unsat"),
    (IDENTITY, [(0.0, 1.0)], "(assert (<= 0.1000000000000000000001 0.1))\n(assert (<= Y_0 100))", "unsat"),
    (IDENTITY, [(0.0, 0.5)], "(assert (>= Y_0 0.5000000000000000000000000000001))", "unsat"),  # 31 digits
    (IDENTITY, None, "(assert (>= X_0 0.50000000000000000001))\n(assert (<= X_0 1))\n(assert (<= Y_0 0.5))", "unsat"),
    (IDENTITY, None, "(assert (> X_0 0.49999999999999999999))\n(assert (<= X_0 0.5))\n(assert (<= Y_0 0.5))", "sat"),
    ([(np.array([[-3e38]]), np.array([-3e38]))], [(0.0, 1.0)], "(assert (<= Y_0 0))", "sat"),  # y = -inf in float32
])
def test_properties_whose_numbers_float64_cannot_hold(tmp_path, layers, box, body, truth):
    """A fourth review's cases of the exact reading (each a wrong answer or a traceback before):
    a sum of outputs against a rounded bound, a constant comparison, a 31-digit bound, an input
    bound just above a float64 number, a strict one just below one, an output onnxruntime
    evaluates to -inf. ``sat`` is checked strictly in :func:`answer`; an ``unsat`` truth allows
    ``unknown``."""
    result, _, _ = answer(tmp_path, layers, vnnlib_text(1, len(layers[-1][1]), box, body))
    assert result.answer == truth if truth == "sat" else result.answer in ("unsat", "unknown"), result.result_text()
