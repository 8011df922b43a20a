"""LayerNormalization: ``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` over the
trailing axes from ``axis`` on.

One composite dual layer, not a chain of primitive ones: written out as ops, ``sqrt`` would
need a lower bound of the variance above ``-eps``, which bounds propagated through the
squares need not give. Inside one rule the facts the composition knows hold by construction:
with ``d = x - mean(x)`` (exact, linear), every ``d_k`` has interval bounds from ``[l, u]``
(centre and radius through the centring map), so ``d_k^2`` has bounds ``>= 0``, the variance
``v = mean(d^2)`` lies in ``[v_lo, v_hi]`` with ``v_lo >= 0``, and ``r = 1 / sqrt(v + eps)`` in
``[r_lo, r_hi]``. Each nonlinear piece gets parallel bounding lines: the square in ``d``
(slope ``l_d + u_d``), ``r`` in ``v`` (the chord of a convex decreasing function) and the
product ``y_k = d_k r`` (within ``|d_k - c_d| |r - c_r| <= w_d w_r / 4`` of
``c_r d_k + c_d r - c_d c_r``). Composed backward they form one linear dual layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import Bounds, DualRule, DualStep
from ..errors import DualgraphError
from ..lowering import Call, Missing, Unsupported
from ..op_registry import define_op, random_const, var
from .common import chord_relaxation, example_axis

layer_norm = define_op("LayerNormalization")


def _normalized_axes(node, rank: int) -> int:
    axis = example_axis(int(node.attrs.get("axis", -1)), rank, node, "normalises over")
    return axis


@layer_norm.evaluate
def _(node, inputs):
    x, scale, bias = (list(inputs) + [None, None])[:3]
    axis = _normalized_axes(node, x.dim())
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, float(node.attrs.get("epsilon", 1e-5)))


def _pieces(node, b: Bounds, like: torch.Tensor) -> dict:
    """Interval facts and parallel-line relaxations of one LayerNormalization (see the module
    docstring); tensors are ``[B, G, K]``: groups of the ``K`` normalised entries."""
    axis = _normalized_axes(node, b.lower.dim())
    lead = b.lower.shape[:axis]
    l, u = (t.reshape(*lead[:1], -1, math.prod(b.lower.shape[axis:])) for t in b)   # [B, G, K]
    k = l.shape[-1]
    centre, radius = (l + u) / 2, (u - l) / 2
    c_d = centre - centre.mean(-1, keepdim=True)                   # d = (I - 11^T / K) x
    r_d = radius * (1 - 2 / k) + radius.sum(-1, keepdim=True) / k  # |I - 11^T / K| radius
    d_lo, d_hi = c_d - r_d, c_d + r_d
    q_lo = torch.where((d_lo <= 0) & (d_hi >= 0), torch.zeros_like(d_lo), torch.minimum(d_lo ** 2, d_hi ** 2))
    q_hi = torch.maximum(d_lo ** 2, d_hi ** 2)
    eps = float(node.attrs.get("epsilon", 1e-5))
    v_lo, v_hi = q_lo.mean(-1, keepdim=True) + eps, q_hi.mean(-1, keepdim=True) + eps   # v + eps > 0
    square = chord_relaxation(Bounds(d_lo, d_hi), torch.square, stationary=lambda a: [a / 2])
    inv_sqrt = chord_relaxation(Bounds(v_lo, v_hi), torch.rsqrt,
                                stationary=lambda a: [((-2 * a).clamp(min=1e-300)) ** (-2 / 3)])
    r_lo, r_hi = torch.rsqrt(v_hi), torch.rsqrt(v_lo)
    p = {"axis": axis, "k": k, "c_d": c_d, "w_d": d_hi - d_lo, "c_r": (r_lo + r_hi) / 2, "w_r": r_hi - r_lo,
         "a_q": square.a_lo, "a_r": inv_sqrt.a_lo}
    p["mid_q"], p["gap_q"] = square.mid_gap()
    p["mid_r"], p["gap_r"] = inv_sqrt.mid_gap()
    p["mid_r"] = p["mid_r"] + p["a_r"] * eps  # r's lines are in v + eps; the composition feeds v = mean(q)
    scale, bias = (node.const_input(i).to(like).reshape(1, 1, k) if i < len(node.inputs) and node.inputs[i] is not None
                   else None for i in (1, 2))
    p["scale"] = scale if scale is not None else torch.ones(1, 1, k, dtype=like.dtype, device=like.device)
    p["bias"] = bias
    return p


@layer_norm.dual
class LayerNormDual(DualRule):
    """With ``lam`` on ``y`` (grouped ``[b, M, B, G, K]``): ``lam_y = lam scale``; ``mu = lam_y c_r``
    on ``d``; ``rho = sum_k lam_y c_d`` on ``r``; through ``r = a_r v + ...`` and
    ``v = mean(q)``, ``q_k = a_q d_k + ...``: ``nu = mu + rho a_r a_q / K`` on ``d``; and
    ``lam_x = nu - mean(nu)`` (the centring map is symmetric). Offsets ``T -/+ A`` collect the
    midpoints and half-gaps of every piece and ``lam . bias``."""

    needs_bounds = True

    def linear(self, node, config) -> bool:
        return True

    def backward(self, node, lam, bounds, config):
        p = _pieces(node, bounds[0], lam)
        b, m = lam.shape[:2]
        lam_y = lam.reshape(b, m, *p["c_d"].shape[1:])                                # [b, M, G, K]
        per = {name: t.unsqueeze(1) for name, t in p.items() if torch.is_tensor(t)}    # over the rows
        offset = 0.0
        if p["bias"] is not None:
            offset = (lam_y * per["bias"]).flatten(2).sum(-1)
        lam_y = lam_y * per["scale"]
        rho = (lam_y * per["c_d"]).sum(-1, keepdim=True)
        nu = lam_y * per["c_r"] + rho * per["a_r"] * per["a_q"] / p["k"]
        lam_x = (nu - nu.mean(-1, keepdim=True)).reshape(nu.shape[0], *lam.shape[1:])  # rows per example now

        def total(t):
            return t.flatten(2).sum(-1)
        linear = offset + total(-lam_y * per["c_d"] * per["c_r"]) + total(rho * per["mid_r"]) \
            + total(rho * per["a_r"] * per["mid_q"] / p["k"])
        absolute = total(lam_y.abs() * per["w_d"] * per["w_r"] / 4) + total(rho.abs() * per["gap_r"]) \
            + total((rho * per["a_r"]).abs() * per["gap_q"] / p["k"])
        return DualStep([lam_x], linear - absolute, linear + absolute)

    # rounding facts of the composite map y = scale (c_r d + c_d a_r mean(a_q d)), d = C x with
    # C = I - 11^T / K: |A| x = |scale| (c_r |C| x + |c_d| |a_r| mean(|a_q| |C| x))
    def abs_linear(self, node, xs, bounds, config):
        p = _pieces(node, bounds[0], xs[0])
        x = xs[0].reshape(p["c_d"].shape)
        k = p["k"]
        cx = x * abs(1 - 2 / k) + x.sum(-1, keepdim=True) / k            # |C| x (entries |1 - 1/K|, 1/K)
        spread = p["c_r"] * cx + p["c_d"].abs() * p["a_r"].abs() * (p["a_q"].abs() * cx).mean(-1, keepdim=True)
        return [(p["scale"].abs() * spread).reshape(xs[0].shape)]

    def constant_magnitude(self, node, m_in, bounds, config):
        p = _pieces(node, bounds[0], bounds[0].lower)
        const = p["scale"].abs() * (p["c_d"].abs() * p["c_r"] + p["w_d"] * p["w_r"] / 4
                                    + p["c_d"].abs() * (p["mid_r"].abs() + p["gap_r"]
                                                        + p["a_r"].abs() * (p["mid_q"].abs() + p["gap_q"]).mean(-1, keepdim=True)))
        if p["bias"] is not None:
            const = const + p["bias"].abs()
        return [const.reshape(bounds[0].lower.shape)]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        """``|y_k| <= |scale_k| sqrt(K - 1) + |bias_k|``: a normalised vector has norm sqrt(K), and
        no entry can take more of it than the others' mean allows (whatever the input)."""
        p = _pieces(node, bounds[0], bounds[0].lower)
        bound = p["scale"].abs() * math.sqrt(max(p["k"] - 1, 1))
        if p["bias"] is not None:
            bound = bound + p["bias"].abs()
        rows, groups = terms[0].shape[0], p["c_d"].shape[1]
        return [torch.minimum(terms[0], bound.expand(rows, groups, p["k"]).reshape(terms[0].shape))]

    def eval_length(self, node, bounds, config):
        return 2 * math.prod(node.inputs[0].unit_shape[_normalized_axes(node, len(node.inputs[0].shape)) - 1:]) + 8

    def dual_length(self, node, bounds, config):
        return 2 * node.output.numel + 8


