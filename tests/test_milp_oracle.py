"""Self-tests of the exact MILP oracle (tests/milp_oracle.py).

The oracle is checked against things it does not use: sampled and attacked points (an exact
minimum is never above any attained value, an unsat property is never violated), the LP
relaxation of tests/test_bounds_lp.py (never above the exact minimum), an enumeration of the
activation patterns of nets with few crossing units (one LP per linear region, no big-M),
dense grids on 1-2 input nets (within a Lipschitz bound of the exact minimum), onnxruntime
on the exported files, and dualgraph's own VNN-LIB reader and ``dualgraph verify``.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from dualgraph.attack import pgd_attack
from dualgraph.vnnlib import read_vnnlib

from milp_oracle import (GAP_TOL, SLACK, Conj, OracleError, ReluMILP, decide_property, exact_min,
                         float32_weights, forward64, interval_bounds, make_property, nets_and_properties, random_box,
                         small_relu_nets, write_instance)
from test_bounds_lp import ReluLP  # the LP relaxation oracle (never above the exact minimum)
from strategies import DTYPE, SEEDS, DagNet, affine_pieces, build_dense, build_mlp, build_residual

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def tol(v: float) -> float:
    return 10 * GAP_TOL * (1 + abs(v))


def sample_box(lo: np.ndarray, hi: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Uniform points, random vertices and the centre of the box: ``[m, n_in]``."""
    g = np.random.default_rng(seed)
    u = g.uniform(size=(n, lo.size))
    corners = np.where(g.uniform(size=(n, lo.size)) < 0.5, lo, hi)
    return np.concatenate([lo + (hi - lo) * u, corners, ((lo + hi) / 2)[None]])


def pgd_min(net: DagNet, lo: np.ndarray, hi: np.ndarray, spec, seed: int = 0) -> float:
    """The best ``min_m max_r (C_m f(x) - d_m)_r`` dualgraph's PGD finds (an attained value)."""
    res = pgd_attack(lambda x: net(x).reshape(x.shape[0], -1), torch.as_tensor(lo), torch.as_tensor(hi),
                     [(torch.as_tensor(C, dtype=DTYPE), torch.as_tensor(d, dtype=DTYPE)) for C, d in spec],
                     steps=60, restarts=8, seed=seed)
    return float(res.margin[0])


