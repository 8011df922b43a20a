"""Affine layers: Gemm, MatMul, Conv, BatchNormalization (exact dual layers, Corollary 1).

Each op is defined once: evaluation (ONNX semantics), dual layer (the adjoint ``A^T``; the
bias term comes from evaluating at zero), ONNX import, torch.fx lowering, checker examples.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import AffineRule, DualStep, const_args
from ..errors import DualgraphError, UnsupportedOpError
from ..lowering import PAD_MODES, Call, Const, Missing, Ref, Unsupported, Var, ntuple
from ..ir import Value
from ..linalg import batched_dot, conv_transpose2d
from ..op_registry import SAME, define_op, random_const, var
from .common import (CONV_FUNCTIONS, ElementwiseAffineDual, conv_pads, offset_dot_length, require_const,
                     spatial_rank, sum_to_unit, torch_pad, window)

# ---- Gemm: Y = alpha * A' B' + beta * C ------------------------------------------------------------

gemm = define_op("Gemm")


@gemm.evaluate
def _(node, inputs):
    a, b, c = (list(inputs) + [None, None])[:3]
    if node.attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    if node.attrs.get("transB", 0):
        b = b.transpose(-1, -2)
    y = a @ b
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        beta = float(node.attrs.get("beta", 1.0))
        y = y + (c if beta == 1.0 else beta * c)
    return y


@gemm.dual
class GemmDual(AffineRule):
    """With variable A: ``lam_A = alpha * lam B'^T`` (transposed if transA)."""

    bias_slot = 2
    sums_into_next_add = True

    def transpose(self, node, lam_rows):
        require_const(node, 1, 2)
        w = const_args(node, lam_rows)[1]
        if node.attrs.get("transB", 0):
            w = w.t()
        alpha = float(node.attrs.get("alpha", 1.0))
        g = lam_rows @ (w.t() if alpha == 1.0 else w.t() * alpha)  # no copy of W per pass when alpha is 1
        return [g.t() if node.attrs.get("transA", 0) else g]

    def abs_linear(self, node, xs, bounds, config):
        if node.attrs.get("transA", 0):
            return self._abs_jacobian(node, xs)
        w = const_args(node, xs[0])[1].abs()
        return [xs[0] @ (w.t() if node.attrs.get("transB", 0) else w) * abs(float(node.attrs.get("alpha", 1.0)))]

    def eval_length(self, node, bounds, config):
        w = node.inputs[1].const
        return w.shape[1 if node.attrs.get("transB", 0) else 0] + 3  # K products, then alpha, beta * C

    def evaluation_gain(self, node):
        """``alpha (A B)``: the product before ``alpha`` is ``T / |alpha|``, and its errors are
        scaled by ``|alpha|``."""
        alpha = abs(float(node.attrs.get("alpha", 1.0)))
        return max(alpha, 1 / alpha) if alpha not in (0.0, 1.0) else 1.0

    def dual_length(self, node, bounds, config):
        return node.output.numel + 2  # the adjoint sums over the outputs; so does lam . bias


@gemm.onnx_import
def _(ctx, n):
    a, b = n.ins[0], n.ins[1]
    c = n.ins[2] if len(n.ins) > 2 else None
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    trans_a, trans_b = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    if isinstance(a, Var) and isinstance(b, Const) and not isinstance(c, Var) and not trans_a:
        x = a
        if x.added and x.onnx_shape()[0] == 1:
            x = ctx.to_native(n, x)
        if not x.added:  # the common case: x @ op(W) + C with one example per row
            attrs = {"alpha": alpha, "beta": beta, "transA": 0, "transB": trans_b}
            inputs = [x.value, ctx.const_input(n, 1), ctx.const_input(n, 2) if c is not None else None]
            return ctx.emit(n, "Gemm", inputs if c is not None else inputs[:2], attrs, False, n.outs)

    # Otherwise lower to MatMul (+ Add): y = alpha * op(A) @ op(B) + beta * C.
    def op_of(ref: Ref, trans: int) -> Ref:
        if not trans:
            return ref
        if isinstance(ref, Const):
            return ref.map(lambda t: t.T.copy())
        return ctx.transpose(n, ref, [1, 0], None)
    a, b = op_of(a, trans_a), op_of(b, trans_b)
    if alpha != 1.0 and isinstance(b, Const):
        b = b.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    elif alpha != 1.0 and isinstance(a, Const):
        a = a.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    scale_after = alpha != 1.0 and isinstance(a, Var) and isinstance(b, Var)
    y = ctx.matmul(n, a, b, n.outs if c is None and not scale_after else None)
    if scale_after:
        y = ctx.binary(n, "Mul", y, Const.of(np.asarray(alpha, dtype=np.float32)), n.outs if c is None else None)
    if c is None:
        return [y]
    if isinstance(c, Const):
        c = c.map(lambda t: t * np.asarray(beta, dtype=t.dtype)) if beta != 1.0 else c
    elif beta != 1.0:
        c = ctx.binary(n, "Mul", c, Const.of(np.asarray(beta, dtype=np.float32)), None)
    return [ctx.binary(n, "Add", y, c, n.outs)]


