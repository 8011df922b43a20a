"""A fused bound for branch and bound on ReLU chains: one dual pass as a few matrix products.

Branch and bound spends its time in the slope-and-multiplier ascents of its domains, each
step a dual pass over a batch of single rows. On a network that is a **chain**

    x -> A_1 -> ReLU -> A_2 -> ReLU -> ... -> ReLU -> A_L -> y,    A_i(h) = W_i h + b_i

(every node between two ReLUs one whose dual layer is linear: Gemm, MatMul, Add of a
constant, Flatten, Sub/Div normalisation, Conv, ...), that pass is, for a specification row
``c`` with free lower slopes ``alpha`` and split multipliers ``beta >= 0``:

    a_{L-1} = c W_L,                                J = c . b_L
    at the ReLU after A_i (its input bounds l, u):
        g_i = a_i^+ * s_i + a_i^- * d_i + beta_i * sign_i
        J  += a_i^- . (-d_i * l_i) + g_i . b_i,      a_{i-1} = g_i W_i
    J += a_0 . mid - |a_0| . rad                        (the input box, mid +- rad)

with ``d = u / (u - l)`` on crossing units (1 on active, 0 on inactive ones: the upper line
``d (z - l)``), ``s`` the lower slope (``alpha`` on crossing units, ``d`` elsewhere) and
``sign`` the split constraint ``sign z <= 0`` (0 on unsplit units). This is the bound the
dual graph gives with the same slopes and multipliers (the dual graph of a chain is this
chain run backwards); here it is a handful of dense products and a gradient written out
instead of an interpreted walk and autograd: 1.7x the domains per second on the
competition's MNIST networks, where the matrix products are now two thirds of the time
(``bench/vnncomp_report.md``).

**A filter, not a proof.** Branch and bound uses these passes only to search
(:class:`dualgraph.bab.BranchAndBound` with ``fused=True``): a domain counts as proved only
once the float64 scheduler's bound, computed again at the variables with which this bound
passed, passes too. A wrong filter costs time, never soundness. The passes take off the
scheduler's rounding allowance as it stands at the root (:class:`ChainAllowance`), so that
what they pass the confirmation passes too (without it 3% of their proofs failed to
confirm, and each failure split a domain that was in fact proved). The tests check that
without the allowance the bound equals the scheduler's in float64, and that with it the
float32 bound stays below the float64 proof.

The ascent is the one of :mod:`dualgraph.alpha` (Adam with the same step-size profile, rows
stop at their goal, the best iterate kept, the rows still climbing go on alone once half
have stopped) and fills the same ``record`` (:meth:`dualgraph.scheduler.BoundScheduler.
bound_output`), so branch and bound branches, warm-starts and confirms alike on both. One
difference, by choice: behind a layer that passes on nothing (a row that is an exact 0 there)
the bound is at a kink, and where autograd takes the centre of the relaxation as its
supergradient this pass takes the point most in favour of that layer's slopes rising
(:meth:`FusedChain._leaving_directions`; 2.4x fewer domains on one competition tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .alpha import LR_FINAL
from .dual_registry import Bounds, dual_rule
from .errors import DualgraphError
from .interpreter import Interpreter
from .ir import Graph, Node, Value

MAX_DENSE = 1 << 24
"""The most weight entries (all layers) a chain may have as dense matrices; a larger network
(wide convolutions) keeps the scheduler's passes."""

RELU = ("", "Relu")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the scheduler's ascent uses
SQRT_FLOOR = 1e-30  # added to Adam's second moments before the square root (see _ChainAscent._adam)
CHUNK_ROWS = 256
"""Rows per ascent: a layer's working set (about ten ``[rows, width]`` tensors) then stays in a
core's L2 cache on 256-unit layers; 512 rows take 30% longer per row on this machine."""


