"""The core dual layers, one registration per op (contract: :mod:`dualgraph.dual_registry`).

Affine and structural ops are exact (Corollary 1; structural ops are the adjoint of their
index map, obtained as a vector-Jacobian product). Activations use linear relaxations on
the pre-activation bounds ``[l, u]``: ReLU per Corollary 2 (or CROWN's adaptive lower
slope), the others with the chord slope and offsets from the exact extremes of
``f(z) - a z`` on ``[l, u]``, which is the tightest pair of parallel bounding lines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dual_registry import (AffineRule, Bounds, DualRule, DualStep, Relaxation, const_args,
                            register_dual, register_relaxation)
from .errors import UnsupportedOpError
from .eval_rules import window
from .ir import Node

# ---- affine and structural ops --------------------------------------------------------

# Each class states, besides its adjoint, the arithmetic that dualgraph.rounding bounds:
# ``abs_by_eval`` (the op with |constants| computes |A| x + c), ``eval_length`` and
# ``dual_length`` (the most nonzero terms of one sum in the op's evaluation / its dual).

def _offset_dot(rule: AffineRule, node: Node) -> int:
    """Length of the dot product ``lam . f(0)`` (0 when the op has no constant term)."""
    return max(o.numel for o in node.outputs) + 1 if rule.has_offsets(node) else 0


class IndexMapDual(AffineRule):
    """Ops that only move, copy or zero-fill entries: no arithmetic but a padding constant."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return _offset_dot(self, node)


INDEX_MAP_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice",
                 "Split", "Pad", "Identity", "Dropout")
for _op in INDEX_MAP_OPS:
    register_dual(_op)(type(f"{_op}Dual", (IndexMapDual,), {}))


