"""Output-side ops: ArgMax, Equal, OneHot — what segmentation and detection exports put after
the logits. They have an evaluation and no dual layer (their outputs are integers or
booleans): certification strips a trailing ArgMax over the classes (the class it reads off is
what positive margins prove, :func:`dualgraph.api.strip_readout`); anywhere else, and in
``verify``, they are refused with an error that says what to export instead
(``OpDefinition.output_side``).
"""

from __future__ import annotations

import torch

from ..op_registry import define_op
from .common import example_axis

argmax = define_op("ArgMax")
argmax.output_side = True


@argmax.evaluate
def _(node, inputs):
    x = inputs[0]
    axis = example_axis(int(node.attrs.get("axis", 0)), x.dim(), node, "reduces over")
    if node.attrs.get("select_last_index", 0):
        x = x.flip(axis)
        idx = x.argmax(dim=axis, keepdim=bool(node.attrs.get("keepdims", 1)))
        return x.shape[axis] - 1 - idx
    return x.argmax(dim=axis, keepdim=bool(node.attrs.get("keepdims", 1)))


@argmax.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axis = ctx.axis(n, int(n.attrs.get("axis", 0)), x.rank)
    if not x.added and axis == 0:
        x = ctx.to_added(n, x)
    attrs = {"axis": axis + x.added, "keepdims": int(n.attrs.get("keepdims", 1)),
             "select_last_index": int(n.attrs.get("select_last_index", 0))}
    return ctx.emit(n, "ArgMax", [x.value], attrs, x.added, n.outs)


equal = define_op("Equal")
equal.output_side = True
equal.evaluate(lambda node, inputs: torch.eq(inputs[0], inputs[1]))
equal.onnx_import(lambda ctx, n: [ctx.binary(n, "Equal", n.ins[0], n.ins[1], n.outs,
                                             (n.in_names[0], n.in_names[1]))])

one_hot = define_op("OneHot")
one_hot.output_side = True


@one_hot.evaluate
def _(node, inputs):
    indices, depth, values = inputs[0], node.const_input(1), inputs[2]
    depth = int(depth.reshape(-1)[0])
    axis = int(node.attrs.get("axis", -1))
    indices = indices.long()
    inside = (indices >= -depth) & (indices < depth)  # outside: a row of off values (onnxruntime's reading)
    hot = torch.nn.functional.one_hot(torch.remainder(indices, depth), depth) * inside.unsqueeze(-1)  # negative: from the end
    hot = hot.movedim(-1, axis if axis >= 0 else indices.dim() + 1 + axis)
    return torch.where(hot.bool(), values[1], values[0])
