"""Empty branch-and-bound domains: one layer's split constraints over the box of its inputs.

A domain of :mod:`dualgraph.bab` constrains split units ``j`` of a ReLU's input ``z = W y + b``
to one side, ``s_j z_j <= 0``. Its bounds are the root's, so deep in a tree many domains are
**empty**: their splits contradict each other under those bounds, and the ascent proves such a
domain only as its multipliers grow without bound (half of one competition tree was empty
domains, ``bench/vnncomp_report.md``). Most are empty by one layer's splits alone, for ``y``
anywhere in the box ``[l, u]`` of that layer's inputs (the previous ReLU's outputs on the
domain's bounds, or the input box):

    tau* = min_{y in [l, u]} max_j  s_j (W_j y + b_j)   > 0.

That is a small linear program (one row per split unit of the layer, a few dozen; one column per
input unit, a few hundred), solved for a whole batch of domains at once by the **primal simplex
method with bounded variables** (:func:`minimax_simplex`). Its dual variables are the
certificate: for any ``beta >= 0``,

    V(beta) = sum_j beta_j s_j b_j + sum_i min(a_i l_i, a_i u_i),    a = sum_j beta_j s_j W_j,

is at most ``sum_j beta_j s_j z_j`` on the box, so ``V(beta) > 0`` proves that no ``y`` in the box
meets every constraint. :func:`certified_empty` checks it in float64 with an allowance for its own
rounding and for the network's evaluation error at ``z`` (a split is on ``z`` as evaluated: the
constraints hold up to that error), so a domain is dropped only on a proof; the simplex is a
search and may stop anywhere without harm.

A proof needs the layer's exact weights (the dense maps of :mod:`dualgraph.chain` are float64
evaluations of the ops, not the weights themselves), so the test runs where a split ReLU's
input is a ``Gemm`` with constant weights (``alpha = beta = 1``, no ``transA``) of the previous
split ReLU's output or of the network's input (through ``Flatten``); elsewhere the ascent alone
proves empty domains, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ir import Graph, Node, Value
from .rounding import SAFETY, gamma, underflow, unit_roundoff

PROBE_EVERY = 16
"""A layer whose recent tests found almost nothing empty (:data:`LEAN_SHARE`) is tested on one
call in this many: on the competition's 256x2 network the first layer's test (784 columns)
found no empty child in 2,188 and took a fifth of the search's time."""

LEAN_SHARE = 0.01
"""Below this share of empty children among a layer's recent tests (a window of about ten
calls), the layer is only probed."""

WARM_UP = 128
"""Children a layer is tested on before its share counts."""

PIVOTS = 96
"""Most simplex iterations (pivots and bound flips) per batch; a domain not decided by then stays.
In a batch of 512 children deep in a competition tree (256-unit layers, up to 22 splits in one)
every problem was decided within 50, and all 133 that HiGHS found empty were certified."""