@dataclass
class AffineChain:
    """A chain network as dense affine maps: ``weights[i]`` ``[n_{i+1}, n_i]`` and ``biases[i]``
    ``[n_{i+1}]`` map the input (``i = 0``, flattened) or the output of ``relus[i - 1]`` to the
    input of ``relus[i]`` or, for the last, the network's output; float64."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    relus: list[Node]
    input_shape: tuple[int, ...]
    targets: list[Value]  # what each map computes: the ReLUs' inputs, then the network's output

    @classmethod
    def of(cls, graph: Graph, config) -> AffineChain | None:
        """The chain form of ``graph``, or None where it is not a chain of affine maps and ReLUs
        (a skip connection, a value used twice, another activation, several inputs or outputs)
        or its dense weights would exceed :data:`MAX_DENSE` entries."""
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            return None
        segments: list[tuple[Value, list[Node], Value]] = []
        relus: list[Node] = []
        start = current = graph.inputs[0]
        pending: list[Node] = []
        for node in graph.nodes:
            inputs = node.var_inputs
            if len(current.users) != 1 or len(inputs) != 1 or inputs[0] is not current or len(node.outputs) != 1:
                return None
            if node.op == RELU:
                segments.append((start, pending, current))
                relus.append(node)
                start, pending = node.outputs[0], []
            elif dual_rule(node).linear(node, config):
                pending.append(node)
            else:
                return None
            current = node.outputs[0]
        if current is not graph.outputs[0] or not relus:
            return None
        segments.append((start, pending, current))
        if sum(a.numel * b.numel for a, _, b in segments) > MAX_DENSE:
            return None
        interpreter = Interpreter(graph)
        try:
            maps = [_affine_map(interpreter, *segment) for segment in segments]
        except (DualgraphError, RuntimeError):  # e.g. a Reshape to a fixed batch of 1
            return None
        chain = cls([w for w, _ in maps], [b for _, b in maps], relus, graph.inputs[0].unit_shape,
                    [target for _, _, target in segments])
        return chain if chain._reproduces(interpreter) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output ``[B, n_out]`` on inputs ``[B, *input_shape]`` through the maps."""
        h = x.flatten(1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.T + b
            if k < len(self.relus):
                h = h.clamp(min=0)
        return h

    def _reproduces(self, interpreter: Interpreter) -> bool:
        """Whether the maps give the graph's outputs on a few random inputs (float64): a last
        guard against a segment that evaluates differently on a batch of unit vectors."""
        x = torch.randn(3, *self.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        try:
            expected = interpreter.run(x)[0].reshape(3, -1)
        except (DualgraphError, RuntimeError):
            return False
        return expected.shape == (3, self.weights[-1].shape[0]) and bool(
            torch.allclose(self(x), expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max()))))


