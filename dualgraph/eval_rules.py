"""Evaluation rules for the default-domain ops of the IR, with ONNX semantics.

Each rule is ``rule(node, inputs) -> tensor | tuple of tensors`` (see
:func:`dualgraph.interpreter.register_eval`). Rules must also run on torch ``meta``
tensors, because shape inference evaluates them there: they never read the *values* of
their tensor inputs. Integer parameters given as inputs (Reshape targets, Slice bounds,
Pad amounts, ...) are read from the node with ``node.const_input(i)``, which returns the
real constant tensor even while the inputs themselves are meta tensors.

IR conventions the rules rely on (guaranteed by the frontends, see :mod:`dualgraph.ir`):
variable tensors carry the batch first, attribute axes count it, and a Reshape target's
entry 0 stands for the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .errors import DualgraphError
from .interpreter import register_eval
from .ir import Node, normalize_axis

Tensor = torch.Tensor


# ---- helpers ----------------------------------------------------------------------------
def _ints(node: Node, index: int | None, attr: str | None = None) -> list[int] | None:
    """Integer list given as constant input ``index`` or, failing that, attribute ``attr``."""
    if index is not None and index < len(node.inputs) and node.inputs[index] is not None:
        return [int(v) for v in node.const_input(index).reshape(-1).tolist()]
    if attr is not None and attr in node.attrs:
        value = node.attrs[attr]
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return None


def _axis(axis: int, rank: int, node: Node, inclusive: bool = False) -> int:
    return normalize_axis(axis, rank, f"node '{node.name}' ({node.op_type})", inclusive=inclusive)


def _torch_pad(pads_begin: Sequence[int], pads_end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads of the trailing axes -> F.pad's last-axis-first list."""
    flat: list[int] = []
    for b, e in zip(reversed(pads_begin), reversed(pads_end)):
        flat += [int(b), int(e)]
    return flat