def draw_case(data, net: DagNet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = random.Random(data.draw(SEEDS, label="box/objective seed"))
    lo, hi = random_box(rng, net.input_shape[0])
    c = np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(net.n_out)
    return lo, hi, c


# ---- the exact minimum ---------------------------------------------------------------------------

@settings(max_examples=25, **SETTINGS)
@given(net=small_relu_nets(), data=st.data())
def test_exact_min_is_attained_and_below_samples_pgd_above_lp(net, data):
    lo, hi, c = draw_case(data, net)
    oracle = ReluMILP(net, lo, hi)
    best = oracle.minimize(c)
    assert (lo <= best.x).all() and (best.x <= hi).all()
    assert best.value == float(c @ forward64(net, best.x)[0])            # attained, in float64
    assert best.lower <= best.value <= best.lower + GAP_TOL * (1 + abs(best.value))
    pts = sample_box(lo, hi, 1024, seed=1)
    sampled = forward64(net, pts) @ c
    assert best.value <= sampled.min() + 1e-9 * (1 + abs(best.value)), (best.value, sampled.min())
    assert best.value <= pgd_min(net, lo, hi, [(c[None], np.zeros(1))]) + 1e-9 * (1 + abs(best.value))
    top = oracle.maximize(c)
    assert sampled.max() <= top.value + 1e-9 * (1 + abs(top.value)) and top.value == float(c @ top.y)
    # the LP relaxation on the oracle's interval bounds (test_bounds_lp) is never above it
    pieces, K = affine_pieces(net), len(net.dag)
    lp = ReluLP(pieces, K, oracle.bounds, lo, hi)
    assert lp.minimise(K, c) <= best.value + 1e-7 * (1 + abs(best.value))
    # the interval bounds contain every sampled pre-activation
    with torch.no_grad():
        pre = net.pre_activations(torch.as_tensor(pts).reshape(-1, *net.input_shape))
    for k, (l, u) in interval_bounds(pieces, lo, hi).items():
        z = pre[k].reshape(len(pts), -1).numpy()
        assert (z >= l).all() and (z <= u).all()


def enumerate_patterns(net: DagNet, lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> float:
    """``min c^T f`` as the minimum over the activation patterns of the crossing units of one
    LP each: ``feat_k = D_k z_k`` with the pattern's 0/1 diagonal ``D_k`` and the sign rows
    ``z >= 0`` (on) / ``z <= 0`` (off); no big-M, no binaries."""
    pieces, K = affine_pieces(net), len(net.dag)
    bounds = interval_bounds(pieces, lo, hi)
    off, n = {0: 0}, lo.size
    for k in range(1, K + 1):
        off[k] = n
        n += pieces[k][1].numel()
    crossing = [(k, i) for k in range(1, K + 1) if pieces[k][2] == "relu"
                for i in range(pieces[k][1].numel()) if bounds[k][0][i] < 0 < bounds[k][1][i]]
    best = np.inf
    for pattern in itertools.product([0.0, 1.0], repeat=len(crossing)):
        on = {k: (bounds[k][0] >= 0).astype(float) for k in range(1, K + 1) if pieces[k][2] == "relu"}
        for (k, i), p in zip(crossing, pattern):
            on[k][i] = p
        A_eq, b_eq, A_ub = [], [], []
        for k in range(1, K + 1):
            W, b, _ = pieces[k]
            block = np.zeros((b.numel(), n))
            block[:, off[k]:off[k] + b.numel()] = np.eye(b.numel())
            for j, Wkj in W.items():
                D = on[j] if j in on else np.ones(Wkj.shape[1])
                block[:, off[j]:off[j] + Wkj.shape[1]] -= Wkj.numpy() * D
            A_eq.append(block)
            b_eq.append(b.numpy())
        for (k, i), p in zip(crossing, pattern):
            row = np.zeros(n)
            row[off[k] + i] = -1.0 if p else 1.0
            A_ub.append(row)
        obj = np.zeros(n)
        D = on[K] if K in on else np.ones(c.size)
        obj[off[K]:off[K] + c.size] = c * D
        res = linprog(obj, A_ub=np.array(A_ub) if A_ub else None, b_ub=np.zeros(len(A_ub)) if A_ub else None,
                      A_eq=np.vstack(A_eq), b_eq=np.concatenate(b_eq),
                      bounds=[(lo[i], hi[i]) for i in range(lo.size)] + [(None, None)] * (n - lo.size),
                      method="highs")
        if res.status == 0:
            best = min(best, float(res.fun))
    return best


@settings(max_examples=20, **SETTINGS)
@given(net=small_relu_nets(), data=st.data())
def test_exact_min_equals_the_best_linear_region(net, data):
    lo, hi, c = draw_case(data, net)
    # the widest of these boxes around the same centre with at most 6 crossing units (2^6 LPs)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for f in (8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.05, 0.0):
        lo, hi = mid - f * half, mid + f * half
        oracle = ReluMILP(net, lo, hi)
        if oracle.n_binary <= 6:
            break
    best = oracle.minimize(c).value
    assert abs(enumerate_patterns(net, lo, hi, c) - best) <= 1e-7 * (1 + abs(best))


def lipschitz_l2(net: DagNet) -> float:
    """An L2 Lipschitz constant of ``f``: ``L_k = sum_j ||W_kj||_2 L_j``, ReLU 1-Lipschitz."""
    pieces = affine_pieces(net)
    L = {0: 1.0}
    for k in sorted(pieces):
        L[k] = sum(float(torch.linalg.matrix_norm(W, 2)) * L[j] for j, W in pieces[k][0].items())
    return L[max(pieces)]


def grid(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """A grid with ``n`` points per free coordinate and the L2 distance that covers the box."""
    axes = [np.linspace(l, h, n) if h > l else np.array([l]) for l, h in zip(lo, hi)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, lo.size)
    return pts, 0.5 * float(np.linalg.norm((hi - lo) / (n - 1)))


@settings(max_examples=20, **SETTINGS)
@given(pair=nets_and_properties(max_inputs=2), data=st.data())
def test_brute_force_grid_on_one_and_two_inputs(pair, data):
    net, prop = pair
    lo, hi = prop.input_lo, prop.input_hi
    pts, radius = grid(lo, hi, 4001 if lo.size == 1 else 301)
    ys = forward64(net, pts)
    L = lipschitz_l2(net)
    c = np.random.default_rng(data.draw(SEEDS, label="objective")).standard_normal(net.n_out)
    best = exact_min(net, lo, hi, c).value
    sampled = ys @ c
    assert best <= sampled.min() + 1e-9 * (1 + abs(best))
    assert sampled.min() - best <= np.linalg.norm(c) * L * radius + 1e-9 * (1 + abs(best)), (sampled.min(), best)
    # the property: the grid's best violation is within the Lipschitz bound of the exact margin
    answer, _ = decide_property(net, prop)
    assert answer == prop.expected
    viol = prop.violations(ys).min(1)
    row_norm = max(float(np.linalg.norm(c_.C, axis=1).max()) for c_ in prop.unsafe)
    assert viol.min() >= prop.margin - tol(prop.margin)
    assert viol.min() - prop.margin <= row_norm * L * radius + tol(prop.margin)
    if (viol <= 0).any():
        assert answer == "sat"


# ---- decisions ---------------------------------------------------------------------------------------

@settings(max_examples=30, **SETTINGS)
@given(pair=nets_and_properties())
def test_decisions_witnesses_samples_and_pgd(pair):
    net, prop = pair
    oracle = ReluMILP(net, prop.input_lo, prop.input_hi)
    answer, x = oracle.decide_any(prop.unsafe)
    assert answer == prop.expected, prop
    margin = oracle.property_margin(prop.unsafe)
    assert abs(margin - prop.margin) <= tol(prop.margin)
    spec = [(c.C, c.d) for c in prop.unsafe]
    found = pgd_min(net, prop.input_lo, prop.input_hi, spec)
    viol = prop.violations(forward64(net, sample_box(prop.input_lo, prop.input_hi, 512, seed=2))).min(1)
    assert min(found, viol.min()) >= prop.margin - tol(prop.margin)       # nothing beats the exact margin
    if answer == "sat":
        assert (prop.input_lo <= x).all() and (x <= prop.input_hi).all()
        y = forward64(net, x)
        assert prop.unsafe_at(y, SLACK * (1 + max(np.abs(c.d).max() for c in prop.unsafe)))[0]
    else:
        assert x is None and found > 0 and (viol > 0).all()
    # dualgraph's VnnlibProperty of the same region gives the same answer and violations
    vp = prop.to_vnnlib()
    assert decide_property(net, vp)[0] == answer
    y0 = forward64(net, prop.input_lo)
    np.testing.assert_array_equal(vp.violations(y0), prop.violations(y0))


def test_strategy_mixes_sat_and_unsat_with_close_calls():
    """36 properties on 36 nets: 30-70% sat, close calls (within 1% of the spread) both ways,
    every kind."""
    rng = random.Random(7)
    fams = [build_mlp, build_residual, build_dense]
    props = [make_property(fams[seed % 3](random.Random(seed), max_width=6), rng.randrange(2 ** 32))
             for seed in range(36)]
    sat = sum(p.expected == "sat" for p in props)
    assert 0.3 * len(props) <= sat <= 0.7 * len(props), sat
    close = [p for p in props if p.rel_gap <= 0.011]
    assert sum(p.expected == "sat" for p in close) >= 2 and sum(p.expected == "unsat" for p in close) >= 2
    assert {p.kind for p in props} == {"robust", "halfspace", "polytope", "union", "natural"}


def relu_abs_net() -> DagNet:
    """``f(x) = (relu(x) + relu(-x), relu(x) - 2 relu(-x) + 1) = (|x|, ...)`` on one input."""
    net = DagNet((1,), "mlp")
    hidden = torch.nn.Linear(1, 2).to(DTYPE)
    out = torch.nn.Linear(2, 2).to(DTYPE)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        hidden.bias.zero_()
        out.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -2.0]]))
        out.bias.copy_(torch.tensor([0.0, 1.0]))
    h = net.add([0], [hidden], act="relu")
    net.add([h], [out])
    return net.eval()


