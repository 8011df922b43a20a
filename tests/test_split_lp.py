"""The split-LP emptiness test of branch-and-bound domains (:mod:`dualgraph.split_lp`).

* The batched simplex against scipy's HiGHS on the same small LPs (random, with duplicate and
  zero rows, fixed coordinates and single rows): its certificate is never above the LP optimum
  (weak duality), a domain is certified empty only where the LP is infeasible, and every LP
  infeasible by more than a hair is certified.
* On float32 Gemm-ReLU chains (some with near-duplicate units whose biases differ by about
  float32 rounding): a domain made of the splits that a point of the box meets as the network
  evaluates it in float32 (points on the units' zero crossings among them) is never dropped.
* A contradiction smaller than the network's evaluation error is not a proof; a larger one is.
* In branch and bound: children are dropped, and the answers are those of the search without
  the test (``tests/test_bab.py`` runs its MILP agreement with the test on, the default).
* Only Gemm layers (``alpha = beta = 1``) of the previous ReLU or the input get the test, with
  their own stored weights (not through a residual sum, not with a scaled product).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from dualgraph.bab import BranchAndBound
from dualgraph.split_lp import EmptinessTest, SplitLayer, certified_empty, minimax_simplex
from dualgraph.verification import VerifyConfig, VerifyModel, verify_property
from dualgraph.vnnlib import read_vnnlib

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def lp_minimax(W, b, rows, sign, lo, up) -> float:
    """``min_{y in [lo, up]} max_k sign_k (W_{rows_k} y + b_{rows_k})`` by HiGHS (one problem)."""
    A = sign[:, None] * W[rows]
    c = sign * b[rows]
    n = W.shape[1]
    # variables (y, tau): min tau s.t. A y + c <= tau
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=np.c_[A, -np.ones(len(rows))], b_ub=-c,
                  bounds=list(zip(lo, up)) + [(None, None)], method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


@st.composite
def layer_problems(draw):
    """A layer ``W`` ``[N, n]``, ``b``, and ``D`` problems: rows (split units), signs and a box."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    g = np.random.default_rng(seed)
    N, n, D = draw(st.integers(1, 12)), draw(st.integers(1, 10)), draw(st.integers(1, 6))
    W = g.standard_normal((N, n)) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    if N >= 2 and draw(st.booleans()):  # a duplicate row, its bias a little off
        W[1] = W[0]
    if draw(st.booleans()):
        W[:, g.integers(n)] = 0.0          # a column nothing reads
    b = g.standard_normal(N) * draw(st.sampled_from([0.0, 0.5, 3.0]))
    K = draw(st.integers(1, N))
    rows = np.stack([g.choice(N, K, replace=False) for _ in range(D)])
    sign = g.choice([-1.0, 1.0], (D, K))
    pad = draw(st.integers(0, K - 1))       # padding rows at the end of some problems
    if pad:
        sign[0, K - pad:] = 0.0
    lo = g.standard_normal((D, n))
    up = lo + np.abs(g.standard_normal((D, n))) * (g.random((D, n)) > 0.1)  # some fixed coordinates
    return W, b, rows, sign, lo, up


@settings(max_examples=150, **SETTINGS)
@given(problem=layer_problems())
def test_the_simplex_certifies_exactly_the_empty_problems_the_lp_finds(problem):
    W, b, rows, sign, lo, up = problem
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    rows_t = torch.tensor(rows)
    beta = minimax_simplex(t(W), rows_t, t(sign), t(b), t(lo), t(up))
    form = SplitLayer(t(W), t(b), torch.zeros(len(b), dtype=torch.float64))
    empty = certified_empty(form, rows_t, t(sign), t(lo), t(up), beta)
    assert (beta >= 0).all() and (beta[t(sign) == 0] == 0).all()
    for k in range(len(rows)):
        real = sign[k] != 0
        optimum = lp_minimax(W, b, rows[k][real], sign[k][real], lo[k], up[k])
        bv = beta[k].numpy()[real]
        a = (bv * sign[k][real]) @ W[rows[k][real]]
        value = bv @ (sign[k][real] * b[rows[k][real]]) + np.minimum(a * lo[k], a * up[k]).sum()
        scale = 1.0 + np.abs(W).max() * np.abs(np.r_[lo[k], up[k]]).max() + np.abs(b).max()
        assert value <= optimum + 1e-9 * scale, "a certificate above the LP optimum"
        if empty[k]:
            assert optimum > 0, "certified empty, but the LP finds a point"
        elif optimum > 1e-6 * scale:
            raise AssertionError(f"the LP is infeasible by {optimum:g} but the simplex found no certificate "
                                 f"(its value {value:g})")