@dataclass
class SplitLayer:
    """A split ReLU's input as an exact affine map ``z = W y + b`` of ``y``, float64:
    ``weight`` ``[N, n]``, ``bias`` ``[N]``, and ``noise`` ``[N]``, the most the network as
    evaluated may differ from that map at ``z`` (:meth:`dualgraph.rounding.RoundingAllowance.
    evaluation_error`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    noise: torch.Tensor


def gemm_map(node: Node, source: Value) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W, b)`` float64 (exact: the node's own constants) where ``node`` is a ``Gemm``
    ``y = source @ op(B) + C`` with constant ``B`` and ``C`` and ``alpha = beta = 1``; else None."""
    if node.op != ("", "Gemm") or node.attrs.get("transA", 0) or node.var_inputs != [node.inputs[0]]:
        return None
    if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
        return None
    if node.inputs[0] is not source or node.const_input(1) is None or node.const_input(1).dim() != 2:
        return None
    w = node.const_input(1).double()
    w = w if node.attrs.get("transB", 0) else w.t()
    c = node.const_input(2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    b = torch.zeros(w.shape[0], dtype=torch.float64) if c is None else c.double().flatten()
    if b.numel() != w.shape[0] or w.shape[1] != source.numel:
        return None
    return w.contiguous(), b


def split_sources(graph: Graph, relus: list[Node]) -> list[Value | None]:
    """For each ReLU, the value ``y`` its input is a Gemm of, where that is the previous ReLU's
    output or the network's input (directly or through ``Flatten``); else None."""
    x = graph.inputs[0]
    flat = {x} | {n.outputs[0] for n in graph.nodes if n.op == ("", "Flatten") and n.inputs[0] is x
                  and int(n.attrs.get("axis", 1)) == 1}
    sources: list[Value | None] = []
    for k, relu in enumerate(relus):
        producer = relu.inputs[0].producer
        y = producer.inputs[0] if producer is not None and producer.inputs else None
        ok = y in flat if k == 0 else y is relus[k - 1].outputs[0]
        sources.append(y if ok else None)
    return sources


class EmptinessTest:
    """Drops branch-and-bound domains that one layer's splits make empty (module docstring).

    ``layers[k]``: ReLU ``k``'s input as a :class:`SplitLayer` of its source (None: no test on
    that layer's splits); ``input_box``: ``(lo, hi)`` of the network's flattened input;
    ``root``: each ReLU's input bounds at the root ``(lower, upper)`` ``[N_k]``, all float64."""

    def __init__(self, names: list[str], layers: list[SplitLayer | None],
                 input_box: tuple[torch.Tensor, torch.Tensor], root: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.names, self.layers, self.input_box, self.root = names, layers, input_box, root
        self.calls = 0
        self.seen = [0] * len(layers)      # children tested per layer
        self.tested = [0.0] * len(layers)  # recent tests and finds per layer (decaying by 0.9 a call)
        self.found = [0.0] * len(layers)

    def empty(self, signs: dict[str, torch.Tensor], layer: torch.Tensor) -> torch.Tensor:
        """Which domains ``signs`` (per ReLU ``[D, N_k]``, int8) are proved empty by the splits
        of ReLU ``layer[d]`` (the one each domain split last) or of the next one (whose box that
        split narrowed), ``[D]`` bool. A layer whose recent tests found almost nothing is only
        probed (:data:`PROBE_EVERY`): the test is a search, what it skips stays to the ascent."""
        D = len(layer)
        out = torch.zeros(D, dtype=torch.bool)
        self.calls += 1
        for k, form in enumerate(self.layers):
            mine = (((layer == k) | (layer == k - 1)) & ~out).nonzero().flatten()
            if form is None or not len(mine) or not self._worth_it(k):
                continue
            s = signs[self.names[k]][mine]
            count = (s != 0).sum(1)
            K = int(count.max())
            if K == 0:
                continue
            rows = torch.argsort((s == 0).to(torch.int8), dim=1, stable=True)[:, :K]  # split units first
            sign = torch.gather(s, 1, rows).double()
            lo, up = self._box(k, signs, mine)
            beta = minimax_simplex(form.weight, rows, sign, form.bias, lo, up)
            found = certified_empty(form, rows, sign, lo, up, beta)
            out[mine] |= found
            self.seen[k] += len(mine)
            self.tested[k] += len(mine)
            self.found[k] += int(found.sum())
        self.tested = [0.9 * t for t in self.tested]
        self.found = [0.9 * f for f in self.found]
        return out

    def _worth_it(self, k: int) -> bool:
        """Whether to test layer ``k`` in this call: while warming up, while its recent share of
        empty children is at least :data:`LEAN_SHARE`, and on every :data:`PROBE_EVERY`-th call."""
        return (self.seen[k] < WARM_UP or self.found[k] >= LEAN_SHARE * self.tested[k]
                or self.calls % PROBE_EVERY == 0)

    def _box(self, k: int, signs: dict[str, torch.Tensor], mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box of ReLU ``k``'s source on the domains ``mine``: the input box, or the previous
        ReLU's outputs on its root bounds clamped to the domains' splits."""
        if k == 0:
            lo, hi = self.input_box
            return lo.expand(len(mine), -1), hi.expand(len(mine), -1)
        lower, upper = self.root[k - 1]
        s = signs[self.names[k - 1]][mine]
        # an inactive split has z <= 0 (output 0); an active one z >= 0 (the ReLU's output is z)
        up = torch.where(s > 0, 0.0, upper.clamp(min=0))
        lo = torch.where(s > 0, 0.0, lower.clamp(min=0)).expand_as(up)
        return lo, up


@dataclass
class _Tableau:
    """The simplex state of the problems still running (module docstring of :func:`minimax_simplex`)."""

    origin: torch.Tensor   # [d] index into the batch
    rows: torch.Tensor     # [d, K] split units
    sign: torch.Tensor     # [d, K] float64 (0: padding)
    radius: torch.Tensor   # [d, n]
    radius32: torch.Tensor  # [d, n] float32, for the pricing
    at: torch.Tensor       # [d, n] float32: a nonbasic t_i's value (-1 or 1), 0 where basic
    slack_out: torch.Tensor  # [d, K]: 1 where w_k is nonbasic (at 0)
    basic: torch.Tensor    # [d, K] ids: t_0..t_{n-1}, tau (n), w_0..w_{K-1} (n + 1 + k)
    xb: torch.Tensor       # [d, K] the basic variables' values
    Binv: torch.Tensor     # [d, K, K]
    tau_at: torch.Tensor   # [d] tau's position (tau never leaves: it is free)

    def keep(self, index: torch.Tensor) -> _Tableau:
        return _Tableau(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def minimax_simplex(W: torch.Tensor, rows: torch.Tensor, sign: torch.Tensor, bias: torch.Tensor,
                    lo: torch.Tensor, up: torch.Tensor, pivots: int = PIVOTS) -> torch.Tensor:
    """Dual variables ``beta`` ``[D, K]`` (``>= 0``, summing to 1) of the ``D`` problems

        min_{y in [lo, up]} max_k sign_k (W_{rows_k} . y + bias_{rows_k})

    ``W`` ``[N, n]``, ``bias`` ``[N]`` (shared), ``rows`` ``[D, K]`` (padding where ``sign`` is 0),
    ``sign`` ``[D, K]``, ``lo``/``up`` ``[D, n]``, float64.

    With ``y = mid + radius * t`` this is the LP ``min tau`` s.t. ``Q t - tau + w = -p``, ``w >= 0``,
    ``-1 <= t <= 1`` (``Q_k = sign_k W_{rows_k} radius``, ``p_k = sign_k (W_{rows_k} mid + b)``),
    solved by the primal simplex method with bounded variables. ``tau`` is free, so it stays basic;
    it starts at ``max_k (p_k + Q_k t0)`` on the corner ``t0`` that minimises the rows' sum, a
    feasible start without a phase one. Dantzig's rule on the reduced costs ``beta . Q_i``, priced
    in float32 as one product with ``W`` for all problems; a nonbasic ``t_i`` that reaches its
    other bound first flips without a basis change. A problem stops when the simplex is optimal,
    when ``tau <= 0`` (a point meets every row: not empty), or after ``pivots`` iterations; the
    running ones are packed together as the others stop. ``beta = -y`` for the simplex
    multipliers ``y`` (the row of ``B^-1`` at ``tau``), clipped at 0 and normalised: a candidate
    certificate wherever the method stopped (:func:`certified_empty` decides).
    """
    D, K = rows.shape
    n = W.shape[1]
    dtype = W.dtype
    live = (sign != 0).to(dtype)
    mid, radius = (lo + up) / 2, (up - lo) / 2
    W32, Wt = W.float(), W.t().contiguous()
    scale = float(W.abs().max()) * float(radius.max()) + 1e-300
    tol, tiny = 1e-6 * scale, 1e-12 * scale              # above float32 pricing's error; a pivot's least entry
    # padding rows never bind; the start: the corner minimising the real rows' sum
    p = live * sign * ((mid @ Wt).gather(1, rows) + bias[rows]) - 1e300 * (1 - live)
    total = torch.zeros(D, W.shape[0], dtype=dtype).scatter_add_(1, rows, sign) @ W * radius
    corner = torch.where(total > 0, -1.0, 1.0).to(dtype)
    value = p + sign * ((corner * radius) @ Wt).gather(1, rows)
    tau, tau_at = value.max(1)
    batch = torch.arange(D)
    xb = tau.unsqueeze(1) - value
    xb[batch, tau_at] = tau
    basic = (n + 1 + torch.arange(K)).repeat(D, 1)
    basic[batch, tau_at] = n
    Binv = torch.eye(K, dtype=dtype).repeat(D, 1, 1)
    Binv[batch, :, tau_at] = -1.0                        # B: tau's column is -1; B is its own inverse
    slack_out = torch.zeros(D, K, dtype=dtype)
    slack_out[batch, tau_at] = 1.0
    beta_out = torch.zeros(D, K, dtype=dtype)
    tab = _Tableau(batch, rows, sign, radius, radius.float(), corner.float(), slack_out, basic, xb, Binv, tau_at)
    running = tau > 0
    for _ in range(pivots):
        if len(tab.origin) and int(running.sum()) < 0.75 * len(tab.origin):  # pack the running ones
            done = (~running).nonzero().flatten()
            beta_out[tab.origin[done]] = -tab.Binv[done, tab.tau_at[done]]
            tab, running = tab.keep(running.nonzero().flatten()), running[running]
        if not len(tab.origin):
            break
        running = _pivot(tab, W, W32, running, tol, tiny)
    if len(tab.origin):
        beta_out[tab.origin] = -tab.Binv[torch.arange(len(tab.origin)), tab.tau_at]
    beta = (beta_out * live).clamp(min=0)
    return beta / beta.sum(1, keepdim=True).clamp(min=1e-300)


def _pivot(tab: _Tableau, W: torch.Tensor, W32: torch.Tensor, running: torch.Tensor, tol: float,
           tiny: float) -> torch.Tensor:
    """One simplex iteration on every running problem of ``tab`` (in place); which still run."""
    d_all, K = tab.rows.shape
    n = W.shape[1]
    dtype = W.dtype
    batch = torch.arange(d_all)
    beta = -tab.Binv[batch, tab.tau_at]                  # y = the row of B^-1 at tau; beta = -y
    lam = torch.zeros(d_all, W.shape[0]).scatter_add_(1, tab.rows, (beta * tab.sign).float())
    best_t, i = ((lam @ W32) * tab.radius32 * tab.at).max(1)   # beta . Q_i, signed to a gain
    best_w, j = (-beta * tab.slack_out).max(1)                        # w_k's reduced cost is beta_k
    is_t = best_t.to(dtype) >= best_w
    running = running & (torch.maximum(best_t.to(dtype), best_w) > tol)   # else optimal
    direction = torch.where(is_t, -tab.at[batch, i].to(dtype), 1.0)
    column = torch.where(is_t.unsqueeze(1), tab.sign * W[tab.rows, i.unsqueeze(1)] * tab.radius[batch, i].unsqueeze(1),
                         torch.nn.functional.one_hot(j, K).to(dtype))
    v = (tab.Binv @ column.unsqueeze(2)).squeeze(2)                   # B^-1 a_q
    alpha = direction.unsqueeze(1) * v                                # the basics move by -theta alpha
    basic_t = tab.basic < n
    room = torch.where((alpha > tiny) & (tab.basic != n), (tab.xb + basic_t.to(dtype)).clamp(min=0) / alpha, torch.inf)
    room = torch.where((alpha < -tiny) & basic_t, (1.0 - tab.xb).clamp(min=0) / -alpha, room)
    step, leave = room.min(1)
    flip = is_t & (step >= 2.0)                          # t_i reaches its other bound first
    theta = torch.where(flip, 2.0, step)
    running = running & torch.isfinite(theta)
    theta = torch.where(running, theta, 0.0)
    tab.xb -= theta.unsqueeze(1) * alpha
    flip &= running
    swap = running & ~flip
    tab.at[flip, i[flip]] *= -1.0
    # a basis change: the entering variable takes position `leave`, the basic there leaves
    d = swap.nonzero().flatten()
    r = leave[d]
    out = tab.basic[d, r]
    out_t = out < n
    hit = torch.where(alpha[d, r] > 0, -1.0, 1.0)        # the bound a leaving t_i reached
    tab.at[d[out_t], out[out_t]] = hit[out_t].float()
    tab.slack_out[d[~out_t], out[~out_t] - n - 1] = 1.0
    in_t = is_t[d]
    tab.at[d[in_t], i[d[in_t]]] = 0.0
    tab.slack_out[d[~in_t], j[d[~in_t]]] = 0.0
    tab.basic[d, r] = torch.where(in_t, i[d], n + 1 + j[d])
    tab.xb[d, r] = torch.where(in_t, -direction[d], 0.0) + direction[d] * theta[d]
    pivot = torch.where(swap, v[batch, leave], 1.0)
    pivot_row = tab.Binv[batch, leave] / pivot.unsqueeze(1)
    tab.Binv.baddbmm_((v * swap.unsqueeze(1)).unsqueeze(2), pivot_row.unsqueeze(1), alpha=-1.0)  # in place
    tab.Binv[batch, leave] += swap.unsqueeze(1) * pivot_row
    return running & (tab.xb[batch, tab.tau_at] > 0)


def certified_empty(form: SplitLayer, rows: torch.Tensor, sign: torch.Tensor, lo: torch.Tensor, up: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """Whether ``beta`` ``[D, K]`` (``>= 0``) proves ``{y in [lo, up] : sign_k (W_{rows_k} y +
    b_{rows_k}) <= noise_{rows_k} for all k}`` empty, ``[D]`` bool (arguments as
    :func:`minimax_simplex`'s; ``noise`` from ``form``: a split holds on ``z`` as evaluated).

    Computes ``V = sum_k beta_k (sign_k b_k - noise_k) + sum_i min(a_i lo_i, a_i up_i)`` with
    ``a = sum_k beta_k sign_k W_k`` and subtracts its rounding: ``a`` carries at most ``gamma(K)
    (|W|^T beta)_i`` (``|sign| = 1``), which moves the minimum by at most that times ``m_i =
    max(|lo_i|, |up_i|)``; the products and the sums of ``n + 2K`` terms at most
    ``gamma(n + 2K + 2)`` of the terms' magnitudes; ``gamma`` is superadditive, so one
    ``gamma(n + 2K + 4)`` covers both (times :data:`SAFETY`), with an absolute term for
    underflow (:func:`dualgraph.rounding.underflow`)."""
    D, K = rows.shape
    N, n = form.weight.shape
    a = torch.zeros(D, N, dtype=torch.float64).scatter_add_(1, rows, beta * sign) @ form.weight
    spread = torch.zeros(D, N, dtype=torch.float64).scatter_add_(1, rows, beta * sign.abs()) @ form.weight.abs()
    value = (beta * (sign * form.bias[rows] - form.noise[rows])).sum(1) + torch.minimum(a * lo, a * up).sum(1)
    m = torch.maximum(lo.abs(), up.abs())
    magnitude = (beta * (form.bias[rows].abs() + form.noise[rows])).sum(1) + (spread * m).sum(1)
    # below float64's smallest normal number each operation may err by < sigma more: an entry of
    # a by 2K of them (times m_i in the minimum), the value's sums by 2 (n + 2K + 4)
    sigma = underflow(torch.float64)
    allowance = SAFETY * (gamma(n + 2 * K + 4, unit_roundoff(torch.float64)) * magnitude
                          + 2 * sigma * (K * m.sum(1) + n + 2 * K + 4))
    return value - allowance > 0
