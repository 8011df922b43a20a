"""An exact MILP oracle for small ReLU networks (scipy's HiGHS), to test complete verifiers.

For one example of a ReLU :class:`~strategies.DagNet` (``relu_only``: every node is affine
followed by ReLU or by nothing), an input box ``lo <= x <= hi`` and linear output
constraints, :class:`ReluMILP` answers exactly (up to the solver's tolerances, see below):

* ``minimize(c)``: ``min c^T f(x)`` over the box (and ``maximize``);
* ``margin(C, d)``: ``min_x max_r (C f(x) - d)_r``, the violation of the conjunction
  ``C y <= d`` at its best point (``<= 0``: some ``x`` puts ``f(x)`` inside the polyhedron);
* ``decide(C, d)`` / ``decide_any([(C, d), ...])``: ``("sat", x)`` with a witness ``x`` in the
  box whose outputs satisfy every row of one conjunction, or ``("unsat", None)``.

It is independent of dualgraph: the affine pieces come from the torch modules themselves
(:func:`strategies.affine_pieces`, the Jacobian of each node's affine part) and the big-M
bounds from plain interval arithmetic in float64 here.

The MILP (one example). Variables: ``x`` (the input), per node ``k`` its pre-activation
``z_k``; per ReLU node also the post-activation ``a_k`` and, for each *crossing* unit
(interval bounds ``l < 0 < u``), a binary ``s``::

    lo <= x <= hi
    z_k = sum_{j in parents(k)} W_kj feat_j + b_k        feat_0 = x, feat_j = a_j (ReLU) or z_j
    l_k <= z_k <= u_k                                     (interval bounds, valid, inflated by 1e-9)
    unit with u <= 0:  a = 0                              (stably inactive)
    unit with l >= 0:  a = z                              (stably active)
    crossing unit:     a >= 0,  a >= z,  a <= z - l (1 - s),  a <= u s,  s in {0, 1}

``s = 1`` forces ``a = z >= 0`` and ``s = 0`` forces ``a = 0 >= z``: the feasible set is
exactly the graph of the network over the box. The output is ``y = feat_K`` (last node).
``minimize`` minimises ``c^T y``; ``margin`` adds a free ``t`` with ``C y - t <= d`` and
minimises ``t``.

Numerics. HiGHS works with tolerances (feasibility 1e-6 on every row, integrality 1e-6, an
absolute optimality gap 1e-6; we set the relative gap to 0), and a fractional ``s`` of
1e-6 lets ``a`` be off by ``1e-6 * |l|``. So every answer is *polished* and *checked*: the
activation pattern of the MILP solution (``s`` rounded) is fixed, which makes the big-M rows
exact, and the LP over that linear region is solved again; its ``x`` (clipped into the box)
is evaluated by the torch network in float64, and the *reported* value is that evaluation
(an attained value, so an upper bound on the true minimum up to float64 evaluation error).
``MinResult.lower`` is HiGHS' dual bound. If the two differ by more than
``GAP_TOL * (1 + |value|)``, or the MILP says "sat" (optimal ``t <= 0``) but the network at
the witness violates a row by more than ``SLACK * (1 + |d|)``, :class:`OracleError` is
raised: the oracle never silently hands out a wrong answer. The oracle resolves margins
to about 1e-6; :func:`small_properties` keeps its properties at least ``1e-3`` of the
output's spread away from the threshold.

The rest of the module: :func:`small_relu_nets` (networks small enough that each MILP
takes milliseconds), :func:`small_properties` (VNN-LIB-style properties with a known
answer, a mix of sat and unsat, many close calls), and :func:`write_instance` (an ONNX
file and a VNN-LIB file for ``dualgraph verify model.onnx prop.vnnlib``).

Usage::

    oracle = ReluMILP(net, lo, hi)               # lo, hi: [n_inputs] float64 arrays
    best = oracle.minimize(c)                    # MinResult(value, x, y, lower)
    answer, x = oracle.decide(C, d)              # "sat"/x or "unsat"/None
    answer, x = decide_property(net, prop)       # prop: Property or dualgraph VnnlibProperty
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from strategies import DTYPE, SEEDS, DagNet, affine_pieces, build_dense, build_mlp, build_residual

SLACK = 1e-6
"""A witness satisfies ``C f(x) <= d + SLACK * (1 + |d|)`` (rows checked in float64)."""
GAP_TOL = 1e-5
"""The attained value and HiGHS' dual bound agree to ``GAP_TOL * (1 + |value|)``."""
INFLATE = 1e-9
"""Interval bounds are widened by ``INFLATE * (1 + magnitude)`` against float64 rounding."""