def _broadcast_factor(node: Node) -> int:
    """How many output entries one variable input entry reaches (its adjoint sums them)."""
    return max(1, max(o.numel for o in node.outputs) // max(1, min(v.numel for v in node.var_inputs)))


class ElementwiseAffineDual(AffineRule):
    """Elementwise arithmetic with constants or between variables (broadcasting allowed)."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return 4  # (x - mean) / sqrt(var + eps) * scale + B at most

    def dual_length(self, node, bounds, config):
        return max(_broadcast_factor(node) + 2, _offset_dot(self, node))


@register_dual("Add")
class AddDual(ElementwiseAffineDual):
    pass


@register_dual("BatchNormalization")
class BatchNormDual(ElementwiseAffineDual):
    """Inference BatchNorm: with |scale| and |B| its linear part is |scale| / sqrt(var + eps)."""


@register_dual("Sub")
class SubDual(ElementwiseAffineDual):
    def abs_linear(self, node, xs, bounds, config):
        return self.eval_with_abs_constants(node, xs, ("", "Add"))  # |a - b| <= |a| + |b|


@register_dual("Neg")
class NegDual(ElementwiseAffineDual):
    def abs_linear(self, node, xs, bounds, config):
        return [xs[0]]


@register_dual("AveragePool")
class AveragePoolDual(AffineRule):
    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return math.prod(node.attrs["kernel_shape"]) + 1

    def dual_length(self, node, bounds, config):
        return math.prod(node.attrs["kernel_shape"]) + 1  # overlapping windows add up per input unit


@register_dual("GlobalAveragePool")
class GlobalAveragePoolDual(AffineRule):
    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        return math.prod(node.inputs[0].unit_shape[1:]) + 1

    def dual_length(self, node, bounds, config):
        return 1


def _require_const(node: Node, *indices: int) -> None:
    for i in indices:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            raise UnsupportedOpError(
                f"node '{node.name}' ({node.op_type}): input '{v.name}' depends on the network input; "
                f"{node.op_type} is only supported with a constant operand here (it would not be affine)")


@register_dual("Mul")
class MulDual(ElementwiseAffineDual):
    def backward(self, node, lam, bounds, config):
        if len(node.var_inputs) != 1:
            _require_const(node, 0, 1)
        return super().backward(node, lam, bounds, config)


@register_dual("Div")
class DivDual(ElementwiseAffineDual):
    def backward(self, node, lam, bounds, config):
        _require_const(node, 1)
        return super().backward(node, lam, bounds, config)


@register_dual("Gemm")
class GemmDual(AffineRule):
    """``Y = alpha * A' B' + beta * C`` with variable A: ``lam_A = alpha * lam B'^T`` (transposed if transA)."""

    bias_slot = 2

    def transpose(self, node, lam_rows):
        _require_const(node, 1, 2)
        w = const_args(node, lam_rows)[1]
        if node.attrs.get("transB", 0):
            w = w.t()
        g = lam_rows @ (w.t() * float(node.attrs.get("alpha", 1.0)))
        return [g.t() if node.attrs.get("transA", 0) else g]

    def abs_linear(self, node, xs, bounds, config):
        if node.attrs.get("transA", 0):
            return self._abs_jacobian(node, xs)
        w = const_args(node, xs[0])[1].abs()
        return [xs[0] @ (w.t() if node.attrs.get("transB", 0) else w) * abs(float(node.attrs.get("alpha", 1.0)))]

    def eval_length(self, node, bounds, config):
        w = node.inputs[1].const
        return w.shape[1 if node.attrs.get("transB", 0) else 0] + 3  # K products, then alpha, beta * C

    def dual_length(self, node, bounds, config):
        return node.output.numel + 2  # the adjoint sums over the outputs; so does lam . bias


@register_dual("MatMul")
class MatMulDual(AffineRule):
    """``x @ W`` or ``W @ x`` with one constant operand (affine); two variables are bilinear."""

    abs_by_eval = True

    def eval_length(self, node, bounds, config):
        w = next(v.const for v in node.inputs if v.is_const)
        return (w.shape[-2] if node.inputs[1].is_const else w.shape[-1]) + 1  # the contracted axis

    def dual_length(self, node, bounds, config):
        w = next(v.const for v in node.inputs if v.is_const)
        return (w.shape[-1] if node.inputs[1].is_const else w.shape[-2]) + 1

    def transpose(self, node, lam_rows):
        if node.inputs[0].is_const and not node.inputs[1].is_const:
            return super().transpose(node, lam_rows)  # W @ x: the generic adjoint (W^T applied on the left)
        _require_const(node, 1)
        w = const_args(node, lam_rows)[1]
        if w.dim() != 2:
            return super().transpose(node, lam_rows)
        return [lam_rows @ w.t()]


@register_dual("Conv")
class ConvDual(AffineRule):
    """Transpose of a 2-D convolution: ``conv_transpose2d`` with the same weights, or, for
    convolutions with few input channels (typically the first layer), a matrix product
    with the filters followed by one strided add per filter tap, which is several times
    faster on CPU than the library's transposed convolution for that shape."""

    abs_by_eval = True
    bias_slot = 2

    def eval_length(self, node, bounds, config):
        w = node.inputs[1].const
        return w.shape[1] * math.prod(w.shape[2:]) + 1  # c_in / groups * taps, then the bias

    def dual_length(self, node, bounds, config):
        w = node.inputs[1].const
        return max(w.shape[0] * math.prod(w.shape[2:]) + 1, _offset_dot(self, node))  # c_out * taps per input

    def transpose(self, node, lam_rows):
        _require_const(node, 1, 2)
        w = const_args(node, lam_rows)[1]
        in_hw = node.inputs[0].unit_shape[1:]
        if w.dim() != 4:
            return super().transpose(node, lam_rows)  # 1-D or 3-D: generic adjoint
        g = window(node, in_hw, w.shape[2:])
        if not g.symmetric:
            return super().transpose(node, lam_rows)  # asymmetric padding: generic adjoint
        stride, pads, dil = list(g.strides), list(g.begins), list(g.dilations)
        groups = int(node.attrs.get("group", 1))
        if groups == 1 and w.shape[1] * w.shape[2] * w.shape[3] <= 64:
            return [_conv_transpose_by_taps(lam_rows, w, stride, pads, dil, in_hw)]
        out_hw = lam_rows.shape[2:]
        extra = [in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * pads[i] + dil[i] * (w.shape[2 + i] - 1) + 1)
                 for i in range(2)]
        if any(e < 0 or e >= max(stride[i], dil[i]) for i, e in enumerate(extra)):
            return super().transpose(node, lam_rows)
        return [F.conv_transpose2d(lam_rows, w, stride=stride, padding=pads, output_padding=extra,
                                   groups=groups, dilation=dil)]


