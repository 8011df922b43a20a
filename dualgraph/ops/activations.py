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

from ..dual_registry import Bounds, Relaxation, const_args
from ..errors import DualgraphError
from ..lowering import Call, Unsupported
from ..op_registry import define_op, var
from .common import chord_relaxation, crossing, fx_unary, node_axis, onnx_elementwise

# ---- Relu --------------------------------------------------------------------------------------------

relu = define_op("Relu")
relu.evaluate(lambda node, inputs: torch.relu(inputs[0]))


@relu.relaxation(linear_if=lambda config: config.relu_relaxation == "paper", breakpoints=lambda node: (0.0,),
                 eval_roundings=0)
def relu_relaxation(node, b: Bounds, config) -> Relaxation:
    """Corollary 2: slope ``d = u/(u-l)`` on the crossing set, 0 / 1 on the stable sets.

    Upper line ``d (z - l)``; the lower line is ``d z`` (the paper: a linear dual layer) or, with
    ``relu_relaxation="crown"``, ``a z`` with ``a = 1 if u > -l else 0`` (any ``a`` in [0,1]
    is valid).
    """
    l, u = b
    cross = crossing(b)
    d = torch.where(cross, u / torch.where(cross, u - l, 1.0), (l >= 0).to(l.dtype))
    b_up = torch.where(cross, -d * l, 0.0)
    if config.relu_relaxation == "paper":
        return Relaxation(d, 0.0, d, b_up)
    a_lo = torch.where(cross, (u > -l).to(l.dtype), d)
    return Relaxation(a_lo, 0.0, d, b_up)


relu.onnx_import(onnx_elementwise)
relu.fx_lowering(nn.ReLU, F.relu, torch.relu, "relu")(fx_unary("Relu"))
relu.example(var(5))
relu.example(var(2, 3, 3))


# ---- LeakyRelu ---------------------------------------------------------------------------------------

leaky_relu = define_op("LeakyRelu")
leaky_relu.evaluate(lambda node, inputs: F.leaky_relu(inputs[0], float(node.attrs.get("alpha", 0.01))))


# alpha > 1 takes the chord relaxation, which depends on l and u: no bound-free pieces then
@leaky_relu.relaxation(linear_if=lambda config: True, eval_roundings=1,
                       breakpoints=lambda node: (0.0,) if float(node.attrs.get("alpha", 0.01)) <= 1 else None)
def leaky_relu_relaxation(node, b: Bounds, config) -> Relaxation:
    """Chord slope ``s`` on crossing units; ``s z`` is below f (alpha <= s <= 1), the chord above."""
    alpha = float(node.attrs.get("alpha", 0.01))
    if alpha > 1:
        return chord_relaxation(b, lambda z: F.leaky_relu(z, alpha), breakpoints=(0.0,))
    l, u = b
    cross = crossing(b)
    s = torch.where(cross, (u - alpha * l) / torch.where(cross, u - l, 1.0),
                    torch.where(l >= 0, torch.ones_like(l), torch.full_like(l, alpha)))  # alpha in l's precision
    return Relaxation(s, 0.0, s, torch.where(cross, l * (alpha - s), 0.0))


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


@clip.relaxation(linear_if=lambda config: True, eval_roundings=0)
def clip_relaxation(node, b: Bounds, config) -> Relaxation:
    """Piecewise linear with breakpoints at ``min`` and ``max``: the chord relaxation."""
    lo_v, hi_v = _clip_limits(node, const_args(node, b.lower))
    lo = float(lo_v) if lo_v is not None else -math.inf
    hi = float(hi_v) if hi_v is not None else math.inf
    bps = tuple(p for p in (lo, hi) if math.isfinite(p))
    return chord_relaxation(b, lambda z: z.clamp(min=lo, max=hi), breakpoints=bps)


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


def _define_s_shaped(op_type: str, f, stationary, *fx_targets):
    """An S-shaped activation: chord slope, offsets through the stationary points of f - a z."""
    op = define_op(op_type)
    op.evaluate(lambda node, inputs: f(inputs[0]))
    op.relaxation(linear_if=lambda config: True)(
        lambda node, b, config: chord_relaxation(b, f, stationary=stationary))
    op.onnx_import(onnx_elementwise)
    op.fx_lowering(*fx_targets)(fx_unary(op_type))
    op.example(var(6))
    return op


sigmoid = _define_s_shaped("Sigmoid", torch.sigmoid, _sigmoid_stationary, nn.Sigmoid, F.sigmoid, torch.sigmoid,
                           "sigmoid")
tanh = _define_s_shaped("Tanh", torch.tanh, _tanh_stationary, nn.Tanh, F.tanh, torch.tanh, "tanh")


# ---- Softmax (evaluation only) -------------------------------------------------------------------------

softmax = define_op("Softmax")


@softmax.evaluate
def _(node, inputs):
    x = inputs[0]
    return torch.softmax(x, dim=node_axis(int(node.attrs.get("axis", -1)), x.dim(), node))


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
