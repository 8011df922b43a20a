"""Dual bounds against the LP they relax: ``J <= LP optimum <= true minimum``.

On tiny ReLU networks (MLPs, residual and dense/concat DAGs, float64) with an L-inf box
input set, we take the scheduler's intermediate bounds ``l, u`` and solve, with scipy's
HiGHS, the LP relaxation of ``min c^T f(x)``:

* ``z_i = sum_j W_ij feat_j + b_i`` (dense matrices from the module itself),
* ReLU ``a = relu(z)``: ``a = 0`` if ``u <= 0``, ``a = z`` if ``l >= 0``, and on crossing
  units the triangle ``a >= 0, a >= z, a <= u (z - l) / (u - l)``,
* ``x`` in the box.

Theorem 1's bound is the objective of a feasible point of this LP's dual, so
``J_paper <= LP`` and ``J_crown <= LP`` (each with the bounds it was computed from), and
the LP relaxes the network, so ``LP <= spec @ f(x')`` at every sampled point. The same
holds for each intermediate bound: ``l_j <= min z_j`` and ``u_j >= max z_j`` over the LP of
the network truncated before that layer.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from dualgraph.input_sets import Box, linf_ball
from dualgraph.scheduler import BoundConfig, BoundScheduler

from strategies import (DTYPE, DagNet, affine_pieces, dense_nets, input_sets, mlp_nets, residual_nets,
                        sample_points, to_ir)

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLACK = 1e-7


class ReluLP:
    """The LP relaxation of nodes ``1..upto`` of a ReLU DagNet for one example."""

    def __init__(self, pieces, upto: int, lu: dict[int, tuple[np.ndarray, np.ndarray]],
                 lo: np.ndarray, hi: np.ndarray) -> None:
        self.offset: dict[tuple[str, int], int] = {}
        sizes = []

        def var(kind, k, n):
            self.offset[(kind, k)] = sum(sizes)
            sizes.append(n)

        var("feat", 0, lo.size)
        for k in range(1, upto + 1):
            n = pieces[k][1].numel()
            var("z", k, n)
            if pieces[k][2] == "relu":
                var("a", k, n)
        self.n = sum(sizes)
        bounds = [(None, None)] * self.n
        for i in range(lo.size):
            bounds[i] = (float(lo[i]), float(hi[i]))
        eq_rows, eq_rhs, ub_rows, ub_rhs = [], [], [], []

        def feat(j):  # offset of the feature a node reads: x, relu(z_j) or z_j itself
            return self.offset[("feat", 0)] if j == 0 else self.offset[("a" if ("a", j) in self.offset else "z", j)]

        for k in range(1, upto + 1):
            W, b, act = pieces[k]
            zk = self.offset[("z", k)]
            n = b.numel()
            block = np.zeros((n, self.n))
            block[:, zk:zk + n] = np.eye(n)
            for j, Wkj in W.items():
                fj = feat(j)
                block[:, fj:fj + Wkj.shape[1]] -= Wkj.numpy()
            eq_rows.append(block)
            eq_rhs.append(b.numpy())
            if act != "relu":
                continue
            ak = self.offset[("a", k)]
            l, u = lu[k]
            for j in range(n):
                if u[j] <= 0:
                    bounds[ak + j] = (0.0, 0.0)
                elif l[j] >= 0:
                    row = np.zeros(self.n)
                    row[ak + j], row[zk + j] = 1.0, -1.0
                    eq_rows.append(row[None])
                    eq_rhs.append(np.zeros(1))
                else:
                    bounds[ak + j] = (0.0, None)
                    row = np.zeros(self.n)                        # z - a <= 0
                    row[zk + j], row[ak + j] = 1.0, -1.0
                    ub_rows.append(row)
                    ub_rhs.append(0.0)
                    row = np.zeros(self.n)                        # (u - l) a - u z <= -u l
                    row[ak + j], row[zk + j] = u[j] - l[j], -u[j]
                    ub_rows.append(row)
                    ub_rhs.append(-u[j] * l[j])
        self.A_eq, self.b_eq = np.vstack(eq_rows), np.concatenate(eq_rhs)
        self.A_ub = np.vstack(ub_rows) if ub_rows else None
        self.b_ub = np.array(ub_rhs) if ub_rows else None
        self.bounds = bounds

    def minimise(self, k: int, c: np.ndarray) -> float:
        """``min c^T z_k`` over the LP."""
        obj = np.zeros(self.n)
        zk = self.offset[("z", k)]
        obj[zk:zk + c.size] = c
        res = linprog(obj, A_ub=self.A_ub, b_ub=self.b_ub, A_eq=self.A_eq, b_eq=self.b_eq,
                      bounds=self.bounds, method="highs")
        assert res.status == 0, res.message
        return float(res.fun)


def lp_check(net: DagNet, data) -> None:
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape, kinds=("linf", "linf01")), label="input set")
    box = case.make()
    assert isinstance(box, Box)
    B = box.center.shape[0]
    spec = torch.randn(B, 2, net.n_out, dtype=DTYPE,
                       generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="spec")))
    pieces = affine_pieces(net)
    K = len(net.dag)
    relu_inputs = [n.inputs[0] for n in graph.nodes if n.op_type == "Relu"]
    assert len(relu_inputs) == len(net.bounded)
    with torch.no_grad():
        pts = sample_points(box, 64, torch.Generator().manual_seed(3))
        ys = net(pts.reshape(-1, *net.input_shape)).reshape(pts.shape[0], B, 1, -1)
        sampled = (ys * spec.unsqueeze(0)).sum(-1).amin(0)              # [B, m]

    configs = {"paper": BoundConfig(), "crown": BoundConfig(relu_relaxation="crown"),
               "alpha": BoundConfig(relu_relaxation="alpha"),
               "paper/forward": BoundConfig(direction="forward"),
               "paper/dense": BoundConfig(direction="backward", patches=False, prune_stable=False)}
    scheds = {r: BoundScheduler(graph, cfg) for r, cfg in configs.items()}
    all_bounds = {r: s.intermediate_bounds(box) for r, s in scheds.items()}
    finals = {r: scheds[r].bound_output(box, spec, bounds) for r, bounds in all_bounds.items()}
    # optimised slopes start from CROWN's and keep the best iterate: never looser, anywhere.
    # (The final bound as users get it: CROWN's first, then on optimised intermediate bounds,
    # which are inside CROWN's, so the LP on them bounds both.)
    finals["alpha"] = scheds["alpha"].bound_output(box, spec)
    assert (finals["alpha"] >= finals["crown"] - 1e-9 * (1 + finals["crown"].abs())).all()
    # An ascent may start anywhere (branch and bound starts a domain's from its parent's last
    # slopes): random starts, out of the slopes' range too, NaN (CROWN's start) in places.
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="warm start"))
    warm = {}
    for n in graph.nodes:
        if n.op_type == "Relu":
            t = 2 * torch.rand(B, n.outputs[0].numel, generator=g, dtype=DTYPE) - 0.5
            warm[(n.name, "slopes")] = torch.where(torch.rand(t.shape, generator=g) < 0.3, torch.nan, t)
    all_bounds["alpha/warm"] = all_bounds["alpha"]
    finals["alpha/warm"] = scheds["alpha"].bound_output(box, spec, all_bounds["alpha"], warm=warm)
    # and the bound at the start values themselves (branch and bound's float64 confirmation)
    all_bounds["alpha/at warm"] = all_bounds["alpha"]
    finals["alpha/at warm"] = scheds["alpha"].bound_output(box, spec, all_bounds["alpha"], warm=warm, steps=0)
    for v in relu_inputs:
        a, c = all_bounds["alpha"][v], all_bounds["crown"][v]
        crossing = (c.lower < 0) & (c.upper > 0)
        assert (a.lower[crossing] >= c.lower[crossing] - 1e-9 * (1 + c.lower[crossing].abs())).all(), v.name
        assert (a.upper[crossing] <= c.upper[crossing] + 1e-9 * (1 + c.upper[crossing].abs())).all(), v.name
    for r, bounds in all_bounds.items():
        J = finals[r]
        # CROWN's final layer on the paper's intermediate bounds is also a dual-feasible point
        J_mixed = scheds["crown"].bound_output(box, spec, bounds) if r == "paper" else None
        for b in range(B):
            lo, hi = box.lo[b].reshape(-1).numpy(), box.hi[b].reshape(-1).numpy()
            lu = {i: (bounds[v].lower[b].reshape(-1).numpy(), bounds[v].upper[b].reshape(-1).numpy())
                  for i, v in zip(net.bounded, relu_inputs)}
            # every intermediate bound against the LP of the network truncated before it
            for i in net.bounded:
                lp = ReluLP(pieces, i, lu, lo, hi)
                l, u = lu[i]
                for j in range(l.size):
                    e = np.zeros(l.size)
                    e[j] = 1.0
                    lmin, umax = lp.minimise(i, e), -lp.minimise(i, -e)
                    assert l[j] <= lmin + SLACK * (1 + abs(lmin)), (r, i, j, l[j], lmin)
                    assert u[j] >= umax - SLACK * (1 + abs(umax)), (r, i, j, u[j], umax)
            lp = ReluLP(pieces, K, lu, lo, hi)
            for row in range(spec.shape[1]):
                opt = lp.minimise(K, spec[b, row].numpy())
                assert float(J[b, row]) <= opt + SLACK * (1 + abs(opt)), (r, float(J[b, row]), opt)
                if J_mixed is not None:
                    assert float(J_mixed[b, row]) <= opt + SLACK * (1 + abs(opt)), ("mixed", float(J_mixed[b, row]), opt)
                assert opt <= float(sampled[b, row]) + SLACK * (1 + abs(opt)), (r, opt, float(sampled[b, row]))


@settings(max_examples=25, **SETTINGS)
@given(net=st.one_of(mlp_nets(max_width=8), residual_nets(max_width=8), dense_nets(max_width=6, max_nodes=3)),
       data=st.data())
def test_dual_bound_below_lp_below_samples(net, data):
    lp_check(net, data)


def test_one_hidden_layer_lp_is_dual_optimum_over_slopes():
    """One hidden layer: the LP optimum equals the best J over lower slopes (LP duality,
    Wong & Kolter 2017); both relaxations are such slopes, so both are <= LP, and a fine
    search over per-unit slopes of a 2-unit net closes the gap."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).to(DTYPE)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.copy_(torch.tensor([0.25]))
    # LP by hand-built constraints: l = (-1.5, -2.5), u = (2.5, 1.5)
    l, u = np.array([-1.5, -2.5]), np.array([2.5, 1.5])
    W1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    # variables x1 x2 z1 z2 a1 a2; min a1 - a2 + .25
    A_eq = np.hstack([-W1, np.eye(2), np.zeros((2, 2))])
    A_ub, b_ub = [], []
    for j in range(2):
        r1 = np.zeros(6)
        r1[2 + j], r1[4 + j] = 1, -1
        r2 = np.zeros(6)
        r2[4 + j], r2[2 + j] = u[j] - l[j], -u[j]
        A_ub += [r1, r2]
        b_ub += [0.0, -u[j] * l[j]]
    res = linprog(np.array([0, 0, 0, 0, 1, -1.0]), A_ub=np.array(A_ub), b_ub=np.array(b_ub), A_eq=A_eq,
                  b_eq=b1, bounds=[(-1, 1), (-1, 1), (None, None), (None, None), (0, None), (0, None)],
                  method="highs")
    lp = res.fun + 0.25
    # J as a function of the lower slope of unit 1 (unit 2 uses the upper line, its nu_hat > 0)
    d = u / (u - l)
    best = -np.inf
    for a in np.linspace(0, 1, 1001):
        nu2 = np.array([-a, d[1]])               # nu = slope * nu_hat, nu_hat_2 = W2^T (-c) = (-1, 1)
        nu_hat1 = W1.T @ nu2
        J = 0.25 - nu2 @ b1 - np.abs(nu_hat1).sum() + l[1] * max(nu2[1], 0)
        best = max(best, J)
    assert best <= lp + 1e-9
    assert abs(best - lp) < 1e-3, (best, lp)
    # the two relaxations are the slopes d_1 = 5/8 (paper) and 1 (CROWN): J = -1.4375 and -2
    graph = to_ir_module(net)
    box = linf_ball(torch.zeros(1, 2, dtype=DTYPE), 1.0)
    for relaxation, want in (("paper", -1.4375), ("crown", -2.0)):
        J = float(BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation))
                  .bound_output(box, torch.ones(1, 1, 1, dtype=DTYPE)))
        assert abs(J - want) < 1e-12 and J <= lp + 1e-9, (relaxation, J, lp)
    # optimised slopes climb from CROWN's -2 to the LP optimum (the best slope), never past it
    J = float(BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=100))
              .bound_output(box, torch.ones(1, 1, 1, dtype=DTYPE)))
    assert J <= lp + 1e-9 and J > lp - 1e-3, (J, lp)


def to_ir_module(module: torch.nn.Module):
    from dualgraph.frontends.fx import load_module
    return load_module(module, torch.zeros(2, 2, dtype=DTYPE))