def _conv_transpose_by_taps(lam: torch.Tensor, w: torch.Tensor, stride, pad, dil, in_hw) -> torch.Tensor:
    """``conv_transpose2d`` as ``W^T lam`` (one plane per filter tap) + a strided add per tap."""
    return _TapsTranspose.apply(lam, w, (tuple(stride), tuple(pad), tuple(dil), tuple(in_hw)))


class _TapsTranspose(torch.autograd.Function):
    """The transposed convolution by filter taps, with a backward of the same shape: the
    strided views of the output gradient, one per tap (the adjoint of the strided adds),
    then one matrix product for ``lam``'s gradient and one for the filters'."""

    @staticmethod
    def _full_size(lam, w, stride, pad, dil, in_hw):
        (ho, wo), (kh, kw) = lam.shape[2:], w.shape[2:]
        return (max(in_hw[0] + 2 * pad[0], (ho - 1) * stride[0] + dil[0] * (kh - 1) + 1),
                max(in_hw[1] + 2 * pad[1], (wo - 1) * stride[1] + dil[1] * (kw - 1) + 1))

    @staticmethod
    def _tap_views(t, lam, w, stride, dil):
        """The strided view of padded ``t`` ``[r, c_in, H, W]`` that each tap writes to."""
        (ho, wo), (kh, kw) = lam.shape[2:], w.shape[2:]
        for i in range(kh):
            for j in range(kw):
                y, x = i * dil[0], j * dil[1]
                yield t[:, :, y:y + (ho - 1) * stride[0] + 1:stride[0], x:x + (wo - 1) * stride[1] + 1:stride[1]]

    @staticmethod
    def forward(ctx, lam, w, geometry):
        stride, pad, dil, in_hw = geometry
        ctx.save_for_backward(lam, w)
        ctx.geometry = geometry
        r, c_out, ho, wo = lam.shape
        c_in, kh, kw = w.shape[1:]
        # [c_in*kh*kw, c_out] @ [r, c_out, P]: each tap's plane comes out contiguous (bmm on the
        # expanded filters: matmul would fold the rows into one product through two copies)
        filters = w.reshape(c_out, c_in * kh * kw).t()
        planes = torch.bmm(filters.expand(r, *filters.shape), lam.reshape(r, c_out, ho * wo))
        planes = planes.view(r, c_in, kh * kw, ho, wo)
        out = lam.new_zeros(r, c_in, *_TapsTranspose._full_size(lam, w, stride, pad, dil, in_hw))
        for k, view in enumerate(_TapsTranspose._tap_views(out, lam, w, stride, dil)):
            view += planes[:, :, k]
        return out[:, :, pad[0]:pad[0] + in_hw[0], pad[1]:pad[1] + in_hw[1]]

    @staticmethod
    def backward(ctx, grad):
        lam, w = ctx.saved_tensors
        stride, pad, dil, in_hw = ctx.geometry
        r, c_out, ho, wo = lam.shape
        full = grad.new_zeros(r, grad.shape[1], *_TapsTranspose._full_size(lam, w, stride, pad, dil, in_hw))
        full[:, :, pad[0]:pad[0] + in_hw[0], pad[1]:pad[1] + in_hw[1]] = grad
        planes = torch.stack(list(_TapsTranspose._tap_views(full, lam, w, stride, dil)), 2)
        planes = planes.view(r, -1, ho * wo)                                    # [r, c_in*kh*kw, P]
        grad_lam = grad_w = None
        if ctx.needs_input_grad[0]:
            filters = w.reshape(c_out, -1)
            grad_lam = torch.bmm(filters.expand(r, *filters.shape), planes).view_as(lam)
        if ctx.needs_input_grad[1]:
            # sum over rows of [c_out, P] @ [P, c_in*kh*kw] (einsum picks a far slower order here)
            grad_w = torch.bmm(lam.reshape(r, c_out, -1), planes.transpose(1, 2)).sum(0).reshape_as(w)
        return grad_lam, grad_w, None


# ---- activations ----------------------------------------------------------------------

def _crossing(b: Bounds) -> torch.Tensor:
    return (b.lower < 0) & (b.upper > 0)


@register_relaxation("Relu", linear_if=lambda cfg: cfg.relu_relaxation == "paper",
                     breakpoints=lambda node: (0.0,), eval_roundings=0)
