"""Pooling: AveragePool and GlobalAveragePool (affine, exact), MaxPool and GlobalMaxPool.

Window geometry (kernel, strides, dilations, pads, ``auto_pad``) has one definition,
:func:`dualgraph.ops.common.window`, read by evaluation, dual layers and the patch path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import AffineRule, Bounds, DualRule, DualStep, FreeSlopes
from ..errors import DualgraphError, UnsupportedOpError
from ..lowering import Call, Missing, Unsupported, ntuple
from ..op_registry import define_op, var
from .common import CONV_FUNCTIONS, conv_pads, spatial_rank, torch_pad, window

Tensor = torch.Tensor
_MAX_POOL_FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_geometry(node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """kernel, strides, dilations, pads_begin and pads_end of a pool on ``x``.

    ``pads_end`` includes the extra room ``ceil_mode`` needs for the last window. As in
    PyTorch (and onnxruntime), a window that would start in the end padding is dropped.
    """
    spatial_rank(x, node)
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
    flat = x.reshape(-1, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
    out = CONV_FUNCTIONS[len(kernel)](flat, ones, stride=strides, dilation=dilations)
    return out.reshape(*x.shape[:2], *out.shape[2:])


def _onnx_pool(ctx, n):
    x = ctx.to_native(n, ctx.var(n, 0))
    if "kernel_shape" not in n.attrs:
        raise DualgraphError(f"node '{n.name}' ({n.op}) has no kernel_shape")
    kernel = [int(k) for k in n.attrs["kernel_shape"]]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": conv_pads(n.attrs, [int(d) for d in x.value.shape[2:]], kernel, f"node '{n.name}' ({n.op})"),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "ceil_mode": int(n.attrs.get("ceil_mode", 0))}
    if n.op == "AveragePool":
        attrs["count_include_pad"] = int(n.attrs.get("count_include_pad", 0))
    out = ctx.emit(n, n.op, [x.value], attrs, False, n.outs[:1])
    indices = Missing(f"the indices output of MaxPool node '{n.name}' is not supported")
    return out + [indices] * (len(n.outs) - 1)


def _onnx_global_pool(ctx, n):
    x = ctx.to_native(n, ctx.var(n, 0))
    return ctx.emit(n, n.op, [x.value], {}, False, n.outs)


def _lower_pool(lo, op_type: str, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, extra: dict):
    x = lo.var(x)
    nd = lo.rank(x) - 2
    if nd < 1:
        raise Unsupported("pooling needs [batch, channels, spatial...] input")
    k = ntuple(kernel, nd)
    s = k if stride is None or stride == [] or stride == () else ntuple(stride, nd)
    p = ntuple(padding, nd)
    attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(bool(ceil_mode)), **extra}
    return lo.emit(op_type, [x], attrs)


# ---- AveragePool -------------------------------------------------------------------------------------

average_pool = define_op("AveragePool")


@average_pool.evaluate
def _(node, inputs):
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(node, x)
    pads = conv_pads(node.attrs, x.shape[2:], kernel)
    n = len(kernel)
    total = _sum_pool(F.pad(x, torch_pad(begins, ends)), kernel, strides, dilations)
    # The divisor counts the input cells of each window, plus the explicit padding cells
    # when count_include_pad is set, but never the extra cells ceil_mode adds.
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    include = 1.0 if node.attrs.get("count_include_pad", 0) else 0.0
    mask = F.pad(mask, torch_pad(pads[:n], pads[n:]), value=include)
    mask = F.pad(mask, torch_pad([0] * n, [e - p for e, p in zip(ends, pads[n:])]), value=0.0)
    return total / _sum_pool(mask, kernel, strides, dilations)


@average_pool.dual
class AveragePoolDual(AffineRule):
    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return math.prod(node.attrs["kernel_shape"]) + 1

    def evaluation_gain(self, node):
        return float(math.prod(node.attrs["kernel_shape"]))  # the window's sum, before the division

    def dual_length(self, node, bounds, config):
        return math.prod(node.attrs["kernel_shape"]) + 1  # overlapping windows add up per input unit


average_pool.onnx_import(_onnx_pool)


def _lower_avg_pool(lo, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                    count_include_pad: bool, divisor_override: Any):
    if divisor_override is not None:
        raise Unsupported("divisor_override")
    return _lower_pool(lo, "AveragePool", x, kernel, stride, padding, ceil_mode,
                       {"count_include_pad": int(bool(count_include_pad))})


@average_pool.fx_lowering(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _(lo, call: Call):
    m = call.module
    return _lower_avg_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                           m.count_include_pad, getattr(m, "divisor_override", None))


@average_pool.fx_lowering(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _(lo, call: Call):
    return _lower_avg_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                           call.arg(3, "padding", 0), call.arg(4, "ceil_mode", False),
                           call.arg(5, "count_include_pad", True), call.arg(6, "divisor_override", None))


def _lower_adaptive_avg_pool(lo, x: Any, output_size: Any):
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


@average_pool.fx_lowering(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _(lo, call: Call):
    return _lower_adaptive_avg_pool(lo, call.arg(0, "input"), call.module.output_size)


@average_pool.fx_lowering(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _(lo, call: Call):
    return _lower_adaptive_avg_pool(lo, call.arg(0, "input"), call.arg(1, "output_size"))


average_pool.example(var(2, 5, 5), attrs={"kernel_shape": [2, 2], "strides": [2, 2]})
average_pool.example(var(1, 4, 4), attrs={"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]})
average_pool.example(var(1, 4, 4), attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                          "count_include_pad": 1})
average_pool.example(var(1, 5, 5), attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1})
average_pool.example(var(2, 6), attrs={"kernel_shape": [3], "strides": [2]})


# ---- GlobalAveragePool -------------------------------------------------------------------------------

global_average_pool = define_op("GlobalAveragePool")


@global_average_pool.evaluate
def _(node, inputs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@global_average_pool.dual
class GlobalAveragePoolDual(AffineRule):
    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return math.prod(node.inputs[0].unit_shape[1:]) + 1

    def evaluation_gain(self, node):
        return float(math.prod(node.inputs[0].unit_shape[1:]))  # the map's sum, before the division

    def dual_length(self, node, bounds, config):
        return 1


global_average_pool.onnx_import(_onnx_global_pool)


global_average_pool.example(var(2, 3, 3))


# ---- MaxPool -----------------------------------------------------------------------------------------

max_pool = define_op("MaxPool")


@max_pool.evaluate
def max_pool_eval(node, inputs):
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(node, x)
    x = F.pad(x, torch_pad(begins, ends), value=-math.inf)
    return _MAX_POOL_FUNCTIONS[len(kernel)](x, kernel, strides, 0, dilations)


def max_upper_line(l_win: Tensor, u_win: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The upper line ``max_k z_k <= a z_k* + b`` of each window, valid on the box
    ``l <= z <= u``; windows along dimension 2 (``[B, C, K, L]``, padding at ``-inf``).

    ``k*`` is the entry of largest upper bound and ``M`` the largest upper bound of the
    others. On the box ``max_k z_k <= max(z_k*, M)``, a convex function of ``z_k*`` alone,
    so its chord over ``[l_k*, u_k*]`` bounds it: through ``(l_k*, M)`` and ``(u_k*, u_k*)``,
    slope ``a = (u_k* - M) / (u_k* - l_k*)`` in ``[0, 1]``. Where ``M <= l_k*`` the max is
    exactly ``z_k*`` (``a = 1, b = 0``); where ``M = u_k*`` the chord is the constant
    ``max_k u_k``. The line is never above that constant on ``[l_k*, u_k*]``.

    Floating point: any computed slope gives a valid line once ``b`` is at least both
    ``M - a l_k*`` and ``u_k* (1 - a)`` (the chord's two ends; the gap is convex), so ``b``
    is their maximum moved up by a bound of its own rounding. Returns ``(k*, a, b)`` as
    ``[B, C, 1, L]`` indices and ``[B, C, L]`` values. Ties go to the first entry (the same
    whatever the tensors' memory layout, so that every bound path picks the same ``k*``).
    """
    top = u_win.amax(2, keepdim=True)
    k_up = _first(u_win == top)
    others = u_win.scatter(2, k_up, -math.inf).amax(2, keepdim=True)
    l_top = l_win.gather(2, k_up)
    exact = others <= l_top  # also windows of one entry (others = -inf)
    finite_others = torch.where(exact, l_top, others)
    width = (top - l_top).clamp(min=torch.finfo(top.dtype).tiny)
    a = torch.where(exact, 1.0, ((top - finite_others) / width).clamp(0.0, 1.0))
    ends = torch.maximum(finite_others - a * l_top, top - a * top)
    reach = finite_others.abs() + top.abs() + a * (l_top.abs() + top.abs())
    b = torch.where(exact, 0.0, ends + 4 * torch.finfo(top.dtype).eps * reach)
    return k_up, a.squeeze(2), b.squeeze(2)


