"""Trust, but verify: the first use of a dual layer from outside dualgraph is checked.

A plugin's relaxation is a claim: ``a_lo z + b_lo <= f(z) <= a_up z + b_up`` for every ``z``
in ``[l, u]``. A wrong one (a chord used as both lines) would produce certificates for
properties that do not hold. So the first time a process uses a relaxation that dualgraph
did not ship *at a node*, the claim is tested on points inside the bounds it was actually
given there (every example of the batch, or as many as a fixed number of evaluations allows,
spread over it): each interval's ends, its midpoint and random points, evaluated in float64
with the op's own evaluation rule. The tolerance is what the rounding allowance adds to a
relaxation's offsets anyway (8 units of roundoff of the bounds' precision, relative to
``|a| max(|l|, |u|) + 2 |b|``), so a relaxation passes only if it is sound up to the
rounding dualgraph accounts for. A rule that is not a relaxation (a
:class:`~dualgraph.dual_registry.DualRule` subclass) is tested on its first backward step at
a node the same way, against inequality (1) of the contract, and (2) when it declares
itself linear; one that declares free variables (optimised by ``--relaxation alpha``) also
with them at the ends and the middle of their declared ranges. A violation stops the run
with an error naming the plugin, the op, the node and a violating point; a node that passed
is not checked again in that process (for that rule: a redefined op's rule is checked anew).

Sampling cannot prove a relaxation sound (``dualgraph check-op`` tests far more points);
it catches the claims that are wrong where they are used, at a cost measured in
``bench/plugin_report.md`` (a few milliseconds per node, once per process).
"""

from __future__ import annotations

import torch

from .dual_registry import DualRule, DualStep, Relaxation, const_args
from .errors import DualgraphError
from .interpreter import EVAL_RULES
from .ir import Node
from .linalg import between

POINTS_PER_UNIT = 16     # per sampled unit: both ends, the midpoint and 13 random points
MAX_ENTRIES = 1 << 16    # a cap on the evaluations, so the check costs the same on any batch


CHECKED = "trust checked"
SLOPES_CHECKED = "trust checked: free slopes"


def needs_check(rule: DualRule, node: Node, what: str = CHECKED) -> bool:
    """Whether ``rule`` comes from outside dualgraph and has not yet been checked at ``node``
    (``what``: its steps, or those with its free slopes, :func:`verify_free_slopes`)."""
    return rule.trust_source is not None and not any(r is rule for r in node.meta.get(what, ()))


def _passed(rule: DualRule, node: Node, what: str = CHECKED) -> None:
    # the rule itself, not its id: a redefined op's new rule may get a freed rule's id (a review)
    node.meta.setdefault(what, []).append(rule)


def verify_relaxation(rule: DualRule, node: Node, bounds, r: Relaxation) -> None:
    """Check ``r`` on points of ``bounds`` (the first use of a plugin relaxation at ``node``)."""
    if not isinstance(r, Relaxation):
        raise DualgraphError(f"the relaxation of {rule.trust_source} returned a {type(r).__name__} at node "
                             f"'{node.name}'; it must return a dualgraph.Relaxation")
    lower, upper = bounds.lower.detach(), bounds.upper.detach()
    rows, points = _sample(lower.shape)
    l, u = (_take(t, rows).to(torch.float64) for t in (lower, upper))
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64),
                   torch.rand(points - 3, generator=gen, dtype=torch.float64)])
    t = t.view(-1, *([1] * l.dim()))
    z = between(l, u, t).where(torch.isfinite(l) & torch.isfinite(u), torch.zeros_like(l))   # [K, rows, *unit]
    fz = _evaluate(node, z.reshape(-1, *l.shape[1:])).view_as(z)
    eps = torch.finfo(lower.dtype).eps

    def line(a, b) -> tuple[torch.Tensor, torch.Tensor]:
        a = _take(a.detach(), rows).to(torch.float64)
        b = _take(b.detach(), rows).to(torch.float64) if torch.is_tensor(b) else torch.tensor(float(b), dtype=torch.float64)
        return a * z + b, a.abs() * magnitude + 2 * b.abs()

    magnitude = torch.maximum(l.abs(), u.abs()).where(torch.isfinite(l) & torch.isfinite(u), torch.zeros_like(l))
    lines = [(*line(r.a_lo, r.b_lo), "lower", 1.0), (*line(r.a_up, r.b_up), "upper", -1.0)]
    if r.free is not None:  # free lines: the valid slopes form an interval, so its ends and its middle
        for side, a, b in r.free.lines(r):
            which = "free lower" if side < 0 else "free upper"
            lines.append((*line(a, b), f"{which} (at a slope of its range)", -float(side)))
    # the allowance's share for a relaxation: 8 units of roundoff (u = eps / 2) of |a| m + 2 |b|;
    # 4 float64 ulps of f cover the check's own evaluation
    f64 = torch.finfo(torch.float64).eps
    checks = []
    for value, scale, which, side in lines:  # excess > 0: a lower line above f, or an upper line below it
        checks.append((side * (value - fz) - (4 * eps * scale + 4 * f64 * fz.abs()), value, which))
    for excess, line_value, which in checks:
        excess = torch.nan_to_num(excess, nan=float("inf"))
        if bool((excess > 0).any()):
            k = int(excess.flatten().argmax())
            raise DualgraphError(
                f"the relaxation of {rule.trust_source} is unsound at node '{node.name}': at z = "
                f"{_item(z, k):.6g} in [l, u] = [{_item(l.expand_as(z), k):.6g}, {_item(u.expand_as(z), k):.6g}], "
                f"f(z) = {_item(fz, k):.6g}, but its {which} line gives {_item(line_value, k):.6g}; a relaxation "
                "must bound f on the whole interval (test it with `dualgraph check-op`)")
    _passed(rule, node)