def test_hand_computed_answers():
    net = relu_abs_net()
    oracle = ReluMILP(net, [-1.0], [2.0])
    assert oracle.n_binary == 2
    assert oracle.minimize([1.0, 0.0]).value == 0.0 and abs(oracle.minimize([1.0, 0.0]).x[0]) <= 1e-9
    assert oracle.maximize([1.0, 0.0]).value == 2.0
    assert oracle.minimize([0.0, 1.0]).value == -1.0 and oracle.maximize([0.0, 1.0]).value == 3.0
    # |x| <= 0.25 and y_1 >= 1.4 (x >= 0.4): unreachable; with y_1 >= 1.2 (x = 0.2..0.25): reachable
    assert oracle.decide(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.25, -1.4])) == ("unsat", None)
    answer, x = oracle.decide(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.25, -1.2]))
    assert answer == "sat" and 0.2 - 1e-9 <= x[0] <= 0.25 + 1e-9
    assert abs(oracle.margin(np.array([[1.0, 0.0]]), np.array([0.0])).value) <= 1e-12
    # a disjunction: sat through its second conjunction only; a row-less conjunction is everything
    answer, x = oracle.decide_any([(np.array([[1.0, 0.0]]), np.array([-0.5])),
                                   Conj(np.array([[0.0, 1.0]]), np.array([-0.5]))])
    assert answer == "sat" and x[0] <= -0.5 + 1e-9
    assert oracle.decide(np.zeros((0, 2)), np.zeros(0))[0] == "sat"
    # a fixed coordinate (lo == hi)
    assert ReluMILP(net, [0.5], [0.5]).minimize([0.0, 1.0]).value == 1.5


