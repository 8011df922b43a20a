"""Activations: Relu, LeakyRelu, Clip, Sigmoid, Tanh (linear relaxations on ``[l, u]``), Softmax.

ReLU follows Corollary 2 (or CROWN's adaptive lower slope); the others use the chord slope
with offsets from the exact extremes of ``f(z) - a z`` on ``[l, u]``, the tightest pair of
parallel bounding lines (:func:`dualgraph.ops.common.chord_relaxation`). Softmax has an
evaluation only: it is accepted after the logits, where certification never bounds it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import Bounds, DualRule, DualStep, FreeLines, Relaxation, const_args
from ..errors import DualgraphError
from ..lowering import Call, Unsupported
from ..op_registry import define_op, var
from .common import chord_relaxation, crossing, derivative_range, fx_unary, node_axis, onnx_elementwise

# ---- Relu --------------------------------------------------------------------------------------------

relu = define_op("Relu")
relu.evaluate(lambda node, inputs: torch.relu(inputs[0]))


@relu.relaxation(linear_if=lambda config: config.relu_relaxation == "paper", breakpoints=lambda node: (0.0,),
                 eval_roundings=0, monotone=True)
def relu_relaxation(node, b: Bounds, config) -> Relaxation:
    """Corollary 2: slope ``d = u/(u-l)`` on the crossing set, 0 / 1 on the stable sets.

    Upper line ``d (z - l)``; the lower line is ``d z`` (the paper: a linear dual layer) or, with
    ``relu_relaxation="crown"``, ``a z`` with ``a = 1 if u > -l else 0``. Any ``a`` in [0,1] is
    valid: with ``"alpha"`` the crossing units' lower slopes are free (optimised, starting
    from CROWN's).
    """
    l, u = b
    cross = crossing(b)
    d = torch.where(cross, u / torch.where(cross, u - l, 1.0), (l >= 0).to(l.dtype))
    b_up = torch.where(cross, -d * l, 0.0)
    if config.relu_relaxation == "paper":
        return Relaxation(d, 0.0, d, b_up)
    a_lo = torch.where(cross, (u > -l).to(l.dtype), d)
    return Relaxation(a_lo, 0.0, d, b_up, FreeLines(cross, 0.0, 1.0) if config.relu_relaxation == "alpha" else None)


relu.onnx_import(onnx_elementwise)
relu.fx_lowering(nn.ReLU, F.relu, torch.relu, "relu")(fx_unary("Relu"))
relu.example(var(5))
relu.example(var(2, 3, 3))


# ---- LeakyRelu ---------------------------------------------------------------------------------------

leaky_relu = define_op("LeakyRelu")
leaky_relu.evaluate(lambda node, inputs: F.leaky_relu(inputs[0], float(node.attrs.get("alpha", 0.01))))


# alpha > 1 takes the chord relaxation, which depends on l and u: no bound-free pieces then
@leaky_relu.relaxation(linear_if=lambda config: config.relu_relaxation != "alpha", eval_roundings=1,
                       breakpoints=lambda node: (0.0,) if float(node.attrs.get("alpha", 0.01)) <= 1 else None)
def leaky_relu_relaxation(node, b: Bounds, config) -> Relaxation:
    """Chord slope ``s`` on crossing units; ``s z`` is below f (alpha <= s <= 1), the chord above.
    Any ``a z`` with ``alpha <= a <= 1`` is below f: with ``relu_relaxation="alpha"`` those
    lower slopes are free (optimised from ``s``)."""
    alpha = float(node.attrs.get("alpha", 0.01))
    if alpha > 1:
        return chord_relaxation(b, lambda z: F.leaky_relu(z, alpha), breakpoints=(0.0,))
    l, u = b
    cross = crossing(b)
    s = torch.where(cross, (u - alpha * l) / torch.where(cross, u - l, 1.0),
                    torch.where(l >= 0, torch.ones_like(l), torch.full_like(l, alpha)))  # alpha in l's precision
    free = FreeLines(cross, alpha, 1.0) if config.relu_relaxation == "alpha" else None
    return Relaxation(s, 0.0, s, torch.where(cross, l * (alpha - s), 0.0), free)


leaky_relu.onnx_import(onnx_elementwise)


@leaky_relu.fx_lowering(nn.LeakyReLU)
def _(lo, call: Call):
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(call.module.negative_slope)})


@leaky_relu.fx_lowering(F.leaky_relu)
def _(lo, call: Call):
    slope = lo.constant(call.arg(1, "negative_slope", 0.01), "negative_slope")
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(slope)})


leaky_relu.example(var(5))
leaky_relu.example(var(5), attrs={"alpha": 0.2})
leaky_relu.example(var(2, 3), attrs={"alpha": 2.0})


# ---- Clip (HardTanh, ReLU6, clamp) --------------------------------------------------------------------

clip = define_op("Clip")


def _clip_limits(node, inputs: list) -> tuple[Any, Any]:
    """``(min, max)``: inputs 1 and 2 (opset >= 11), else the attributes of older opsets."""
    lo, hi = (list(inputs) + [None, None, None])[1:3]
    return (lo if lo is not None else node.attrs.get("min"), hi if hi is not None else node.attrs.get("max"))


@clip.evaluate
def _(node, inputs):
    x = inputs[0]
    lo, hi = _clip_limits(node, inputs)
    if lo is not None:
        x = torch.clamp(x, min=lo)
    if hi is not None:
        x = torch.clamp(x, max=hi)
    return x


@clip.relaxation(linear_if=lambda config: config.relu_relaxation != "alpha", eval_roundings=0, monotone=True)
def clip_relaxation(node, b: Bounds, config) -> Relaxation:
    """Piecewise linear with breakpoints at ``min`` and ``max``: the chord relaxation. With
    ``relu_relaxation="alpha"`` both lines are free, slopes in ``[0, 1]`` where the interval
    reaches both a flat piece and the sloped one (each line's offset the tightest for its
    slope: a HardTanh's lines like a ReLU's on either side)."""
    lo_v, hi_v = _clip_limits(node, const_args(node, b.lower))
    lo = float(lo_v) if lo_v is not None else -math.inf
    hi = float(hi_v) if hi_v is not None else math.inf
    bps = tuple(p for p in (lo, hi) if math.isfinite(p))
    # f' is 1 between the limits, 0 outside: "peaked" anywhere between them
    peak = (lo + hi) / 2 if bps == (lo, hi) else (lo + 1 if math.isfinite(lo) else (hi - 1 if bps else 0.0))

    def derivative(z):
        return ((z > lo) & (z < hi)).to(z.dtype)
    return chord_relaxation(b, lambda z: z.clamp(min=lo, max=hi), breakpoints=bps,
                            free_slopes=derivative_range(config, b, derivative, peak))


@clip.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    if ctx.opset < 11:  # bounds were attributes; normalise them to inputs
        limits = [ctx.ir_const(np.array(n.attrs[k], dtype=np.float32), f"{n.name}/dg_{k}")
                  if k in n.attrs else None for k in ("min", "max")]
    else:
        limits = [ctx.const_input(n, i) for i in (1, 2)]
    inputs = [x.value, *limits]
    while inputs[-1] is None:
        inputs.pop()
    return ctx.emit(n, "Clip", inputs, {}, x.added, n.outs)


def _lower_clip(lo, x: Any, low: Any, high: Any):
    limits = []
    for b, what in ((low, "min"), (high, "max")):
        b = lo.constant(b, what)
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise Unsupported(f"{what} must be a scalar")
        limits.append(None if b is None else torch.tensor(float(b), dtype=torch.float32))
    return lo.emit("Clip", [lo.var(x), *limits])


@clip.fx_lowering(nn.Hardtanh, nn.ReLU6)  # ReLU6 is a Hardtanh(0, 6) subclass with its own type
def _(lo, call: Call):
    return _lower_clip(lo, call.arg(0, "input"), call.module.min_val, call.module.max_val)


@clip.fx_lowering(F.hardtanh)
def _(lo, call: Call):
    return _lower_clip(lo, call.arg(0, "input"), call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0))


@clip.fx_lowering(F.relu6)
def _(lo, call: Call):
    return _lower_clip(lo, call.arg(0, "input"), 0.0, 6.0)


@clip.fx_lowering(torch.clamp, torch.clip, "clamp", "clip")
def _(lo, call: Call):
    return _lower_clip(lo, call.arg(0, "input"), call.arg(1, "min", None), call.arg(2, "max", None))


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


clip.example(var(5), _scalar(-0.5), _scalar(1.0), special_points=(-0.5, 1.0))
clip.example(var(5), _scalar(0.0))
clip.example(var(5), None, _scalar(0.3), special_points=(0.3,))
clip.example(var(2, 2), _scalar(0.0), _scalar(6.0), special_points=(6.0,))


# ---- Sigmoid and Tanh: S-shaped, chord slope with the stationary points of f(z) - a z ----------------

def _sigmoid_stationary(a: torch.Tensor) -> list[torch.Tensor]:
    # sigma'(z) = s(1-s) = a  ->  s = (1 + sqrt(1-4a))/2, z = +-logit(s); no solution if a > 1/4
    s = (1 + torch.sqrt((1 - 4 * a).clamp(min=0))) / 2
    z = torch.log(s.clamp(max=1 - 1e-15) / (1 - s).clamp(min=1e-15))
    return [z, -z]


def _tanh_stationary(a: torch.Tensor) -> list[torch.Tensor]:
    # tanh'(z) = 1 - t^2 = a  ->  z = +-atanh(sqrt(1-a)); no solution if a > 1
    t = torch.sqrt((1 - a).clamp(min=0)).clamp(max=1 - 1e-15)
    z = torch.atanh(t)
    return [z, -z]


def _define_s_shaped(op_type: str, f, derivative, stationary, *fx_targets, eval_absolute: float = 0.0):
    """An S-shaped activation: chord slope, offsets through the stationary points of f - a z.

    With ``relu_relaxation="alpha"`` the lower and the upper line are free (optimised from
    the chord), each with the tightest offset for its slope: a tangent line where the
    extreme of ``f - a z`` is a stationary point (the tangent point parametrised by its
    slope), the line through an end where it is not. Slopes range over the values ``f'``
    takes on ``[l, u]`` (``f'`` is even and decreasing in ``|z|``: from ``min(f'(l), f'(u))``
    to ``f'`` at the point of ``[l, u]`` nearest 0). ``eval_absolute``: see
    :meth:`~dualgraph.op_registry.OpDefinition.relaxation`."""
    op = define_op(op_type)
    op.evaluate(lambda node, inputs: f(inputs[0]))

    @op.relaxation(linear_if=lambda config: config.relu_relaxation != "alpha", eval_absolute=eval_absolute)
    def relax(node, b: Bounds, config) -> Relaxation:
        return chord_relaxation(b, f, stationary=stationary, free_slopes=derivative_range(config, b, derivative, 0.0))

    op.onnx_import(onnx_elementwise)
    op.fx_lowering(*fx_targets)(fx_unary(op_type))
    op.example(var(6))
    return op


def _sigmoid_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


# onnxruntime's float32 Sigmoid is a vectorised approximation off by up to 1.7e-7 absolute (2.8 u at
# 2^-24; 0 where the value is near 0): 8 u declared (tests/test_float_soundness.py measures it)
sigmoid = _define_s_shaped("Sigmoid", torch.sigmoid, _sigmoid_derivative, _sigmoid_stationary, nn.Sigmoid, F.sigmoid,
                           torch.sigmoid, "sigmoid", eval_absolute=8.0)
tanh = _define_s_shaped("Tanh", torch.tanh, _tanh_derivative, _tanh_stationary, nn.Tanh, F.tanh, torch.tanh, "tanh")


@sigmoid.fx_lowering(nn.SiLU, F.silu)
def _(lo, call: Call):
    """SiLU as its ONNX export writes it: ``x * sigmoid(x)`` (a product of two variables)."""
    x = lo.var(call.arg(0, "input"))
    return lo.emit("Mul", [x, lo.emit("Sigmoid", [x], hint=f"{lo.node_name}_sigmoid")])


# ---- Softmax ---------------------------------------------------------------------------------------------

softmax = define_op("Softmax")


@softmax.evaluate
def _(node, inputs):
    x = inputs[0]
    return torch.softmax(x, dim=node_axis(int(node.attrs.get("axis", -1)), x.dim(), node))


def _softmax_pieces(node, b: Bounds):
    """The relaxations that make up softmax's, from the bounds of ``x`` (the softmax axis last).

    ``y_k = e_k r`` with ``e_k = exp(x_k - m)`` (``m = max_k u_k``, so ``e <= 1``: no overflow),
    ``s = sum_k e_k`` and ``r = 1 / s``; each factor has interval bounds from ``[l, u]``:
    ``e`` in ``[E_l, E_u]``, ``s`` in ``[S_l, S_u]``, ``r`` in ``[1/S_u, 1/S_l]``; ``e`` and ``r``
    have parallel-line relaxations (exp in ``x - m``, reciprocal in ``s``), and the product
    ``e r`` is within ``(e - c_e)(r - c_r)``, at most ``w_e w_r / 4``, of
    ``c_r e + c_e r - c_e c_r`` (``c`` the midpoints, ``w`` the widths).

    ``ok`` marks the groups where all of this is finite; elsewhere (``S_l`` underflows when every
    ``l_k`` lies far below ``m``) the rule falls back to ``0 <= y <= 1``."""
    axis = node_axis(int(node.attrs.get("axis", -1)), b.lower.dim(), node)
    l, u = b.lower.movedim(axis, -1), b.upper.movedim(axis, -1)
    m = u.amax(-1, keepdim=True)
    e = chord_relaxation(Bounds(l - m, u - m), torch.exp, stationary=lambda a: [torch.log(a.clamp(min=1e-300))])
    e_lo, e_hi = torch.exp(l - m), torch.exp(u - m)
    s_lo, s_hi = e_lo.sum(-1, keepdim=True), e_hi.sum(-1, keepdim=True)
    ok = (s_lo > torch.finfo(s_lo.dtype).tiny * 1e6) & torch.isfinite(m)
    s_lo, s_hi = torch.where(ok, s_lo, 1.0), torch.where(ok, s_hi, 1.0)   # placeholders where not ok
    r = chord_relaxation(Bounds(s_lo, s_hi), torch.reciprocal,
                         stationary=lambda a: [1 / torch.sqrt((-a).clamp(min=1e-300))])
    r_lo, r_hi = 1 / s_hi, 1 / s_lo
    pieces = {"axis": axis, "ok": ok, "m": torch.where(ok, m, 0.0), "a_e": e.a_lo, "a_r": r.a_lo, "c_e": (e_lo + e_hi) / 2, "w_e": e_hi - e_lo,
              "c_r": (r_lo + r_hi) / 2, "w_r": r_hi - r_lo}
    for name, rel in (("e", e), ("r", r)):
        pieces[f"mid_{name}"], pieces[f"gap_{name}"] = rel.mid_gap()
    for name in ("a_e", "a_r", "c_e", "w_e", "c_r", "w_r", "mid_e", "gap_e", "mid_r", "gap_r"):
        pieces[name] = torch.where(ok, pieces[name], 0.0)  # no NaN from the placeholders
    return pieces


@softmax.dual
class SoftmaxDual(DualRule):
    """Softmax as ``exp``, a sum, a reciprocal and a product, each relaxed by parallel lines
    (:func:`_softmax_pieces`), composed backward: a linear dual layer. With ``lam`` on ``y``:
    ``mu = lam c_r`` on ``e``, ``rho = sum_k lam_k c_e,k`` on ``r``, ``nu = mu + rho a_r`` on ``e``
    (through ``s``), ``lam_x = nu a_e``; the offsets are ``T -/+ A`` with
    ``T = sum(-lam c_e c_r + nu (mid_e - a_e m)) + rho mid_r`` and
    ``A = sum(|lam| w_e w_r / 4 + |nu| gap_e) + |rho| gap_r``."""

    needs_bounds = True

    def linear(self, node, config) -> bool:
        return True

    def backward(self, node, lam, bounds, config):
        p = _softmax_pieces(node, bounds[0])
        lam_t = lam.movedim(p["axis"] + 1, -1)
        per = {k: v.unsqueeze(1) for k, v in p.items() if k != "axis"}   # broadcast over the rows
        rho = (lam_t * per["c_e"]).sum(-1, keepdim=True)
        nu = lam_t * per["c_r"] + rho * per["a_r"]
        lam_x = (nu * per["a_e"]).movedim(-1, p["axis"] + 1)

        def total(t):
            return t.flatten(2).sum(-1)
        ok = per["ok"]
        linear = total(torch.where(ok, -lam_t * per["c_e"] * per["c_r"] + nu * (per["mid_e"] - per["a_e"] * per["m"]),
                                   lam_t / 2)) + total(rho * per["mid_r"])          # not ok: y in 1/2 -/+ 1/2
        absolute = total(torch.where(ok, lam_t.abs() * per["w_e"] * per["w_r"] / 4 + nu.abs() * per["gap_e"],
                                     lam_t.abs() / 2)) + total(rho.abs() * per["gap_r"])
        return DualStep([lam_x], linear - absolute, linear + absolute)

    # rounding facts of the composite map x -> y: A = c_r a_e (own unit) + c_e |a_r| a_e (every unit)
    def abs_linear(self, node, xs, bounds, config):
        p = _softmax_pieces(node, bounds[0])
        x = xs[0].movedim(p["axis"], -1)
        spread = p["c_r"] * p["a_e"] * x + p["c_e"] * p["a_r"].abs() * (p["a_e"] * x).sum(-1, keepdim=True)
        return [spread.movedim(-1, p["axis"])]

    def constant_magnitude(self, node, m_in, bounds, config):
        p = _softmax_pieces(node, bounds[0])
        e_const = (p["mid_e"] - p["a_e"] * p["m"]).abs() + p["gap_e"]
        const = (p["c_e"] * p["c_r"] + p["w_e"] * p["w_r"] / 4 + p["c_e"] * (p["mid_r"].abs() + p["gap_r"])
                 + p["c_r"] * e_const + p["c_e"] * p["a_r"].abs() * e_const.sum(-1, keepdim=True))
        return [torch.where(p["ok"], const, 1.0).movedim(-1, p["axis"])]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        return [torch.ones_like(terms[0])]  # a probability

    def eval_length(self, node, bounds, config):
        return node.inputs[0].unit_shape[node_axis(int(node.attrs.get("axis", -1)), len(node.inputs[0].shape), node) - 1] + 8

    def dual_length(self, node, bounds, config):
        return 2 * node.output.numel + 8


@softmax.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axis = ctx.axis(n, int(n.attrs.get("axis", -1 if ctx.opset >= 13 else 1)), x.rank)
    if ctx.opset < 13 and math.prod(x.onnx_shape()[axis + 1:]) != 1:
        raise DualgraphError(f"node '{n.name}' (Softmax, opset {ctx.opset}) normalises over several axes; "
                             "only a softmax over one axis is supported")
    if not x.added and axis == 0:
        x = ctx.to_added(n, x)
    return ctx.emit(n, "Softmax", [x.value], {"axis": axis + x.added}, x.added, n.outs)


def _lower_softmax(lo, x: Any, dim: Any):
    x = lo.var(x)
    if dim is None:
        raise Unsupported("softmax needs an explicit dim")
    return lo.emit("Softmax", [x], {"axis": lo.axis(x, dim)})


@softmax.fx_lowering(nn.Softmax)
def _(lo, call: Call):
    return _lower_softmax(lo, call.arg(0, "input"), call.module.dim)


@softmax.fx_lowering(F.softmax, torch.softmax, "softmax")
def _(lo, call: Call):
    if call.kwargs.get("dtype") is not None:
        raise Unsupported("softmax with dtype=")
    return _lower_softmax(lo, call.arg(0, "input"), call.arg(1, "dim", None))


softmax.example(var(5), attrs={"axis": 1})
softmax.example(var(2, 3), attrs={"axis": -1})
softmax.example(var(3, 2), attrs={"axis": 1})