def verify_dual_step(rule: DualRule, node: Node, lam, bounds: list, config, step: DualStep, *,
                     mark: bool = True) -> None:
    """Check one backward step against the contract on points within ``bounds`` (or, for a
    rule that gets no bounds, standard normal points): the first use of a plugin dual layer
    (``mark``: record that ``node`` passed)."""
    lams = lam if isinstance(lam, list) else [lam]
    b_lam = lams[0].shape[0]
    var_inputs = node.var_inputs
    n_rows = max([b_lam] + [bd.lower.shape[0] for bd in bounds if bd is not None])
    picked = _spread(n_rows, 8)  # examples spread over the batch, not its first ones
    rows = len(picked)
    gen = torch.Generator().manual_seed(0)
    points = POINTS_PER_UNIT
    drawn: dict = {}   # one draw per distinct value: a node may read one value in two slots
    for i, v in enumerate(var_inputs):
        if v in drawn:
            continue
        bd = bounds[i] if i < len(bounds) else None
        shape = (points, rows, *v.unit_shape)
        if bd is None:
            drawn[v] = torch.randn(shape, generator=gen, dtype=torch.float64)
            continue
        l, u = (_take(t.detach(), picked).to(torch.float64).expand(rows, *v.unit_shape) for t in bd)
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        t[0], t[1] = 0.0, 1.0
        drawn[v] = between(l, u, t)
    zs = [drawn[v] for v in var_inputs]
    where = "inside its input bounds" if bounds else "(normal random inputs; the rule takes no bounds)"
    args = const_args(node, zs[0])
    full = [drawn[v].reshape(points * rows, *v.unit_shape) if v is not None and not v.is_const else a
            for v, a in zip(node.inputs, args)]
    with torch.no_grad():
        outs = EVAL_RULES[node.op](node, full)
    outs = [outs] if torch.is_tensor(outs) else list(outs)
    picked_lams = [_take(lm.detach(), picked).to(torch.float64) for lm in lams]
    ys = [y.reshape(points, rows, *y.shape[1:]) for y in outs]
    lhs = sum(_dot(lm, y) for lm, y in zip(picked_lams, ys))
    rhs = torch.zeros_like(lhs)
    lower = _offset(step.lower, picked)
    # relative to the magnitudes summed (sums of |products|: rounding is relative to them, not to
    # a cancelled sum), with no absolute floor: an offset 1e-4 too high passed where every term
    # was 1e-5 (a review: a wrong float32 certificate)
    scale = sum(_dot(lm.abs(), y.abs()) for lm, y in zip(picked_lams, ys)) + lower.abs()
    for z, li in zip(zs, step.lam_in):
        if li is not None:
            li = _take(li.detach(), picked).to(torch.float64)
            rhs, scale = rhs + _dot(li, z), scale + _dot(li.abs(), z.abs())
    eps = torch.finfo(lams[0].dtype).eps
    tol = 1e3 * eps * scale
    bad = rhs + lower - lhs - tol
    what = "(1): lam . f(z) >= sum lam_i . z_i + lower"
    if rule.linear(node, config) and step.upper is not None and not bool((bad > 0).any()):
        bad = lhs - rhs - _offset(step.upper, picked) - tol
        what = "(2): lam . f(z) <= sum lam_i . z_i + upper"
    bad = torch.nan_to_num(bad, nan=float("inf"))
    if bool((bad > 0).any()):
        k = int(bad.flatten().argmax())
        point, example = divmod(k // bad.shape[-1], rows)
        z0 = zs[0][point, example].flatten()[:4].tolist() if zs else []
        raise DualgraphError(
            f"the dual layer of {rule.trust_source} is unsound at node '{node.name}': inequality {what} "
            f"fails by {float(bad.flatten()[k]):.6g} at a point {where} (first entries "
            f"{[round(x, 6) for x in z0]}); test it with `dualgraph check-op`")
    if mark:
        _passed(rule, node)


def verify_free_slopes(rule: DualRule, node: Node, bounds: list, config, free: dict) -> None:
    """Check a plugin dual layer's optimised-slope steps (``backward_with_slopes``) where its free
    variables (``free``, :meth:`~dualgraph.dual_registry.DualRule.free_variables`) are at the
    ends and the middle of their declared ranges, for random ``lam`` of both signs: every value
    in range must give a sound step, and the optimiser goes anywhere in it (a review: slopes
    declared in [0, 2] for a ReLU passed, checked only at their starting values)."""
    import dataclasses
    rows = bounds[0].lower.shape[0]
    gen = torch.Generator().manual_seed(0)
    for where in (0.0, 1.0, 0.5):
        chosen = {}
        for kind, fs in free.items():
            lo, hi = (torch.as_tensor(x, dtype=fs.values.dtype) for x in (fs.lo, fs.hi))
            value = (lo + where * (hi - lo)).expand_as(fs.values).clone()
            chosen[kind] = dataclasses.replace(fs, values=value.detach())
        for _ in range(2):
            lam = torch.randn((rows, 2, *node.outputs[0].unit_shape), generator=gen, dtype=torch.float64)
            lam = lam.to(bounds[0].lower.dtype)
            step = rule.backward_with_slopes(node, lam, bounds[0], config, chosen.get("slopes"),
                                             None, chosen.get("upper slopes"))
            verify_dual_step(rule, node, lam, bounds, config, step, mark=False)
    _passed(rule, node, SLOPES_CHECKED)


def _sample(shape: torch.Size) -> tuple[torch.Tensor, int]:
    """Which examples of a ``[B, *unit]`` tensor to sample, and how many points per unit: every
    example where the cap on evaluations allows, with fewer points (at least both ends and the
    midpoint) before fewer examples, which are then spread over the batch (the first rows alone
    missed a wrong relaxation on a later example: a review)."""
    units, batch = max(1, int(torch.Size(shape[1:]).numel())), int(shape[0])
    points = max(3, min(POINTS_PER_UNIT, MAX_ENTRIES // (units * batch)))
    count = max(1, min(batch, MAX_ENTRIES // (points * units)))
    return _spread(batch, count), points


def _spread(batch: int, most: int) -> torch.Tensor:
    """Up to ``most`` example indices of a batch, spread over it (its ends included)."""
    return torch.linspace(0, batch - 1, min(batch, most)).round().long().unique()


def _take(t: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    if not (t.dim() > 0 and t.shape[0] > 1):
        return t
    return t[:rows] if isinstance(rows, int) else t[rows]


def _evaluate(node: Node, z: torch.Tensor) -> torch.Tensor:
    """The op at ``z`` (its first variable input), constants as in the node, in float64."""
    args = const_args(node, z)
    slot = next(i for i, v in enumerate(node.inputs) if v is not None and not v.is_const)
    args[slot] = z
    with torch.no_grad():
        out = EVAL_RULES[node.op](node, args)
    return (out if torch.is_tensor(out) else out[0]).to(torch.float64)


def _dot(lam: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``lam [b, m, *s]`` . ``z [n, B, *s]`` -> ``[n, max(b, B), m]``."""
    return (lam.unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1)


def _offset(x, rows: torch.Tensor | int) -> torch.Tensor:
    if torch.is_tensor(x):
        return _take(x.detach(), rows).to(torch.float64).unsqueeze(0)
    return torch.tensor(float(x or 0.0), dtype=torch.float64)


def _item(t: torch.Tensor, k: int) -> float:
    return float(t.flatten()[k])
