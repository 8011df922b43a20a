"""Elementwise functions: Abs, Exp, Log, Sqrt, Reciprocal, Pow (constant exponent), Softplus,
Sin, Cos, and the steps Sign, Floor, Ceil.

Every relaxation is a pair of parallel lines (the dual layers are linear): the chord's slope
``a`` and offsets through the extremes of ``g(z) = f(z) - a z`` on ``[l, u]``, which lie at
the ends, at kinks, or where ``f'(z) = a`` (each op states those stationary points;
:func:`~dualgraph.ops.common.chord_relaxation`). With ``relu_relaxation="alpha"`` the lines
of Abs, Exp, Softplus and Erf are free, each with the tightest offset for its slope, slopes
over the values ``f'`` takes on ``[l, u]`` (:func:`~dualgraph.ops.common.derivative_range`;
not for Log, Sqrt, Reciprocal, whose ``f'`` is unbounded near 0, nor Pow, Sin, Cos). Steps are monotone: the constant lines
``f(l)`` and ``f(u)``. Ops defined on part of the line (Log, Sqrt, Reciprocal, fractional
powers) refuse bounds that leave it, and Exp refuses bounds it would overflow on, with an
error naming the node: a bound that is not finite is no bound.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import Bounds, Relaxation
from ..errors import DualgraphError, UnsupportedOpError
from ..lowering import Call, Unsupported
from ..op_registry import define_op, var
from .common import chord_relaxation, derivative_range, fx_unary, onnx_elementwise

Tensor = torch.Tensor
INF = float("inf")


def _require_inside(node, b: Bounds, low: float, high: float = INF, *, open_low: bool = False,
                    what: str = "") -> None:
    """Refuse bounds that leave the op's domain (``[low, high]``, or ``(low, high]``)."""
    l, u = b
    outside = (l <= low) if open_low else (l < low)
    outside = outside | (u > high) | torch.isnan(l) | torch.isnan(u)
    if bool(outside.any()):
        side = "(" if open_low else "["
        raise DualgraphError(f"node '{node.name}' ({node.op_type}): its input's bounds reach "
                             f"[{float(l.min()):.4g}, {float(u.max()):.4g}], outside {side}{low:g}, {high:g}]"
                             f"{what}; no finite linear bounds exist there (bound the input first, e.g. with Clip)")


def _define(op_type: str, f: Callable[[Tensor], Tensor], relax, *fx_targets, eval_roundings: int = 8,
            breakpoints=lambda node: None, free_lines: bool = False):
    """A one-input function: evaluation ``f``, linear relaxation, ONNX import as it is, fx lowering.
    ``free_lines``: with ``relu_relaxation="alpha"`` the relaxation's lines are free
    (:func:`~dualgraph.ops.common.derivative_range`), so its dual layer is not linear then."""
    op = define_op(op_type)
    op.evaluate(lambda node, inputs: f(inputs[0]))
    linear_if = (lambda config: config.relu_relaxation != "alpha") if free_lines else (lambda config: True)
    op.relaxation(linear_if=linear_if, eval_roundings=eval_roundings, breakpoints=breakpoints)(relax)
    op.onnx_import(onnx_elementwise)
    if fx_targets:
        op.fx_lowering(*fx_targets)(fx_unary(op_type))
    return op


# ---- convex / concave functions ------------------------------------------------------------------

abs_op = _define("Abs", torch.abs,
                 lambda node, b, config: chord_relaxation(b, torch.abs, breakpoints=(0.0,),
                                                          free_slopes=derivative_range(config, b, torch.sign)),
                 torch.abs, "abs", eval_roundings=0, breakpoints=lambda node: (0.0,), free_lines=True)
abs_op.example(var(6))
abs_op.example(var(2, 3))


def _exp_relaxation(node, b: Bounds, config) -> Relaxation:
    _require_inside(node, b, -INF, math.log(torch.finfo(b.upper.dtype).max) - 1,
                    what=" (exp would overflow)")
    return chord_relaxation(b, torch.exp, stationary=lambda a: [torch.log(a.clamp(min=1e-300))],
                            free_slopes=derivative_range(config, b, torch.exp))


exp = _define("Exp", torch.exp, _exp_relaxation, torch.exp, "exp", free_lines=True)
exp.example(var(6), domain=(-INF, 30.0))


def _log_relaxation(node, b: Bounds, config) -> Relaxation:
    _require_inside(node, b, 0.0, open_low=True)
    return chord_relaxation(b, torch.log, stationary=lambda a: [1 / a.clamp(min=1e-300)])


log = _define("Log", torch.log, _log_relaxation, torch.log, "log")
log.example(var(6), domain=(1e-3, INF))


def _sqrt_relaxation(node, b: Bounds, config) -> Relaxation:
    _require_inside(node, b, 0.0)
    return chord_relaxation(b, torch.sqrt, stationary=lambda a: [0.25 / a.clamp(min=1e-150) ** 2])


sqrt = _define("Sqrt", torch.sqrt, _sqrt_relaxation, torch.sqrt, "sqrt")
sqrt.example(var(6), domain=(0.0, INF))