@max_pool.dual
class MaxPoolDual(DualRule):
    """Lower: ``max_k z_k >= z_k*`` with ``k*`` the window entry of largest lower bound.
    Upper: the chord of :func:`max_upper_line` on the entry of largest upper bound (``z_k*``
    itself when ``l_k* >= u_k`` for every other ``k``, then the max is exactly ``z_k*``).
    Sign-dependent, so the rule is not linear. Windows are formed with ``unfold``; the
    adjoint is ``fold``. With ``relu_relaxation="alpha"`` the lower line may be any convex
    combination of the window's entries (:meth:`backward_with_slopes`).
    """

    needs_bounds = True

    def abs_linear(self, node, xs, bounds, config):
        return [max_pool_eval(node, [xs[0]])]  # each row routed to one entry, weight <= 1

    def constant_magnitude(self, node, m_in, bounds, config):
        # the upper line's offset: |b| <= |M| + |l_k*| + |u_k*| (plus its rounding)
        l, u = bounds[0]
        widest = max_pool_eval(node, [torch.maximum(l.abs(), u.abs())])
        return [3 * widest]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        return [max_pool_eval(node, [m_in[0]])]

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return max(math.prod(node.attrs["kernel_shape"]), node.output.numel) + 1

    def has_image_bounds(self, node):
        return True

    def image_bounds(self, node, bounds):
        """``[max_k l_k, max_k u_k]``: a one-unit pass bounds the max by ``z_k*`` below and by
        the chord through ``(u_k*, u_k*)`` above, so it can do no better."""
        l, u = bounds[0]
        return [Bounds(max_pool_eval(node, [l]), max_pool_eval(node, [u]))]

    def backward(self, node, lam, bounds, config):
        return self.backward_with_slopes(node, lam, bounds[0], config, None)

    def free_variables(self, node, bounds, config):
        """The lower line's weights (:func:`free_lower_weights`)."""
        weights = free_lower_weights(node, bounds[0])
        return {} if weights is None else {"slopes": weights}

    def backward_with_slopes(self, node, lam, bounds: Bounds, config, weights, splits=None, upper=None):
        """:meth:`backward`, or with ``weights`` (a :class:`~dualgraph.dual_registry.FreeSlopes`
        from :func:`free_lower_weights`, ``relu_relaxation="alpha"``) the lower line
        ``sum_k p_k z_k`` with ``p = w / sum_k w_k`` for each row's weights ``w >= 0`` on the
        window's entries: a convex combination is below the max, so any weights give a sound
        step. The computed ``p >= 0`` may sum to ``s != 1`` (rounding, or all weights 0); then
        ``sum_k p_k z_k <= s max_k z_k <= max_k z_k + |s - 1| r`` with ``r`` the window's largest
        ``|l|, |u|``, which the offsets pay (``s`` summed in float64)."""
        l = bounds.lower
        kernel, geom, pad = _pool_2d(node, l.shape[2:])
        k_lo, k_up, slope, offset = (t.flatten(2) for t in max_pool_lines(node, bounds))  # [B, C, L]
        B, C, H, W = l.shape
        K, L = kernel[0] * kernel[1], k_lo.shape[-1]
        b, m = lam.shape[:2]
        lam_f = lam.flatten(3)                                         # [b, m, C, L]
        pos = lam_f.clamp(min=0)
        neg = lam_f - pos
        bb = max(b, B)
        const = neg * offset.unsqueeze(1)
        if weights is None:
            cols = torch.zeros(bb, m, C, K, L, dtype=lam.dtype, device=lam.device)
            cols.scatter_add_(3, k_lo.unsqueeze(1).unsqueeze(3).expand(bb, m, C, 1, L),
                              pos.unsqueeze(3).expand(bb, m, C, 1, L))
        else:  # one row per example (the optimiser's batch): weights [b, 1, C * K * L]
            valid, reach = _window_facts(node, bounds)
            w = weights.values.view(b, C, K, L).clamp(0.0, 1.0) * valid
            p = w / w.sum(2, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
            excess = ((p.detach().double().sum(2) - 1).abs() + (K + 1) * 2.0 ** -53).to(lam.dtype)  # [b, C, L]
            cols = p.unsqueeze(1) * pos.unsqueeze(3)
            const = const - pos * (2 * excess * reach).unsqueeze(1)
        cols = cols.scatter_add(3, k_up.unsqueeze(1).unsqueeze(3).expand(bb, m, C, 1, L),
                                (neg * slope.unsqueeze(1)).unsqueeze(3).expand(bb, m, C, 1, L))
        Hp, Wp = H + pad[2] + pad[3], W + pad[0] + pad[1]
        folded = F.fold(cols.reshape(bb * m, C * K, L), (Hp, Wp), **geom)
        lam_in = folded[:, :, pad[2]:pad[2] + H, pad[0]:pad[0] + W].reshape(bb, m, C, H, W)
        return DualStep([lam_in], const.flatten(2).sum(-1), None)


def _pool_2d(node, spatial) -> tuple[list[int], dict, tuple[int, int, int, int]]:
    """``(kernel, unfold/fold geometry, F.pad amounts)`` of a 2-D MaxPool with a dual layer."""
    g = window(node, spatial)
    kernel = list(g.kernel)
    if len(kernel) != 2 or node.attrs.get("ceil_mode", 0):
        raise UnsupportedOpError(f"node '{node.name}' (MaxPool): only 2-D pooling without ceil_mode "
                                 "has a dual layer")
    geom = dict(kernel_size=kernel, stride=list(g.strides), dilation=list(g.dilations))
    return kernel, geom, (g.begins[1], g.ends[1], g.begins[0], g.ends[0])  # F.pad order: left, right, top, bottom


def max_pool_lines(node, bounds: Bounds) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both lines of every window of a 2-D MaxPool on ``bounds`` of its input, as maps of its
    output's shape ``[B, C, Ho, Wo]``: the entry of the lower line ``z_k*`` (index within the
    window, row-major; the entry of largest lower bound) and the entry, slope and offset of
    the upper line (:func:`max_upper_line`). Computed once per bounds object; the dense dual
    layer and the patch path (:func:`dualgraph.patches.through_max_pool`) both read them."""
    key = (node.name, "max_pool_lines")
    if key not in bounds.cache:
        l, u = bounds
        l_win, u_win = _windows(node, l), _windows(node, u)
        k_up, slope, offset = max_upper_line(l_win, u_win)
        shape = (*l.shape[:2], *node.output.unit_shape[1:])
        # the lower line: the largest lower bound; among ties (ReLU outputs often share l = 0)
        # the largest upper bound, then the first entry
        tied = torch.where(l_win == l_win.amax(2, keepdim=True), u_win, -math.inf)
        k_lo = _first(tied == tied.amax(2, keepdim=True))
        bounds.cache[key] = (k_lo.view(shape), k_up.view(shape), slope.view(shape), offset.view(shape))
    return bounds.cache[key]


def free_lower_weights(node, bounds: Bounds) -> FreeSlopes | None:
    """The lower line's free parameters of a 2-D MaxPool on ``bounds`` (one example per row,
    as the slope optimiser's batches have): weights in ``[0, 1]`` on each window's entries,
    ``[B, 1, C * K * L]`` (channel, window entry, position), normalised where used, started
    one-hot on the entry of the fixed lower line (the same line); None where every window
    has a dominating entry (its line is then exact)."""
    k_lo, k_up, slope, offset = max_pool_lines(node, bounds)
    if bool((slope == 1).all() & (offset == 0).all()):
        return None
    valid, _ = _window_facts(node, bounds)
    B, C, K, L = valid.shape
    start = torch.zeros(valid.shape, dtype=bounds.lower.dtype, device=bounds.lower.device)
    start.scatter_(2, k_lo.view(B, C, 1, L), 1.0)
    values = start.view(B, 1, -1).requires_grad_(True)
    index = torch.arange(values.shape[-1], device=values.device)
    return FreeSlopes(index, values, valid.view(B, 1, -1), 0.0, 1.0, width=values.shape[-1])


def _window_facts(node, bounds: Bounds) -> tuple[Tensor, Tensor]:
    """``(valid, reach)``: which entries of each window lie on the map (``[B, C, K, L]``) and
    the window's largest ``|l|, |u|`` (``[B, C, L]``); kept with the bounds."""
    key = (node.name, "max_pool_window_facts")
    if key not in bounds.cache:
        l, u = bounds
        reach = max_pool_eval(node, [torch.maximum(l.abs(), u.abs())]).flatten(2)
        bounds.cache[key] = (torch.isfinite(_windows(node, l)), reach)
    return bounds.cache[key]