def test_a_contradiction_within_the_evaluation_error_is_no_proof():
    """``z_0 = y_0 + b`` and ``z_1 = y_0 + c y_1 + b`` with ``c y_1 > 0`` below float32 rounding:
    the splits ``z_0 >= 0`` and ``z_1 <= 0`` contradict each other in exact arithmetic (by
    ``c y_1``), but at ``y_0 = -b`` float32 evaluates both to exactly 0, so the domain holds a
    point of the network as evaluated and must not be dropped; with ``c`` far above rounding
    it is a proof."""
    c = float(np.float32(1e-9))
    W = torch.tensor([[1.0, 0.0], [1.0, c]], dtype=torch.float64)
    bias = torch.tensor([0.25, 0.25], dtype=torch.float64)
    lo, up = torch.tensor([[-1.0, 0.5]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    rows, sign = torch.tensor([[0, 1]]), torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[-0.25, 1.0]])
    z = y @ W.float().t() + bias.float()                                         # the network in float32
    assert z[0, 0] >= 0 >= z[0, 1], z
    beta = minimax_simplex(W, rows, sign, bias, lo, up)
    exact = SplitLayer(W, bias, torch.zeros(2, dtype=torch.float64))
    assert bool(certified_empty(exact, rows, sign, lo, up, beta)), "exactly, the domain is empty"
    T = W.abs() @ torch.tensor([1.0, 1.0], dtype=torch.float64) + bias.abs()
    noise = 1.01 * (2 * 2.0 ** -24) / (1 - 2 * 2.0 ** -24) * T                   # SAFETY gamma(2, u32) T
    assert not bool(certified_empty(SplitLayer(W, bias, noise), rows, sign, lo, up, beta)), \
        "a point as evaluated meets both splits"
    W_far = torch.tensor([[1.0, 0.0], [1.0, 1e-3]], dtype=torch.float64)
    beta = minimax_simplex(W_far, rows, sign, bias, lo, up)
    assert bool(certified_empty(SplitLayer(W_far, bias, noise), rows, sign, lo, up, beta)), \
        "a contradiction beyond rounding is a proof"


