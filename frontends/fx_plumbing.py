"""The torch.fx frontend's own lowering rules: Python-level plumbing that is not an op.

Tensor attributes and sizes (``x.shape``, ``x.size(1)``, ``x.dim()``), indexing
(``x[:, 1:3]``, tuple items) and memory-layout calls (``contiguous``, ``clone``,
``detach``). Ops (layers, activations, shapes) are lowered by their op definitions
(:mod:`dualgraph.ops`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from dualgraph.ir import Value
from dualgraph.lowering import BATCH_SIZE, Call, Unsupported
from dualgraph.frontends.fx_lowering import Lowering, lowers


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
                    hint=f"{lo.node_name}_slice" if squeeze else None)
    return lo.emit("Squeeze", [y], {"axes": squeeze}) if squeeze else y


@lowers("contiguous", "clone", "detach")
def _passthrough(lo: Lowering, call: Call) -> Value:
    # Memory-layout / autograd bookkeeping: no value changes, so no IR node at all.
    return lo.var(call.arg(0, "input"))