def _affine(lo, x: Any, weight: Any, bias: Any):
    """``x W^T + b``: Gemm for 2-D inputs, MatMul (+ Add) over the last axis otherwise."""
    x = lo.var(x)
    w = lo.constant(weight, "weight")
    b = lo.constant(bias, "bias")
    if lo.rank(x) == 2:
        return lo.emit("Gemm", [x, w, b], {"transB": 1})
    y = lo.emit("MatMul", [x, lo.transposed(w)], hint=f"{lo.node_name}_matmul")
    return y if b is None else lo.emit("Add", [y, b])


@gemm.fx_lowering(nn.Linear)
def _(lo, call: Call):
    return _affine(lo, call.arg(0, "input"), call.module.weight, call.module.bias)


@gemm.fx_lowering(F.linear)
def _(lo, call: Call):
    return _affine(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None))


gemm.example(var(4), random_const(3, 4, seed=1), random_const(3, seed=2),
             attrs={"transB": 1, "alpha": 0.7, "beta": 1.3})
gemm.example(var(4), random_const(4, 3, seed=3))
gemm.example(var(2), random_const(2, 5, seed=4), random_const(1, 5, seed=5), attrs={"beta": -2.0})


# ---- MatMul with one constant operand ---------------------------------------------------------------

matmul = define_op("MatMul")


@matmul.evaluate
def _(node, inputs):
    return torch.matmul(inputs[0], inputs[1])


def _matrix_planes(bounds):
    """Midpoints and widths of both operands' bounds: ``A B`` lies within
    ``A c_B + c_A B - c_A c_B -/+ (w_A w_B) / 4`` on the box (the midpoint McCormick planes of
    every product term, summed over the contracted axis)."""
    (la, ua), (lb, ub) = bounds
    return (la + ua) / 2, (lb + ub) / 2, ua - la, ub - lb


@matmul.dual
class MatMulDual(AffineRule):
    """``x @ W`` or ``W @ x`` with one constant operand: affine, exact. ``A @ B`` of two
    variables (attention): every product term between the midpoint McCormick planes, a linear
    dual layer ``lam_A = lam c_B^T``, ``lam_B = c_A^T lam``, offsets ``-lam . c_A c_B -/+
    |lam| . w_A w_B / 4``."""

    abs_by_eval = True
    sums_into_next_add = True

    def bounds_needed(self, node) -> bool:
        return all(v is not None and not v.is_const for v in node.inputs[:2])

    def backward(self, node, lam, bounds, config):
        if not self.bounds_needed(node):
            return super().backward(node, lam, bounds, config)
        if len(node.inputs[0].shape) != len(node.inputs[1].shape):
            raise UnsupportedOpError(f"node '{node.name}' (MatMul): a product of two computed tensors of different "
                                     "rank would align the batch with a matrix axis")
        ca, cb, wa, wb = _matrix_planes(bounds)
        lam_a = sum_to_unit(lam @ cb.unsqueeze(1).transpose(-1, -2), node.inputs[0].unit_shape)
        lam_b = sum_to_unit(ca.unsqueeze(1).transpose(-1, -2) @ lam, node.inputs[1].unit_shape)
        linear = -batched_dot(lam, ca @ cb)
        absolute = batched_dot(lam.abs(), (wa @ wb) / 4)
        return DualStep([lam_a, lam_b], linear - absolute, linear + absolute)

    def abs_linear(self, node, xs, bounds, config):
        if not self.bounds_needed(node):
            return super().abs_linear(node, xs, bounds, config)
        ca, cb, _, _ = _matrix_planes(bounds)
        return [xs[0] @ cb.abs() + ca.abs() @ xs[1]]

    def constant_magnitude(self, node, m_in, bounds, config):
        if not self.bounds_needed(node):
            return super().constant_magnitude(node, m_in, bounds, config)
        ca, cb, wa, wb = _matrix_planes(bounds)
        return [ca.abs() @ cb.abs() + (wa @ wb) / 4]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        return [m_in[0] @ m_in[1]] if self.bounds_needed(node) else terms

    def eval_length(self, node, bounds, config):
        if self.bounds_needed(node):
            return node.inputs[0].unit_shape[-1] + 1
        w = next(v.const for v in node.inputs if v.is_const)
        return (w.shape[-2] if node.inputs[1].is_const else w.shape[-1]) + 1  # the contracted axis

    def dual_length(self, node, bounds, config):
        if self.bounds_needed(node):
            return node.output.numel + max(node.inputs[0].unit_shape[-2:]) + max(node.inputs[1].unit_shape[-2:]) + 2
        w = next(v.const for v in node.inputs if v.is_const)
        return (w.shape[-1] if node.inputs[1].is_const else w.shape[-2]) + 1

    def transpose(self, node, lam_rows):
        if node.inputs[0].is_const and not node.inputs[1].is_const:
            return super().transpose(node, lam_rows)  # W @ x: the generic adjoint (W^T applied on the left)
        require_const(node, 1)
        w = const_args(node, lam_rows)[1]
        if w.dim() != 2:
            return super().transpose(node, lam_rows)
        return [lam_rows @ w.t()]


