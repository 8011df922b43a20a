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
    """``F.conv_transpose2d``; undilated, where :func:`by_phases` says so, as one stride-1
    transpose per output **phase**. An output pixel ``y = s i + r`` (phase ``r < s``) takes
    only the taps ``w[r::s]`` of the filter:

        out[s i + r] = sum_m x[m] w[s i + r - s m] = sum_m x[m] w[r::s][i - m],

    a stride-1 transposed convolution with that sub-filter (none for ``r`` past the filter:
    zeros). The phases together sum the strided transpose's terms, in another order (the
    rounding allowance bounds any order); torch's CPU kernel for a strided transpose with a
    filter no wider than its stride is several times slower than these stride-1 ones."""
    s, pad, extra = tuple(stride), tuple(padding), tuple(output_padding)
    if tuple(dilation) != (1, 1) or not by_phases(x, w, s):
        return F.conv_transpose2d(x, w, stride=s, padding=pad, output_padding=extra, groups=groups,
                                  dilation=tuple(dilation))
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