def _chain_onnx(folder, widths: list[int], g: np.random.Generator, near_duplicates: bool):
    """A float32 Gemm-ReLU chain ``widths[0] -> ... -> widths[-1]``; with ``near_duplicates`` each
    hidden layer's unit 1 copies unit 0 with its bias one or two float32 ulps off."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits, x = [], {}, "X"
    weights = []
    for k in range(len(widths) - 1):
        W = (g.standard_normal((widths[k + 1], widths[k])) * g.choice([0.5, 1.0, 2.0]) / np.sqrt(widths[k]))
        b = g.standard_normal(widths[k + 1]) * 0.3
        W, b = W.astype(np.float32), b.astype(np.float32)
        hidden = k < len(widths) - 2
        if hidden and near_duplicates and widths[k + 1] >= 2:
            W[1] = W[0]
            b[1] = np.nextafter(np.nextafter(b[0], np.float32(np.inf)), np.float32(np.inf)) if g.random() < 0.5 \
                else np.nextafter(b[0], np.float32(-np.inf))
        inits[f"W{k}"], inits[f"b{k}"] = W, b
        weights.append((W, b))
        out = f"z{k}" if hidden else "Y"
        nodes.append(helper.make_node("Gemm", [x, f"W{k}", f"b{k}"], [out], transB=1))
        if hidden:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"]))
            x = f"r{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, widths[0]])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, widths[-1]])],
                              [numpy_helper.from_array(t, k) for k, t in inits.items()])
    path = folder / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, weights


def _search_on(path, lo: np.ndarray, hi: np.ndarray, n_out: int) -> BranchAndBound:
    model = VerifyModel(path)
    sched = model.certifier("alpha", 5).scheduler
    t = lambda a: torch.tensor(a, dtype=torch.float64)[None]  # noqa: E731
    bab = BranchAndBound(sched, t(lo), t(hi), torch.ones(1, n_out, dtype=torch.float64), torch.zeros(1),
                         np.zeros(1, dtype=int), lambda xs: None)
    bab.prepare()
    return bab


def _fresh(test: EmptinessTest, only: int | None = None) -> EmptinessTest:
    """A new test of the same layers (``only``: that layer alone, not the next one's splits
    too), so that every call tests every layer (a test that found nothing lately only probes)."""
    layers = [form if only is None or i == only else None for i, form in enumerate(test.layers)]
    return EmptinessTest(test.names, layers, test.input_box, test.root)


def _evaluate32(weights, x: np.ndarray) -> list[np.ndarray]:
    """Each hidden layer's pre-activations as float32 evaluates them, ``[P, N_k]``."""
    zs, h = [], x.astype(np.float32)
    for W, b in weights[:-1]:
        z = h @ W.T + b
        zs.append(z)
        h = np.maximum(z, 0)
    return zs


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2 ** 32 - 1), near_duplicates=st.booleans())
def test_a_domain_around_a_point_of_the_box_is_never_dropped(seed, near_duplicates, tmp_path_factory):
    g = np.random.default_rng(seed)
    widths = [int(g.integers(2, 7))] + [int(g.integers(3, 13)) for _ in range(int(g.integers(2, 4)))] + [3]
    path, weights = _chain_onnx(tmp_path_factory.mktemp("split"), widths, g, near_duplicates)
    center = g.standard_normal(widths[0])
    half = g.choice([0.1, 0.5, 1.0])
    lo, hi = center - half, center + half
    bab = _search_on(path, lo, hi, widths[-1])
    test = bab.emptiness
    assert test is not None and all(form is not None for form in test.layers)
    points = lo + (hi - lo) * g.random((200, widths[0]))
    points = np.concatenate([points, _zero_crossings(weights, points, g)])
    points = np.clip(points, lo, hi)
    zs = _evaluate32(weights, points)
    signs = {}
    for relu, z in zip(bab.relus, zs):
        s = np.where(z > 0, -1, np.where(z < 0, 1, g.choice([-1, 1], z.shape)))  # the side the point is on
        keep = g.random(z.shape) < g.choice([0.3, 0.7, 1.0])
        signs[relu.name] = torch.tensor(s * keep, dtype=torch.int8)
    for k in range(len(bab.relus)):
        empty = _fresh(test).empty(signs, torch.full((len(points),), k))
        assert not bool(empty.any()), f"layer {k}: a domain holding a point of the box was dropped"