@matmul.onnx_import
def _(ctx, n):
    return [ctx.matmul(n, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


@matmul.fx_lowering(operator.matmul, torch.matmul, torch.mm, "matmul", "mm")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    other = call.arg(1, "other")
    if isinstance(other, Value):  # two computed operands: per-example matrices (attention)
        if lo.rank(x) != lo.rank(other) or lo.rank(x) < 3:
            raise Unsupported("a product of two computed tensors needs matrices per example (same rank >= 3)")
        return lo.emit("MatMul", [x, other])
    # variable @ constant is affine and keeps the batch axis first
    w = lo.constant(other, "right operand of matmul")
    if not isinstance(w, torch.Tensor) or w.dim() < 1:
        raise Unsupported("the right operand must be a constant tensor")
    return lo.emit("MatMul", [x, w])


matmul.example(var(4), random_const(4, 3, seed=6))
matmul.example(var(2, 4), random_const(4, 3, seed=7))
matmul.example(var(2, 3), var(3, 4))
matmul.example(var(3, 3), SAME)
matmul.example(var(2, 2, 3), var(1, 3, 2))   # matrix-batch axes broadcast


# ---- Conv --------------------------------------------------------------------------------------------

conv = define_op("Conv")


@conv.evaluate
def _(node, inputs):
    x, w, b = (list(inputs) + [None])[:3]
    n = spatial_rank(x, node)
    g = window(node, x.shape[2:], w.shape[2:])
    padding: Any = list(g.begins)
    if not g.symmetric:  # torch pads symmetrically; pad asymmetric cases up front
        x, padding = F.pad(x, torch_pad(list(g.begins), list(g.ends))), 0
    return CONV_FUNCTIONS[n](x, w, b, stride=list(g.strides), padding=padding, dilation=list(g.dilations),
                             groups=int(node.attrs.get("group", 1)))


@conv.dual
class ConvDual(AffineRule):
    """Transpose of a 2-D convolution: ``conv_transpose2d`` with the same weights
    (:func:`dualgraph.linalg.conv_transpose2d`: by filter taps for convolutions with few input
    channels, typically the first layer; phase by phase where that pays)."""

    abs_by_eval = True
    bias_slot = 2
    sums_into_next_add = True

    def eval_length(self, node, bounds, config):
        w = node.inputs[1].const
        return w.shape[1] * math.prod(w.shape[2:]) + 1  # c_in / groups * taps, then the bias

    def dual_length(self, node, bounds, config):
        w = node.inputs[1].const
        return max(w.shape[0] * math.prod(w.shape[2:]) + 1, offset_dot_length(self, node))  # c_out * taps

    def transpose(self, node, lam_rows):
        require_const(node, 1, 2)
        w = const_args(node, lam_rows)[1]
        in_hw = node.inputs[0].unit_shape[1:]
        if w.dim() != 4:
            return super().transpose(node, lam_rows)  # 1-D or 3-D: generic adjoint
        g = window(node, in_hw, w.shape[2:])
        if not g.symmetric:
            return super().transpose(node, lam_rows)  # asymmetric padding: generic adjoint
        stride, pads, dil = list(g.strides), list(g.begins), list(g.dilations)
        groups = int(node.attrs.get("group", 1))
        out_hw = lam_rows.shape[2:]
        extra = [in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * pads[i] + dil[i] * (w.shape[2 + i] - 1) + 1)
                 for i in range(2)]
        if any(e < 0 or e >= max(stride[i], dil[i]) for i, e in enumerate(extra)):
            return super().transpose(node, lam_rows)
        return [conv_transpose2d(lam_rows, w, stride, pads, extra, groups, dil)]


@conv.onnx_import
def _(ctx, n):
    x = ctx.to_native(n, ctx.var(n, 0))
    w = ctx.const(n, 1, "the Conv weight")
    spatial = [int(d) for d in x.value.shape[2:]]
    kernel = [int(k) for k in (n.attrs.get("kernel_shape") or ctx.batch_free(n, w).shape[2:])]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": conv_pads(n.attrs, spatial, kernel, f"node '{n.name}' ({n.op})"),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "group": int(n.attrs.get("group", 1))}
    inputs = [x.value, ctx.const_input(n, 1)]
    if len(n.ins) > 2 and n.ins[2] is not None:
        inputs.append(ctx.const_input(n, 2))
    return ctx.emit(n, "Conv", inputs, attrs, False, n.outs)


def _lower_conv(lo, x: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                dilation: Any, groups: Any, padding_mode: str = "zeros"):
    x = lo.var(x)
    w = lo.constant(weight, "weight")
    b = lo.constant(bias, "bias")
    kernel = list(w.shape[2:])
    nd = len(kernel)
    strides, dilations = ntuple(stride, nd), ntuple(dilation, nd)
    if padding == "valid":
        pads = [0] * (2 * nd)
    elif padding == "same":
        # torch pads d*(k-1) in total, the odd unit at the end (right/bottom).
        total = [d * (k - 1) for d, k in zip(dilations, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = ntuple(padding, nd)
        pads = p + p  # ONNX layout: all begins, then all ends
    if padding_mode != "zeros" and any(pads):
        # torch pads explicitly (F.pad with that mode), then convolves without padding.
        spatial = torch.tensor([0, 0, *pads[:nd], 0, 0, *pads[nd:]], dtype=torch.int64)
        x = lo.emit("Pad", [x, spatial], {"mode": PAD_MODES[padding_mode]}, hint=f"{lo.node_name}_pad")
        pads = [0] * (2 * nd)
    return lo.emit("Conv", [x, w, b], {"kernel_shape": kernel, "strides": strides, "pads": pads,
                                       "dilations": dilations, "group": int(groups)})


@conv.fx_lowering(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _(lo, call: Call):
    m = call.module
    if m.padding_mode not in PAD_MODES:
        raise Unsupported(f"padding_mode='{m.padding_mode}'")
    return _lower_conv(lo, call.arg(0, "input"), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                       m.padding_mode)


@conv.fx_lowering(F.conv1d, F.conv2d, F.conv3d)
def _(lo, call: Call):
    return _lower_conv(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None),
                       call.arg(3, "stride", 1), call.arg(4, "padding", 0), call.arg(5, "dilation", 1),
                       call.arg(6, "groups", 1))


conv.example(var(2, 6, 6), random_const(3, 2, 3, 3, seed=8), random_const(3, seed=9),
             attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]})
conv.example(var(2, 7, 7), random_const(2, 2, 2, 2, seed=10), attrs={"dilations": [2, 2]})
conv.example(var(4, 5, 5), random_const(4, 2, 3, 3, seed=11), random_const(4, seed=12),
             attrs={"group": 2, "pads": [1, 1, 1, 1], "strides": [1, 2]})
conv.example(var(2, 4, 4), random_const(2, 1, 2, 2, seed=13), attrs={"group": 2, "pads": [0, 1, 1, 0]})
conv.example(var(1, 6, 6), random_const(1, 1, 3, 3, seed=14), attrs={"strides": [2, 2]})
conv.example(var(1, 5, 5), random_const(2, 1, 2, 2, seed=15), attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"})
conv.example(var(2, 7), random_const(3, 2, 3, seed=16), random_const(3, seed=17),
             attrs={"strides": [2], "pads": [1, 1]})


# ---- BatchNormalization (inference) ------------------------------------------------------------------

batch_norm = define_op("BatchNormalization")


@batch_norm.evaluate
def _(node, inputs):
    x, scale, bias, mean, variance = inputs[:5]
    return F.batch_norm(x, mean, variance, scale, bias, training=False, eps=float(node.attrs.get("epsilon", 1e-5)))


@batch_norm.dual
class BatchNormDual(ElementwiseAffineDual):
    """Inference BatchNorm: with |scale| and |B| its linear part is |scale| / sqrt(var + eps)."""

    def constant_factor(self, node):
        scale, var = node.inputs[1].const, node.inputs[4].const
        return scale / torch.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))

    def constant_magnitude(self, node, m_in, bounds, config):
        """``|B| + |mean s|`` (``s = scale / sqrt(var + eps)``), not ``|B - mean s|``: the
        evaluation forms ``B - mean s`` or ``(x - mean) s``, whose rounding is relative to the
        parts, which may cancel."""
        scale, bias, mean, var = (node.inputs[i].const.to(m_in[0]) for i in range(1, 5))
        s = scale / torch.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        unit = node.output.unit_shape
        per_channel = (bias.abs() + (mean * s).abs()).reshape(-1, *[1] * (len(unit) - 1))
        return [torch.broadcast_to(per_channel, unit).unsqueeze(0)]