def _windows(node, x: Tensor) -> Tensor:
    """The pool windows of ``x`` ``[B, C, H, W]`` as ``[B, C, K, L]`` (entry, position), the
    padding at ``-inf`` (it never wins a max)."""
    kernel, geom, pad = _pool_2d(node, x.shape[2:])
    return F.unfold(F.pad(x, pad, value=-math.inf), **geom).view(*x.shape[:2], kernel[0] * kernel[1], -1)


def _first(mask: Tensor) -> Tensor:
    """The first True entry along dimension 2 of ``mask`` (``argmax`` leaves ties to the
    kernel, which may resolve them differently for different memory layouts)."""
    index = torch.arange(mask.shape[2], device=mask.device).view(1, 1, -1, *([1] * (mask.dim() - 3)))
    return torch.where(mask, index, mask.shape[2]).amin(2, keepdim=True)


max_pool.onnx_import(_onnx_pool)


@max_pool.fx_lowering(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _(lo, call: Call):
    m = call.module
    return _lower_max_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                           m.return_indices)


@max_pool.fx_lowering(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _(lo, call: Call):
    return _lower_max_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                           call.arg(3, "padding", 0), call.arg(4, "dilation", 1), call.arg(5, "ceil_mode", False),
                           call.arg(6, "return_indices", False))


def _lower_max_pool(lo, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
                    ceil_mode: bool, return_indices: bool):
    if return_indices:
        raise Unsupported("return_indices=True")
    nd = lo.rank(lo.var(x)) - 2
    return _lower_pool(lo, "MaxPool", x, kernel, stride, padding, ceil_mode, {"dilations": ntuple(dilation, nd)})


max_pool.example(var(2, 4, 4), attrs={"kernel_shape": [2, 2], "strides": [2, 2]})
max_pool.example(var(1, 4, 4), attrs={"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]})
max_pool.example(var(1, 5, 5), attrs={"kernel_shape": [2, 2], "strides": [1, 1], "dilations": [2, 2]})
max_pool.example(var(2, 3, 5), attrs={"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0]})


# ---- GlobalMaxPool (evaluation only) ----------------------------------------------------------------

global_max_pool = define_op("GlobalMaxPool")


@global_max_pool.evaluate
def _(node, inputs):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


global_max_pool.onnx_import(_onnx_global_pool)