def _zero_crossings(weights, points: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """Points on the segments between pairs of ``points`` where some hidden unit's float32
    pre-activation changes sign, bisected to the last float64 step."""
    out = []
    for _ in range(40):
        a, b = points[g.integers(len(points))], points[g.integers(len(points))]
        za, zb = _evaluate32(weights, a[None]), _evaluate32(weights, b[None])
        k = int(g.integers(len(za)))
        flips = np.nonzero(np.sign(za[k][0]) != np.sign(zb[k][0]))[0]
        if not len(flips):
            continue
        j = int(g.choice(flips))
        s_lo, s_hi = 0.0, 1.0
        side = np.sign(za[k][0, j])
        for _ in range(60):
            mid = (s_lo + s_hi) / 2
            z = _evaluate32(weights, (a + mid * (b - a))[None])[k][0, j]
            s_lo, s_hi = (mid, s_hi) if np.sign(z) == side else (s_lo, mid)
        out += [a + s_lo * (b - a), a + s_hi * (b - a)]
    return np.array(out).reshape(-1, points.shape[1])


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_domains_are_dropped_where_the_lp_says_empty(seed, tmp_path_factory):
    """Random split patterns on a chain: each dropped domain's layer LP (its box as the test
    builds it, the evaluation error ignored) is infeasible, and each LP infeasible by far more
    than the evaluation error is dropped."""
    g = np.random.default_rng(seed)
    widths = [int(g.integers(2, 6)), int(g.integers(4, 12)), int(g.integers(4, 12)), 2]
    path, weights = _chain_onnx(tmp_path_factory.mktemp("split"), widths, g, False)
    lo = g.standard_normal(widths[0])
    hi = lo + g.choice([0.3, 1.0])
    bab = _search_on(path, lo, hi, widths[-1])
    test = bab.emptiness
    D = 64
    signs = {relu.name: torch.tensor(g.choice([-1, 0, 1], (D, relu.inputs[0].numel), p=[0.3, 0.4, 0.3]),
                                     dtype=torch.int8) for relu in bab.relus}
    for k, relu in enumerate(bab.relus):
        form = test.layers[k]
        empty = _fresh(test, only=k).empty(signs, torch.full((D,), k))
        box_lo, box_up = test._box(k, signs, torch.arange(D))
        for d in range(D):
            s = signs[relu.name][d].numpy().astype(float)
            rows = np.nonzero(s)[0]
            if not len(rows):
                assert not empty[d]
                continue
            optimum = lp_minimax(form.weight.numpy(), form.bias.numpy(), rows, s[rows], box_lo[d].numpy(),
                                 box_up[d].numpy())
            noise = float(form.noise.max())
            if empty[d]:
                assert optimum > 0, (k, d, optimum)
            else:
                assert optimum <= 10 * noise + 1e-9, (k, d, optimum, noise)


def test_branch_and_bound_drops_empty_children_and_answers_alike(tmp_path):
    """A chain whose search goes deep enough for empty children (the threshold 5% of the
    output's sampled spread above its sampled maximum): the same answer with the test and
    without it, fewer domains bounded with it."""
    g = np.random.default_rng(4)
    widths = [4, 24, 24, 24, 2]
    path, weights = _chain_onnx(tmp_path, widths, g, False)
    center, eps = g.standard_normal(4), 1.0
    xs = center + eps * (2 * g.random((20000, 4)) - 1)
    out = np.maximum(_evaluate32(weights, xs)[-1], 0) @ weights[-1][0].T + weights[-1][1]
    diff = out[:, 1] - out[:, 0]
    d = float(diff.max() + 0.05 * (diff.max() - diff.min()))
    lines = [f"(declare-const X_{i} Real)" for i in range(4)] + ["(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    lines += [f"(assert (>= X_{i} {float(center[i] - eps)!r}))" for i in range(4)]
    lines += [f"(assert (<= X_{i} {float(center[i] + eps)!r}))" for i in range(4)]
    lines.append(f"(assert (>= Y_1 (+ Y_0 {d!r})))")
    (tmp_path / "p.vnnlib").write_text("\n".join(lines) + "\n")
    prop = read_vnnlib(tmp_path / "p.vnnlib")
    base = dict(split_max_inputs=0, attack_rounds=0)
    with_test = verify_property(VerifyModel(path), prop, 60, VerifyConfig(**base))
    without = verify_property(VerifyModel(path), prop, 60, VerifyConfig(**base, bab_empty_test=False))
    assert with_test.answer == without.answer == "unsat", (with_test.details, without.details)
    assert with_test.details.get("bab_empty_domains", 0) > 0, with_test.details
    assert with_test.details["bab_domains"] < without.details["bab_domains"]


def _graph_of(tmp_path, nodes, inits, n_in: int, n_out: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dualgraph.frontends.onnx import load_onnx
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n_out])],
                              [numpy_helper.from_array(np.asarray(t, np.float32), k) for k, t in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "g.onnx")
    return load_onnx(onnx.load(tmp_path / "g.onnx"))