class OracleError(AssertionError):
    """The MILP and the float64 network disagree beyond the tolerances (numerical trouble)."""


@dataclass
class MinResult:
    """The optimum of a MILP: ``value`` at the attained point ``x`` (outputs ``y``, float64
    torch evaluation) and HiGHS' dual bound ``lower`` (``lower <= true optimum <= value``
    up to the tolerances)."""

    value: float
    x: np.ndarray
    y: np.ndarray
    lower: float


def forward64(net: DagNet, x: np.ndarray) -> np.ndarray:
    """``f(x)`` in float64 for flat inputs ``[B, n_in]`` (or one ``[n_in]``): ``[B, n_out]``."""
    xs = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, *net.input_shape).to(DTYPE)
    with torch.no_grad():
        return net(xs).reshape(xs.shape[0], -1).numpy()


def interval_bounds(pieces, lo: np.ndarray, hi: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Interval bounds ``(l_k, u_k)`` of every pre-activation ``z_k`` over the box, in float64,
    widened by ``INFLATE`` (relative to the magnitudes summed) so that rounding cannot make
    them invalid."""
    feat = {0: (np.asarray(lo, np.float64), np.asarray(hi, np.float64))}
    out = {}
    for k in sorted(pieces):
        W, b, act = pieces[k]
        b = b.numpy()
        l, u, mag = b.copy(), b.copy(), np.abs(b)
        for j, Wkj in W.items():
            Wn = Wkj.numpy()
            fl, fu = feat[j]
            Wp, Wm = np.maximum(Wn, 0), np.minimum(Wn, 0)
            l = l + Wp @ fl + Wm @ fu
            u = u + Wp @ fu + Wm @ fl
            mag = mag + np.abs(Wn) @ np.maximum(np.abs(fl), np.abs(fu))
        pad = INFLATE * (1 + mag)
        l, u = l - pad, u + pad
        out[k] = (l, u)
        feat[k] = (np.maximum(l, 0), np.maximum(u, 0)) if act == "relu" else (l, u)
    return out


class ReluMILP:
    """The exact MILP of a ReLU :class:`DagNet` over one input box (see the module docstring).

    ``lo, hi``: the box, flat ``[n_inputs]`` (``lo == hi`` in some coordinates is fine).
    Attributes: ``bounds`` (the interval bounds ``{k: (l_k, u_k)}`` used as big-M),
    ``n_binary`` (crossing units), ``n_in``, ``n_out``."""

    def __init__(self, net: DagNet, lo: Any, hi: Any) -> None:
        if not net.relu_only:
            raise ValueError(f"ReluMILP needs a ReLU-only DagNet, got {net.describe()}")
        self.net = net
        self.lo = np.asarray(lo, np.float64).reshape(-1).copy()
        self.hi = np.asarray(hi, np.float64).reshape(-1).copy()
        if self.lo.shape != self.hi.shape or not (self.lo <= self.hi).all():
            raise ValueError("the box needs lo <= hi of equal shapes")
        pieces = affine_pieces(net)
        self.bounds = interval_bounds(pieces, self.lo, self.hi)
        self.n_in = self.lo.size
        K = len(net.dag)
        self.n_out = pieces[K][1].numel()
        # ---- variables: x, then per node z_k [, a_k, s_k]
        self.off: dict[tuple[str, int], int] = {}
        n = 0

        def var(kind: str, k: int, size: int) -> None:
            nonlocal n
            self.off[(kind, k)] = n
            n += size

        var("x", 0, self.n_in)
        for k in range(1, K + 1):
            size = pieces[k][1].numel()
            var("z", k, size)
            if pieces[k][2] == "relu":
                var("a", k, size)
                var("s", k, size)
        self.n = n
        vlo, vhi = np.full(n, -np.inf), np.full(n, np.inf)
        integrality = np.zeros(n)
        vlo[:self.n_in], vhi[:self.n_in] = self.lo, self.hi
        rows, rlo, rhi = [], [], []

        def row(entries: dict[int, float], lb: float, ub: float) -> None:
            r = np.zeros(n)
            for i, v in entries.items():
                r[i] += v
            rows.append(r)
            rlo.append(lb)
            rhi.append(ub)

        def feat(j: int) -> int:
            if j == 0:
                return self.off[("x", 0)]
            return self.off[("a", j)] if ("a", j) in self.off else self.off[("z", j)]

        self.n_binary = 0
        for k in range(1, K + 1):
            W, b, act = pieces[k]
            zk, size = self.off[("z", k)], b.numel()
            l, u = self.bounds[k]
            vlo[zk:zk + size], vhi[zk:zk + size] = l, u
            block = np.zeros((size, n))
            block[:, zk:zk + size] = np.eye(size)
            for j, Wkj in W.items():
                fj = feat(j)
                block[:, fj:fj + Wkj.shape[1]] -= Wkj.numpy()
            rows.extend(block)
            rlo.extend(b.numpy())
            rhi.extend(b.numpy())
            if act != "relu":
                continue
            ak, sk = self.off[("a", k)], self.off[("s", k)]
            for i in range(size):
                z, a, s = zk + i, ak + i, sk + i
                if u[i] <= 0:                          # inactive: a = 0
                    vlo[a] = vhi[a] = 0.0
                    vlo[s] = vhi[s] = 0.0
                elif l[i] >= 0:                        # active: a = z
                    vlo[a], vhi[a] = l[i], u[i]
                    vlo[s] = vhi[s] = 1.0
                    row({a: 1.0, z: -1.0}, 0.0, 0.0)
                else:                                  # crossing: big-M with a binary s
                    self.n_binary += 1
                    vlo[a], vhi[a] = 0.0, u[i]
                    vlo[s], vhi[s] = 0.0, 1.0
                    integrality[s] = 1
                    row({z: 1.0, a: -1.0}, -np.inf, 0.0)                    # a >= z
                    row({a: 1.0, z: -1.0, s: -l[i]}, -np.inf, -l[i])        # a <= z - l (1 - s)
                    row({a: 1.0, s: -u[i]}, -np.inf, 0.0)                   # a <= u s
        self._A = np.vstack(rows)
        self._rlo, self._rhi = np.array(rlo), np.array(rhi)
        self._vlo, self._vhi, self._int = vlo, vhi, integrality
        self._binaries = np.flatnonzero(integrality)
        out = feat(K)
        self._y = slice(out, out + self.n_out)
        self.y_bounds = (vlo[self._y].copy(), vhi[self._y].copy())
        if pieces[K][2] == "relu":
            self.y_bounds = (np.maximum(self.bounds[K][0], 0), np.maximum(self.bounds[K][1], 0))

    # ---- evaluation ---------------------------------------------------------------------------
    def forward(self, x: Any) -> np.ndarray:
        """``f(x)`` in float64 (torch): ``[B, n_out]``."""
        return forward64(self.net, x)

    # ---- solving --------------------------------------------------------------------------------
    def _solve(self, obj_y: np.ndarray, C: np.ndarray | None = None, d: np.ndarray | None = None):
        """Minimise ``obj_y . y`` (``C is None``) or ``t`` with ``C y - t <= d``; returns
        ``(milp result, polished x)``; ``None`` for x when the polish LP fails."""
        A, rlo, rhi = self._A, self._rlo, self._rhi
        vlo, vhi, integ = self._vlo, self._vhi, self._int
        c = np.zeros(self.n)
        c[self._y] = obj_y
        if C is not None:  # one more variable t
            m = C.shape[0]
            yl, yu = self.y_bounds
            Cp, Cm = np.maximum(C, 0), np.minimum(C, 0)
            rl, ru = Cp @ yl + Cm @ yu - d, Cp @ yu + Cm @ yl - d
            A = np.hstack([A, np.zeros((A.shape[0], 1))])
            extra = np.zeros((m, self.n + 1))
            extra[:, self._y] = C
            extra[:, -1] = -1.0
            A = np.vstack([A, extra])
            rlo, rhi = np.concatenate([rlo, np.full(m, -np.inf)]), np.concatenate([rhi, d])
            vlo = np.append(vlo, rl.max() - 1.0)
            vhi = np.append(vhi, ru.max() + 1.0)
            integ = np.append(integ, 0)
            c = np.append(np.zeros(self.n), 1.0)
        res = milp(c, integrality=integ, bounds=Bounds(vlo, vhi), constraints=LinearConstraint(A, rlo, rhi),
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.status != 0 or res.x is None:
            raise OracleError(f"HiGHS MILP: status {res.status}, {res.message}")
        # polish: fix the activation pattern (exact rows) and solve the LP of that region
        pattern = np.round(res.x[self._binaries])
        plo, phi = vlo.copy(), vhi.copy()
        plo[self._binaries] = phi[self._binaries] = pattern
        lp = milp(c, integrality=np.zeros_like(integ), bounds=Bounds(plo, phi),
                  constraints=LinearConstraint(A, rlo, rhi))
        x = lp.x if lp.status == 0 and lp.x is not None else res.x
        return res, np.clip(x[:self.n_in], self.lo, self.hi)

    def minimize(self, c: Any) -> MinResult:
        """``min c^T f(x)`` over the box: the value attained at ``x`` (torch, float64) and
        HiGHS' dual bound; raises :class:`OracleError` when they disagree."""
        c = np.asarray(c, np.float64).reshape(-1)
        res, x = self._solve(c)
        y = self.forward(x)[0]
        value = float(c @ y)
        lower = float(res.mip_dual_bound if res.mip_dual_bound is not None else res.fun)
        if not lower - GAP_TOL * (1 + abs(value)) <= value <= max(res.fun, lower) + GAP_TOL * (1 + abs(value)):
            raise OracleError(f"min c^T f: the network gives {value} at the MILP point, the MILP {res.fun} "
                              f"(dual bound {lower})")
        return MinResult(value, x, y, min(lower, value))

    def maximize(self, c: Any) -> MinResult:
        """``max c^T f(x)``: ``value`` the attained maximum, ``lower`` renamed: here an *upper* bound."""
        r = self.minimize(-np.asarray(c, np.float64))
        return MinResult(-r.value, r.x, r.y, -r.lower)

    def margin(self, C: Any, d: Any) -> MinResult:
        """``min_x max_r (C f(x) - d)_r`` over the box (``<= 0``: the conjunction ``C y <= d``
        is reachable). A conjunction without rows is all of the output space: ``-inf`` at
        the box centre."""
        C = np.asarray(C, np.float64).reshape(-1, self.n_out)
        d = np.asarray(d, np.float64).reshape(-1)
        if C.shape[0] == 0:
            x = (self.lo + self.hi) / 2
            return MinResult(-np.inf, x, self.forward(x)[0], -np.inf)
        res, x = self._solve(np.zeros(self.n_out), C, d)
        y = self.forward(x)[0]
        value = float(np.max(C @ y - d))
        lower = float(res.mip_dual_bound if res.mip_dual_bound is not None else res.fun)
        scale = 1 + float(np.abs(d).max())
        if res.fun <= 0 and value > SLACK * scale:
            raise OracleError(f"the MILP finds C f(x) <= d reachable (t = {res.fun}) but the network at its "
                              f"point x = {x.tolist()} violates a row by {value}")
        if not lower - GAP_TOL * (1 + abs(value)) <= value <= max(res.fun, lower) + GAP_TOL * (1 + abs(value)):
            raise OracleError(f"margin: the network gives {value} at the MILP point, the MILP {res.fun} "
                              f"(dual bound {lower})")
        return MinResult(value, x, y, min(lower, value))

    def decide(self, C: Any, d: Any) -> tuple[str, np.ndarray | None]:
        """Is some ``x`` in the box with ``C f(x) <= d`` (every row)? ``("sat", x)`` with a
        witness checked in float64 (rows hold to ``SLACK * (1 + |d|)``), else ``("unsat", None)``."""
        r = self.margin(C, d)
        d = np.asarray(d, np.float64).reshape(-1)
        if r.value <= SLACK * (1 + (float(np.abs(d).max()) if d.size else 0.0)):
            return "sat", r.x
        return "unsat", None

    def decide_any(self, conjunctions: Sequence[Any]) -> tuple[str, np.ndarray | None]:
        """A disjunction: ``conjunctions`` of ``(C, d)`` pairs or objects with ``.C``/``.d``;
        ``sat`` with the witness of the first reachable one."""
        for conj in conjunctions:
            C, d = (conj.C, conj.d) if hasattr(conj, "C") else conj
            answer, x = self.decide(C, d)
            if answer == "sat":
                return answer, x
        return "unsat", None

    def property_margin(self, conjunctions: Sequence[Any]) -> float:
        """``min`` over the conjunctions of :meth:`margin` (``<= 0``: the disjunction is reachable)."""
        out = np.inf
        for conj in conjunctions:
            C, d = (conj.C, conj.d) if hasattr(conj, "C") else conj
            out = min(out, self.margin(C, d).value)
        return out


def exact_min(net: DagNet, lo: Any, hi: Any, c: Any) -> MinResult:
    """``min c^T f(x)`` over ``[lo, hi]`` (one-off :class:`ReluMILP`)."""
    return ReluMILP(net, lo, hi).minimize(c)


def decide_property(net: DagNet, prop: Any) -> tuple[str, np.ndarray | None]:
    """Answer a property with ``input_lo``, ``input_hi`` and ``unsafe`` (conjunctions with
    ``C``, ``d``): a :class:`Property` or a ``dualgraph.vnnlib.VnnlibProperty``, or a list of
    them (several boxes: sat if any is). ``("sat", x)`` or ``("unsat", None)``."""
    props = prop if isinstance(prop, (list, tuple)) else [prop]
    for p in props:
        answer, x = ReluMILP(net, p.input_lo, p.input_hi).decide_any(p.unsafe)
        if answer == "sat":
            return answer, x
    return "unsat", None


# ---- properties ------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Conj:
    """The polyhedron ``C y <= d`` (``C: [k, n_out]``)."""

    C: np.ndarray
    d: np.ndarray


@dataclass(eq=False)
class Property:
    """A VNN-LIB-style property (the same field names as ``dualgraph.vnnlib.VnnlibProperty``):
    the box ``[input_lo, input_hi]`` and the unsafe region ``OR_m (C_m y <= d_m)``, with its
    exact answer.

    ``margin``: ``min_m min_x max_r (C_m f(x) - d_m)_r`` (exact, from the oracle; ``<= 0``
    iff ``expected == "sat"``); ``scale``: the spread of the constrained outputs over the box
    (max minus min of the violation, sampled), so ``abs(margin) / scale`` says how close a
    call it is; ``kind``: how it was drawn."""

    input_lo: np.ndarray
    input_hi: np.ndarray
    n_outputs: int
    unsafe: tuple[Conj, ...]
    expected: str
    margin: float
    scale: float
    kind: str
    seed: int = 0
    details: dict = field(default_factory=dict)

    @property
    def n_inputs(self) -> int:
        return int(self.input_lo.size)

    @property
    def rel_gap(self) -> float:
        return abs(self.margin) / self.scale

    def violations(self, y: Any) -> np.ndarray:
        """``[B, len(unsafe)]``: ``max_r (C_m y - d_m)_r`` per conjunction (``<= 0``: inside)."""
        y = np.asarray(y, np.float64).reshape(-1, self.n_outputs)
        return np.stack([np.max(y @ c.C.T - c.d, axis=1, initial=-np.inf) for c in self.unsafe], axis=1)

    def unsafe_at(self, y: Any, tol: float = 0.0) -> np.ndarray:
        """``[B]`` bool: ``y`` in the unsafe region (to ``tol``)."""
        return self.violations(y).min(axis=1) <= tol

    def attack_spec(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The unsafe region as ``dualgraph.attack``'s spec (float64 tensors)."""
        return [(torch.as_tensor(c.C, dtype=DTYPE), torch.as_tensor(c.d, dtype=DTYPE)) for c in self.unsafe]

    def to_vnnlib(self):
        """The same property as a ``dualgraph.vnnlib.VnnlibProperty`` (for ``verify_property``)."""
        from dualgraph.vnnlib import Conjunction, VnnlibProperty
        return VnnlibProperty(self.input_lo.copy(), self.input_hi.copy(), self.n_outputs,
                              tuple(Conjunction(c.C.copy(), c.d.copy()) for c in self.unsafe))

    def __repr__(self) -> str:
        return (f"Property({self.kind}, expected={self.expected}, margin={self.margin:.3g}, scale={self.scale:.3g}, "
                f"seed={self.seed}, box=[{self.input_lo.round(3).tolist()}, {self.input_hi.round(3).tolist()}], "
                f"{len(self.unsafe)} conjunctions of {[len(c.d) for c in self.unsafe]} rows)")


PROPERTY_KINDS = ("robust", "halfspace", "polytope", "union", "natural")
GAPS = (1e-3, 1e-2, 0.05, 0.2, 0.5)
"""Distances of the threshold from the exact optimum, as fractions of the spread ``scale``."""
MIN_GAP = 1e-4
"""... and at least ``MIN_GAP * (1 + |optimum|)``, a hundred times the oracle's resolution."""


def small_relu_nets(max_inputs: int | None = None) -> st.SearchStrategy[DagNet]:
    """ReLU MLPs (<= 3 hidden layers of <= 10 units), residual nets (an optional stem and 1-2
    blocks, <= 6 units per layer) and dense/concat DAGs (2-3 hidden nodes of <= 6 units), the
    builders of tests/strategies.py (MultiUse edges and BatchNorm included); 1-6 inputs, 1-4
    outputs, at most ~40 crossing units: a MILP takes ~15 ms on average, rarely 0.5 s.
    ``max_inputs``: keep only nets with at most that many inputs (a filter)."""
    nets = SEEDS.map(relu_net_of_seed)
    return nets if max_inputs is None else nets.filter(lambda net: net.input_shape[0] <= max_inputs)


def relu_net_of_seed(seed: int) -> DagNet:
    """The net :func:`small_relu_nets` draws for ``seed``."""
    rng = random.Random(seed)
    families = [lambda: build_mlp(rng, max_width=10, max_depth=3), lambda: build_residual(rng, max_width=6),
                lambda: build_dense(rng, max_width=6, max_nodes=3)]
    return rng.choice(families)()


def random_box(rng: random.Random, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """A box around a Gaussian centre: one half-width for all coordinates or a random one per
    coordinate, now and then a fixed coordinate (``lo == hi``)."""
    g = np.random.default_rng(rng.randrange(2 ** 32))
    center = g.standard_normal(n_in)
    eps = rng.choice([0.05, 0.1, 0.3, 0.5, 1.0])
    half = np.full(n_in, eps) if rng.random() < 0.5 else eps * g.uniform(0.2, 1.0, n_in)
    if n_in >= 2 and rng.random() < 0.1:
        half[rng.randrange(n_in)] = 0.0
    return center - half, center + half


def make_property(net: DagNet, seed: int, kinds: Sequence[str] = PROPERTY_KINDS, sat_share: float = 0.5,
                  gaps: Sequence[float] = GAPS, oracle_box: tuple[np.ndarray, np.ndarray] | None = None) -> Property:
    """One property for ``net`` from ``seed`` (see :func:`small_properties`)."""
    rng = random.Random(seed)
    g = np.random.default_rng(rng.randrange(2 ** 32))
    n_in, n_out = net.input_shape[0], net.n_out
    lo, hi = oracle_box if oracle_box is not None else random_box(rng, n_in)
    oracle = ReluMILP(net, lo, hi)
    pts = np.concatenate([lo + (hi - lo) * g.uniform(size=(256, n_in)), ((lo + hi) / 2)[None]])
    ys = oracle.forward(pts)
    kind = rng.choice([k for k in kinds if n_out >= 2 or k not in ("robust", "natural")] or ["halfspace"])
    # the rows of each conjunction, before the thresholds
    if kind in ("robust", "natural"):
        label = int(np.argmax(ys[-1])) if rng.random() < 0.7 else rng.randrange(n_out)
        rows = []
        for j in range(n_out):
            if j != label:
                r = np.zeros((1, n_out))
                r[0, label], r[0, j] = 1.0, -1.0      # y_label - y_j <= d: class j within d of the label
                rows.append(r)
    elif kind == "halfspace":
        rows = [g.standard_normal((1, n_out))]
    elif kind == "polytope":
        rows = [g.standard_normal((rng.randint(2, 3), n_out))]
    else:  # union
        rows = [g.standard_normal((rng.randint(1, 2), n_out)) for _ in range(rng.randint(2, 3))]
    conjs, margins, scales = [], [], []
    if kind == "natural":  # classic robustness: y_j >= y_label, thresholds 0; the answer falls where it falls
        for C in rows:
            d = np.zeros(1)
            conjs.append(Conj(C, d))
            margins.append(oracle.margin(C, d).value)
            v = (ys @ C.T).max(1)
            scales.append(max(float(v.max() - v.min()), 1e-3))
    else:
        # the exact margin m of C y <= 0; d = m - tau moves it to exactly tau (tau > 0: unsat)
        want_sat = rng.random() < sat_share
        hit = rng.randrange(len(rows))
        for k, C in enumerate(rows):
            m = oracle.margin(C, np.zeros(len(C))).value
            v = (ys @ C.T).max(1)
            scale = max(float(v.max() - m), 1e-3)
            gap = max(rng.choice(gaps) * scale, MIN_GAP * (1 + abs(m)))
            sat_k = (k == hit) if want_sat else False
            if want_sat and k != hit:
                sat_k = rng.random() < 0.3
            tau = -gap if sat_k else gap
            d = np.full(len(C), m - tau)
            conjs.append(Conj(C, d))
            margins.append(tau)
            scales.append(scale)
    k_best = int(np.argmin(margins))
    margin = float(margins[k_best])
    return Property(lo, hi, n_out, tuple(conjs), "sat" if margin <= 0 else "unsat", margin, scales[k_best],
                    kind, seed, {"margins": margins, "scales": scales})


def small_properties(net: DagNet, kinds: Sequence[str] = PROPERTY_KINDS, sat_share: float = 0.5,
                     gaps: Sequence[float] = GAPS) -> st.SearchStrategy[Property]:
    """Properties of ``net`` with a known answer (``Property.expected``), from a seed.

    The box: a Gaussian centre, half-widths 0.05..1 (equal or per coordinate, sometimes one
    fixed coordinate). The unsafe region, by ``kind``:

    * ``robust``: ``OR_{j != label} (y_label - y_j <= d_j)`` (class ``j`` comes within
      ``d_j`` of the label; the label is the centre's top class, or random);
    * ``halfspace``: one random row ``c^T y <= d``; ``polytope``: 2-3 random rows in one
      conjunction; ``union``: 2-3 conjunctions of 1-2 random rows;
    * ``natural``: ``robust`` with every ``d_j = 0`` (the usual VNN-LIB robustness query); its
      answer is whatever the oracle finds.

    Except for ``natural``, the thresholds are placed by the oracle: with ``m`` the exact
    margin of ``C y <= 0``, ``d = m - tau`` gives margin exactly ``tau``; the property is
    sat (probability ``sat_share``: one conjunction, and each other with probability 0.3,
    gets ``tau = -gap``) or unsat (every conjunction ``tau = +gap``), with ``gap`` a fraction
    (``gaps``: 0.1% to 50%) of the spread of the conjunction's violation over the box, so
    many are close calls."""
    return SEEDS.map(lambda seed: make_property(net, seed, kinds, sat_share, gaps))


def nets_and_properties(max_inputs: int | None = None, **kw) -> st.SearchStrategy[tuple[DagNet, Property]]:
    """``(net, property)`` pairs: :func:`small_relu_nets` and :func:`small_properties`."""
    return small_relu_nets(max_inputs).flatmap(lambda net: small_properties(net, **kw).map(lambda p: (net, p)))


# ---- files -----------------------------------------------------------------------------------------

def _num(v: float) -> str:
    """A float64 as a VNN-LIB decimal that reads back exactly."""
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"VNN-LIB needs finite numbers, got {v}")
    return repr(v + 0.0)  # + 0.0: never "-0.0"


def vnnlib_text(prop: Any) -> str:
    """VNN-LIB 1.0 text of a property (``input_lo``, ``input_hi``, ``n_outputs``, ``unsafe``):
    the box as one-line bounds and the unsafe region as ``(assert (or (and rows...) ...))``,
    each row ``(<= (+ (* c_0 Y_0) ...) d)``. The numbers are written with ``repr`` so that
    they read back as the same float64."""
    n_in, n_out = int(np.asarray(prop.input_lo).size), int(prop.n_outputs)
    lines = [f"; {prop!r}".replace("\n", " ")[:300]]
    lines += [f"(declare-const X_{i} Real)" for i in range(n_in)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    lo, hi = np.asarray(prop.input_lo).reshape(-1), np.asarray(prop.input_hi).reshape(-1)
    for i in range(n_in):
        lines.append(f"(assert (>= X_{i} {_num(lo[i])}))")
        lines.append(f"(assert (<= X_{i} {_num(hi[i])}))")
    terms = []
    for conj in prop.unsafe:
        atoms = []
        for row, d in zip(np.asarray(conj.C), np.asarray(conj.d)):
            prods = [f"(* {_num(c)} Y_{j})" for j, c in enumerate(row) if c != 0]
            lhs = f"(+ {' '.join(prods)})" if prods else "0.0"
            atoms.append(f"(<= {lhs} {_num(d)})")
        terms.append(f"(and {' '.join(atoms)})" if atoms else "true")
    lines.append("(assert (or\n    " + "\n    ".join(terms) + "\n))" if terms else "(assert false)")
    return "\n".join(lines) + "\n"


def float32_weights(net: DagNet) -> DagNet:
    """A copy of ``net`` (still float64) whose parameters and buffers are rounded to float32:
    the function a float32 export computes, up to float32 evaluation error; build the oracle
    and the properties on it when exporting with ``dtype=torch.float32``."""
    net32 = copy.deepcopy(net)
    with torch.no_grad():
        for t in list(net32.parameters()) + list(net32.buffers()):
            if t.is_floating_point():
                t.copy_(t.float().double())
    return net32


def export_onnx(net: DagNet, path: str | Path, dtype: torch.dtype = DTYPE) -> Path:
    """``net`` as an ONNX file with input ``x: [1, n_in]`` and output ``y: [1, n_out]`` (static,
    as in VNN-COMP), in ``dtype`` (float64 by default: onnxruntime then computes what the
    oracle does)."""
    path = Path(path)
    model = copy.deepcopy(net).to(dtype).eval()
    x = torch.zeros(1, *net.input_shape, dtype=dtype)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    return path


def write_instance(net: DagNet, prop: Any, folder: str | Path, name: str = "net",
                   dtype: torch.dtype = DTYPE) -> tuple[Path, Path]:
    """Write ``folder/name.onnx`` and ``folder/name.vnnlib`` for ``dualgraph verify``; returns
    both paths. With ``dtype=torch.float32`` build ``net`` and ``prop`` with
    :func:`float32_weights` first, and keep the properties' gaps above float32 rounding."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(net, folder / f"{name}.onnx", dtype)
    vnnlib_path = folder / f"{name}.vnnlib"
    vnnlib_path.write_text(vnnlib_text(prop))
    return onnx_path, vnnlib_path
