"""Helpers shared by the built-in op families: parameters, window geometry, dual-layer bases.

IR conventions the evaluation rules rely on (guaranteed by the frontends, see
:mod:`dualgraph.ir`): variable tensors carry the batch first, attribute axes count it, and a
Reshape target's entry 0 stands for the batch. Rules must also run on torch ``meta`` tensors
(shape inference): integer parameters given as inputs (Reshape targets, Slice bounds, Pad
amounts) are read with ``node.const_input(i)``, never from the tensor passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..dual_registry import AffineRule, Bounds, FreeLines, Relaxation
from ..errors import DualgraphError, UnsupportedOpError
from ..ir import Node, normalize_axis
from ..lowering import Call

Tensor = torch.Tensor


# ---- parameters ----------------------------------------------------------------------------------

def int_list(node: Node, index: int | None, attr: str | None = None) -> list[int] | None:
    """Integer list given as constant input ``index`` or, failing that, attribute ``attr``."""
    if index is not None and index < len(node.inputs) and node.inputs[index] is not None:
        return [int(v) for v in node.const_input(index).reshape(-1).tolist()]
    if attr is not None and attr in node.attrs:
        value = node.attrs[attr]
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return None


def node_axis(axis: int, rank: int, node: Node, inclusive: bool = False) -> int:
    """``axis`` normalised against ``rank``, errors naming the node."""
    return normalize_axis(axis, rank, f"node '{node.name}' ({node.op_type})", inclusive=inclusive)


def example_axis(axis: int, rank: int, node: Node, what: str) -> int:
    """:func:`node_axis`, refusing the batch axis (examples are independent): the error says
    the node ``what`` (e.g. "reduces over") the batch axis."""
    axis = node_axis(axis, rank, node)
    if axis == 0:
        raise DualgraphError(f"node '{node.name}' ({node.op_type}) {what} the batch axis")
    return axis


def torch_pad(pads_begin: Sequence[int], pads_end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads of the trailing axes -> F.pad's last-axis-first list."""
    flat: list[int] = []
    for b, e in zip(reversed(pads_begin), reversed(pads_end)):
        flat += [int(b), int(e)]
    return flat


def slice_range(start: int, end: int, step: int, size: int) -> range:
    """The indices ONNX Slice selects along one axis (with its clamping rules)."""
    if step == 0:
        raise DualgraphError("Slice step 0 is invalid")
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), size), min(max(end, 0), size), step)
    return range(min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)


# ---- window geometry (Conv and pooling) -----------------------------------------------------------

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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


def conv_pads(attrs: dict[str, Any], spatial: Sequence[int], kernel: Sequence[int], where: str = "a node") -> list[int]:
    """Explicit ONNX ``pads`` ``[b_1..b_n, e_1..e_n]`` for Conv/pool attributes.

    Resolves ``auto_pad`` (NOTSET, VALID, SAME_UPPER, SAME_LOWER) against the spatial input
    shape, so that frontends can normalise nodes to explicit pads and rules share one
    definition of the geometry. SAME with a dilation is refused (``where`` names the node):
    onnxruntime's pools pad for the undilated kernel, against the spec.
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
        if any(int(d) != 1 for d in dilations):
            # the spec pads for the dilated span (k-1)d+1; onnxruntime's pools pad for k (and its
            # Conv refuses the combination): the network as evaluated is not the one we would bound
            raise UnsupportedOpError(f"{where}: auto_pad {auto} with dilations {dilations} is computed differently "
                                     "by onnx runtimes; export the model with explicit pads")
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-int(size) // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    raise DualgraphError(f"unknown auto_pad value {auto!r}")


def spatial_rank(x: Tensor, node: Node) -> int:
    """Number of spatial axes of a ``[batch, channels, *spatial]`` input (1 to 3)."""
    n = x.dim() - 2
    if n not in CONV_FUNCTIONS:
        raise DualgraphError(f"node '{node.name}' ({node.op_type}): input of rank {x.dim()} is not "
                             "supported (expected [batch, channels, 1 to 3 spatial axes])")
    return n


# ---- dual-layer bases ---------------------------------------------------------------------------
# Each class states, besides its adjoint, the arithmetic that dualgraph.rounding bounds:
# ``abs_by_eval`` (the op with |constants| computes |A| x + c), ``eval_length`` and
# ``dual_length`` (the most nonzero terms of one sum in the op's evaluation / its dual).

def offset_dot_length(rule: AffineRule, node: Node) -> int:
    """Length of the dot product ``lam . f(0)`` (0 when the op has no constant term)."""
    return max(o.numel for o in node.outputs) + 1 if rule.has_offsets(node) else 0


def broadcast_factor(node: Node) -> int:
    """How many output entries one variable input entry reaches (its adjoint sums them)."""
    return max(1, max(o.numel for o in node.outputs) // max(1, min(v.numel for v in node.var_inputs)))


class IndexMapDual(AffineRule):
    """Ops that only move, copy or zero-fill entries: no arithmetic but a padding constant."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return offset_dot_length(self, node)


