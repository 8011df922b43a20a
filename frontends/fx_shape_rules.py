"""Lowering rules of the torch.fx frontend for shapes: flatten / view / reshape, sizes,
permute / transpose, (un)squeeze, cat, split / chunk, basic slicing and F.pad.

Registered with :func:`dualgraph.frontends.fx_lowering.lowers` like those in :mod:`dualgraph.frontends.fx_rules`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgraph.ir import Value
from dualgraph.frontends.fx_lowering import (PAD_MODES, BATCH_SIZE, Call, example_shapes, Lowering,
                                   reshape_to, Unsupported, lowers)


# ---- shapes ---------------------------------------------------------------------------

def _flatten(lo: Lowering, x: Any, start: int, end: int) -> Value:
    x = lo.var(x)
    r = lo.rank(x)
    start, end = start + r if start < 0 else start, end + r if end < 0 else end
    if start == 0:
        raise Unsupported("flattening the batch dimension (use start_dim=1)")
    if start == 1 and end == r - 1:
        return lo.emit("Flatten", [x], {"axis": 1})
    return reshape_to(lo, x, lo.out_shape())


@lowers(nn.Flatten)
def _flatten_module(lo: Lowering, call: Call) -> Value:
    return _flatten(lo, call.arg(0, "input"), call.module.start_dim, call.module.end_dim)


@lowers(torch.flatten, "flatten")
def _flatten_function(lo: Lowering, call: Call) -> Value:
    return _flatten(lo, call.arg(0, "input"), call.arg(1, "start_dim", 0), call.arg(2, "end_dim", -1))


@lowers(torch.reshape, "view", "reshape")
def _reshape(lo: Lowering, call: Call) -> Value:
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


@lowers(getattr)
def _getattr(lo: Lowering, call: Call) -> Any:
    x, name = lo.var(call.arg(0, "input")), call.args[1]
    if name == "shape":
        return (BATCH_SIZE, *lo.shape(x)[1:])
    if name == "ndim":
        return lo.rank(x)
    raise Unsupported(f"attribute '{name}' of a tensor")


@lowers("size")
def _size(lo: Lowering, call: Call) -> Any:
    x = lo.var(call.arg(0, "input"))
    sizes = (BATCH_SIZE, *lo.shape(x)[1:])
    dim = call.arg(1, "dim", None)
    return sizes if dim is None else sizes[int(dim)]


@lowers("dim")
def _dim(lo: Lowering, call: Call) -> int:
    return lo.rank(lo.var(call.arg(0, "input")))


@lowers(torch.permute, "permute")
def _permute(lo: Lowering, call: Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    perm = [d + lo.rank(x) if d < 0 else d for d in map(int, call.varargs(1, "dims"))]
    if perm[0] != 0:
        raise Unsupported("the batch dimension must stay first")
    return lo.emit("Transpose", [x], {"perm": perm})


@lowers(torch.transpose, "transpose")
def _transpose(lo: Lowering, call: Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    a, b = lo.axis(x, call.arg(1, "dim0")), lo.axis(x, call.arg(2, "dim1"))
    perm = list(range(lo.rank(x)))
    perm[a], perm[b] = perm[b], perm[a]
    return lo.emit("Transpose", [x], {"perm": perm})


@lowers(torch.unsqueeze, "unsqueeze")
def _unsqueeze(lo: Lowering, call: Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    d = int(call.arg(1, "dim"))
    d = d + lo.rank(x) + 1 if d < 0 else d
    if d == 0:
        raise Unsupported("unsqueeze(0) would move the batch dimension")
    return lo.emit("Unsqueeze", [x], {"axes": [d]})


@lowers(torch.squeeze, "squeeze")
def _squeeze(lo: Lowering, call: Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    shape = lo.shape(x)
    dim = call.arg(1, "dim", None)
    if dim is None:  # all size-1 axes except the batch (whose example size says nothing)
        axes = [i for i in range(1, len(shape)) if shape[i] == 1]
    else:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        axes = [a for a in (lo.axis(x, d) for d in dims) if shape[a] == 1]  # torch skips size != 1
    return lo.emit("Squeeze", [x], {"axes": axes}) if axes else x


@lowers(torch.cat, torch.concat, torch.concatenate)
def _cat(lo: Lowering, call: Call) -> Value:
    parts = [lo.var(t, "every concatenated tensor") for t in call.arg(0, "tensors")]
    dim = call.arg(1, "dim", call.kwargs.get("axis", 0))
    return lo.emit("Concat", parts, {"axis": lo.axis(parts[0], dim)})


@lowers(torch.split, torch.chunk, "split", "chunk")
def _split(lo: Lowering, call: Call) -> tuple[Value, ...]:
    # split(x, size_or_sections, dim) and chunk(x, chunks, dim) alike: the part sizes are
    # read off the example outputs, which fixes the ragged last part of chunk too.
    x = lo.var(call.arg(0, "input"))
    axis = lo.axis(x, call.arg(2, "dim", 0))
    sizes = [s[axis] for s in example_shapes(call.node)]
    return lo.emit("Split", [x, torch.tensor(sizes, dtype=torch.int64)], {"axis": axis}, n_outputs=len(sizes))


@lowers(operator.getitem)
def _getitem(lo: Lowering, call: Call) -> Any:
    seq, index = call.args[0], call.args[1]
    if not isinstance(seq, Value):  # a Python list/tuple holding variables
        return seq[index]
    return _slice(lo, seq, index)


def _slice(lo: Lowering, x: Value, index: Any) -> Value:
    """Basic indexing ``x[:, a:b, ..., c]`` -> Slice (+ Squeeze for integer indices)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (lo.rank(x) - len(index) + 1) + index[at + 1:]
    if not index or not isinstance(index[0], slice) or index[0] != slice(None) or len(index) > lo.rank(x):
        raise Unsupported(f"index {index}: must start with ':' (keep the batch) and use slices/ints")
    starts, ends, axes, steps, squeeze = [], [], [], [], []
    for axis, i in enumerate(index[1:], start=1):
        size = lo.shape(x)[axis]
        if isinstance(i, slice):
            if i == slice(None):
                continue
            s, e, st = i.indices(size)
            if st <= 0:
                raise Unsupported("negative slice steps")
        elif isinstance(i, int) and not isinstance(i, bool):
            s = i + size if i < 0 else i
            e, st = s + 1, 1
            squeeze.append(axis)
        else:
            raise Unsupported(f"index {i!r} (only slices and ints)")
        starts.append(s), ends.append(e), axes.append(axis), steps.append(st)
    y = x
    if axes:
        y = lo.emit("Slice", [x, *(torch.tensor(v, dtype=torch.int64) for v in (starts, ends, axes, steps))],
                    hint=f"{lo._node.name}_slice" if squeeze else None)
    return lo.emit("Squeeze", [y], {"axes": squeeze}) if squeeze else y


@lowers(F.pad)
def _pad(lo: Lowering, call: Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    pad = [int(p) for p in lo.constant(call.arg(1, "pad"), "pad")]
    mode = call.arg(2, "mode", "constant")
    value = call.arg(3, "value", None)
    if mode not in PAD_MODES:
        raise Unsupported(f"mode='{mode}'")
    if any(p < 0 for p in pad):
        raise Unsupported("negative padding (cropping)")
    r = lo.rank(x)
    begins, ends = [0] * r, [0] * r
    for k in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last axis backwards
        begins[r - 1 - k], ends[r - 1 - k] = pad[2 * k], pad[2 * k + 1]
    if begins[0] or ends[0]:
        raise Unsupported("padding the batch dimension")
    pads = torch.tensor(begins + ends, dtype=torch.int64)
    if mode != "constant":
        return lo.emit("Pad", [x, pads], {"mode": PAD_MODES[mode]})
    fill = torch.tensor(float(value or 0.0), dtype=torch.float32)
    return lo.emit("Pad", [x, pads, fill], {"mode": "constant"})