@batch_norm.onnx_import
def _(ctx, n):
    if int(n.attrs.get("training_mode", 0)):
        raise DualgraphError(f"node '{n.name}' (BatchNormalization) is in training mode; export the model "
                             "in eval mode")
    x = ctx.to_native(n, ctx.var(n, 0))
    inputs = [x.value] + [ctx.const_input(n, i) for i in range(1, 5)]
    out = ctx.emit(n, "BatchNormalization", inputs, {"epsilon": float(n.attrs.get("epsilon", 1e-5))}, False,
                   n.outs[:1])
    extra = Missing(f"the training outputs of BatchNormalization node '{n.name}' are not supported")
    return out + [extra] * (len(n.outs) - 1)


def _lower_batch_norm(lo, x: Any, mean: Any, variance: Any, weight: Any, bias: Any, eps: float):
    x = lo.var(x)
    mean, variance = lo.constant(mean, "running_mean"), lo.constant(variance, "running_var")
    if mean is None or variance is None:
        raise Unsupported("BatchNorm without running statistics normalises with batch "
                          "statistics, which mixes the examples of a batch")
    weight = torch.ones_like(mean) if weight is None else lo.constant(weight, "weight")
    bias = torch.zeros_like(mean) if bias is None else lo.constant(bias, "bias")
    return lo.emit("BatchNormalization", [x, weight, bias, mean, variance], {"epsilon": float(eps)})