@dataclass(frozen=True)
class Window:
    """The window geometry of a Conv or pooling node (ONNX attributes, defaults applied,
    ``auto_pad`` resolved): per spatial axis, kernel, stride, dilation and the padding at
    the beginning and the end."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def symmetric(self) -> bool:
        """Equal padding at both ends of every axis (what torch's ``padding=`` expresses)."""
        return self.begins == self.ends


def window(node: Node, spatial: Sequence[int], kernel: Sequence[int] | None = None) -> Window:
    """The :class:`Window` of ``node`` on inputs with ``spatial`` sizes; ``kernel`` defaults
    to the ``kernel_shape`` attribute (a Conv's comes from its weight). The one definition of
    the geometry that evaluation, dual layers and the patch path all read."""
    kernel = [int(k) for k in (kernel if kernel is not None else node.attrs["kernel_shape"])]
    n = len(kernel)
    pads = conv_pads(node.attrs, spatial, kernel)
    return Window(tuple(kernel), tuple(int(s) for s in (node.attrs.get("strides") or [1] * n)),
                  tuple(int(d) for d in (node.attrs.get("dilations") or [1] * n)),
                  tuple(pads[:n]), tuple(pads[n:]))


def conv_pads(attrs: dict[str, Any], spatial: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Explicit ONNX ``pads`` ``[b_1..b_n, e_1..e_n]`` for Conv/pool attributes.

    Resolves ``auto_pad`` (NOTSET, VALID, SAME_UPPER, SAME_LOWER) against the spatial input
    shape, so that frontends can normalise nodes to explicit pads and rules share one
    definition of the geometry.
    """
    n = len(spatial)
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = list(attrs.get("pads") or [0] * (2 * n))
        if len(pads) != 2 * n:
            raise DualgraphError(f"pads {pads} do not match {n} spatial axes")
        return [int(p) for p in pads]
    if auto == "VALID":
        return [0] * (2 * n)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-int(size) // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    raise DualgraphError(f"unknown auto_pad value {auto!r}")


# ---- linear algebra and arithmetic --------------------------------------------------------
@register_eval("Gemm")
def _gemm(node: Node, inputs: list) -> Tensor:
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


@register_eval("MatMul")
def _matmul(node: Node, inputs: list) -> Tensor:
    return torch.matmul(inputs[0], inputs[1])


@register_eval("Add")
def _add(node: Node, inputs: list) -> Tensor:
    return inputs[0] + inputs[1]


@register_eval("Sub")
def _sub(node: Node, inputs: list) -> Tensor:
    return inputs[0] - inputs[1]


@register_eval("Mul")
def _mul(node: Node, inputs: list) -> Tensor:
    return inputs[0] * inputs[1]


@register_eval("Div")
def _div(node: Node, inputs: list) -> Tensor:
    return inputs[0] / inputs[1]


@register_eval("Neg")
def _neg(node: Node, inputs: list) -> Tensor:
    return -inputs[0]


# ---- activations ----------------------------------------------------------------------------
@register_eval("Relu")
def _relu(node: Node, inputs: list) -> Tensor:
    return torch.relu(inputs[0])


@register_eval("LeakyRelu")
def _leaky_relu(node: Node, inputs: list) -> Tensor:
    return F.leaky_relu(inputs[0], float(node.attrs.get("alpha", 0.01)))


@register_eval("Sigmoid")
def _sigmoid(node: Node, inputs: list) -> Tensor:
    return torch.sigmoid(inputs[0])


@register_eval("Tanh")
def _tanh(node: Node, inputs: list) -> Tensor:
    return torch.tanh(inputs[0])


@register_eval("Clip")
def _clip(node: Node, inputs: list) -> Tensor:
    x, lo, hi = (list(inputs) + [None, None])[:3]
    # Before opset 11 the bounds were attributes; the ONNX frontend turns them into inputs.
    lo = lo if lo is not None else node.attrs.get("min")
    hi = hi if hi is not None else node.attrs.get("max")
    if lo is not None:
        x = torch.clamp(x, min=lo)
    if hi is not None:
        x = torch.clamp(x, max=hi)
    return x


@register_eval("Softmax")
def _softmax(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    return torch.softmax(x, dim=_axis(int(node.attrs.get("axis", -1)), x.dim(), node))


@register_eval("Identity")
def _identity(node: Node, inputs: list) -> Tensor:
    return inputs[0]


@register_eval("Dropout")
def _dropout(node: Node, inputs: list):
    """Inference mode: the identity (plus an all-true mask if the node declares one)."""
    x = inputs[0]
    if len(node.outputs) > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@register_eval("Constant")
def _constant(node: Node, inputs: list) -> Tensor:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            return value if isinstance(value, torch.Tensor) else torch.tensor(value)
    raise DualgraphError(f"node '{node.name}' (Constant) has no supported value attribute")


# ---- convolution, normalisation, pooling -------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _spatial_rank(x: Tensor, node: Node) -> int:
    n = x.dim() - 2
    if n not in _CONV:
        raise DualgraphError(f"node '{node.name}' ({node.op_type}): input of rank {x.dim()} is not "
                             "supported (expected [batch, channels, 1 to 3 spatial axes])")
    return n


@register_eval("Conv")
def _conv(node: Node, inputs: list) -> Tensor:
    x, w, b = (list(inputs) + [None])[:3]
    n = _spatial_rank(x, node)
    g = window(node, x.shape[2:], w.shape[2:])
    padding: Any = list(g.begins)
    if not g.symmetric:  # torch pads symmetrically; pad asymmetric cases up front
        x, padding = F.pad(x, _torch_pad(list(g.begins), list(g.ends))), 0
    return _CONV[n](x, w, b, stride=list(g.strides), padding=padding, dilation=list(g.dilations),
                    groups=int(node.attrs.get("group", 1)))


@register_eval("BatchNormalization")
def _batch_norm(node: Node, inputs: list) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False,
                        eps=float(node.attrs.get("epsilon", 1e-5)))


def _pool_geometry(node: Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """kernel, strides, dilations, pads_begin and pads_end of a pool on ``x``.

    ``pads_end`` includes the extra room ``ceil_mode`` needs for the last window. As in
    PyTorch (and onnxruntime), a window that would start in the end padding is dropped.
    """
    _spatial_rank(x, node)
    g = window(node, x.shape[2:])
    kernel, strides, dilations = list(g.kernel), list(g.strides), list(g.dilations)
    begins, ends = list(g.begins), list(g.ends)
    if node.attrs.get("ceil_mode", 0):
        for i, size in enumerate(x.shape[2:]):
            span = (kernel[i] - 1) * dilations[i] + 1
            total = int(size) + begins[i] + ends[i]
            out = -(-(total - span) // strides[i]) + 1
            if (out - 1) * strides[i] >= int(size) + begins[i]:
                out -= 1
            ends[i] += max(0, (out - 1) * strides[i] + span - total)
    return kernel, strides, dilations, begins, ends


def _sum_pool(x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> Tensor:
    """Window sums, as a depthwise convolution with a kernel of ones (handles dilation)."""
    n = len(kernel)
    flat = x.reshape(-1, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
    out = _CONV[n](flat, ones, stride=strides, dilation=dilations)
    return out.reshape(*x.shape[:2], *out.shape[2:])


@register_eval("AveragePool")
def _average_pool(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(node, x)
    pads = conv_pads(node.attrs, x.shape[2:], kernel)
    n = len(kernel)
    total = _sum_pool(F.pad(x, _torch_pad(begins, ends)), kernel, strides, dilations)
    # The divisor counts the input cells of each window, plus the explicit padding cells
    # when count_include_pad is set, but never the extra cells ceil_mode adds.
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    include = 1.0 if node.attrs.get("count_include_pad", 0) else 0.0
    mask = F.pad(mask, _torch_pad(pads[:n], pads[n:]), value=include)
    mask = F.pad(mask, _torch_pad([0] * n, [e - p for e, p in zip(ends, pads[n:])]), value=0.0)
    return total / _sum_pool(mask, kernel, strides, dilations)


@register_eval("MaxPool")
def _max_pool(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(node, x)
    x = F.pad(x, _torch_pad(begins, ends), value=-math.inf)
    return _MAXPOOL[len(kernel)](x, kernel, strides, 0, dilations)


@register_eval("GlobalAveragePool")
def _global_average_pool(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register_eval("GlobalMaxPool")
def _global_max_pool(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---- structural ops -------------------------------------------------------------------------
@register_eval("Flatten")
def _flatten(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    axis = _axis(int(node.attrs.get("axis", 1)), x.dim(), node, inclusive=True)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register_eval("Reshape")
def _reshape(node: Node, inputs: list) -> Tensor:
    """Entry 0 of the target is the batch; 0 elsewhere copies that axis, -1 is inferred."""
    x = inputs[0]
    target = _ints(node, 1, "shape")
    allowzero = bool(node.attrs.get("allowzero", 0))
    rest = [int(x.shape[i]) if d == 0 and not allowzero else d
            for i, d in enumerate(target[1:], start=1)]
    return x.reshape(x.shape[0], *rest)


@register_eval("Transpose")
def _transpose(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    perm = list(node.attrs.get("perm") or reversed(range(x.dim())))
    if perm[0] != 0:
        raise DualgraphError(f"node '{node.name}' (Transpose): perm {perm} moves the batch axis")
    return x.permute(*perm)


@register_eval("Squeeze")
def _squeeze(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    axes = _ints(node, 1, "axes")
    if axes is None:  # never the batch axis, whatever the batch size at run time
        axes = [i for i in range(1, x.dim()) if x.shape[i] == 1]
    for a in sorted((_axis(a, x.dim(), node) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@register_eval("Unsqueeze")
def _unsqueeze(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    axes = _ints(node, 1, "axes")
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank, node) for a in axes):
        x = x.unsqueeze(a)
    return x


@register_eval("Concat")
def _concat(node: Node, inputs: list) -> Tensor:
    """Constant operands (no batch axis of their own, leading size 1) are broadcast."""
    batch = next((t.shape[0] for t, v in zip(inputs, node.inputs) if not v.is_const), None)
    parts = [t.expand(batch, *t.shape[1:]) if v.is_const and batch is not None else t
             for t, v in zip(inputs, node.inputs)]
    return torch.cat(parts, dim=_axis(int(node.attrs["axis"]), parts[0].dim(), node))


def slice_range(start: int, end: int, step: int, size: int) -> range:
    """The indices ONNX Slice selects along one axis (with its clamping rules)."""
    if step == 0:
        raise DualgraphError("Slice step 0 is invalid")
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), size), min(max(end, 0), size), step)
    return range(min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)


@register_eval("Slice")
def _slice(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    starts, ends = _ints(node, 1, "starts"), _ints(node, 2, "ends")
    axes = _ints(node, 3, "axes") or list(range(len(starts)))
    steps = _ints(node, 4) or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim(), node)
        r = slice_range(start, end, step, int(x.shape[axis]))
        if step > 0:
            index = [slice(None)] * axis + [slice(r.start, r.stop, r.step)]
            x = x[tuple(index)]
        else:  # torch has no negative-step slicing
            x = x.index_select(axis, torch.arange(r.start, r.stop, r.step, device=x.device))
    return x


@register_eval("Split")
def _split(node: Node, inputs: list) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = _axis(int(node.attrs.get("axis", 0)), x.dim(), node)
    sizes = _ints(node, 1, "split")
    if sizes is None:  # equal parts; the last one smaller when the axis does not divide
        parts = int(node.attrs.get("num_outputs", len(node.outputs)))
        chunk = -(-int(x.shape[axis]) // parts)
        sizes = [chunk] * (parts - 1) + [int(x.shape[axis]) - chunk * (parts - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _pad_indices(size: int, begin: int, end: int, mode: str, device) -> Tensor:
    """Source index of every output cell along one axis for reflect/edge/wrap padding."""
    idx = torch.arange(-begin, size + end, device=device)
    if mode == "edge" or (mode == "reflect" and size == 1):
        return idx.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(idx, size)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


@register_eval("Pad")
def _pad(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    mode = node.attrs.get("mode", "constant")
    pads = _ints(node, 1, "pads")
    rank = x.dim()
    axes = _ints(node, 3)
    if axes is not None:  # opset 18: pads given for some axes only
        full = [0] * (2 * rank)
        for i, a in enumerate(_axis(a, rank, node) for a in axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if mode == "constant":
        value = node.const_input(2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        value = float(value.reshape(-1)[0]) if value is not None and value.numel() else float(
            node.attrs.get("value", 0.0))
        return F.pad(x, _torch_pad(pads[:rank], pads[rank:]), value=value)
    if mode not in ("reflect", "edge", "wrap"):
        raise DualgraphError(f"node '{node.name}' (Pad): mode {mode!r} is not supported")
    for axis in range(rank):
        begin, end = pads[axis], pads[rank + axis]
        if begin or end:
            x = x.index_select(axis, _pad_indices(int(x.shape[axis]), begin, end, mode, x.device))
    return x