@pytest.mark.parametrize("case, expected", [
    ("chain", [True, True]),
    ("alpha", [False, True]),        # Gemm alpha != 1: the weights are not the map's
    ("residual", [True, False]),     # the second Gemm reads relu + x, not the previous ReLU alone
    ("no_bias_transposed", [True, True]),
])
def test_the_test_runs_only_on_gemm_layers_of_the_previous_relu(tmp_path, case, expected):
    """Which ReLUs get the split-LP test: those whose input is an exact Gemm (alpha = beta = 1,
    constant weights) of the previous ReLU's output or of the input."""
    from onnx import helper

    from dualgraph.ir import Node
    from dualgraph.split_lp import gemm_map, split_sources
    g = np.random.default_rng(0)
    W1, b1, W2, b2, W3 = g.standard_normal((3, 3)), g.standard_normal(3), g.standard_normal((3, 3)), \
        g.standard_normal(3), g.standard_normal((1, 3))
    first = dict(transB=1, alpha=0.5) if case == "alpha" else dict(transB=1)
    nodes = [helper.make_node("Gemm", ["X", "W1", "b1"], ["z1"], **first), helper.make_node("Relu", ["z1"], ["r1"])]
    inits = dict(W1=W1, b1=b1, W2=W2, b2=b2, W3=W3)
    second_in = "r1"
    if case == "residual":
        nodes.append(helper.make_node("Add", ["r1", "X"], ["s"]))
        second_in = "s"
    if case == "no_bias_transposed":
        inits["W2"] = W2.T
        nodes.append(helper.make_node("Gemm", [second_in, "W2"], ["z2"]))
    else:
        nodes.append(helper.make_node("Gemm", [second_in, "W2", "b2"], ["z2"], transB=1))
    nodes += [helper.make_node("Relu", ["z2"], ["r2"]), helper.make_node("Gemm", ["r2", "W3"], ["Y"], transB=1)]
    graph = _graph_of(tmp_path, nodes, inits, 3, 1)
    relus: list[Node] = [n for n in graph.nodes if n.op == ("", "Relu")]
    found = [source is not None and gemm_map(relu.inputs[0].producer, source) is not None
             for relu, source in zip(relus, split_sources(graph, relus))]
    assert found == expected
    as_stored = lambda a: torch.tensor(np.asarray(a, np.float32), dtype=torch.float64)  # noqa: E731
    layers = [(as_stored(W1), as_stored(b1)), (as_stored(W2), as_stored(b2) * (case != "no_bias_transposed"))]
    for (relu, source), (W, b) in zip(zip(relus, split_sources(graph, relus)), layers):
        exact = None if source is None else gemm_map(relu.inputs[0].producer, source)
        if exact is not None:  # the layer's own weights, exactly
            assert torch.equal(exact[0], W) and torch.equal(exact[1], b)


def test_a_layer_that_finds_nothing_is_only_probed():
    """After its warm-up a layer whose tests found no empty child is tested on one call in
    PROBE_EVERY; one that keeps finding them on every call."""
    from dualgraph import split_lp
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    form = SplitLayer(W, torch.tensor([0.0, -1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    box = (torch.tensor([-1.0, -1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64))
    test = EmptinessTest(["r"], [form], box, [])
    D = split_lp.WARM_UP
    # z_0 = y_0 >= 0 and z_1 = y_0 - 1 >= 0 meet at y_0 = 1: never empty
    feasible = {"r": torch.tensor([[-1, -1]], dtype=torch.int8).repeat(D, 1)}
    assert test._worth_it(0)  # warming up
    tested = []
    for _ in range(2 * split_lp.PROBE_EVERY):
        before = test.seen[0]
        assert not test.empty(feasible, torch.zeros(D, dtype=torch.long)).any()
        tested.append(test.seen[0] > before)
    assert tested[0] and sum(tested) <= 1 + 2, tested  # the warm-up, then probes only
    # z_0 = y_0 <= 0 and z_1 = y_0 - 1 >= 0: empty on every call
    empty = {"r": torch.tensor([[1, -1]], dtype=torch.int8).repeat(D, 1)}
    test = EmptinessTest(["r"], [form], box, [])
    for _ in range(2 * split_lp.PROBE_EVERY):
        assert test.empty(empty, torch.zeros(D, dtype=torch.long)).all()