@batch_norm.fx_lowering(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _(lo, call: Call):
    m = call.module  # inference semantics: always the running statistics
    return _lower_batch_norm(lo, call.arg(0, "input"), m.running_mean, m.running_var, m.weight, m.bias, m.eps)


@batch_norm.fx_lowering(F.batch_norm)
def _(lo, call: Call):
    if call.arg(5, "training", False):
        raise Unsupported("training=True uses batch statistics")
    return _lower_batch_norm(lo, call.arg(0, "input"), call.arg(1, "running_mean"), call.arg(2, "running_var"),
                             call.arg(3, "weight", None), call.arg(4, "bias", None), call.arg(7, "eps", 1e-5))


batch_norm.example(var(3, 2, 2), random_const(3, seed=25), random_const(3, seed=26), random_const(3, seed=27),
                   random_const(3, seed=28, positive=True), attrs={"epsilon": 1e-3})
batch_norm.example(var(3), random_const(3, seed=29), random_const(3, seed=30), random_const(3, seed=31),
                   random_const(3, seed=32, positive=True))


# ---- ConvTranspose ------------------------------------------------------------------------------------

conv_transpose = define_op("ConvTranspose")
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _transpose_geometry(attrs, spatial, kernel) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """strides, dilations, pads (begins + ends) and output_padding of an ONNX ConvTranspose,
    ``output_shape`` and ``auto_pad`` resolved to explicit pads (the ONNX formulas)."""
    n = len(kernel)
    strides = [int(s) for s in attrs.get("strides") or [1] * n]
    dilations = [int(d) for d in attrs.get("dilations") or [1] * n]
    extra = [int(p) for p in attrs.get("output_padding") or [0] * n]
    pads = [int(p) for p in attrs.get("pads") or [0] * (2 * n)]
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    wanted = attrs.get("output_shape")
    if wanted is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [int(o) for o in wanted][-n:] if wanted is not None else [int(s) * st for s, st in zip(spatial, strides)]
        begins, ends = [], []
        for i, (size, k, s, d, e, out) in enumerate(zip(spatial, kernel, strides, dilations, extra, wanted)):
            total = s * (int(size) - 1) + e + (k - 1) * d + 1 - out
            if total < 0:  # an output_shape past the full output: more rows at the end, as onnxruntime
                extra[i], total = e - total, 0
            small, big = total // 2, total - total // 2
            # the ONNX spec: the larger half at the end only for SAME_UPPER
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * (2 * n)
    return strides, dilations, pads, extra


@conv_transpose.evaluate
def _(node, inputs):
    x, w, b = (list(inputs) + [None])[:3]
    n = spatial_rank(x, node)
    kernel = list(w.shape[2:])
    strides, dilations, pads, extra = _transpose_geometry(node.attrs, x.shape[2:], kernel)
    full = _CONV_TRANSPOSE[n](x, w, None, stride=strides, groups=int(node.attrs.get("group", 1)), dilation=dilations)
    full = F.pad(full, torch_pad([0] * n, extra))                  # output_padding: rows at the end
    crop = (slice(None), slice(None)) + tuple(slice(pads[i], full.shape[2 + i] - pads[n + i]) for i in range(n))
    y = full[crop]
    return y if b is None else y + b.reshape(1, -1, *([1] * n))


@conv_transpose.dual
class ConvTransposeDual(AffineRule):
    """The adjoint of a transposed convolution (a convolution), by the generic vector-Jacobian product."""

    abs_by_eval = True
    bias_slot = 2

    def eval_length(self, node, bounds, config):
        w = node.inputs[1].const
        return w.shape[0] * math.prod(w.shape[2:]) + 1        # c_in per group * taps, then the bias

    def dual_length(self, node, bounds, config):
        w = node.inputs[1].const
        return max(w.shape[1] * math.prod(w.shape[2:]) + 1, offset_dot_length(self, node))


@conv_transpose.onnx_import
def _(ctx, n):
    x = ctx.to_native(n, ctx.var(n, 0))
    w = ctx.batch_free(n, ctx.const(n, 1, "the ConvTranspose weight"))
    kernel = [int(k) for k in (n.attrs.get("kernel_shape") or w.shape[2:])]
    strides, dilations, pads, extra = _transpose_geometry(n.attrs, [int(d) for d in x.value.shape[2:]], kernel)
    attrs = {"strides": strides, "dilations": dilations, "pads": pads, "output_padding": extra,
             "group": int(n.attrs.get("group", 1))}
    inputs = [x.value, ctx.const_input(n, 1)]
    if len(n.ins) > 2 and n.ins[2] is not None:
        inputs.append(ctx.const_input(n, 2))
    return ctx.emit(n, "ConvTranspose", inputs, attrs, False, n.outs)


@conv_transpose.fx_lowering(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _(lo, call: Call):
    m = call.module
    if m.padding_mode != "zeros":
        raise Unsupported(f"padding_mode='{m.padding_mode}'")
    nd = len(m.kernel_size)
    p = ntuple(m.padding, nd)
    attrs = {"strides": ntuple(m.stride, nd), "dilations": ntuple(m.dilation, nd), "pads": p + p,
             "output_padding": ntuple(m.output_padding, nd), "group": int(m.groups)}
    return lo.emit("ConvTranspose", [lo.var(call.arg(0, "input")), lo.constant(m.weight, "weight"),
                                     lo.constant(m.bias, "bias")], attrs)


conv_transpose.example(var(2, 3, 3), random_const(2, 3, 3, 3, seed=41), random_const(3, seed=42),
                       attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]})
conv_transpose.example(var(2, 4), random_const(2, 1, 3, seed=43), attrs={"strides": [2], "pads": [0, 1],
                                                                         "group": 2})
conv_transpose.example(var(1, 3, 3), random_const(1, 2, 2, 2, seed=44), attrs={"dilations": [2, 1]})