class RearrangeDual(IndexMapDual):
    """Ops that only rearrange entries, one output entry per input entry (Identity, Reshape,
    Transpose, ...): :attr:`~dualgraph.dual_registry.DualRule.rearranges_entries`."""

    rearranges_entries = True


class ElementwiseAffineDual(AffineRule):
    """Elementwise arithmetic with constants or between variables (broadcasting allowed)."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return 4  # (x - mean) / sqrt(var + eps) * scale + B at most

    def dual_length(self, node, bounds, config):
        return max(broadcast_factor(node) + 2, offset_dot_length(self, node))


def sum_to_unit(t: Tensor, unit_shape: Sequence[int]) -> Tensor:
    """Rows ``t [b, m, *out_unit]`` summed over the axes an operand of per-example shape
    ``unit_shape`` was broadcast along (leading axes it lacks, and its size-1 axes): the
    adjoint of numpy broadcasting."""
    lead = t.dim() - 2 - len(unit_shape)
    if lead:
        t = t.sum(dim=tuple(range(2, 2 + lead)))
    axes = tuple(2 + i for i, d in enumerate(unit_shape) if d == 1 and t.shape[2 + i] != 1)
    return t.sum(dim=axes, keepdim=True) if axes else t


def require_const(node: Node, *indices: int) -> None:
    """Refuse a node whose inputs ``indices`` depend on the network input (it would not be affine)."""
    for i in indices:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            raise UnsupportedOpError(
                f"node '{node.name}' ({node.op_type}): input '{v.name}' depends on the network input; "
                f"{node.op_type} is only supported with a constant operand here (it would not be affine)")


def crossing(b: Bounds) -> torch.Tensor:
    """Units whose interval contains 0 in its interior."""
    return (b.lower < 0) & (b.upper > 0)


def chord_relaxation(b: Bounds, f: Callable[[Tensor], Tensor], breakpoints: Sequence[float] = (),
                     stationary: Callable[[Tensor], list[Tensor]] | None = None,
                     free_slopes: tuple[Tensor, Tensor] | None = None,
                     f_above: Callable[[Tensor], Tensor] | None = None) -> Relaxation:
    """Parallel lines of the chord slope ``a`` through the extremes of ``g(z) = f(z) - a z``.

    The extremes of ``g`` on ``[l, u]`` lie at ``l``, ``u``, the breakpoints of a piecewise
    linear ``f``, or the stationary points ``f'(z) = a`` (``stationary(a)`` returns them):
    the tightest pair of parallel bounding lines.

    Everything is computed in float64, then returned in the bounds' precision: the slope
    rounded to it, the offsets moved out by what that rounding shifts the lines on ``[l, u]``
    (``|a_t - a| max(|l|, |u|)``) plus a float64 slack, and rounded outward. So the lines bound
    ``f`` (as computed in float64) on the whole interval, with no slack of the bounds' own
    precision left in them: the rounding allowance accounts for float32 evaluation apart.

    ``free_slopes`` (``(lo, hi)``, float64 ``[B, *unit]``): both lines become free
    (:class:`~dualgraph.dual_registry.FreeLines`, ``relu_relaxation="alpha"``) with slopes in
    ``[lo, hi]`` and, for each slope, the same tightest offsets (``stationary`` must then
    give every solution of ``f'(z) = a`` for any slope in the range): the line of slope
    ``a`` through the extreme of ``g`` touches ``f`` there, a tangent line where the extreme
    is a stationary point.

    ``f_above``: where runtimes compute ``f`` differently, the highest of their values (``>= f``
    everywhere, with the same kinks and stationary points, or none): the upper lines bound it
    instead of ``f`` (the lower ones bound ``f``, which must then be the lowest).
    """
    dtype = b.lower.dtype
    l, u = (t.to(torch.float64) for t in b)  # differentiable: the robust loss trains through bounds
    m = torch.maximum(l.abs(), u.abs())
    width = u - l
    flat = width <= 1e-12 * (1 + m)
    a = torch.where(flat, 0.0, (f(u) - f(l)) / torch.where(flat, 1.0, width))
    a_t = a.to(dtype)
    fs = (f, f_above or f)
    lo, hi = _extremes(l, u, a, a_t, fs, breakpoints, stationary)
    r = Relaxation(a_t, _round_down(lo, dtype), a_t, _round_up(hi, dtype))
    if free_slopes is not None:
        r.free = _free_lines(l, u, r, fs, breakpoints, stationary, free_slopes, ~flat)
    return r


def derivative_range(config, b: Bounds, derivative: Callable[[Tensor], Tensor],
                     peak: float | None = None) -> tuple[Tensor, Tensor] | None:
    """The slopes ``f'`` takes on ``[l, u]`` (float64), the free lines' range of
    :func:`chord_relaxation` with ``relu_relaxation="alpha"`` (None otherwise): between
    ``f'(l)`` and ``f'(u)`` for ``f'`` monotone on the line (``f`` convex or concave), and
    with ``peak`` (``f'`` increasing up to ``peak``, decreasing after: an S-shaped ``f``)
    up to ``f'`` at the point of ``[l, u]`` nearest the peak."""
    if config.relu_relaxation != "alpha":
        return None
    l, u = (t.detach().to(torch.float64) for t in b)
    at_l, at_u = derivative(l), derivative(u)
    if peak is None:
        return torch.minimum(at_l, at_u), torch.maximum(at_l, at_u)
    return torch.minimum(at_l, at_u), derivative(torch.full_like(l, peak).clamp(min=l, max=u))


def _extremes(l: Tensor, u: Tensor, a: Tensor, a_t: Tensor, fs, breakpoints, stationary,
              detach_points: bool = False) -> tuple[Tensor, Tensor]:
    """``min`` of ``f(z) - a z`` and ``max`` of ``f_above(z) - a z`` on ``[l, u]`` (float64;
    ``fs = (f, f_above)``), moved out by the shift
    of rounding ``a`` to ``a_t`` and a float64 slack. ``detach_points`` (the free lines'
    offsets): the gradient in ``a`` alone, ``-z*`` at the extreme's point (Danskin), the mean
    of the points that tie for it. Ties are the rule, not the exception: at the chord's slope
    ``g(l) = g(u)``, and which end wins by the last bit of ``f`` depends on how the tensor is
    laid out (vectorised lanes or not), so the points within a relative 1e-10 count as tied;
    the optimiser then climbs alike on dense rows and on windows."""
    m = torch.maximum(l.abs(), u.abs())
    cands = [l, u] + [torch.full_like(l, p).clamp(min=l, max=u) for p in breakpoints]
    if stationary is not None:
        cands += [z.clamp(min=l, max=u) for z in stationary(a.detach() if detach_points else a)]
    f, f_above = fs
    if not detach_points:
        g, g_above = (torch.stack([h(z) - a * z for z in cands]) for h in (f, f_above))
        scale = 1 + torch.maximum(g.abs().amax(0), g_above.abs().amax(0)) + a.abs() * m
        slack = (a_t.to(torch.float64) - a).abs() * m + 1e-12 * scale
        return g.amin(0) - slack, g_above.amax(0) + slack
    a_value = a.detach()
    z = torch.stack([c.detach() for c in cands])
    g, g_above = (h(z) - a_value * z for h in (f, f_above))
    scale = 1 + torch.maximum(g.abs().amax(0), g_above.abs().amax(0)) + a_value.abs() * m.detach()
    slack = (a_t.detach().to(torch.float64) - a_value).abs() * m.detach() + 1e-12 * scale
    step = a - a_value  # zero, carrying the gradient in a

    def extreme(g: Tensor, value: Tensor) -> Tensor:
        tied = (g - value).abs() <= 1e-10 * scale
        return value - step * (z * tied).sum(0) / tied.sum(0)
    return extreme(g, g.amin(0)) - slack, extreme(g_above, g_above.amax(0)) + slack


def _free_lines(l: Tensor, u: Tensor, r: Relaxation, fs, breakpoints, stationary,
                slopes: tuple[Tensor, Tensor], units: Tensor) -> FreeLines:
    """The free lines of :func:`chord_relaxation`: slopes in ``slopes``, offsets by :func:`_extremes`."""
    dtype = r.a_lo.dtype
    lo, hi = (t.to(dtype) for t in slopes)
    lo, hi = torch.minimum(lo, r.a_lo), torch.maximum(hi, r.a_lo)  # the start (the chord) in range

    def offsets(a: Tensor, at: Callable[[Tensor], Tensor], side: int) -> Tensor:
        a64 = a.to(torch.float64)
        low, high = _extremes(at(l), at(u), a64, a, fs, breakpoints, stationary, detach_points=True)
        return _round_down(low, a.dtype) if side < 0 else _round_up(high, a.dtype)

    return FreeLines(units, lo, hi, (lo, hi), offsets)


def _round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, never above ``t`` (float64 in, rounded toward -inf)."""
    r = t.to(dtype)
    d = r.detach()
    step = torch.nextafter(d, torch.full_like(d, -float("inf"))) - d  # a constant: gradients pass through r
    return torch.where(d.to(t.dtype) > t.detach(), r + step, r)


def _round_up(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, never below ``t``."""
    r = t.to(dtype)
    d = r.detach()
    step = torch.nextafter(d, torch.full_like(d, float("inf"))) - d
    return torch.where(d.to(t.dtype) < t.detach(), r + step, r)


# ---- import and lowering helpers -----------------------------------------------------------------

def onnx_elementwise(ctx: Any, n: Any) -> list:
    """ONNX handler of a one-input elementwise op: same layout, attributes as given."""
    x = ctx.var(n, 0)
    return ctx.emit(n, n.op, [x.value], dict(n.attrs), x.added, n.outs)


def fx_unary(op_type: str) -> Callable[[Any, Call], Any]:
    """torch.fx rule lowering ``f(x)`` to one node of ``op_type`` without attributes."""
    def rule(lo: Any, call: Call) -> Any:
        return lo.emit(op_type, [lo.var(call.arg(0, "input"))])
    rule.__name__ = f"lower_{op_type.lower()}"
    return rule