def relu_relaxation(node: Node, b: Bounds, config) -> Relaxation:
    """Corollary 2: slope ``d = u/(u-l)`` on the crossing set, 0 / 1 on the stable sets.

    Upper line ``d (z - l)``; the lower line is ``d z`` (the paper: a linear dual layer) or, with
    ``relu_relaxation="crown"``, ``a z`` with ``a = 1 if u > -l else 0`` (any ``a`` in [0,1]
    is valid).
    """
    l, u = b
    cross = _crossing(b)
    d = torch.where(cross, u / torch.where(cross, u - l, 1.0), (l >= 0).to(l.dtype))
    b_up = torch.where(cross, -d * l, 0.0)
    if config.relu_relaxation == "paper":
        return Relaxation(d, 0.0, d, b_up)
    a_lo = torch.where(cross, (u > -l).to(l.dtype), d)
    return Relaxation(a_lo, 0.0, d, b_up)


@register_relaxation("LeakyRelu", linear_if=lambda cfg: True, eval_roundings=1,  # alpha > 1 takes the chord relaxation, which depends on l and u
                     breakpoints=lambda node: (0.0,) if float(node.attrs.get("alpha", 0.01)) <= 1 else None)
def leaky_relu_relaxation(node: Node, b: Bounds, config) -> Relaxation:
    """Chord slope ``s`` on crossing units; ``s z`` is below f (alpha <= s <= 1), the chord above."""
    alpha = float(node.attrs.get("alpha", 0.01))
    if alpha > 1:
        return _chord_relaxation(b, lambda z: F.leaky_relu(z, alpha), breakpoints=(0.0,))
    l, u = b
    cross = _crossing(b)
    s = torch.where(cross, (u - alpha * l) / torch.where(cross, u - l, 1.0),
                    torch.where(l >= 0, torch.ones_like(l), torch.full_like(l, alpha)))  # alpha in l's precision
    return Relaxation(s, 0.0, s, torch.where(cross, l * (alpha - s), 0.0))


def _chord_relaxation(b: Bounds, f, breakpoints=(), stationary=None) -> Relaxation:
    """Parallel lines of the chord slope ``a`` through the extremes of ``g(z) = f(z) - a z``.

    The extremes of ``g`` on ``[l, u]`` lie at ``l``, ``u``, the breakpoints of a piecewise
    linear ``f``, or the stationary points ``f'(z) = a`` (``stationary(a)`` returns them).
    A tiny absolute margin covers rounding in ``f``.
    """
    l, u = b
    width = u - l
    flat = width <= 1e-12
    a = torch.where(flat, 0.0, (f(u) - f(l)) / torch.where(flat, 1.0, width))
    cands = [l, u] + [torch.full_like(l, p).clamp(min=l, max=u) for p in breakpoints]
    if stationary is not None:
        cands += [z.clamp(min=l, max=u) for z in stationary(a)]
    g = torch.stack([f(z) - a * z for z in cands])
    tol = 1e-7 if l.dtype == torch.float64 else 1e-5
    margin = tol * (1 + g.abs().amax(0))
    return Relaxation(a, g.amin(0) - margin, a, g.amax(0) + margin)


@register_relaxation("Clip", linear_if=lambda cfg: True, eval_roundings=0)
def clip_relaxation(node: Node, b: Bounds, config) -> Relaxation:
    """HardTanh / Clip: piecewise linear, breakpoints at ``min`` and ``max``."""
    args = const_args(node, b.lower) + [None, None]
    # bounds as inputs (opset >= 11) or, before that, as attributes: the same reading as the eval rule
    lo_v = args[1] if args[1] is not None else node.attrs.get("min")
    hi_v = args[2] if args[2] is not None else node.attrs.get("max")
    lo = float(lo_v) if lo_v is not None else -math.inf
    hi = float(hi_v) if hi_v is not None else math.inf
    bps = tuple(p for p in (lo, hi) if math.isfinite(p))
    return _chord_relaxation(b, lambda z: z.clamp(min=lo, max=hi), breakpoints=bps)


def _sigmoid_stationary(a: torch.Tensor) -> list[torch.Tensor]:
    # sigma'(z) = s(1-s) = a  ->  s = (1 + sqrt(1-4a))/2, z = +-logit(s); no solution if a > 1/4
    s = (1 + torch.sqrt((1 - 4 * a).clamp(min=0))) / 2
    z = torch.log(s.clamp(max=1 - 1e-15) / (1 - s).clamp(min=1e-15))
    return [z, -z]