@layer_norm.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axis = ctx.axis(n, int(n.attrs.get("axis", -1)), x.rank)
    if not x.added and axis == 0:
        raise DualgraphError(f"node '{n.name}' (LayerNormalization) normalises over the batch axis")
    inputs = [x.value] + [ctx.const_input(n, i) if i < len(n.ins) and n.ins[i] is not None else None for i in (1, 2)]
    while inputs[-1] is None:
        inputs.pop()
    attrs = {"axis": axis + x.added, "epsilon": float(n.attrs.get("epsilon", 1e-5))}
    outs = ctx.emit(n, "LayerNormalization", inputs, attrs, x.added, n.outs[:1])
    extra = Missing(f"the mean and inverse standard deviation outputs of LayerNormalization node '{n.name}' are "
                    "not supported")
    return outs + [extra] * (len(n.outs) - 1)


@layer_norm.fx_lowering(nn.LayerNorm)
def _(lo, call: Call):
    m = call.module
    x = lo.var(call.arg(0, "input"))
    axis = lo.rank(x) - len(m.normalized_shape)
    if axis < 1:
        raise Unsupported("normalising over the batch axis")
    inputs = [x, lo.constant(m.weight, "weight"), lo.constant(m.bias, "bias")] if m.elementwise_affine else [x]
    return lo.emit("LayerNormalization", inputs, {"axis": axis, "epsilon": float(m.eps)})


layer_norm.example(var(5), random_const(5, seed=50), random_const(5, seed=51), attrs={"axis": 1})
layer_norm.example(var(3, 4), random_const(4, seed=52), attrs={"axis": -1, "epsilon": 1e-3})
layer_norm.example(var(2, 2, 3), attrs={"axis": 2})


@layer_norm.fx_lowering(F.layer_norm)
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    shape = call.arg(1, "normalized_shape")
    shape = [shape] if isinstance(shape, int) else list(shape)
    axis = lo.rank(x) - len(shape)
    if axis < 1:
        raise Unsupported("normalising over the batch axis")
    weight, bias = call.arg(2, "weight", None), call.arg(3, "bias", None)
    inputs = [x, None if weight is None else lo.constant(weight, "weight"),
              None if bias is None else lo.constant(bias, "bias")]
    if inputs[1] is None and inputs[2] is not None:
        inputs[1] = torch.ones(shape)
    return lo.emit("LayerNormalization", inputs, {"axis": axis, "epsilon": float(call.arg(4, "eps", 1e-5))})