def test_a_wrong_witness_is_reported():
    """The guard: when the network the witness is checked on differs from the MILP's (here
    the check sees an output shifted by 1), a claimed sat raises OracleError."""
    net = relu_abs_net()
    oracle = ReluMILP(net, [-1.0], [2.0])
    oracle.forward = lambda x: forward64(net, x) + 1.0
    with pytest.raises(OracleError):
        oracle.decide(np.array([[1.0, 0.0]]), np.array([0.1]))      # |x| <= 0.1: sat, but "y" is off
    with pytest.raises(OracleError):
        oracle.minimize([1.0, 0.0])


# ---- files ---------------------------------------------------------------------------------------------

@settings(max_examples=6, **SETTINGS)
@given(pair=nets_and_properties())
def test_files_read_back_and_run_in_onnxruntime(pair, tmp_path_factory):
    net, prop = pair
    folder = tmp_path_factory.mktemp("milp")
    onnx_path, vnnlib_path = write_instance(net, prop, folder)
    (vp,) = read_vnnlib(vnnlib_path)
    assert vp.input_lo.tolist() == prop.input_lo.tolist() and vp.input_hi.tolist() == prop.input_hi.tolist()
    assert len(vp.unsafe) == len(prop.unsafe)
    for a, b in zip(vp.unsafe, prop.unsafe):
        # d as written (a shortest decimal of the float) is read exactly and rounded up: the
        # float or the next one up, then strict (vnnlib's module docstring)
        assert a.C.tolist() == b.C.tolist()
        moved = a.d != b.d
        assert ((a.d == b.d) | (a.d == np.nextafter(b.d, np.inf))).all()
        assert not moved.any() or a.strict[moved].all()
    pts = sample_box(prop.input_lo, prop.input_hi, 16, seed=0)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ys = np.concatenate([sess.run(None, {"x": p[None]})[0] for p in pts])
    np.testing.assert_allclose(ys, forward64(net, pts), rtol=1e-12, atol=1e-12)
    assert decide_property(net, [vp])[0] == prop.expected
    # float32: the rounded-weights net is what the float32 file computes (to float32 rounding)
    net32 = float32_weights(net)
    onnx32, _ = write_instance(net32, prop, folder, name="net32", dtype=torch.float32)
    sess = ort.InferenceSession(str(onnx32), providers=["CPUExecutionProvider"])
    ys32 = np.concatenate([sess.run(None, {"x": p[None].astype(np.float32)})[0] for p in pts])
    ref = forward64(net32, pts.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(ys32, ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(ref).max()))


@settings(max_examples=6, **SETTINGS)
@given(pair=nets_and_properties(gaps=(0.2, 0.5)))
def test_dualgraph_verify_never_contradicts_the_oracle(pair, tmp_path_factory):
    """End to end: ``dualgraph verify model.onnx prop.vnnlib`` on the written files; whatever
    it answers, a definite answer agrees with the oracle (and sat comes with a real point)."""
    from dualgraph.cli import main
    net, prop = pair
    folder = tmp_path_factory.mktemp("verify")
    onnx_path, vnnlib_path = write_instance(net, prop, folder)
    rc = main(["verify", str(onnx_path), str(vnnlib_path), "--timeout", "20", "--attack-restarts", "8",
               "--attack-steps", "50", "--attack-rounds", "2", "--results", str(folder / "result.txt")])
    out = (folder / "result.txt").read_text()
    assert rc == 0, out
    answer = out.splitlines()[0]
    assert answer in ("sat", "unsat", "unknown", "timeout")
    if answer in ("sat", "unsat"):
        assert answer == prop.expected, (answer, prop)
    if answer == "sat":
        import re
        xs = np.array([float(v) for v in re.findall(r"\(X_\d+\s+([^\s()]+)\)", out)])
        assert (prop.input_lo <= xs).all() and (xs <= prop.input_hi).all()
        assert prop.unsafe_at(forward64(net, xs), 1e-9)[0]