def _reciprocal_relaxation(node, b: Bounds, config) -> Relaxation:
    l, u = b
    if bool(((l <= 0) & (u >= 0)).any()):
        raise DualgraphError(f"node '{node.name}' (Reciprocal): its input's bounds contain 0 "
                             f"([{float(l.min()):.4g}, {float(u.max()):.4g}]); 1/z has no finite linear bounds there")
    # f'(z) = -1/z^2 = a: z = 1/sqrt(-a), on the side of zero the interval is on
    side = torch.where(l > 0, 1.0, -1.0).to(l.dtype)
    return chord_relaxation(b, torch.reciprocal, stationary=lambda a: [side / torch.sqrt((-a).clamp(min=1e-300))])


reciprocal = _define("Reciprocal", torch.reciprocal, _reciprocal_relaxation, torch.reciprocal, "reciprocal")
reciprocal.example(var(6), domain=(0.05, INF))
reciprocal.example(var(6), domain=(-INF, -0.05))


SOFTPLUS_SWITCH = 20.0
"""torch's ``softplus`` returns ``z`` itself above this (its ``threshold``): about ``2e-9``
below ``log(1 + e^z)`` in float64, a step down, so not convex there; onnxruntime computes
the exact value."""


LOGIT_FLOOR = 1e-300
"""Slopes are clamped into ``[LOGIT_FLOOR, 1 - 2^-53]`` before ``logit``: finite stationary points
(and gradients), exact down to ``z = -690``, where softplus is below ``1e-299`` (a clamp at
``1e-15`` put the tangent point of a chord on ``[-40, -36]`` at an end of the interval)."""


def _exact_softplus(z: torch.Tensor) -> torch.Tensor:
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def _softplus_relaxation(node, b: Bounds, config) -> Relaxation:
    # f'(z) = sigmoid(z) = a: z = logit(a). The lower lines bound torch's values, the lower of
    # the two (the top and foot of its step are candidate extremes); the upper lines the exact ones.
    switch = torch.tensor(SOFTPLUS_SWITCH, dtype=torch.float64)
    foot = float(torch.nextafter(switch, 2 * switch))
    return chord_relaxation(b, F.softplus, breakpoints=(SOFTPLUS_SWITCH, foot),
                            stationary=lambda a: [torch.logit(a.clamp(LOGIT_FLOOR, 1 - 2.0 ** -53))],
                            free_slopes=derivative_range(config, b, torch.sigmoid), f_above=_exact_softplus)


softplus = _define("Softplus", F.softplus, _softplus_relaxation, free_lines=True)


def _softplus_call(lo, call: Call, beta: float, threshold: float):
    """torch's softplus with ONNX's parameters only: beta 1, the switch to ``z`` at
    :data:`SOFTPLUS_SWITCH` (another threshold was read as 20: a review)."""
    if float(beta) != 1.0 or float(threshold) != SOFTPLUS_SWITCH:
        raise Unsupported(f"beta={beta}, threshold={threshold} (ONNX Softplus is torch's with beta 1 and "
                          f"threshold {SOFTPLUS_SWITCH:g})")
    return lo.emit("Softplus", [lo.var(call.arg(0, "input"))])


@softplus.fx_lowering(nn.Softplus)
def _(lo, call: Call):
    return _softplus_call(lo, call, call.module.beta, call.module.threshold)


@softplus.fx_lowering(F.softplus)
def _(lo, call: Call):
    return _softplus_call(lo, call, call.arg(1, "beta", 1.0), call.arg(2, "threshold", 20.0))


softplus.example(var(6))


# ---- Erf (GELU as exported: x * 0.5 * (1 + erf(x / sqrt 2))) --------------------------------------

def _erf_stationary(a: Tensor) -> list[Tensor]:
    # erf'(z) = 2/sqrt(pi) exp(-z^2) = a  ->  z = +-sqrt(-log(a sqrt(pi) / 2)); none if a > 2/sqrt(pi)
    z = torch.sqrt((-torch.log((a * math.sqrt(math.pi) / 2).clamp(min=1e-300))).clamp(min=0))
    return [z, -z]


def _erf_derivative(z: Tensor) -> Tensor:
    return 2 / math.sqrt(math.pi) * torch.exp(-z * z)


def _erf_relaxation(node, b: Bounds, config) -> Relaxation:
    return chord_relaxation(b, torch.erf, stationary=_erf_stationary,
                            free_slopes=derivative_range(config, b, _erf_derivative, peak=0.0))


erf = _define("Erf", torch.erf, _erf_relaxation, torch.erf, "erf", free_lines=True)
erf.example(var(6))


# ---- Pow with a constant exponent ----------------------------------------------------------------

pow_op = define_op("Pow")
pow_op.evaluate(lambda node, inputs: torch.pow(inputs[0], inputs[1]))


