"""Conversion handlers of the ONNX frontend, one per ONNX op family.

Each handler is registered with :func:`dualgraph.frontends.onnx_refs.handles` for the
default-domain ops it converts; it gets the handler context
(:class:`dualgraph.frontends.onnx_context.HandlerContext`, whose building blocks it calls)
and the node, and returns one ref per ONNX output.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from dualgraph import eval_rules  # noqa: F401  (shares conv_pads/slice_range)
from dualgraph.errors import DualgraphError
from dualgraph.frontends.onnx_refs import FLOAT_TYPES, Ref, Const, handles, Missing, OnnxNode, Var

if TYPE_CHECKING:
    from dualgraph.frontends.onnx_context import HandlerContext


def _resolve_reshape(n: OnnxNode, target: np.ndarray, shape: list[int], allowzero: int) -> list[int]:
    """ONNX Reshape's output shape for input ``shape`` (0 copies an axis, -1 is inferred)."""
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(dims)]
    total = math.prod(shape)
    if out.count(-1) == 1:
        known = math.prod(d for d in out if d != -1)
        if known and total % known == 0:
            out[out.index(-1)] = total // known
    if any(d < 0 for d in out) or math.prod(out) != total:
        raise DualgraphError(f"node '{n.name}' ({n.op}): cannot reshape a tensor of shape {shape} "
                             f"to {dims}")
    return out


# ---- handlers: one per ONNX op family ------------------------------------------------------------
@handles("Relu", "Sigmoid", "Tanh", "Neg", "Identity", "LeakyRelu")
def _unary(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    attrs = {"alpha": float(n.attrs.get("alpha", 0.01))} if n.op == "LeakyRelu" else {}
    return imp.emit(n, n.op, [x.value], attrs, x.added, n.outs)


@handles("Dropout")
def _dropout(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    mask = Missing(f"the mask output of Dropout node '{n.name}' is not supported")
    return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs[:1]) + [mask] * (len(n.outs) - 1)


@handles("Cast")
def _cast(imp: HandlerContext, n: OnnxNode) -> list:
    if int(n.attrs.get("to", 0)) not in FLOAT_TYPES:
        raise DualgraphError(f"node '{n.name}' (Cast) casts a network tensor to a non-float type; "
                             "not supported")
    x = imp.var(n, 0)  # a float-to-float cast is the identity for analysis purposes
    return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs)


