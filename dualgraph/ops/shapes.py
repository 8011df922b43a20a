"""Structural ops: Identity, Dropout, Cast, Constant, Flatten, Reshape, Transpose, Squeeze,
Unsqueeze, Concat, Slice, Split, Pad.

They only move, copy or fill entries, so their dual layer is the adjoint of their index map
(:class:`~dualgraph.ops.common.IndexMapDual`: a vector-Jacobian product of the evaluation,
no code of its own). The ONNX handlers keep track of the batch layout (see
:mod:`dualgraph.frontends.onnx`): an op that touches ONNX axis 0 moves the tensor to the
"added" layout first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DualgraphError
from ..ir import EVALUATED_IN, Value
from ..lowering import BATCH_SIZE, FLOAT_TYPES, PAD_MODES, Call, Const, Missing, OnnxNode, Unsupported, Var, reshape_to
from ..op_registry import SAME, define_op, random_const, var
from .common import IndexMapDual, RearrangeDual, example_axis, int_list, node_axis, onnx_elementwise, slice_range, torch_pad

Tensor = torch.Tensor


def _ints(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ---- Identity, Dropout (inference), Cast (float to float), Constant ---------------------------------

identity = define_op("Identity")
identity.evaluate(lambda node, inputs: inputs[0])
identity.dual(RearrangeDual)
identity.onnx_import(onnx_elementwise)


@identity.fx_lowering(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                      F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _(lo, call: Call):
    # Dropout is the identity at inference, whatever its `training` flag said when traced.
    return lo.emit("Identity", [lo.var(call.arg(0, "input"))])


identity.example(var(3))

dropout = define_op("Dropout")


@dropout.evaluate
def _(node, inputs):
    """Inference mode: the identity (plus an all-true mask if the node declares one)."""
    x = inputs[0]
    if len(node.outputs) > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


dropout.dual(IndexMapDual)


@dropout.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    training = ctx.const(n, 2, "Dropout's training_mode")  # opset 12: a third input, False if omitted
    if training is not None and bool(np.any(ctx.batch_free(n, training))):
        ratio = ctx.const(n, 1, "Dropout's ratio")
        if ratio is None or float(ctx.batch_free(n, ratio).reshape(-1)[0]) != 0.0:
            raise DualgraphError(f"node '{n.name}' (Dropout) runs in training mode (training_mode is true): "
                                 "onnxruntime then drops random entries; export the model for inference")
    mask = Missing(f"the mask output of Dropout node '{n.name}' is not supported")
    return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs[:1]) + [mask] * (len(n.outs) - 1)


dropout.example(var(2, 3))
dropout.example(var(3), torch.tensor(0.5, dtype=torch.float64))

cast = define_op("Cast")


@cast.onnx_import
def _(ctx, n):
    if int(n.attrs.get("to", 0)) not in FLOAT_TYPES:
        raise DualgraphError(f"node '{n.name}' (Cast) casts a network tensor to a non-float type; not supported")
    x = ctx.var(n, 0)  # a float-to-float cast is the identity for the bounds, not for the rounding:
    ctx.g.meta.setdefault(EVALUATED_IN, set()).add(FLOAT_TYPES[int(n.attrs["to"])])
    return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs)


constant = define_op("Constant")


@constant.evaluate
def _(node, inputs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            return value if isinstance(value, torch.Tensor) else torch.tensor(value)
    raise DualgraphError(f"node '{node.name}' (Constant) has no supported value attribute")


# ---- Flatten and Reshape ------------------------------------------------------------------------------

flatten = define_op("Flatten")


@flatten.evaluate
def _(node, inputs):
    x = inputs[0]
    axis = node_axis(int(node.attrs.get("axis", 1)), x.dim(), node, inclusive=True)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


flatten.dual(RearrangeDual)


@flatten.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axis = ctx.axis(n, int(n.attrs.get("axis", 1)), x.rank, inclusive=True)
    if not x.added and axis == 1:
        return ctx.emit(n, "Flatten", [x.value], {"axis": 1}, False, n.outs)

    def target(batch: int) -> list[int]:
        shape = x.onnx_shape(batch)
        return [math.prod(shape[:axis]), math.prod(shape[axis:])]
    return [ctx.reshape_to(n, x, target(1), target(2), n.outs)]


def _lower_flatten(lo, x: Any, start: int, end: int):
    x = lo.var(x)
    r = lo.rank(x)
    start, end = start + r if start < 0 else start, end + r if end < 0 else end
    if start == 0:
        raise Unsupported("flattening the batch dimension (use start_dim=1)")
    if start == 1 and end == r - 1:
        return lo.emit("Flatten", [x], {"axis": 1})
    return reshape_to(lo, x, lo.out_shape())


@flatten.fx_lowering(nn.Flatten)
def _(lo, call: Call):
    return _lower_flatten(lo, call.arg(0, "input"), call.module.start_dim, call.module.end_dim)


@flatten.fx_lowering(torch.flatten, "flatten")
def _(lo, call: Call):
    return _lower_flatten(lo, call.arg(0, "input"), call.arg(1, "start_dim", 0), call.arg(2, "end_dim", -1))


flatten.example(var(2, 3, 2), attrs={"axis": 1})

reshape = define_op("Reshape")


@reshape.evaluate
def _(node, inputs):
    """Entry 0 of the target is the batch; 0 elsewhere copies that axis, -1 is inferred."""
    x = inputs[0]
    target = int_list(node, 1, "shape")
    allowzero = bool(node.attrs.get("allowzero", 0))
    rest = [int(x.shape[i]) if d == 0 and not allowzero else d for i, d in enumerate(target[1:], start=1)]
    return x.reshape(x.shape[0], *rest)


reshape.dual(RearrangeDual)


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
        raise DualgraphError(f"node '{n.name}' ({n.op}): cannot reshape a tensor of shape {shape} to {dims}")
    return out


@reshape.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    t = ctx.const(n, 1, "the Reshape target shape")
    allowzero = int(n.attrs.get("allowzero", 0))
    t1 = _resolve_reshape(n, t.t1, x.onnx_shape(1), allowzero)
    t2 = _resolve_reshape(n, t.t2, x.onnx_shape(2), allowzero) if ctx.dynamic and not x.added else None
    return [ctx.reshape_to(n, x, t1, t2, n.outs)]


@reshape.fx_lowering(torch.reshape, "view", "reshape")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    shape = call.varargs(1, "shape")
    rest = shape[1:]
    if any(e is BATCH_SIZE or isinstance(e, Value) for e in rest):
        raise Unsupported("the batch size may appear only as the first entry of the shape")
    unit = math.prod(lo.shape(x)[1:])
    batch_first = shape[0] is BATCH_SIZE or (shape[0] == -1 and -1 not in rest and math.prod(rest) == unit)
    if not batch_first:
        raise Unsupported(f"shape {shape}: the first entry must be x.size(0) (or -1 with the rest "
                          "fixed) so that the batch dimension is kept")
    return reshape_to(lo, x, lo.out_shape())


reshape.example(var(2, 3), _ints(0, 3, 2))
reshape.example(var(6), _ints(0, 2, -1))


# ---- Transpose, Squeeze, Unsqueeze --------------------------------------------------------------------

transpose = define_op("Transpose")


@transpose.evaluate
def _(node, inputs):
    x = inputs[0]
    perm = list(node.attrs.get("perm") or reversed(range(x.dim())))
    if perm[0] != 0:
        raise DualgraphError(f"node '{node.name}' (Transpose): perm {perm} moves the batch axis")
    return x.permute(*perm)


transpose.dual(RearrangeDual)
transpose.onnx_import(lambda ctx, n: [ctx.transpose(n, ctx.var(n, 0), n.attrs.get("perm"), n.outs)])


@transpose.fx_lowering(torch.permute, "permute")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    perm = [d + lo.rank(x) if d < 0 else d for d in map(int, call.varargs(1, "dims"))]
    if perm[0] != 0:
        raise Unsupported("the batch dimension must stay first")
    return lo.emit("Transpose", [x], {"perm": perm})


@transpose.fx_lowering(torch.transpose, "transpose")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    a, b = lo.axis(x, call.arg(1, "dim0")), lo.axis(x, call.arg(2, "dim1"))
    perm = list(range(lo.rank(x)))
    perm[a], perm[b] = perm[b], perm[a]
    return lo.emit("Transpose", [x], {"perm": perm})


transpose.example(var(2, 3, 4), attrs={"perm": [0, 3, 1, 2]})

squeeze = define_op("Squeeze")


@squeeze.evaluate
def _(node, inputs):
    x = inputs[0]
    axes = int_list(node, 1, "axes")
    if axes is None:  # never the batch axis, whatever the batch size at run time
        axes = [i for i in range(1, x.dim()) if x.shape[i] == 1]
    for a in sorted((node_axis(a, x.dim(), node) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


squeeze.dual(RearrangeDual)


@squeeze.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    shape = x.onnx_shape()
    axes = ctx.ints(n, 1, "axes") if ctx.opset >= 13 else n.attrs.get("axes")
    if axes is None:  # all axes of size 1, except a dynamic batch axis
        axes = [i for i, d in enumerate(shape) if d == 1 and (x.added or i or not ctx.dynamic)]
    axes = sorted({ctx.axis(n, int(a), x.rank) for a in axes})
    if any(shape[a] != 1 for a in axes if a or x.added):
        raise DualgraphError(f"node '{n.name}' (Squeeze): axes {axes} of shape {shape} are not all of size 1")
    if not x.added and 0 in axes:
        x = ctx.to_added(n, x)
    return ctx.emit(n, "Squeeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@squeeze.fx_lowering(torch.squeeze, "squeeze")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    shape = lo.shape(x)
    dim = call.arg(1, "dim", None)
    if dim is None:  # all size-1 axes except the batch (whose example size says nothing)
        axes = [i for i in range(1, len(shape)) if shape[i] == 1]
    else:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        axes = [a for a in (lo.axis(x, d) for d in dims) if shape[a] == 1]  # torch skips size != 1
    return lo.emit("Squeeze", [x], {"axes": axes}) if axes else x


squeeze.example(var(1, 3), attrs={"axes": [1]})
squeeze.example(var(3, 1), _ints(2))

unsqueeze = define_op("Unsqueeze")


@unsqueeze.evaluate
def _(node, inputs):
    x = inputs[0]
    axes = int_list(node, 1, "axes")
    rank = x.dim() + len(axes)
    for a in sorted(node_axis(a, rank, node) for a in axes):
        x = x.unsqueeze(a)
    return x


unsqueeze.dual(RearrangeDual)


@unsqueeze.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axes = ctx.ints(n, 1, "axes") if ctx.opset >= 13 else n.attrs.get("axes")
    if axes is None:
        raise DualgraphError(f"node '{n.name}' (Unsqueeze) has no axes")
    rank = x.rank + len(axes)
    axes = sorted(ctx.axis(n, int(a), rank) for a in axes)
    if not x.added and 0 in axes:
        x = ctx.to_added(n, x)
    return ctx.emit(n, "Unsqueeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@unsqueeze.fx_lowering(torch.unsqueeze, "unsqueeze")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    d = int(call.arg(1, "dim"))
    d = d + lo.rank(x) + 1 if d < 0 else d
    if d == 0:
        raise Unsupported("unsqueeze(0) would move the batch dimension")
    return lo.emit("Unsqueeze", [x], {"axes": [d]})


unsqueeze.example(var(3), attrs={"axes": [2]})
unsqueeze.example(var(2, 3), _ints(1))


# ---- Concat, Slice, Split -------------------------------------------------------------------------------

concat = define_op("Concat")


@concat.evaluate
def _(node, inputs):
    """Constant operands (no batch axis of their own, leading size 1) are broadcast."""
    batch = next((t.shape[0] for t, v in zip(inputs, node.inputs) if not v.is_const), None)
    parts = [t.expand(batch, *t.shape[1:]) if v.is_const and batch is not None else t
             for t, v in zip(inputs, node.inputs)]
    return torch.cat(parts, dim=node_axis(int(node.attrs["axis"]), parts[0].dim(), node))


concat.dual(IndexMapDual)


@concat.onnx_import
def _(ctx, n):
    variables = [r for r in n.ins if isinstance(r, Var)]
    axis = ctx.axis(n, int(n.attrs["axis"]), variables[0].rank)
    added = axis == 0 or any(v.added for v in variables)
    inputs = []
    for i, ref in enumerate(n.ins):
        if isinstance(ref, Var):
            inputs.append((ctx.to_added(n, ref) if added else ref).value)
            continue
        array = ctx.batch_free(n, ref)
        if added:  # give the constant a leading axis of 1 that the rule broadcasts
            inputs.append(ctx.ir_const(array.reshape(1, *array.shape), f"{n.name}/dg_{n.in_names[i]}"))
        elif array.ndim and array.shape[0] == 1:
            inputs.append(ctx.ir_const(array, n.in_names[i]))
        else:
            raise DualgraphError(f"node '{n.name}' (Concat): constant '{n.in_names[i]}' of shape "
                                 f"{list(array.shape)} does not have one row per example")
    return ctx.emit(n, "Concat", inputs, {"axis": axis + added}, added, n.outs)


@concat.fx_lowering(torch.cat, torch.concat, torch.concatenate)
def _(lo, call: Call):
    parts = [lo.var(t, "every concatenated tensor") for t in call.arg(0, "tensors")]
    dim = call.arg(1, "dim", call.kwargs.get("axis", 0))
    return lo.emit("Concat", parts, {"axis": lo.axis(parts[0], dim)})


concat.example(var(2), var(3), attrs={"axis": 1})
concat.example(var(2, 3), var(2, 1), var(2, 2), attrs={"axis": 2})
concat.example(var(3), random_const(1, 2, seed=33), attrs={"axis": 1})
concat.example(var(2), SAME, attrs={"axis": -1})

slice_op = define_op("Slice")


@slice_op.evaluate
def _(node, inputs):
    x = inputs[0]
    starts, ends = int_list(node, 1, "starts"), int_list(node, 2, "ends")
    axes = int_list(node, 3, "axes") or list(range(len(starts)))
    steps = int_list(node, 4) or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = node_axis(axis, x.dim(), node)
        r = slice_range(start, end, step, int(x.shape[axis]))
        if step > 0:
            x = x[(slice(None),) * axis + (slice(r.start, r.stop, r.step),)]
        else:  # torch has no negative-step slicing
            x = x.index_select(axis, torch.arange(r.start, r.stop, r.step, device=x.device))
    return x


slice_op.dual(IndexMapDual)


@slice_op.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    if ctx.opset < 10:
        starts, ends, axes, steps = (n.attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
    else:
        starts, ends, axes, steps = (ctx.ints(n, i) for i in (1, 2, 3, 4))
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    kept = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = ctx.axis(n, int(axis), x.rank)
        if axis == 0 and not x.added:
            batches = (1, 2) if ctx.dynamic else (1,)
            if all(slice_range(start, end, step, b) == range(b) for b in batches):
                continue  # slicing the whole batch axis is a no-op
            x = ctx.to_added(n, x)
        kept.append((int(start), int(end), axis, int(step)))
    if not kept:
        return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs)
    cols = list(zip(*kept))
    inputs = [x.value, ctx.int_const(n, cols[0], "starts"), ctx.int_const(n, cols[1], "ends"),
              ctx.int_const(n, [a + x.added for a in cols[2]], "axes"), ctx.int_const(n, cols[3], "steps")]
    return ctx.emit(n, "Slice", inputs, {}, x.added, n.outs)


slice_op.example(var(6), _ints(1), _ints(5), _ints(1), _ints(2))
slice_op.example(var(3, 5), _ints(0, 4), _ints(2, 0), _ints(1, 2), _ints(1, -1))
slice_op.example(var(4, 3), _ints(-3), _ints(100), _ints(1))

split = define_op("Split")


@split.evaluate
def _(node, inputs):
    x = inputs[0]
    axis = node_axis(int(node.attrs.get("axis", 0)), x.dim(), node)
    sizes = int_list(node, 1, "split")
    if sizes is None:  # equal parts; the last one smaller when the axis does not divide
        parts = int(node.attrs.get("num_outputs", len(node.outputs)))
        chunk = -(-int(x.shape[axis]) // parts)
        sizes = [chunk] * (parts - 1) + [int(x.shape[axis]) - chunk * (parts - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


split.dual(IndexMapDual)


@split.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    axis = ctx.axis(n, int(n.attrs.get("axis", 0)), x.rank)
    sizes = ctx.ints(n, 1) if ctx.opset >= 13 else n.attrs.get("split")
    if sizes is None:
        dim = x.onnx_shape()[axis]
        parts = int(n.attrs.get("num_outputs", len(n.outs)))
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    if not x.added and axis == 0:
        x = ctx.to_added(n, x)
    inputs = [x.value, ctx.int_const(n, sizes, "split")]
    return ctx.emit(n, "Split", inputs, {"axis": axis + x.added}, x.added, n.outs)


@split.fx_lowering(torch.split, torch.chunk, "split", "chunk")
def _(lo, call: Call):
    # split(x, size_or_sections, dim) and chunk(x, chunks, dim) alike: the part sizes are
    # read off the example outputs, which fixes the ragged last part of chunk too.
    x = lo.var(call.arg(0, "input"))
    axis = lo.axis(x, call.arg(2, "dim", 0))
    sizes = [s[axis] for s in lo.out_shapes()]
    return lo.emit("Split", [x, torch.tensor(sizes, dtype=torch.int64)], {"axis": axis}, n_outputs=len(sizes))


split.example(var(5), _ints(2, 3), attrs={"axis": 1}, outputs=2)
split.example(var(2, 4), attrs={"axis": 2}, outputs=2)


# ---- Pad ---------------------------------------------------------------------------------------------

pad = define_op("Pad")


def _pad_indices(size: int, begin: int, end: int, mode: str, device) -> Tensor:
    """Source index of every output cell along one axis for reflect/edge/wrap padding."""
    if mode == "wrap":  # onnxruntime crops first (negative pads), then wraps around what is left
        first, kept = max(0, -begin), size - max(0, -begin) - max(0, -end)
        idx = torch.arange(-max(0, begin), kept + max(0, end), device=device)
        return first + torch.remainder(idx, kept)
    idx = torch.arange(-begin, size + end, device=device)
    if mode == "edge" or (mode == "reflect" and size == 1):
        return idx.clamp(0, size - 1)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


@pad.evaluate
def _(node, inputs):
    x = inputs[0]
    mode = node.attrs.get("mode", "constant")
    pads = int_list(node, 1, "pads")
    rank = x.dim()
    axes = int_list(node, 3)
    if axes is not None:  # opset 18: pads given for some axes only
        full = [0] * (2 * rank)
        for i, a in enumerate(node_axis(a, rank, node) for a in axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if mode == "constant":
        value = node.const_input(2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        value = float(value.reshape(-1)[0]) if value is not None and value.numel() else float(
            node.attrs.get("value", 0.0))
        return F.pad(x, torch_pad(pads[:rank], pads[rank:]), value=value)
    if mode not in ("reflect", "edge", "wrap"):
        raise DualgraphError(f"node '{node.name}' (Pad): mode {mode!r} is not supported")
    for axis in range(rank):
        begin, end = pads[axis], pads[rank + axis]
        if begin or end:
            x = x.index_select(axis, _pad_indices(int(x.shape[axis]), begin, end, mode, x.device))
    return x


pad.dual(IndexMapDual)


@pad.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    mode = n.attrs.get("mode", "constant")
    if ctx.opset < 11:
        pads, value, axes = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0)), None
    else:
        pads, axes = ctx.ints(n, 1), ctx.ints(n, 3)
        c = ctx.const(n, 2, "the Pad value")
        value = float(ctx.batch_free(n, c).reshape(-1)[0]) if c is not None and c.t1.size else 0.0
    rank = x.rank
    if axes is not None:
        full = [0] * (2 * rank)
        for i, a in enumerate(ctx.axis(n, a, rank) for a in axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * rank:
        raise DualgraphError(f"node '{n.name}' (Pad): {len(pads)} pads for a tensor of rank {rank}")
    if not x.added and (pads[0] or pads[rank]):
        x = ctx.to_added(n, x)
    if x.added:
        pads = [0, *pads[:rank], 0, *pads[rank:]]
    inputs = [x.value, ctx.int_const(n, pads, "pads")]
    if mode == "constant":
        dtype = np.float64 if x.value.dtype == torch.float64 else np.float32  # the model's precision
        inputs.append(ctx.ir_const(np.array(value, dtype=dtype), f"{n.name}/dg_value"))
    return ctx.emit(n, "Pad", inputs, {"mode": mode}, x.added, n.outs)


@pad.fx_lowering(F.pad)
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    amounts = [int(p) for p in lo.constant(call.arg(1, "pad"), "pad")]
    mode = call.arg(2, "mode", "constant")
    value = call.arg(3, "value", None)
    if mode not in PAD_MODES:
        raise Unsupported(f"mode='{mode}'")
    if any(p < 0 for p in amounts):
        raise Unsupported("negative padding (cropping)")
    r = lo.rank(x)
    begins, ends = [0] * r, [0] * r
    for k in range(len(amounts) // 2):  # torch lists (begin, end) pairs from the last axis backwards
        begins[r - 1 - k], ends[r - 1 - k] = amounts[2 * k], amounts[2 * k + 1]
    if begins[0] or ends[0]:
        raise Unsupported("padding the batch dimension")
    pads = torch.tensor(begins + ends, dtype=torch.int64)
    if mode != "constant":
        return lo.emit("Pad", [x, pads], {"mode": PAD_MODES[mode]})
    fill = torch.tensor(float(value or 0.0), dtype=torch.float32)
    return lo.emit("Pad", [x, pads, fill], {"mode": "constant"})


pad.example(var(2, 3, 3), _ints(0, 0, 1, 0, 0, 0, 0, 2), attrs={"mode": "constant"})
pad.example(var(2, 3), _ints(0, 1, 1, 0, 0, 2), torch.tensor(0.5, dtype=torch.float64), attrs={"mode": "constant"})
pad.example(var(2, 4), _ints(0, 0, 2, 0, 0, 1), attrs={"mode": "reflect"})
pad.example(var(2, 3), _ints(0, 1, 1, 0, 1, 1), attrs={"mode": "edge"})


# ---- Gather with constant indices ---------------------------------------------------------------------

gather = define_op("Gather")


@gather.evaluate
def _(node, inputs):
    x = inputs[0]
    axis = example_axis(int(node.attrs.get("axis", 0)), x.dim(), node, "gathers along")
    indices = node.const_input(1).to(torch.int64)
    size = int(x.shape[axis])
    if bool(((indices < -size) | (indices >= size)).any()):
        raise DualgraphError(f"node '{node.name}' (Gather): indices out of range for an axis of size {size}")
    flat = torch.where(indices < 0, indices + size, indices).reshape(-1).to(x.device)
    out = x.index_select(axis, flat)
    return out.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


gather.dual(IndexMapDual)


@gather.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    indices = ctx.const(n, 1, "the Gather indices")
    if indices is None:
        raise DualgraphError(f"node '{n.name}' (Gather): indices computed from the network input are not supported")
    axis = ctx.axis(n, int(n.attrs.get("axis", 0)), x.rank)
    if not x.added and axis == 0:
        x = ctx.to_added(n, x)
    array = np.asarray(ctx.batch_free(n, indices), dtype=np.int64)
    return ctx.emit(n, "Gather", [x.value, ctx.ir_const(array, f"{n.name}/dg_indices")], {"axis": axis + x.added},
                    x.added, n.outs)


@gather.fx_lowering(torch.index_select, "index_select")
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    indices = lo.constant(call.arg(2, "index"), "index")
    return lo.emit("Gather", [x, indices.to(torch.int64)], {"axis": lo.axis(x, call.arg(1, "dim"))})


gather.example(var(5, 3), _ints(0, 2, 4, -1).reshape(2, 2), attrs={"axis": 1})
gather.example(var(3, 4), torch.tensor(2), attrs={"axis": 2})


# ---- Where (constant condition), Expand, Tile: written with the ops above -------------------------
# They add no op of their own to the IR: the ONNX handlers rewrite them exactly in terms of Mul,
# Add and Concat (multiplying by 0 or 1 is exact), so every bound path already covers them.

where_op = define_op("Where")


@where_op.onnx_import
def _(ctx, n):
    cond, x, y = n.ins[0], n.ins[1], n.ins[2]
    if isinstance(cond, Var):
        raise DualgraphError(f"node '{n.name}' (Where): a condition computed from the network input is not "
                             "supported (only a constant mask)")
    mask = np.asarray(ctx.batch_free(n, cond), dtype=bool)

    def branch(ref, keep: np.ndarray):
        """``keep * ref``; a constant branch is masked in numpy (no 0 * inf)."""
        if isinstance(ref, Var):
            return ctx.binary(n, "Mul", ref, Const.of(keep.astype(np.float32)), None)
        value = ctx.batch_free(n, ref)
        return Const.of(np.where(keep, value, np.zeros((), dtype=value.dtype)))
    return [ctx.binary(n, "Add", branch(x, mask), branch(y, ~mask), n.outs)]


expand = define_op("Expand")


@expand.onnx_import
def _(ctx, n):
    shape = ctx.const(n, 1, "the Expand shape")
    ones = Const(np.ones([int(d) for d in shape.t1], np.float32),
                 np.ones([int(d) for d in shape.t2], np.float32)) if shape.batch_dependent else \
        Const.of(np.ones([int(d) for d in shape.t1], np.float32))
    return [ctx.binary(n, "Mul", n.ins[0], ones, n.outs)]  # numpy broadcasting, as Expand's


tile = define_op("Tile")


@tile.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    repeats = ctx.ints(n, 1)
    if repeats is None or len(repeats) != x.rank:
        raise DualgraphError(f"node '{n.name}' (Tile): {repeats} repeats for a tensor of rank {x.rank}")
    if repeats[0] != 1 and not x.added:
        x = ctx.to_added(n, x)
    axes = [a for a, r in enumerate(repeats) if r != 1]
    if not axes:
        return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs)
    for k, a in enumerate(axes):
        if repeats[a] < 1:
            raise DualgraphError(f"node '{n.name}' (Tile): repeats {repeats} must be positive")
        x = ctx.emit(n, "Concat", [x.value] * repeats[a], {"axis": a + x.added}, x.added,
                     n.outs if k == len(axes) - 1 else None)[0]
    return [x]


# ---- ScatterND with constant indices ------------------------------------------------------------------

scatter_nd = define_op("ScatterND")


@scatter_nd.evaluate
def _(node, inputs):
    """``out = data; out[indices[p]] = updates[p]`` (``reduction="add"``: ``+=``). In the IR both
    operands carry the batch first, and the ONNX indices address the dims after it."""
    data, _, updates = inputs[:3]
    indices = node.const_input(1).to(torch.int64)
    q = indices.shape[-1]
    flat = indices.reshape(-1, q)
    batch = max(data.shape[0], updates.shape[0])
    out = data.expand(batch, *data.shape[1:]).clone()
    values = updates.expand(batch, *updates.shape[1:]).reshape(batch, flat.shape[0], *data.shape[1 + q:])
    sizes = torch.tensor(data.shape[1:1 + q], dtype=torch.int64)
    flat = torch.where(flat < 0, flat + sizes, flat)
    if node.attrs.get("reduction", "none") == "none" and torch.unique(flat, dim=0).shape[0] < flat.shape[0]:
        raise DualgraphError(f"node '{node.name}' (ScatterND): repeated indices without a reduction (ONNX leaves "
                             "the result undefined); not supported")
    flat = flat.to(out.device)
    where = (torch.arange(batch, device=out.device)[:, None],) + tuple(flat[:, j][None, :] for j in range(q))
    reduction = node.attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise DualgraphError(f"node '{node.name}' (ScatterND): reduction {reduction!r} is not supported (none, add are)")
    return out.index_put(where, values, accumulate=reduction == "add")


scatter_nd.dual(IndexMapDual)


@scatter_nd.onnx_import
def _(ctx, n):
    indices = ctx.const(n, 1, "the ScatterND indices")
    array = np.asarray(ctx.batch_free(n, indices), dtype=np.int64)
    inputs = []
    for k in (0, 2):  # the indices address ONNX axis 0: every operand in the added layout
        ref = n.ins[k]
        if isinstance(ref, Var):
            inputs.append(ctx.to_added(n, ref).value)
        else:
            value = ctx.batch_free(n, ref)
            inputs.append(ctx.ir_const(value.reshape(1, *value.shape), f"{n.name}/dg_{n.in_names[k]}"))
    attrs = {"reduction": n.attrs.get("reduction", "none")}
    return ctx.emit(n, "ScatterND", [inputs[0], ctx.ir_const(array, f"{n.name}/dg_indices"), inputs[1]], attrs,
                    True, n.outs)


scatter_nd.example(var(4, 3), _ints(1, 3).reshape(2, 1), var(2, 3))
scatter_nd.example(var(2, 3), _ints(0, 2, 1, 0).reshape(2, 2), random_const(1, 2, seed=45))
scatter_nd.example(var(3, 2), _ints(1, 1).reshape(2, 1), var(2, 2), attrs={"reduction": "add"})
