"""Small batched linear-algebra helpers shared by dual layers, input sets and the scheduler.

Rows tensors have shape ``[b, m, *unit]``: ``m`` specification rows for each of ``b``
examples, where ``b == 1`` means the rows are shared by every example of the batch
(as they are until the first example-dependent dual layer is crossed).
"""

from __future__ import annotations

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


PHASES_MIN_MAP = 6
"""Smallest input map (pixels a side) on which :func:`conv_transpose2d` splits a strided
transpose into phases; on smaller maps the extra calls cost more than they save."""


def by_phases(x: torch.Tensor, stride: tuple[int, int]) -> bool:
    """Whether :func:`conv_transpose2d` runs the transpose of ``x`` phase by phase: float32,
    a stride above 1, a map of at least ``PHASES_MIN_MAP`` pixels a side."""
    return x.dtype == torch.float32 and tuple(stride) != (1, 1) and min(x.shape[2:]) >= PHASES_MIN_MAP


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int] = (1, 1),
                     padding: tuple[int, int] = (0, 0), output_padding: tuple[int, int] = (0, 0),
                     groups: int = 1) -> torch.Tensor:
    """``F.conv_transpose2d`` (dilation 1); a strided one in float32 as one stride-1 transpose
    per output **phase**. An output pixel ``y = s i + r`` (phase ``r < s``) takes only the taps
    ``w[r::s]`` of the filter:

        out[s i + r] = sum_m x[m] w[s i + r - s m] = sum_m x[m] w[r::s][i - m],

    a stride-1 transposed convolution with that sub-filter. The phases together do the strided
    transpose's arithmetic, but torch's CPU kernels run stride 1 far faster: measured here
    (float32, one thread) 1.6x for ``[4096, 32, 7, 7]`` through a 3x3 filter to 16 channels,
    3.0x through a 1x1 one, 2.1x for a 4x4 stem to 3 channels; about even or slower on maps
    under ``PHASES_MIN_MAP`` pixels and in float64, which keep the library's kernel
    (:func:`by_phases`). The summation order differs, the terms summed do not (the rounding
    allowance bounds any order)."""
    s, pad, extra = tuple(stride), tuple(padding), tuple(output_padding)
    if not by_phases(x, s):
        return F.conv_transpose2d(x, w, stride=s, padding=pad, output_padding=extra, groups=groups)
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
