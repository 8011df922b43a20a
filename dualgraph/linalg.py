"""Small batched linear-algebra helpers shared by dual layers, input sets and the scheduler.

Rows tensors have shape ``[b, m, *unit]``: ``m`` specification rows for each of ``b``
examples, where ``b == 1`` means the rows are shared by every example of the batch
(as they are until the first example-dependent dual layer is crossed).
"""

from __future__ import annotations

import torch


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