def _exponent(node) -> float:
    v = node.inputs[1] if len(node.inputs) > 1 else None
    if v is None or not v.is_const or v.const.numel() != 1:
        raise UnsupportedOpError(f"node '{node.name}' (Pow): only a constant scalar exponent is supported")
    return float(v.const.reshape(-1)[0])


@pow_op.relaxation(linear_if=lambda config: True)
def pow_relaxation(node, b: Bounds, config) -> Relaxation:
    """``z^p``: the stationary points of ``z^p - a z`` solve ``p z^(p-1) = a``."""
    p = _exponent(node)
    integer = p == round(p)
    if not integer or p < 0:  # defined on z >= 0 (z > 0 for negative powers)
        _require_inside(node, b, 0.0, open_low=p < 0, what=f" (z^{p:g})")

    def f(z: Tensor) -> Tensor:
        return torch.pow(z, p)

    def stationary(a: Tensor) -> list[Tensor]:
        if p in (0.0, 1.0):
            return []
        ratio = a / p
        if integer and p > 0 and int(p) % 2 == 0:      # p - 1 odd: one real root, sign of the ratio
            return [torch.sign(ratio) * ratio.abs() ** (1 / (p - 1))]
        root = ratio.clamp(min=0) ** (1 / (p - 1))     # p z^(p-1) = a needs a / p >= 0 here
        return [root, -root] if integer and p > 0 else [root]
    return chord_relaxation(b, f, stationary=stationary)


pow_op.onnx_import(lambda ctx, n: [ctx.binary(n, "Pow", n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))])


@pow_op.fx_lowering(torch.pow, operator.pow, "pow")
def _(lo, call: Call):
    exponent = lo.constant(call.arg(1, "exponent"), "exponent")
    if isinstance(exponent, torch.Tensor) and exponent.numel() != 1:
        raise Unsupported("a tensor exponent (only a scalar exponent is supported)")
    return lo.emit("Pow", [lo.var(call.arg(0, "input")), torch.tensor(float(exponent), dtype=torch.float64)])


def _scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


pow_op.example(var(6), _scalar(2.0))
pow_op.example(var(6), _scalar(3.0))
pow_op.example(var(6), _scalar(4.0), domain=(-6.0, 6.0))
pow_op.example(var(6), _scalar(0.5), domain=(0.0, INF))
pow_op.example(var(6), _scalar(1.5), domain=(0.0, 50.0))
pow_op.example(var(6), _scalar(-1.0), domain=(0.05, INF))


# ---- periodic: Sin, Cos --------------------------------------------------------------------------

TWO_PI = 2 * math.pi


def _periodic_relaxation(f: Callable[[Tensor], Tensor], solutions: Callable[[Tensor], list[Tensor]]):
    """Sin/Cos: over a full period the constant lines -1 and 1; otherwise the chord slope with
    every solution of ``f'(z) = a`` in the periods the interval touches."""
    def relax(node, b: Bounds, config) -> Relaxation:
        l, u = b
        full = (u - l) >= TWO_PI

        def stationary(a: Tensor) -> list[Tensor]:
            base = torch.floor(l / TWO_PI) * TWO_PI
            return [z + base + k * TWO_PI for z in solutions(a) for k in (-1, 0, 1, 2)]
        r = chord_relaxation(b, f, stationary=stationary)
        zero = torch.zeros_like(l)
        one = torch.ones_like(l) * (1 + 1e-6)
        return Relaxation(torch.where(full, zero, r.a_lo), torch.where(full, -one, r.b_lo),
                          torch.where(full, zero, r.a_up), torch.where(full, one, r.b_up))
    return relax


def _sin_solutions(a: Tensor) -> list[Tensor]:   # cos z = a
    t = torch.acos(a.clamp(-1.0, 1.0))
    return [t, -t]


def _cos_solutions(a: Tensor) -> list[Tensor]:   # -sin z = a
    t = torch.asin((-a).clamp(-1.0, 1.0))
    return [t, math.pi - t]


sin = _define("Sin", torch.sin, _periodic_relaxation(torch.sin, _sin_solutions), torch.sin, "sin")
sin.example(var(6))
cos = _define("Cos", torch.cos, _periodic_relaxation(torch.cos, _cos_solutions), torch.cos, "cos")
cos.example(var(6))


# ---- monotone steps: Sign, Floor, Ceil ------------------------------------------------------------

def _step_relaxation(f: Callable[[Tensor], Tensor]):
    """A nondecreasing step function is between the constants ``f(l)`` and ``f(u)`` on ``[l, u]``."""
    def relax(node, b: Bounds, config) -> Relaxation:
        l, u = b
        zero = torch.zeros_like(l)
        return Relaxation(zero, f(l), zero, f(u))
    return relax


for _op_type, _f, _targets in (("Sign", torch.sign, (torch.sign, "sign")),
                               ("Floor", torch.floor, (torch.floor, "floor")),
                               ("Ceil", torch.ceil, (torch.ceil, "ceil"))):
    _step = _define(_op_type, _f, _step_relaxation(_f), *_targets, eval_roundings=0)
    _step.example(var(6), special_points=(0.0, 1.0, -1.0, 2.5))