def _affine_map(interpreter: Interpreter, source: Value, nodes: list[Node], target: Value
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of the affine map ``nodes`` compute from ``source`` to ``target``: the
    nodes run (float64) on ``0`` and the unit vectors, ``b = f(0)``, ``W e_j = f(e_j) - f(0)``."""
    n = source.numel
    x = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
    env = {source: x.view(n + 1, *source.unit_shape)}
    for node in nodes:
        env[node.outputs[0]] = interpreter.run_node(node, env, like=x)[0]
    y = env[target].reshape(n + 1, -1)
    return (y[1:] - y[:1]).T.contiguous(), y[0].clone()


@dataclass
class ChainAllowance:
    """The scheduler's rounding allowance (:mod:`dualgraph.rounding`) as the fused bound takes
    it off each row, so that a row it passes is one the float64 confirmation passes too:
    ``steps[i]`` ``[n]``, the step weight ``W`` of the node computing map ``i``'s output (the
    allowance ``|g| . W`` of the dual variable there; the rows ``|c| . W`` for the last),
    ``input`` ``[n_0]``, the input term's, and ``offsets[i]``, the outward rounding of ReLU
    ``i``'s offsets per unit of ``m + 2 |b_up|`` on crossing units (``m = max(-l, u)``; the
    slopes are at most 1), plus ``underflow[i]`` per crossing unit; ``constant``, what underflow
    in the steps' own arithmetic takes off every row (:meth:`~dualgraph.rounding.
    RoundingAllowance.step_constant`, summed). The allowance takes no part in the gradient (the
    scheduler's neither: it uses ``|lam|`` detached)."""

    steps: list[torch.Tensor]
    input: torch.Tensor
    offsets: list[float]
    underflow: list[float]
    constant: float


@dataclass
class _Relaxed:
    """One ReLU layer's relaxation on each row's domain, ``[R, n]``, as numbers only: the upper
    slope ``d``, half its intercept ``-d l`` (crossing units), the crossing units (1.0 / 0.0),
    CROWN's lower slope and the split signs. The passes use no boolean masks: on this project's CPU
    build a comparison costs about 10x, and ``torch.where`` about 35x, a product."""

    d: torch.Tensor
    half_intercept: torch.Tensor
    outward: torch.Tensor  # half the intercept plus the offsets' rounding (what |a| multiplies)
    crossing: torch.Tensor
    crown: torch.Tensor
    sign: torch.Tensor
    stable: torch.Tensor   # d on the stable units, 0 on the crossing ones

    def lower_slopes(self, alpha: torch.Tensor) -> torch.Tensor:
        """``alpha`` on the crossing units, ``d`` elsewhere, exactly (one term is an exact zero)."""
        return torch.addcmul(self.stable, self.crossing, alpha)

    @classmethod
    def of(cls, b: Bounds, sign: torch.Tensor, rounding: float = 0.0, underflow: float = 0.0) -> _Relaxed:
        l, u = b
        cross = (l < 0) & (u > 0)
        d = torch.where(cross, u / torch.where(cross, u - l, 1.0), (l >= 0).to(l.dtype))
        crown = torch.where(cross, (u > -l).to(l.dtype), d)
        intercept = torch.where(cross, -d * l, 0.0)
        outward = intercept / 2
        if rounding:
            outward = outward + torch.where(cross, rounding * (torch.maximum(-l, u) + 2 * intercept) + underflow, 0.0)
        return cls(d, intercept / 2, outward, cross.to(l.dtype), crown, sign.to(l.dtype), torch.where(cross, 0.0, d))

    def take(self, index: torch.Tensor) -> _Relaxed:
        return _Relaxed(*(t[index] for t in (self.d, self.half_intercept, self.outward, self.crossing, self.crown,
                                             self.sign, self.stable)))


class FusedChain:
    """The bounds of :class:`AffineChain` ``chain`` in ``dtype`` for branch-and-bound domains
    (module docstring)."""

    def __init__(self, chain: AffineChain, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        self.chain, self.dtype = chain, dtype
        self.weights = [w.to(device, dtype) for w in chain.weights]
        self.biases = [b.to(device, dtype) for b in chain.biases]
        self.names = [n.name for n in chain.relus]
        self.allowance: ChainAllowance | None = None  # set by branch and bound where rounding counts
        self.leave_dead_rows = True  # False: the scheduler's subgradient 0 there (see _leaving_directions)

    def bound(self, lo: torch.Tensor, hi: torch.Tensor, bounds: list[Bounds], signs: list[torch.Tensor],
              spec: torch.Tensor, goal: torch.Tensor, *, steps: int, lr: float, warm: dict | None = None,
              record: dict | None = None) -> torch.Tensor:
        """Lower bounds ``[D, m]`` of the rows ``spec`` ``[m, n_out]`` on ``D`` domains: the
        input box ``[lo, hi]`` (flat ``[n_0]``), each ReLU's input bounds ``bounds[i]`` ``[D, n]``
        (the split units' already clamped) and split signs ``signs[i]`` ``[D, n]``. Each row
        first at CROWN's slopes; the rows at or below ``goal`` ``[m]`` then climb ``steps``
        steps from ``warm`` (:data:`dualgraph.alpha.Warm` per domain; ``steps=0``: the bound
        at ``warm``, or CROWN's if higher). ``record``: as
        :meth:`dualgraph.scheduler.BoundScheduler.bound_output` fills it."""
        D, m = bounds[0].lower.shape[0], spec.shape[0]
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        allowance = self.allowance
        rounding = allowance.offsets if allowance is not None else [0.0] * len(bounds)
        underflow = allowance.underflow if allowance is not None else [0.0] * len(bounds)
        layers = [_Relaxed.of(b, s, k, f) for b, s, k, f in zip(bounds, signs, rounding, underflow)]
        domain = torch.arange(D).repeat_interleave(m)
        row = torch.arange(m).repeat(D)
        per_row = [r.take(domain) for r in layers]
        start = self.run(spec[row], per_row, mid, rad, [r.crown for r in per_row], None).view(D, m)
        open_rows = start <= goal
        examples, which = open_rows.nonzero(as_tuple=True)
        if record is not None:
            record.update(examples=examples, rows=which, proving_examples=examples, proving_rows=which)
        if not examples.numel() or not (steps or warm):
            return start
        best, parts = [], []
        for at in range(0, len(examples), CHUNK_ROWS):  # each row climbs on its own: chunks that stay in cache
            ex, row = examples[at:at + CHUNK_ROWS], which[at:at + CHUNK_ROWS]
            ascent = _ChainAscent(self, spec[row], [r.take(ex) for r in layers], mid, rad, start[ex, row], goal[row],
                                  warm, ex, lr)
            part = None if record is None else {}
            best.append(ascent.climb(steps, part))
            if part is not None:
                parts.append(part | {"examples": ex[ascent.alive], "rows": row[ascent.alive]})
        if record is not None:
            for key in dict.fromkeys(k for part in parts for k in part):
                if key in ("variables", "proving"):
                    record[key] = {k: torch.cat([p[key][k] for p in parts if key in p]) for k in parts[0]["proving"]}
                else:
                    record[key] = torch.cat([p[key] for p in parts if key in p])
        return start.index_put((examples, which), torch.cat(best))

    def run(self, C: torch.Tensor, layers: list[_Relaxed], mid: torch.Tensor, rad: torch.Tensor,
            slopes: list[torch.Tensor], multipliers: list[torch.Tensor] | None, record: dict | None = None,
            gradient: bool = False):
        """``J`` ``[R]`` of the rows ``C`` ``[R, n_out]`` at the lower ``slopes`` and ``multipliers``
        (per layer ``[R, n]``; None: 0); ``record``: each ReLU's dual variable and the input's.
        ``gradient``: also ``dJ/dslopes`` and ``dJ/dmultipliers`` (lists like them), by the
        chain rule through the pass written out (module docstring's recursion, reversed):

            abar_0 = mid - sign(a_0) rad
            gbar_i = abar_{i-1} W_i^T + b_i
            dJ/dalpha_i = gbar_i a_i^+ [crossing],   dJ/dbeta_i = gbar_i sign_i
            abar_i = gbar_i (d_i + [a_i > 0] delta_i) + intercept_i (1 - sign(a_i)) / 2

        with ``delta = s - d`` (``alpha - d`` on crossing units, 0 elsewhere), a layer being ``g =
        a^- d + a^+ s + beta sign`` as the scheduler computes it: products and sums only (see
        :class:`_Relaxed`). At ``a = 0`` these are the scheduler's subgradients (the negative
        side's slope, half the intercept: its offsets are ``a . mid - |a| . gap``), which autograd
        of this pass gives too -- except on a row that is an exact 0 at a whole layer, behind a
        layer that passes on nothing, where ``sign(a)`` there is taken from the direction in which
        the row leaves 0 (:meth:`_leaving_directions`; ``leave_dead_rows = False``: autograd's).
        """
        W, b = self.weights, self.biases
        allowance = self.allowance
        a = C @ W[-1]
        J = C @ b[-1]
        if allowance is not None:
            J = J - C.abs() @ allowance.steps[-1] - allowance.constant
        kept = []  # per layer, top first: a, a^+ and delta
        sizes = []  # per layer and the input, each row's |a|_1 (an exact 0: a dead row)
        for i in reversed(range(len(layers))):
            r = layers[i]
            if record is not None:
                record[self.names[i]] = a
            # the scheduler's step (dual_registry._by_sign): a^- d + a^+ s, one of the two terms an
            # exact zero, so g is exactly 0 where it is there (a + (s - d) a^+ is off by a rounding,
            # and at a = 0 the input term's subgradient then takes another sign)
            negative = a.clamp(max=0)
            positive = a - negative
            lower = r.lower_slopes(slopes[i])
            g = torch.addcmul(negative * r.d, positive, lower)
            if multipliers is not None:
                g.addcmul_(multipliers[i], r.sign)
            # a^- . intercept, as the scheduler writes a relaxation's offsets: a . mid - |a| . gap
            magnitude = a.abs()
            J = J + torch.linalg.vecdot(a, r.half_intercept) - torch.linalg.vecdot(magnitude, r.outward) + g @ b[i]
            if allowance is not None:
                J = J - g.abs() @ allowance.steps[i]
            if gradient:
                kept.append((a, positive, lower - r.d))
                if self.leave_dead_rows:
                    sizes.append(magnitude.sum(1))
            a = g @ W[i]
        if record is not None:
            record["input"] = a.view(a.shape[0], 1, *self.chain.input_shape)
        magnitude = a.abs()
        J = J + a @ mid - magnitude @ (rad if allowance is None else rad + allowance.input)
        if not gradient:
            return J
        directions = [k[0] for k in reversed(kept)] + [a]  # bottom first, the input's last
        if self.leave_dead_rows:
            sizes.append(magnitude.sum(1))
            zero = torch.stack(sizes[-2::-1] + sizes[-1:]) == 0  # [L + 1, R], as directions
            # dead: 0 below some ReLU layer (the top layer's row c W_L is 0 only where c is in
            # W_L's left null space, no layer's doing; the multipliers may keep the rows below alive)
            dead = zero[_rows_below(len(layers))].any(0).nonzero().flatten()
            if dead.numel():
                if record is not None:  # (it holds these rows: change copies)
                    directions = [t.clone() for t in directions]
                self._leaving_directions(layers, slopes, multipliers, directions, zero[:, dead], dead)
        abar = mid - directions[-1].sign() * rad
        d_slopes, d_multipliers = [], []
        for i, (positive, delta) in enumerate(k[1:] for k in reversed(kept)):
            r, direction = layers[i], directions[i]
            gbar = torch.addmm(b[i], abar, W[i].T)
            d_slopes.append(gbar * positive * r.crossing)
            d_multipliers.append(gbar * r.sign)
            offsets = torch.addcmul(r.half_intercept, r.half_intercept, direction.sign(), value=-1)
            abar = torch.addcmul(offsets, gbar, r.d).addcmul_(gbar * delta, direction.clamp(min=0).sign())
        return J, d_slopes, d_multipliers

    def _leaving_directions(self, layers: list[_Relaxed], slopes: list[torch.Tensor],
                            multipliers: list[torch.Tensor] | None, directions: list[torch.Tensor],
                            zero: torch.Tensor, dead: torch.Tensor) -> None:
        """Replace, in place, in the rows ``dead`` of ``directions`` (each layer's row, bottom
        first, then the input's), each row that is an exact 0 (``zero``, ``[L + 1, len(dead)]``)
        by the direction in which it leaves 0 as the slopes of the layer that passed on nothing
        fall.

        A layer passes on nothing (``g_k = 0``) where its rows' positive units are crossing at
        lower slope 0 or inactive, and their negative units inactive: CROWN's slopes do that
        wherever ``u <= -l``, and branch and bound's inactive splits with multiplier 0. The bound
        then does not depend on anything behind the layer, ``J_below(g_k)`` (the part of ``J``
        the layers behind it add) is at its kink ``g = 0``, and its supergradients there are
        the primal points of the whole relaxation: the subgradient 0 of every ``|a|`` (what
        autograd and the scheduler take) is the centre point. From the centre the dead layer's
        slopes are pushed by the pre-activations there, which on branch and bound's deep
        domains keeps rows dead that could come alive. Here the supergradient is the primal
        point that maximises ``sum_j a_j^+ z_j`` over the dead layer's crossing units, the one
        most in favour of their slopes rising: the signs of the pass of ``g_k = -a_k^+
        [crossing]``, i.e. ``J``'s derivative along the ray where those slopes fall below 0.
        Every iterate is still a bound and the best is kept, so this only chooses where the
        ascent looks. On 256x4 ``prop_10_0.05`` it takes branch and bound from 163,929 to 66,935
        domains (``bench/vnncomp_report.md``)."""
        W, L = self.weights, len(layers)
        below = _rows_below(L)
        # above the highest layer under which a dead row is 0, every row is itself: start there
        top = max(i for i in range(L) if bool(zero[below[i]].any()))
        row = directions[top][dead]
        for i in range(top, -1, -1):
            r = layers[i]
            if i < top:  # the row itself where it is not 0, else the direction it leaves 0 in
                row = torch.where(zero[i][:, None], row, directions[i][dead])
            crossing = r.crossing[dead]
            lower = torch.addcmul(r.stable[dead], crossing, slopes[i][dead])  # r.lower_slopes on these rows
            negative = row.clamp(max=0)
            g = torch.addcmul(negative * r.d[dead], row - negative, lower)
            if multipliers is not None:
                g.addcmul_(multipliers[i][dead], r.sign[dead])
            passes_nothing = g.abs().sum(1) == 0
            g = torch.where(passes_nothing[:, None], -(row.clamp(min=0) * crossing), g)
            row = g @ W[i]
            low = zero[below[i]]
            directions[below[i]][dead[low]] = row[low]


def _rows_below(layers: int) -> list[int]:
    """The index, in a pass's ``directions`` (each layer's row bottom first, then the input's),
    of the row below each ReLU layer ``i``: the input's for the first, layer ``i - 1``'s else."""
    return [layers] + list(range(layers - 1))


class _ChainAscent:
    """Projected Adam on each open row's slopes and multipliers, the state of
    :meth:`FusedChain.bound`: all of a row's variables in one ``[R, 2 N]`` tensor (``N``
    units in all; the slopes of every layer, then the multipliers), so that a step of Adam is
    a few operations on it; ``alive``: the rows still climbing."""

    def __init__(self, fused: FusedChain, C, layers, mid, rad, start, goal, warm, domains, lr) -> None:
        self.fused, self.C, self.layers, self.mid, self.rad = fused, C, layers, mid, rad
        self.best, self.goal, self.lr = start.clone(), goal, lr
        self.alive = torch.arange(len(start))
        warm = warm or {}

        def started(key, usual):
            w = warm.get(key)
            return usual if w is None else torch.where(w[domains].isnan(), usual, w[domains].to(usual))

        self.keys = [(n, "slopes") for n in fused.names] + [(n, "multipliers") for n in fused.names]
        usual = [r.crown for r in layers] + [torch.zeros_like(r.d) for r in layers]
        self.values = torch.cat([started(k, u) for k, u in zip(self.keys, usual)], 1)
        self.widths = [t.shape[1] for t in usual]
        self.slope_units = sum(self.widths[:len(layers)])
        self._project()
        self.m1, self.m2 = torch.zeros_like(self.values), torch.zeros_like(self.values)
        self.proving = torch.full_like(self.values, torch.nan)
        self.steps_taken = 0

    def _parts(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split(self.widths, 1))

    def _project(self) -> None:
        """Slopes into ``[0, 1]``, multipliers into ``[0, inf)``."""
        self.values.clamp_(min=0)
        self.values[:, :self.slope_units].clamp_(max=1)

    def _run(self, record: dict | None = None, gradient: bool = False):
        L = len(self.layers)
        parts = self._parts(self.values)
        return self.fused.run(self.C, self.layers, self.mid, self.rad, parts[:L], parts[L:], record, gradient)

    def climb(self, steps: int, record: dict | None) -> torch.Tensor:
        for step in range(steps):
            moving = self.best[self.alive] <= self.goal
            if not bool(moving.any()):
                self._keep(moving)
                break
            if 2 * int(moving.sum()) <= len(moving):
                self._keep(moving)
            lower, d_slopes, d_multipliers = self._run(gradient=True)
            self._observe(lower)
            self._adam(torch.cat(d_slopes + d_multipliers, 1), self.lr * LR_FINAL ** ((step + 1) / steps))
        self._keep(self.best[self.alive] <= self.goal)
        if len(self.alive):
            part = {} if record is not None else None
            self._observe(self._run(part))
            if record is not None:
                record.update(part)
                record["variables"] = dict(zip(self.keys, self._parts(self.values)))
        if record is not None:
            record["proving"] = dict(zip(self.keys, self._parts(self.proving)))
        return self.best

    def _observe(self, lower: torch.Tensor) -> None:
        """Keep the best bound of each alive row, and the variables of the rows whose bound passed."""
        rows = self.alive
        self.best[rows] = torch.fmax(self.best[rows], lower)  # a NaN iterate is no bound
        passed = lower > self.goal
        if bool(passed.any()):
            self.proving[rows[passed]] = self.values[passed]

    def _adam(self, ascent: torch.Tensor, lr: float) -> None:
        """One step of Adam (``torch.optim.Adam``'s update, ``m1 / (sqrt(m2) / c2 + eps)`` written
        as ``c2 m1 / (sqrt(m2) + c2 eps)``) up the gradient ``ascent``, then back into the
        ranges. The second moments get a tiny floor before the square root (far below Adam's
        epsilon): the square root of an exact 0 -- every unit without a variable -- takes a slow
        path, about 13x a normal one."""
        b1, b2 = ADAM_BETAS
        self.steps_taken += 1
        t = self.steps_taken
        c1, c2 = 1 - b1 ** t, (1 - b2 ** t) ** 0.5
        self.m1.mul_(b1).add_(ascent, alpha=1 - b1)
        self.m2.mul_(b2).addcmul_(ascent, ascent, value=1 - b2)
        self.values.addcdiv_(self.m1, (self.m2 + SQRT_FLOOR).sqrt_().add_(c2 * ADAM_EPS), value=lr * c2 / c1)
        self._project()

    def _keep(self, moving: torch.Tensor) -> None:
        """Go on with the alive rows ``moving`` only."""
        if bool(moving.all()):
            return
        index = moving.nonzero().flatten()
        self.alive, self.C, self.goal = self.alive[index], self.C[index], self.goal[index]
        self.layers = [r.take(index) for r in self.layers]
        self.values, self.m1, self.m2 = self.values[index], self.m1[index], self.m2[index]
