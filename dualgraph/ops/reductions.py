"""Reductions over non-batch axes: ReduceSum and ReduceMean (affine, exact dual layers: the
adjoint copies ``lam`` back over the reduced axes, scaled by ``1/n`` for the mean).

The IR node keeps its axes (counting the batch) as the ``axes`` attribute and ``keepdims``;
the ONNX handler reads axes from the input (ReduceSum opset >= 13, ReduceMean >= 18) or the
attribute, and refuses a reduction over the examples of a batch.
"""

from __future__ import annotations

import math

import torch

from ..dual_registry import AffineRule
from ..errors import DualgraphError
from ..lowering import Call, Unsupported, reshape_to
from ..op_registry import define_op, var
from .common import int_list, node_axis


def _reduced_axes(node, rank: int) -> list[int]:
    axes = int_list(node, 1, "axes")
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return []
        axes = list(range(1, rank))  # IR nodes never reduce over the batch
    axes = sorted({node_axis(a, rank, node) for a in axes})
    if 0 in axes:
        raise DualgraphError(f"node '{node.name}' ({node.op_type}) reduces over the batch axis")
    return axes


class ReduceDual(AffineRule):
    """A sum (times ``1/n`` for the mean) of ``n`` entries per output; the adjoint is a copy."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return math.prod(node.inputs[0].unit_shape) // max(1, node.output.numel) + 1

    def evaluation_gain(self, node):
        """A mean is a sum, then a division: the sum is ``n`` times the mean's terms."""
        n = math.prod(node.inputs[0].unit_shape) // max(1, node.output.numel)
        return float(n) if node.op_type == "ReduceMean" else 1.0

    def dual_length(self, node, bounds, config):
        return 2


def _onnx_reduce(first_axes_input_opset: int):
    def handler(ctx, n):
        x = ctx.var(n, 0)
        axes = ctx.ints(n, 1, "axes") if ctx.opset >= first_axes_input_opset else n.attrs.get("axes")
        keepdims = int(n.attrs.get("keepdims", 1))
        if not axes:
            if int(n.attrs.get("noop_with_empty_axes", 0)):
                return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs)
            axes = list(range(x.rank))
        axes = sorted({ctx.axis(n, int(a), x.rank) for a in axes})
        if not x.added and 0 in axes:
            x = ctx.to_added(n, x)  # a fixed batch of one: axis 0 is an ordinary axis
        attrs = {"axes": [a + x.added for a in axes], "keepdims": keepdims}
        return ctx.emit(n, n.op, [x.value], attrs, x.added, n.outs)
    return handler


def _lower_reduce(op_type: str):
    def rule(lo, call: Call):
        x = lo.var(call.arg(0, "input"))
        dims = call.arg(1, "dim", None)
        if call.kwargs.get("dtype") is not None:
            raise Unsupported("dtype=")
        if dims is None:
            raise Unsupported("a reduction over every axis, the batch included (give dim=...)")
        dims = [dims] if isinstance(dims, int) else list(dims)
        axes = sorted(lo.axis(x, d) for d in dims)
        keepdim = bool(call.arg(2, "keepdim", False))
        if op_type == "ReduceMean" and lo.rank(x) > 2 and axes == list(range(2, lo.rank(x))):
            # the spatial mean of ResNet heads: a global average pool (patches and pooling rules apply)
            y = lo.emit("GlobalAveragePool", [x], hint=f"{lo.node_name}_pool")
            return y if keepdim else reshape_to(lo, y, lo.out_shape())
        return lo.emit(op_type, [x], {"axes": axes, "keepdims": int(keepdim)})
    rule.__name__ = f"lower_{op_type.lower()}"
    return rule


def _define_reduction(op_type: str, reduce, axes_input_opset: int, *fx_targets):
    """A reduction over non-batch axes: ``reduce(x, dim, keepdim)`` (torch's sum or mean)."""
    op = define_op(op_type)

    @op.evaluate
    def _(node, inputs):
        x = inputs[0]
        axes = _reduced_axes(node, x.dim())
        return reduce(x, dim=axes, keepdim=bool(node.attrs.get("keepdims", 1))) if axes else x

    op.dual(ReduceDual)
    op.onnx_import(_onnx_reduce(axes_input_opset))
    op.fx_lowering(*fx_targets)(_lower_reduce(op_type))
    return op


reduce_sum = _define_reduction("ReduceSum", torch.sum, 13, torch.sum, "sum")
reduce_sum.example(var(3, 4), attrs={"axes": [2], "keepdims": 0})
reduce_sum.example(var(2, 3, 3), attrs={"axes": [1, 3], "keepdims": 1})

reduce_mean = _define_reduction("ReduceMean", torch.mean, 18, torch.mean, "mean")
reduce_mean.example(var(4, 3), attrs={"axes": [-1], "keepdims": 1})
reduce_mean.example(var(2, 3, 3), attrs={"axes": [2, 3], "keepdims": 0})
