"""Small batched linear-algebra helpers shared by dual layers, input sets and the scheduler.

Rows tensors have shape ``[b, m, *unit]``: ``m`` specification rows for each of ``b``
examples, where ``b == 1`` means the rows are shared by every example of the batch
(as they are until the first example-dependent dual layer is crossed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flat_rows(lam: torch.Tensor) -> torch.Tensor:
    """``[b, m, *unit] -> [b, m, n]`` (a view when possible)."""
    return lam.reshape(lam.shape[0], lam.shape[1], -1)


def batched_dot(lam: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_units lam[b, m] * t[b]`` for lam ``[b, m, *unit]``, t ``[B, *unit]`` -> ``[max(b, B), m]``.

    Either side may have batch 1 (broadcast); shared rows cost one matrix product.
    """
    lf = flat_rows(lam)
    if t.shape[0] > 1 and t.stride(0) == 0:  # one tensor expanded over the batch: shared
        t = t[:1]
    tf = t.reshape(t.shape[0], -1)
    if lf.shape[0] == 1:
        return tf @ lf[0].transpose(0, 1)
    if tf.shape[0] == 1:
        return lf @ tf[0]
    if lf.shape[1] == 1:  # one row per example (the slope optimiser's rows): 3-4x faster than einsum
        return (lf[:, 0] * tf).sum(-1, keepdim=True)
    return torch.einsum("bmn,bn->bm", lf, tf)


def norm_upper(t: torch.Tensor, dim) -> torch.Tensor:
    """An upper bound of ``||t||_2`` over ``dim`` that the squares' underflow cannot make too
    small (``torch.linalg.vector_norm`` of entries around 2^-80 in float32 is 0): the norm of
    ``t / s`` times ``s``, ``s`` the power of two at or below the largest ``|t|`` (exact scalings),
    plus ``sqrt(n sigma) s`` for the squares of ``t / s`` that may still underflow or be flushed
    (each below ``sigma``, the smallest normal number). Its rounding is relative, as the
    norm's; its gradient is the norm's (``s`` is a constant)."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod(t.shape[d] for d in dims)
    largest = t.detach().abs().amax(dim=dims, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(torch.where(largest > 0, largest, 1.0))))
    norm = torch.linalg.vector_norm(t / scale, dim=dims) + math.sqrt(n * torch.finfo(t.dtype).tiny)
    return norm * scale.squeeze(dims)


def between(l: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``l + t (u - l)`` for ``t`` in ``[0, 1]``, kept in ``[l, u]``: at ``t = 1`` the sum may
    round past ``u``, and a point outside an interval tests nothing that must hold on it."""
    return torch.minimum(torch.maximum(l + t * (u - l), l), u)