@handles("Clip")
def _clip(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    if imp.opset < 11:  # bounds were attributes; normalise them to inputs
        bounds = [imp.ir_const(np.array(n.attrs[k], dtype=np.float32), f"{n.name}/dg_{k}")
                  if k in n.attrs else None for k in ("min", "max")]
    else:
        bounds = [imp.const_input(n, i) for i in (1, 2)]
    inputs = [x.value, *bounds]
    while inputs[-1] is None:
        inputs.pop()
    return imp.emit(n, "Clip", inputs, {}, x.added, n.outs)


@handles("Add", "Sub", "Mul", "Div")
def _binary(imp: HandlerContext, n: OnnxNode) -> list:
    return [imp.binary(n, n.op, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


@handles("MatMul")
def _matmul(imp: HandlerContext, n: OnnxNode) -> list:
    return [imp.matmul(n, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


@handles("Gemm")
def _gemm(imp: HandlerContext, n: OnnxNode) -> list:
    a, b = n.ins[0], n.ins[1]
    c = n.ins[2] if len(n.ins) > 2 else None
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    trans_a, trans_b = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    if isinstance(a, Var) and isinstance(b, Const) and not isinstance(c, Var) and not trans_a:
        x = a
        if x.added and x.onnx_shape()[0] == 1:
            x = imp.to_native(n, x)
        if not x.added:  # the common case: x @ op(W) + C with one example per row
            attrs = {"alpha": alpha, "beta": beta, "transA": 0, "transB": trans_b}
            inputs = [x.value, imp.const_input(n, 1), imp.const_input(n, 2) if c is not None else None]
            return imp.emit(n, "Gemm", inputs if c is not None else inputs[:2], attrs, False, n.outs)
    # Otherwise lower to MatMul (+ Add): y = alpha * op(A) @ op(B) + beta * C.
    def op_of(ref: Ref, trans: int) -> Ref:
        if not trans:
            return ref
        if isinstance(ref, Const):
            return ref.map(lambda t: t.T.copy())
        return imp.transpose(n, ref, [1, 0], None)
    a, b = op_of(a, trans_a), op_of(b, trans_b)
    if alpha != 1.0 and isinstance(b, Const):
        b = b.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    elif alpha != 1.0 and isinstance(a, Const):
        a = a.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    scale_after = alpha != 1.0 and isinstance(a, Var) and isinstance(b, Var)
    y = imp.matmul(n, a, b, n.outs if c is None and not scale_after else None)
    if scale_after:
        y = imp.binary(n, "Mul", y, Const.of(np.asarray(alpha, dtype=np.float32)),
                       n.outs if c is None else None)
    if c is None:
        return [y]
    if isinstance(c, Const):
        c = c.map(lambda t: t * np.asarray(beta, dtype=t.dtype)) if beta != 1.0 else c
    elif beta != 1.0:
        c = imp.binary(n, "Mul", c, Const.of(np.asarray(beta, dtype=np.float32)), None)
    return [imp.binary(n, "Add", y, c, n.outs)]


@handles("Conv")
def _conv(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    w = imp.const(n, 1, "the Conv weight")
    spatial = [int(d) for d in x.value.shape[2:]]
    kernel = [int(k) for k in (n.attrs.get("kernel_shape") or imp.batch_free(n, w).shape[2:])]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": eval_rules.conv_pads(n.attrs, spatial, kernel),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "group": int(n.attrs.get("group", 1))}
    inputs = [x.value, imp.const_input(n, 1)]
    if len(n.ins) > 2 and n.ins[2] is not None:
        inputs.append(imp.const_input(n, 2))
    return imp.emit(n, "Conv", inputs, attrs, False, n.outs)


@handles("BatchNormalization")
def _batch_norm(imp: HandlerContext, n: OnnxNode) -> list:
    if int(n.attrs.get("training_mode", 0)):
        raise DualgraphError(f"node '{n.name}' (BatchNormalization) is in training mode; export the model "
                             "in eval mode")
    x = imp.to_native(n, imp.var(n, 0))
    inputs = [x.value] + [imp.const_input(n, i) for i in range(1, 5)]
    out = imp.emit(n, "BatchNormalization", inputs, {"epsilon": float(n.attrs.get("epsilon", 1e-5))}, False,
                   n.outs[:1])
    extra = Missing(f"the training outputs of BatchNormalization node '{n.name}' are not supported")
    return out + [extra] * (len(n.outs) - 1)


@handles("AveragePool", "MaxPool")
def _pool(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    if "kernel_shape" not in n.attrs:
        raise DualgraphError(f"node '{n.name}' ({n.op}) has no kernel_shape")
    kernel = [int(k) for k in n.attrs["kernel_shape"]]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": eval_rules.conv_pads(n.attrs, [int(d) for d in x.value.shape[2:]], kernel),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "ceil_mode": int(n.attrs.get("ceil_mode", 0))}
    if n.op == "AveragePool":
        attrs["count_include_pad"] = int(n.attrs.get("count_include_pad", 0))
    out = imp.emit(n, n.op, [x.value], attrs, False, n.outs[:1])
    indices = Missing(f"the indices output of MaxPool node '{n.name}' is not supported")
    return out + [indices] * (len(n.outs) - 1)


@handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    return imp.emit(n, n.op, [x.value], {}, False, n.outs)


@handles("Flatten")
def _flatten(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    axis = imp.axis(n, int(n.attrs.get("axis", 1)), x.rank, inclusive=True)
    if not x.added and axis == 1:
        return imp.emit(n, "Flatten", [x.value], {"axis": 1}, False, n.outs)

    def target(batch: int) -> list[int]:
        shape = x.onnx_shape(batch)
        return [math.prod(shape[:axis]), math.prod(shape[axis:])]
    return [imp.reshape_to(n, x, target(1), target(2), n.outs)]


@handles("Reshape")
def _reshape(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    t = imp.const(n, 1, "the Reshape target shape")
    allowzero = int(n.attrs.get("allowzero", 0))
    t1 = _resolve_reshape(n, t.t1, x.onnx_shape(1), allowzero)
    t2 = _resolve_reshape(n, t.t2, x.onnx_shape(2), allowzero) if imp.dynamic and not x.added else None
    return [imp.reshape_to(n, x, t1, t2, n.outs)]


@handles("Transpose")
def _transpose(imp: HandlerContext, n: OnnxNode) -> list:
    return [imp.transpose(n, imp.var(n, 0), n.attrs.get("perm"), n.outs)]


@handles("Squeeze")
def _squeeze(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    shape = x.onnx_shape()
    axes = imp.ints(n, 1, "axes") if imp.opset >= 13 else n.attrs.get("axes")
    if axes is None:  # all axes of size 1, except a dynamic batch axis
        axes = [i for i, d in enumerate(shape) if d == 1 and (x.added or i or not imp.dynamic)]
    axes = sorted({imp.axis(n, int(a), x.rank) for a in axes})
    if any(shape[a] != 1 for a in axes if a or x.added):
        raise DualgraphError(f"node '{n.name}' (Squeeze): axes {axes} of shape {shape} are not all of size 1")
    if not x.added and 0 in axes:
        x = imp.to_added(n, x)
    return imp.emit(n, "Squeeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@handles("Unsqueeze")
def _unsqueeze(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    axes = imp.ints(n, 1, "axes") if imp.opset >= 13 else n.attrs.get("axes")
    if axes is None:
        raise DualgraphError(f"node '{n.name}' (Unsqueeze) has no axes")
    rank = x.rank + len(axes)
    axes = sorted(imp.axis(n, int(a), rank) for a in axes)
    if not x.added and 0 in axes:
        x = imp.to_added(n, x)
    return imp.emit(n, "Unsqueeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@handles("Concat")
def _concat(imp: HandlerContext, n: OnnxNode) -> list:
    vars_ = [r for r in n.ins if isinstance(r, Var)]
    axis = imp.axis(n, int(n.attrs["axis"]), vars_[0].rank)
    added = axis == 0 or any(v.added for v in vars_)
    inputs = []
    for i, ref in enumerate(n.ins):
        if isinstance(ref, Var):
            inputs.append((imp.to_added(n, ref) if added else ref).value)
            continue
        array = imp.batch_free(n, ref)
        if added:  # give the constant a leading axis of 1 that the rule broadcasts
            inputs.append(imp.ir_const(array.reshape(1, *array.shape), f"{n.name}/dg_{n.in_names[i]}"))
        elif array.ndim and array.shape[0] == 1:
            inputs.append(imp.ir_const(array, n.in_names[i]))
        else:
            raise DualgraphError(f"node '{n.name}' (Concat): constant '{n.in_names[i]}' of shape "
                                 f"{list(array.shape)} does not have one row per example")
    return imp.emit(n, "Concat", inputs, {"axis": axis + added}, added, n.outs)


@handles("Slice")
def _slice(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    if imp.opset < 10:
        starts, ends, axes, steps = (n.attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
    else:
        starts, ends, axes, steps = (imp.ints(n, i) for i in (1, 2, 3, 4))
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    kept = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = imp.axis(n, int(axis), x.rank)
        if axis == 0 and not x.added:
            batches = (1, 2) if imp.dynamic else (1,)
            if all(eval_rules.slice_range(start, end, step, b) == range(b) for b in batches):
                continue  # slicing the whole batch axis is a no-op
            x = imp.to_added(n, x)
        kept.append((int(start), int(end), axis, int(step)))
    if not kept:
        return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs)
    cols = list(zip(*kept))
    inputs = [x.value, imp.int_const(n, cols[0], "starts"), imp.int_const(n, cols[1], "ends"),
              imp.int_const(n, [a + x.added for a in cols[2]], "axes"), imp.int_const(n, cols[3], "steps")]
    return imp.emit(n, "Slice", inputs, {}, x.added, n.outs)


@handles("Split")
def _split(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    axis = imp.axis(n, int(n.attrs.get("axis", 0)), x.rank)
    sizes = imp.ints(n, 1) if imp.opset >= 13 else n.attrs.get("split")
    if sizes is None:
        dim = x.onnx_shape()[axis]
        parts = int(n.attrs.get("num_outputs", len(n.outs)))
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    if not x.added and axis == 0:
        x = imp.to_added(n, x)
    inputs = [x.value, imp.int_const(n, sizes, "split")]
    return imp.emit(n, "Split", inputs, {"axis": axis + x.added}, x.added, n.outs)


@handles("Pad")
def _pad(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    mode = n.attrs.get("mode", "constant")
    if imp.opset < 11:
        pads, value, axes = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0)), None
    else:
        pads, axes = imp.ints(n, 1), imp.ints(n, 3)
        c = imp.const(n, 2, "the Pad value")
        value = float(imp.batch_free(n, c).reshape(-1)[0]) if c is not None and c.t1.size else 0.0
    rank = x.rank
    if axes is not None:
        full = [0] * (2 * rank)
        for i, a in enumerate(imp.axis(n, a, rank) for a in axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * rank:
        raise DualgraphError(f"node '{n.name}' (Pad): {len(pads)} pads for a tensor of rank {rank}")
    if not x.added and (pads[0] or pads[rank]):
        x = imp.to_added(n, x)
    if x.added:
        pads = [0, *pads[:rank], 0, *pads[rank:]]
    inputs = [x.value, imp.int_const(n, pads, "pads")]
    if mode == "constant":
        inputs.append(imp.ir_const(np.array(value, dtype=np.float32), f"{n.name}/dg_value"))
    return imp.emit(n, "Pad", inputs, {"mode": mode}, x.added, n.outs)


@handles("Softmax")
def _softmax(imp: HandlerContext, n: OnnxNode) -> list:
    x = imp.var(n, 0)
    axis = imp.axis(n, int(n.attrs.get("axis", -1 if imp.opset >= 13 else 1)), x.rank)
    if imp.opset < 13 and math.prod(x.onnx_shape()[axis + 1:]) != 1:
        raise DualgraphError(f"node '{n.name}' (Softmax, opset {imp.opset}) normalises over several axes; "
                             "only a softmax over one axis is supported")
    if not x.added and axis == 0:
        x = imp.to_added(n, x)
    return imp.emit(n, "Softmax", [x.value], {"axis": axis + x.added}, x.added, n.outs)
