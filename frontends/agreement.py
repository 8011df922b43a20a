"""When a lowered graph and its source compute the same function, up to rounding.

Both frontends compare the IR they built with what the user's model computes at random
inputs (onnxruntime for an ONNX file, the module itself for torch.fx): a certificate is about
the graph, and this comparison is what makes it one about the model. The rule is per output
entry, so that one large entry does not hide another's difference:

``|ours - theirs| <= AGREEMENT_TOLERANCE (1 + |theirs|) + ROUNDING_FACTOR |ours - accurate|``

where ``ours`` is the graph in the model's precision and ``accurate`` the graph in float64.
Rounding stays within that; a lowering that computes another function is off by the order of
the values themselves.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AGREEMENT_TOLERANCE", "OVERFLOW_SHARE", "ROUNDING_FACTOR", "differences"]

AGREEMENT_TOLERANCE = 1e-3
"""Differences up to this share of ``1 + |y|`` in an output entry are rounding."""

OVERFLOW_SHARE = 2.0 ** -20
"""An output entry that is infinite (or NaN) on one side only counts as rounding where the other
side's is above this share of the precision's largest number (an overflow at the edge)."""

ROUNDING_FACTOR = 100
"""Models whose float32 evaluation cancels heavily at a point (so that two evaluation orders
differ far more than ``1e-3``) show it in the graph's own two precisions as well."""


def differences(ours: np.ndarray, accurate: np.ndarray, theirs: np.ndarray, limit: float) -> np.ndarray:
    """The entries where ``ours`` and ``theirs`` differ by more than rounding explains (the rule in
    this module's docstring); ``accurate`` is the graph in float64, ``limit`` where an overflow
    may start (:data:`OVERFLOW_SHARE` of the largest number). All three arrays share one shape."""
    with np.errstate(invalid="ignore"):  # inf - inf
        rounding = np.nan_to_num(np.abs(ours - accurate), nan=0.0, posinf=0.0)
        tolerance = AGREEMENT_TOLERANCE * (1 + np.abs(theirs)) + ROUNDING_FACTOR * rounding
        # both overflowed: the evaluators may differ (inf against NaN), not compared; one did: the
        # other must be near the largest number
        finite_ours, finite_theirs = np.isfinite(ours), np.isfinite(theirs)
        one_sided = (finite_ours != finite_theirs) & ~(np.abs(np.where(finite_ours, ours, theirs)) > limit)
        return one_sided | (finite_ours & finite_theirs & ~(np.abs(ours - theirs) <= tolerance))