def take_examples(t: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """Rows ``examples`` of a batched tensor ``[B, ...]``; a batch of 1 is shared by all (and
    one tensor expanded over the batch stays an expanded view)."""
    if t.shape[0] > 1 and t.stride(0) != 0:
        return t[examples]
    return t[:1].expand(len(examples), *t.shape[1:])


def tensor_key(t: torch.Tensor) -> tuple[int, int]:
    """Identity and version of ``t``: part of every cache key of a value derived from a
    constant, so that replacing the tensor or editing it in place invalidates the entry."""
    return id(t), t._version


def by_phases(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int]) -> bool:
    """Whether :func:`conv_transpose2d` runs the (undilated) transpose of ``x`` by the filter
    ``w`` phase by phase: in float32, for a filter no wider than its stride (each phase takes at most one
    tap: a 1x1 ResNet shortcut, a 2x2 stride-2 patch embedding). Measured here (float32, one
    thread, huge pages, 512-4096 rows on 2- to 15-pixel maps): 1.2-5x for those; for wider
    filters between 0.86x and 1.5x, and in float64 0.3-0.9x, so they keep the library's kernel."""
    return (x.dtype == torch.float32 and tuple(stride) != (1, 1)
            and all(k <= s for k, s in zip(w.shape[2:], stride)))


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int] = (1, 1),
                     padding: tuple[int, int] = (0, 0), output_padding: tuple[int, int] = (0, 0),
                     groups: int = 1, dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``F.conv_transpose2d``, by the fastest of three ways that give the same sums (in another
    order: the rounding allowance bounds any order):

    * a filter with few outputs per input (``c_out * taps <= TAPS_MAX_INPUTS``: a network's
      first layer, seen from its transpose): :func:`conv_transpose_by_taps`;
    * undilated, where :func:`by_phases` says so: one stride-1 transpose per output **phase**.
      An output pixel ``y = s i + r`` (phase ``r < s``) takes only the taps ``w[r::s]``:

          out[s i + r] = sum_m x[m] w[s i + r - s m] = sum_m x[m] w[r::s][i - m],

      a stride-1 transposed convolution with that sub-filter (none for ``r`` past the filter:
      zeros); torch's CPU kernel for a strided transpose with a filter no wider than its stride
      is several times slower than these stride-1 ones;
    * else the library's kernel."""
    s, pad, extra, dil = tuple(stride), tuple(padding), tuple(output_padding), tuple(dilation)
    if groups == 1 and math.prod(w.shape[1:]) <= TAPS_MAX_INPUTS:
        out_hw = [(x.shape[2 + i] - 1) * s[i] - 2 * pad[i] + dil[i] * (w.shape[2 + i] - 1) + 1 + extra[i]
                  for i in range(2)]
        return conv_transpose_by_taps(x, w, s, pad, dil, out_hw)
    if dil != (1, 1) or not by_phases(x, w, s):
        return F.conv_transpose2d(x, w, stride=s, padding=pad, output_padding=extra, groups=groups, dilation=dil)
    (h, v), (kh, kw) = x.shape[2:], w.shape[2:]
    full_hw = ((h - 1) * s[0] + kh, (v - 1) * s[1] + kw)
    every_phase = s[0] <= kh and s[1] <= kw  # else some phases take no tap: zeros
    full = (x.new_empty if every_phase else x.new_zeros)(x.shape[0], w.shape[1] * groups, *full_hw)
    for r in range(min(s[0], kh)):
        for c in range(min(s[1], kw)):
            full[:, :, r::s[0], c::s[1]] = F.conv_transpose2d(x, w[:, :, r::s[0], c::s[1]], groups=groups)
    out_hw = [full_hw[i] - 2 * pad[i] + extra[i] for i in range(2)]
    out = full[:, :, pad[0]:pad[0] + out_hw[0], pad[1]:pad[1] + out_hw[1]]
    short = [out_hw[i] - out.shape[2 + i] for i in range(2)]  # output padding past the full map
    if any(short):
        return F.pad(out, (0, short[1], 0, short[0]))
    return out if out.shape == full.shape else out.contiguous()


TAPS_MAX_INPUTS = 64
"""Transposes whose every input pixel feeds at most this many outputs (``c_out * taps`` of the
transpose: the primal convolution's inputs per output) run by taps. Measured here (float32, one thread, 4,096 rows): a 3x3 stride-2 filter to 3 channels
(a stem's transpose) 1.3-1.4x faster than the library's kernel on 7- to 15-pixel maps; to 16
channels 2.1-2.7x slower."""


def conv_transpose_by_taps(lam: torch.Tensor, w: torch.Tensor, stride, pad, dil, in_hw) -> torch.Tensor:
    """``conv_transpose2d`` as ``W^T lam`` (one plane per filter tap), then the planes summed
    into the map: by ``F.fold`` (col2im) where its blocks are the rows' positions, else by a
    strided add per tap."""
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
    def _fold_fits(lam, w, stride, pad, dil, in_hw) -> bool:
        """Whether ``F.fold`` onto ``in_hw`` with this geometry takes exactly ``lam``'s
        positions as its blocks (it has no output padding: a map cut short or padded past
        the last block's reach does not fit)."""
        return all(in_hw[i] + 2 * pad[i] >= dil[i] * (w.shape[2 + i] - 1) + 1
                   and (in_hw[i] + 2 * pad[i] - dil[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 == lam.shape[2 + i]
                   for i in range(2))

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
        if kh * kw > 1 and _TapsTranspose._fold_fits(lam, w, stride, pad, dil, in_hw):
            # the strided adds in one call (col2im, the same sums in the same order): 1.3-1.5x
            # faster here on a stem's transpose (3x3 stride 2 to 3 channels, 2,048 rows on 11-
            # to 16-pixel maps); with one tap its single add is faster
            return F.fold(planes, tuple(in_hw), (kh, kw), dilation=dil, padding=pad, stride=stride)
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