def _tanh_stationary(a: torch.Tensor) -> list[torch.Tensor]:
    # tanh'(z) = 1 - t^2 = a  ->  z = +-atanh(sqrt(1-a)); no solution if a > 1
    t = torch.sqrt((1 - a).clamp(min=0)).clamp(max=1 - 1e-15)
    z = torch.atanh(t)
    return [z, -z]


@register_relaxation("Sigmoid", linear_if=lambda cfg: True)
def sigmoid_relaxation(node: Node, b: Bounds, config) -> Relaxation:
    return _chord_relaxation(b, torch.sigmoid, stationary=_sigmoid_stationary)


@register_relaxation("Tanh", linear_if=lambda cfg: True)
def tanh_relaxation(node: Node, b: Bounds, config) -> Relaxation:
    return _chord_relaxation(b, torch.tanh, stationary=_tanh_stationary)


@register_dual("MaxPool")
class MaxPoolDual(DualRule):
    """Lower: ``max_k z_k >= z_k*`` with ``k*`` the window entry of largest lower bound.
    Upper: ``z_k*`` itself when ``l_k* >= u_k`` for every other ``k`` in the window (then
    the max is exactly ``z_k*``), else the constant ``max_k u_k``. Sign-dependent, so the
    rule is not linear. Windows are formed with ``unfold``; the adjoint is ``fold``.
    """

    needs_bounds = True

    def abs_linear(self, node, xs, bounds, config):
        return [_eval_rule(node)(node, [xs[0]])]  # |max_k z_k| <= max_k |z_k|

    def constant_magnitude(self, node, m_in, bounds, config):
        return [_eval_rule(node)(node, [m_in[0]])]  # the constant max_u of the upper line

    def output_magnitude(self, node, m_in, bounds, config, terms):
        return [_eval_rule(node)(node, [m_in[0]])]

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return max(math.prod(node.attrs["kernel_shape"]), node.output.numel) + 1

    def backward(self, node, lam, bounds, config):
        l, u = bounds[0]
        g = window(node, l.shape[2:])
        k = list(g.kernel)
        if len(k) != 2 or node.attrs.get("ceil_mode", 0):
            raise UnsupportedOpError(f"node '{node.name}' (MaxPool): only 2-D pooling without ceil_mode "
                                     "has a dual layer")
        geom = dict(kernel_size=k, stride=list(g.strides), dilation=list(g.dilations))
        B, C, H, W = l.shape
        pad = (g.begins[1], g.ends[1], g.begins[0], g.ends[0])  # F.pad order: left, right, top, bottom
        # padded entries never win the max: pad l and u with -inf
        l_win = F.unfold(F.pad(l, pad, value=-math.inf), **geom).view(B, C, k[0] * k[1], -1)
        u_win = F.unfold(F.pad(u, pad, value=-math.inf), **geom).view(B, C, k[0] * k[1], -1)
        best_l, sel = l_win.max(2, keepdim=True)                       # [B, C, 1, L]
        max_u = u_win.amax(2)                                          # [B, C, L]
        others_u = u_win.scatter(2, sel, -math.inf).amax(2)
        exact = best_l.squeeze(2) >= others_u                          # [B, C, L]
        b, m = lam.shape[:2]
        lam_f = lam.flatten(3)                                         # [b, m, C, L]
        route = lam_f.clamp(min=0) + torch.where(exact.unsqueeze(1), lam_f.clamp(max=0), 0.0)
        const = torch.where(exact.unsqueeze(1), 0.0, lam_f.clamp(max=0) * max_u.unsqueeze(1))
        bb = max(b, B)
        onehot = torch.zeros(B, C, k[0] * k[1], l_win.shape[-1], dtype=lam.dtype, device=lam.device)
        onehot.scatter_(2, sel, 1.0)
        cols = onehot.unsqueeze(1) * route.unsqueeze(3)                # [bb, m, C, K, L]
        Hp, Wp = H + pad[2] + pad[3], W + pad[0] + pad[1]
        folded = F.fold(cols.reshape(bb * m, C * k[0] * k[1], -1), (Hp, Wp), **geom)
        lam_in = folded[:, :, pad[2]:pad[2] + H, pad[0]:pad[0] + W].reshape(bb, m, C, H, W)
        return DualStep([lam_in], const.flatten(2).sum(-1), None)


def _eval_rule(node: Node):
    from .interpreter import EVAL_RULES
    return EVAL_RULES[node.op]
