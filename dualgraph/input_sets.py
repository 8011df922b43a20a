"""Input sets ``B(x)`` and the input term of the dual objective.

For a row ``lam`` (the coefficient of the network input), the dual objective needs
``min_{x' in B} lam . x' = lam . c - rho(lam)`` and ``max = lam . c + rho(lam)``, where
``c`` is the set's centre and ``rho`` the support function of the centred set:

* box ``[lo, hi]`` (an L-inf ball, an L-inf ball intersected with a pixel range, or a
  VNN-LIB box): ``rho(lam) = || lam * (hi - lo) / 2 ||_1``;
* L2 ball of radius ``eps``: ``rho(lam) = eps * ||lam||_2``.

These are the ``-nu^T x - eps ||nu||_*`` terms of Theorem 1 (dual norms L1 and L2).
"""

from __future__ import annotations

import math

import torch

from .errors import DualgraphError
from .linalg import batched_dot, flat_rows, norm_upper, take_examples


def parse_radius(text: str) -> float:
    """A radius as the command line takes it: a number or a fraction (``0.1``, ``2/255``,
    ``0.5/255``), checked by :func:`check_eps`."""
    from fractions import Fraction
    num, slash, den = str(text).strip().partition("/")
    try:
        if slash and not den.strip():
            raise ValueError(text)
        value = float(Fraction(num) / Fraction(den or 1))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise DualgraphError(f"'{text}' is not a radius; give a number or a fraction such as 0.1 or 2/255") from None
    return check_eps(value)


def check_eps(eps: float) -> float:
    """``eps`` as a float, or a DualgraphError if it is negative or not finite."""
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise DualgraphError(f"eps must be a finite number >= 0, got {eps}")
    return eps


class InputSet:
    """A set of inputs, batched: one set per example (``center`` is ``[B, *input_shape]``)."""

    center: torch.Tensor

    def support(self, lam: torch.Tensor) -> torch.Tensor:
        """``max_{x' in B} lam . (x' - c)`` for rows ``[b, m, *input_shape]`` -> ``[B, m]``."""
        raise NotImplementedError

    def bounding_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest box containing the set (used by attacks and sampling)."""
        raise NotImplementedError

    def take(self, examples: torch.Tensor) -> InputSet:
        """The sets of the given examples (an index tensor into the batch), in that order."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random points of each example's set: ``[n, B, *input_shape]``."""
        raise NotImplementedError


class Box(InputSet):
    """``{x' : lo <= x' <= hi}``; ``lo``, ``hi`` of shape ``[B, *input_shape]``."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if lo.shape != hi.shape:
            raise DualgraphError(f"box bounds have different shapes {tuple(lo.shape)} and {tuple(hi.shape)}")
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise DualgraphError("box bounds must be finite")
        if (lo > hi).any():
            raise DualgraphError("box has a lower bound above its upper bound")
        self.lo, self.hi = lo, hi
        self.center = (lo + hi) / 2
        self.radius = (hi - lo) / 2

    def support(self, lam):
        return batched_dot(lam.abs(), self.radius)

    def bounding_box(self):
        return self.lo, self.hi

    def take(self, examples):
        box = object.__new__(Box)  # already checked: skip the checks of __init__
        box.lo, box.hi, box.center, box.radius = (take_examples(t, examples)
                                                  for t in (self.lo, self.hi, self.center, self.radius))
        return box

    def sample(self, n, generator=None):
        t = torch.rand((n, *self.lo.shape), generator=generator, dtype=self.lo.dtype).to(self.lo.device)
        return self.lo + t * (self.hi - self.lo)


def linf_ball(x: torch.Tensor, eps: float, clip: tuple[float, float] | None = None) -> Box:
    """``{x' : ||x' - x||_inf <= eps}``, intersected with ``clip = (lo, hi)`` if given.

    The box is rounded outward (:func:`outward`): ``x - eps`` in float32 may round up, and
    the certificate must cover every point of the real ball."""
    eps = check_eps(eps)
    wide = x.detach().to(torch.float64)
    lo, hi = outward(wide - eps, wide + eps, x.dtype)
    if clip is not None:
        lo, hi = lo.clamp(min=clip[0], max=clip[1]), hi.clamp(min=clip[0], max=clip[1])
    return Box(lo, hi)


class L2Ball(InputSet):
    """``{x' : ||x' - x||_2 <= eps}`` per example."""

    def __init__(self, x: torch.Tensor, eps: float) -> None:
        self.center, self.eps = x, check_eps(eps)

    def support(self, lam):
        n = norm_upper(flat_rows(lam), -1) * self.eps
        return n.expand(self.center.shape[0], -1) if n.shape[0] == 1 else n

    def bounding_box(self):
        return self.center - self.eps, self.center + self.eps

    def take(self, examples):
        return L2Ball(self.center[examples], self.eps)

    def sample(self, n, generator=None):
        shape = (n, *self.center.shape)
        g = torch.randn(shape, generator=generator, dtype=self.center.dtype).to(self.center.device)
        g = g / g.flatten(2).norm(dim=-1).clamp(min=1e-30).view(n, -1, *[1] * (len(shape) - 2))
        rad = torch.rand(shape[:2], generator=generator, dtype=self.center.dtype).to(self.center.device)
        rad = rad ** (1.0 / self.center[0].numel())
        return self.center + self.eps * g * rad.view(n, -1, *[1] * (len(shape) - 2))


def outward(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lo, hi]`` (any precision) as a box in ``dtype`` that contains it: rounded down /
    up, and one more step out where the rounding could not be checked (same precision)."""
    lo_c, hi_c = lo.to(dtype), hi.to(dtype)
    if lo.dtype == dtype or torch.finfo(lo.dtype).eps > torch.finfo(dtype).eps:
        # the inputs were themselves rounded in (at most) this precision: one step out
        return torch.nextafter(lo_c, lo_c.new_tensor(-float("inf"))), torch.nextafter(hi_c, hi_c.new_tensor(float("inf")))
    lo_c = torch.where(lo_c.to(lo.dtype) > lo, torch.nextafter(lo_c, lo_c.new_tensor(-float("inf"))), lo_c)
    hi_c = torch.where(hi_c.to(hi.dtype) < hi, torch.nextafter(hi_c, hi_c.new_tensor(float("inf"))), hi_c)
    return lo_c, hi_c


def make_input_set(x: torch.Tensor, eps: float, norm: str = "linf",
                   clip: tuple[float, float] | None = None) -> InputSet:
    """An L-inf ball (optionally clipped to a pixel range) or an L2 ball around each row of ``x``."""
    if norm == "linf":
        return linf_ball(x, eps, clip)
    if norm == "l2":
        return L2Ball(x, eps)
    raise DualgraphError(f"unknown norm '{norm}'; use linf or l2")
