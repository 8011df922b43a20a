"""Lowering rules of the torch.fx frontend: layers, activations, pooling, arithmetic.

Each rule is registered with :func:`dualgraph.frontends.fx_lowering.lowers` for the layer types,
functions and Tensor method names it lowers; shape and indexing rules are in
:mod:`dualgraph.frontends.fx_shape_rules`. Importing :mod:`dualgraph.frontends.fx` imports both.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgraph.ir import Value
from dualgraph.frontends.fx_lowering import (PAD_MODES, Rule, Call, Lowering, ntuple, reshape_to,
                                   Unsupported, lowers)


# ---- linear layers --------------------------------------------------------------------

def _affine(lo: Lowering, x: Any, weight: Any, bias: Any) -> Value:
    """``x W^T + b``: Gemm for 2-D inputs, MatMul (+ Add) over the last axis otherwise."""
    x = lo.var(x)
    w = lo.constant(weight, "weight")
    b = lo.constant(bias, "bias")
    if lo.rank(x) == 2:
        return lo.emit("Gemm", [x, w, b], {"transB": 1})
    y = lo.emit("MatMul", [x, w.t().contiguous()], hint=f"{lo._node.name}_matmul")
    return y if b is None else lo.emit("Add", [y, b])


@lowers(nn.Linear)
def _linear_module(lo: Lowering, call: Call) -> Value:
    return _affine(lo, call.arg(0, "input"), call.module.weight, call.module.bias)


@lowers(F.linear)
def _linear_function(lo: Lowering, call: Call) -> Value:
    return _affine(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None))


@lowers(operator.matmul, torch.matmul, torch.mm, "matmul", "mm")
def _matmul(lo: Lowering, call: Call) -> Value:
    # Only variable @ constant is affine and keeps the batch axis first.
    x = lo.var(call.arg(0, "input"))
    w = lo.constant(call.arg(1, "other"), "right operand of matmul")
    if not isinstance(w, torch.Tensor) or w.dim() < 1:
        raise Unsupported("the right operand must be a constant tensor")
    return lo.emit("MatMul", [x, w])


def _conv(lo: Lowering, x: Any, weight: Any, bias: Any, stride: Any, padding: Any,
          dilation: Any, groups: Any, padding_mode: str = "zeros") -> Value:
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
        x = lo.emit("Pad", [x, spatial], {"mode": PAD_MODES[padding_mode]}, hint=f"{lo._node.name}_pad")
        pads = [0] * (2 * nd)
    return lo.emit("Conv", [x, w, b], {"kernel_shape": kernel, "strides": strides, "pads": pads,
                                       "dilations": dilations, "group": int(groups)})


@lowers(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(lo: Lowering, call: Call) -> Value:
    m = call.module
    if m.padding_mode not in PAD_MODES:
        raise Unsupported(f"padding_mode='{m.padding_mode}'")
    return _conv(lo, call.arg(0, "input"), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                 m.padding_mode)


@lowers(F.conv1d, F.conv2d, F.conv3d)
def _conv_function(lo: Lowering, call: Call) -> Value:
    return _conv(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None),
                 call.arg(3, "stride", 1), call.arg(4, "padding", 0), call.arg(5, "dilation", 1),
                 call.arg(6, "groups", 1))


# ---- activations ----------------------------------------------------------------------

def _unary(op_type: str) -> Rule:
    def rule(lo: Lowering, call: Call) -> Value:
        return lo.emit(op_type, [lo.var(call.arg(0, "input"))])
    rule.__name__ = f"_{op_type.lower()}"
    return rule


lowers(nn.ReLU, F.relu, torch.relu, "relu")(_unary("Relu"))
lowers(nn.Sigmoid, F.sigmoid, torch.sigmoid, "sigmoid")(_unary("Sigmoid"))
lowers(nn.Tanh, F.tanh, torch.tanh, "tanh")(_unary("Tanh"))
lowers(operator.neg, torch.neg, "neg")(_unary("Neg"))


@lowers(nn.LeakyReLU)
def _leaky_relu_module(lo: Lowering, call: Call) -> Value:
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(call.module.negative_slope)})


@lowers(F.leaky_relu)
def _leaky_relu_function(lo: Lowering, call: Call) -> Value:
    slope = lo.constant(call.arg(1, "negative_slope", 0.01), "negative_slope")
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(slope)})


def _clip(lo: Lowering, x: Any, lo_: Any, hi: Any) -> Value:
    bounds = []
    for b, what in ((lo_, "min"), (hi, "max")):
        b = lo.constant(b, what)
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise Unsupported(f"{what} must be a scalar")
        bounds.append(None if b is None else torch.tensor(float(b), dtype=torch.float32))
    return lo.emit("Clip", [lo.var(x), *bounds])


@lowers(nn.Hardtanh, nn.ReLU6)  # ReLU6 is a Hardtanh(0, 6) subclass with its own type
def _hardtanh_module(lo: Lowering, call: Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.module.min_val, call.module.max_val)


@lowers(F.hardtanh)
def _hardtanh_function(lo: Lowering, call: Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0))


@lowers(F.relu6)
def _relu6_function(lo: Lowering, call: Call) -> Value:
    return _clip(lo, call.arg(0, "input"), 0.0, 6.0)


@lowers(torch.clamp, torch.clip, "clamp", "clip")
def _clamp(lo: Lowering, call: Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.arg(1, "min", None), call.arg(2, "max", None))


def _softmax(lo: Lowering, x: Any, dim: Any) -> Value:
    x = lo.var(x)
    if dim is None:
        raise Unsupported("softmax needs an explicit dim")
    return lo.emit("Softmax", [x], {"axis": lo.axis(x, dim)})


@lowers(nn.Softmax)
def _softmax_module(lo: Lowering, call: Call) -> Value:
    return _softmax(lo, call.arg(0, "input"), call.module.dim)


@lowers(F.softmax, torch.softmax, "softmax")
def _softmax_function(lo: Lowering, call: Call) -> Value:
    if call.kwargs.get("dtype") is not None:
        raise Unsupported("softmax with dtype=")
    return _softmax(lo, call.arg(0, "input"), call.arg(1, "dim", None))


# ---- identities -----------------------------------------------------------------------

@lowers(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _identity(lo: Lowering, call: Call) -> Value:
    # Dropout is the identity at inference, whatever its `training` flag said when traced.
    return lo.emit("Identity", [lo.var(call.arg(0, "input"))])


@lowers("contiguous", "clone", "detach")
def _passthrough(lo: Lowering, call: Call) -> Value:
    # Memory-layout / autograd bookkeeping: no value changes, so no IR node at all.
    return lo.var(call.arg(0, "input"))


# ---- normalisation and pooling --------------------------------------------------------

def _batch_norm(lo: Lowering, x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> Value:
    x = lo.var(x)
    mean, var = lo.constant(mean, "running_mean"), lo.constant(var, "running_var")
    if mean is None or var is None:
        raise Unsupported("BatchNorm without running statistics normalises with batch "
                           "statistics, which mixes the examples of a batch")
    weight = torch.ones_like(mean) if weight is None else lo.constant(weight, "weight")
    bias = torch.zeros_like(mean) if bias is None else lo.constant(bias, "bias")
    return lo.emit("BatchNormalization", [x, weight, bias, mean, var], {"epsilon": float(eps)})


@lowers(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm_module(lo: Lowering, call: Call) -> Value:
    m = call.module  # inference semantics: always the running statistics
    return _batch_norm(lo, call.arg(0, "input"), m.running_mean, m.running_var, m.weight, m.bias, m.eps)


@lowers(F.batch_norm)
def _batch_norm_function(lo: Lowering, call: Call) -> Value:
    if call.arg(5, "training", False):
        raise Unsupported("training=True uses batch statistics")
    return _batch_norm(lo, call.arg(0, "input"), call.arg(1, "running_mean"), call.arg(2, "running_var"),
                       call.arg(3, "weight", None), call.arg(4, "bias", None), call.arg(7, "eps", 1e-5))


def _pool(lo: Lowering, op_type: str, x: Any, kernel: Any, stride: Any, padding: Any,
          ceil_mode: bool, extra: dict) -> Value:
    x = lo.var(x)
    nd = lo.rank(x) - 2
    if nd < 1:
        raise Unsupported("pooling needs [batch, channels, spatial...] input")
    k = ntuple(kernel, nd)
    s = k if stride is None or stride == [] or stride == () else ntuple(stride, nd)
    p = ntuple(padding, nd)
    attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(bool(ceil_mode)), **extra}
    return lo.emit(op_type, [x], attrs)


def _avg_pool(lo: Lowering, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
              count_include_pad: bool, divisor_override: Any) -> Value:
    if divisor_override is not None:
        raise Unsupported("divisor_override")
    return _pool(lo, "AveragePool", x, kernel, stride, padding, ceil_mode,
                 {"count_include_pad": int(bool(count_include_pad))})


def _max_pool(lo: Lowering, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
              ceil_mode: bool, return_indices: bool) -> Value:
    if return_indices:
        raise Unsupported("return_indices=True")
    nd = lo.rank(lo.var(x)) - 2
    return _pool(lo, "MaxPool", x, kernel, stride, padding, ceil_mode, {"dilations": ntuple(dilation, nd)})


@lowers(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(lo: Lowering, call: Call) -> Value:
    m = call.module
    return _avg_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     m.count_include_pad, getattr(m, "divisor_override", None))


@lowers(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool_function(lo: Lowering, call: Call) -> Value:
    return _avg_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                     call.arg(3, "padding", 0), call.arg(4, "ceil_mode", False),
                     call.arg(5, "count_include_pad", True), call.arg(6, "divisor_override", None))


@lowers(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool_module(lo: Lowering, call: Call) -> Value:
    m = call.module
    return _max_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                     m.return_indices)


@lowers(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _max_pool_function(lo: Lowering, call: Call) -> Value:
    return _max_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                     call.arg(3, "padding", 0), call.arg(4, "dilation", 1), call.arg(5, "ceil_mode", False),
                     call.arg(6, "return_indices", False))


def _adaptive_avg_pool(lo: Lowering, x: Any, output_size: Any) -> Value:
    x = lo.var(x)
    spatial = lo.shape(x)[2:]
    sizes = list(output_size) if isinstance(output_size, (tuple, list)) else [output_size] * len(spatial)
    out = [s if o is None else int(o) for o, s in zip(sizes, spatial)]  # None: keep that size
    if all(o == 1 for o in out):
        return lo.emit("GlobalAveragePool", [x])
    if any(s % o for s, o in zip(spatial, out)):
        raise Unsupported(f"adaptive pooling of {tuple(spatial)} to {tuple(out)} (sizes must divide)")
    # Evenly dividing windows: an ordinary average pool with kernel = stride = in / out.
    k = [s // o for s, o in zip(spatial, out)]
    return lo.emit("AveragePool", [x], {"kernel_shape": k, "strides": k, "pads": [0] * (2 * len(k)),
                                       "ceil_mode": 0, "count_include_pad": 0})


@lowers(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_pool_module(lo: Lowering, call: Call) -> Value:
    return _adaptive_avg_pool(lo, call.arg(0, "input"), call.module.output_size)


@lowers(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_avg_pool_function(lo: Lowering, call: Call) -> Value:
    return _adaptive_avg_pool(lo, call.arg(0, "input"), call.arg(1, "output_size"))


@lowers(torch.mean, "mean")
def _mean(lo: Lowering, call: Call) -> Value:
    # Only the spatial mean x.mean((2, 3)) of ResNet heads: a global average pool.
    x = lo.var(call.arg(0, "input"))
    dims = call.arg(1, "dim", None)
    dims = sorted(lo.axis(x, d) for d in ((dims,) if isinstance(dims, int) else dims or ()))
    if dims != list(range(2, lo.rank(x))) or not dims:
        raise Unsupported("mean over dims other than all spatial dims (2, 3, ...)")
    y = lo.emit("GlobalAveragePool", [x], hint=f"{lo._node.name}_pool")
    if call.arg(2, "keepdim", False):
        return lo.emit("Identity", [y])
    return reshape_to(lo, y, lo.out_shape())


# ---- arithmetic -----------------------------------------------------------------------

def _check_broadcast(lo: Lowering, x: Value, c: Any) -> None:
    """A constant operand must broadcast over the batch, never against it."""
    if not isinstance(c, torch.Tensor):
        return
    # Right-aligned broadcasting: the constant's axes at or before the batch axis must be 1.
    leading = c.shape[:max(0, c.dim() - lo.rank(x) + 1)]
    if any(d != 1 for d in leading):
        raise Unsupported(f"constant of shape {tuple(c.shape)} broadcasts against the batch dimension")


def _binary(op_type: str, commutative: bool) -> Rule:
    def rule(lo: Lowering, call: Call) -> Value:
        a, b = call.arg(0, "input"), call.arg(1, "other")
        if call.kwargs.get("rounding_mode") is not None:
            raise Unsupported("rounding_mode")
        alpha = call.kwargs.get("alpha", 1)
        if alpha != 1:  # torch.add(a, b, alpha=k) = a + k * b
            b = lo.emit("Mul", [b, float(alpha)], hint=f"{lo._node.name}_alpha") if isinstance(b, Value) else b * alpha
        if not isinstance(a, Value) and commutative:  # keep the variable first: c + x -> x + c
            a, b = b, a
        var = a if isinstance(a, Value) else b
        for operand in (a, b):
            if not isinstance(operand, Value):
                _check_broadcast(lo, var, lo.constant(operand, "operand"))
        return lo.emit(op_type, [a, b])
    rule.__name__ = f"_{op_type.lower()}"
    return rule


lowers(operator.add, operator.iadd, torch.add, "add")(_binary("Add", commutative=True))
lowers(operator.sub, operator.isub, torch.sub, torch.subtract, "sub")(_binary("Sub", commutative=False))
lowers(operator.mul, operator.imul, torch.mul, torch.multiply, "mul")(_binary("Mul", commutative=True))
lowers(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div")(_binary("Div", commutative=False))
