"""Random projections for intermediate bounds (Section 3.2: Algorithm 1, Theorem 2).

The forward engine (:mod:`dualgraph.forward`) writes the radius of every unit ``j`` of a
bounded value as ``rho(F_x[:, j]) + sum_acts sum_k |F_act[k, j]|``: an input term and
one L1 term per activation, where the columns ``F`` are the identity (of the input, and
of each activation's gap units scaled by the half-gap) pushed forward. The half-gap split
is exactly Theorem 2's ``[a]_+ = (|a| + a)/2``: the linear ``a/2`` part rides in the
centre pass (one extra vector, exact), only the ``|a|/2`` part is a sum of absolute values.
The schemes here push ``r`` random columns instead of one per unit, so the cost is ``r``
(plus the centre) forward passes, linear in the network size:

* **L1 terms** (box inputs, every gap term): push ``R * scale`` with ``R`` standard
  Cauchy (``r`` columns; each draw is shared by the examples of a batch, and a gap term's
  columns are zero off the crossing set because the gap is). By 1-stability each pushed entry is
  ``||scale * row||_1 * C`` with ``C`` standard Cauchy, and ``median |C| = 1``, so the
  sample median of ``|.|`` over the ``r`` columns estimates the norm (Li et al. 2007; no
  rescaling). For even ``r`` we take the geometric mean of the two middle order
  statistics: ``log |C|`` is symmetric about 0 (``|C|`` and ``1/|C|`` have the same law),
  so the estimate is *exactly median-unbiased* for every ``r``:
  ``P(estimate < norm) = 1/2``.
* **One projection for all L1 terms.** Algorithm 1 keeps ``r`` columns per source (the
  input and every ReLU layer) and adds one median per source. Cauchy variables are
  1-stable: a sum of independent ``a_s C_s`` is ``(sum_s |a_s|) C``. So the gap columns
  of every activation are *added* to the input's columns as they appear (fresh,
  independent draws) and one median estimates the whole radius
  ``||lam * radius||_1 + sum_acts sum_k |F_act[k, j]|`` at once: ``r`` columns through
  each layer instead of ``r`` per source behind it, and one median per bounded value.
  The relative error of the merged estimate is that of one median (``~ pi / (2 sqrt r)``).
* **Lower median for training** (``proj_estimator="lower-median"``, the training default):
  the ``ceil(r/2)``-th smallest ``|.|`` (the lower of the two middle ones for even ``r``, as
  ``torch.median`` and the paper's code), biased low by the factor ``~tan(pi k / (2 (r+1)))``
  (``k = ceil(r/2)``: about 0.87 at r = 10, 0.97 at r = 50). A training loss wants the exact
  bound, and noise in intermediate estimates *inflates* it (the relaxation penalty grows with
  the bounds' width, and wider estimates also add crossing units): on the paper's small
  MNIST model at r = 10 the median-unbiased estimate puts the robust loss 22-33% above the
  exact one, the lower median 4-11% (``bench/train_report.md``). For estimates reported to
  a user (``certify --proj``) the default stays the median-unbiased one.
* **L2 input term** (L2 balls): push ``eps * G`` with ``G`` standard Gaussian; each entry
  is ``eps ||row||_2 * N(0, 1)``, estimated by ``||entries||_2 / sqrt(r)``.
* **Geometric-mean estimator** (``proj_estimator="geometric"``, Li et al. 2007):
  ``cos(pi/(2r))^r * prod_i |x_i|^(1/r)``, mean-unbiased because
  ``E |C|^t = 1/cos(pi t/2)`` for ``|t| < 1``.

**High-probability upper estimates** (``delta``; the paper's Appendix E.1 idea). Each L1
term is replaced by ``c(r, delta') * prod_i |x_i|^(1/r)`` with ``c`` from a Chernoff
bound: with ``x_i = d |C_i|`` and ``S = sum_i log |C_i|``, for every ``0 < t < 1``

    P(c (prod |x_i|)^(1/r) < d) = P(S < -r log c) <= E[|C|^-t]^r e^(-t r log c)
                                 = exp(-r log cos(pi t / 2) - t r log c),

which is ``<= delta'`` when ``log c = min_t (-log cos(pi t/2) + log(1/delta')/r) / t``
(:func:`cauchy_upper_factor`; as ``r -> inf`` this tends to the Gaussian figure
``pi sqrt(log(1/delta') / (2 r))``). The L2 input term uses the exact chi-square quantile:
``||x||_2^2 / (eps ||row||_2)^2`` is chi-square with ``r`` degrees of freedom, so
``||x||_2 / sqrt(q)`` with ``P(chi2_r < q) = delta'`` is an upper estimate with
probability ``1 - delta'``.

*Independence.* Algorithm 1 pushes one draw through every layer, so the slopes ``D`` of
a layer (from the estimated bounds of the layer before) depend on the same draw that then
estimates the next layer's norms; the median estimate is then only approximately
median-unbiased there (fine for training, as in the paper). With ``delta`` every bounded
value is estimated from its own fresh draw (:meth:`Projections.bounds`), independent of
the earlier bounds it is conditioned on, so the tail bound applies as stated.

*What the guarantee covers.* With a box input the whole radius of a unit is one L1
estimate (``delta' = delta``); with an L2 ball it is two terms (the Gaussian input term
and the merged gap terms), each with ``delta' = delta / 2``. So by a union bound **each
intermediate bound** (one unit's ``l`` and ``u``, which share one radius) holds with
probability at least ``1 - delta`` over the draws of that call. A
final certificate ``J(C)`` needs *all* ``N`` intermediate bounds it used to hold; by a
union bound it is valid with probability at least ``1 - N delta`` (``N`` is the number of
bounded units per example, :attr:`BoundScheduler.bound_targets`), which is vacuous unless
``delta << 1/N``. Results computed this way are estimates, labelled "probabilistic", and
must never be reported as verified. The draws are independent of the data only if the
seed is not chosen after looking at the results.
"""

from __future__ import annotations

import functools
import math

import torch

from .errors import DualgraphError
from .forward import ColumnScheme
from .input_sets import Box, InputSet, L2Ball

ESTIMATORS = ("median", "lower-median", "geometric")


# ---- estimators -------------------------------------------------------------------------

def median_abs(cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sample median of ``|cols|`` along ``dim`` (geometric mean of the middle two for even r).

    The order statistics are selected without autograd and gathered with it, so gradients
    flow only through the selected entries, as in the paper.
    """
    r = cols.shape[dim]
    with torch.no_grad():
        a = cols.detach().abs()
        if r <= MAX_NETWORK_R:
            idx = torch.cat([(a == m.unsqueeze(dim)).to(torch.uint8).max(dim, keepdim=True).indices
                             for m in _middle_values(a, dim)], dim)
        else:
            idx = _middle_indices(a, dim, r)
    sel = cols.gather(dim, idx).abs()
    if r % 2:
        return sel.squeeze(dim)
    lo, hi = sel.unbind(dim)
    prod = lo * hi
    tiny = torch.finfo(prod.dtype).tiny
    # sqrt has an infinite slope at 0: clamp (zero gradient below tiny), then zero exactly
    return torch.where(prod > tiny, prod.clamp(min=tiny).sqrt(), torch.zeros_like(prod))


def lower_median_abs(cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The ``ceil(r/2)``-th smallest of ``|cols|`` along ``dim`` (``torch.median``'s convention:
    the median for odd ``r``, the lower middle one for even ``r``); gradients flow through the
    selected entries only."""
    r = cols.shape[dim]
    with torch.no_grad():
        a = cols.detach().abs()
        if r <= MAX_NETWORK_R:
            m = _middle_values(a, dim, lower_only=True)[0]
            idx = (a == m.unsqueeze(dim)).to(torch.uint8).max(dim, keepdim=True).indices
        else:
            idx = _middle_indices(a, dim, r, lower_only=True)
    return cols.gather(dim, idx).abs().squeeze(dim)


def _middle_indices(a: torch.Tensor, dim: int, r: int, lower_only: bool = False) -> torch.Tensor:
    """Indices along ``dim`` of the middle order statistic(s) of ``a`` (two for even ``r``).

    The ``r // 2 + 1`` smallest entries, unordered, along the last, contiguous axis (where
    ``topk`` is fastest on CPU), then their one or two largest: the middle ones."""
    last = a.movedim(dim, -1).contiguous()
    low, low_idx = last.topk((r + 1) // 2 if lower_only else r // 2 + 1, -1, largest=False, sorted=False)
    _, pos = low.max(-1, keepdim=True)
    if r % 2 == 0 and not lower_only:  # and the second largest (two max passes beat a topk(2) here)
        _, second = low.scatter(-1, pos, float("-inf")).max(-1, keepdim=True)
        pos = torch.cat([pos, second], -1)
    return low_idx.gather(-1, pos).movedim(-1, dim)


MAX_NETWORK_R = 16
"""Up to this ``r`` the middle order statistics come from a comparator network: elementwise
min/max over whole slices, several times faster on CPU than ``topk``/``kthvalue`` along a
short dimension."""


@functools.lru_cache(maxsize=None)
def _middle_network(r: int, lower_only: bool = False) -> tuple[tuple[int, int], ...]:
    """Comparators of odd-even transposition sort on ``r`` entries, keeping only those
    that the middle output position(s) depend on (only the lower one: ``lower_only``)."""
    comparators = [(i, i + 1) for step in range(r) for i in range(step % 2, r - 1, 2)]
    live, kept = ({(r - 1) // 2} if lower_only else {(r - 1) // 2, r // 2}), []
    for i, j in reversed(comparators):
        if i in live or j in live:
            kept.append((i, j))
            live |= {i, j}
    return tuple(reversed(kept))


def _middle_values(a: torch.Tensor, dim: int, lower_only: bool = False) -> list[torch.Tensor]:
    """The middle order statistic of ``a`` along ``dim`` (odd size) or the two middle ones
    (only the lower one with ``lower_only``)."""
    r = a.shape[dim]
    xs = list(a.unbind(dim))
    for i, j in _middle_network(r, lower_only):
        xs[i], xs[j] = torch.minimum(xs[i], xs[j]), torch.maximum(xs[i], xs[j])
    return [xs[(r - 1) // 2]] if r % 2 or lower_only else [xs[r // 2 - 1], xs[r // 2]]


def geometric_mean_abs(cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``prod_i |cols_i|^(1/r)`` along ``dim`` (0 where an entry is 0, with zero gradient there)."""
    a = cols.abs()
    tiny = torch.finfo(a.dtype).tiny
    g = a.clamp(min=tiny).log().mean(dim).exp()
    return torch.where((a > tiny).all(dim), g, torch.zeros_like(g))


def cauchy_unbiased_factor(r: int) -> float:
    """``cos(pi/(2r))^r``: makes the geometric mean of ``r`` |Cauchy| samples mean-unbiased."""
    if r == 1:
        raise DualgraphError("the geometric-mean estimator needs proj >= 2 (E|C| is infinite)")
    return math.cos(math.pi / (2 * r)) ** r


@functools.lru_cache(maxsize=256)
def cauchy_upper_factor(r: int, delta: float) -> float:
    """``c`` with ``P(c * geometric_mean(|x|) < ||.||_1) <= delta`` for ``r`` Cauchy samples.

    ``log c = min_{0<t<1} (-log cos(pi t/2) + log(1/delta)/r) / t`` (Chernoff bound on the
    moments ``E|C|^-t = 1/cos(pi t/2)``; derivation in the module docstring). The objective
    is quasi-convex in ``t`` (convex numerator, positive at 0), found by golden section.
    """
    if not 0 < delta < 1:
        raise DualgraphError(f"delta must be in (0, 1), got {delta}")
    k = math.log(1 / delta) / r

    def f(t: float) -> float:
        return (-math.log(math.cos(math.pi * t / 2)) + k) / t

    a, b = 1e-9, 1 - 1e-9
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        c1, c2 = b - phi * (b - a), a + phi * (b - a)
        if f(c1) < f(c2):
            b = c2
        else:
            a = c1
    return math.exp(f((a + b) / 2))


@functools.lru_cache(maxsize=256)
def chi2_quantile(r: int, q: float) -> float:
    """The ``q``-quantile of the chi-square distribution with ``r`` degrees of freedom (bisection)."""
    a = torch.tensor(r / 2, dtype=torch.float64)
    lo, hi = 0.0, float(r) + 20.0 * math.sqrt(2 * r) + 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---- column schemes ---------------------------------------------------------------------

class CauchyColumns(ColumnScheme):
    """``r`` Cauchy columns for the input and all gap terms together (merged by 1-stability);
    the radius by the median or the geometric-mean estimator.

    ``delta`` (geometric estimator only) turns the estimate into an upper estimate valid
    with probability ``1 - delta`` (see the module docstring). Input sets: boxes (L-inf
    balls, clipped or not, VNN-LIB boxes).
    """

    #: number of separately estimated terms in one radius (delta is split between them)
    terms = 1

    def __init__(self, r: int, generator: torch.Generator | None = None, estimator: str = "median",
                 delta: float | None = None) -> None:
        # the arguments come from a BoundConfig, which validated them
        self.r, self.generator, self.estimator = r, generator, estimator
        self.delta = delta
        self.term_delta = None if delta is None else delta / self.terms
        if estimator == "geometric":
            self.factor = (cauchy_unbiased_factor(r) if delta is None
                           else cauchy_upper_factor(r, self.term_delta))

    # -- draws --
    def _draw(self, shape, like: torch.Tensor, kind: str = "cauchy") -> torch.Tensor:
        """Standard Cauchy (``tan(pi (U - 1/2))``, several times faster than ``Tensor.cauchy_``
        on CPU) or standard normal samples, drawn from this scheme's generator."""
        gen = self.generator
        dev = like.device if gen is None else gen.device
        if kind == "cauchy":
            t = torch.rand(shape, dtype=like.dtype, device=dev, generator=gen).sub_(0.5).mul_(math.pi).tan_()
        else:
            t = torch.randn(shape, dtype=like.dtype, device=dev, generator=gen)
        return t.to(like.device)

    def l1(self, cols: torch.Tensor) -> torch.Tensor:
        """Estimate of ``sum_k |F[k, j]|`` from the pushed columns ``[b, r, n]`` -> ``[b, n]``."""
        if self.estimator == "median":
            return median_abs(cols, 1)
        if self.estimator == "lower-median":
            return lower_median_abs(cols, 1)
        return self.factor * geometric_mean_abs(cols, 1)

    # -- ColumnScheme --
    def input_columns(self, input_set: InputSet, unit_shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(input_set, Box):
            raise DualgraphError(f"Cauchy projections estimate L1 norms: they need a box input set "
                                 f"(L-inf ball), not {type(input_set).__name__}")
        radius = input_set.radius
        if radius.shape[0] > 1:
            top = radius.amax(0, keepdim=True)
            if bool((radius >= top * (1 - 1e-5)).all()):
                # the same box shape for every example up to rounding (an unclipped L-inf ball:
                # (x+eps - (x-eps))/2 is eps only up to rounding): one un-batched set of columns
                # for the slightly larger box, so the estimate stays an upper one where it must
                radius = top
        like = input_set.center
        return self._draw((1, self.r, *unit_shape), like) * radius.unsqueeze(1)

    def input_term(self, input_set: InputSet, cols: torch.Tensor) -> torch.Tensor:
        return self.l1(cols)

    def gap_columns(self, gap: torch.Tensor) -> torch.Tensor | None:
        if not bool(gap.ne(0).any()):
            return None
        # one draw shared by the batch (like the input's): every example's estimate has the
        # estimator's law; only estimates of different examples become dependent
        return self._draw((1, self.r, *gap.shape[1:]), gap) * gap.unsqueeze(1)

    def gap_term(self, cols: torch.Tensor) -> torch.Tensor:
        return self.l1(cols)

    def source_key(self, node_name: str) -> object:
        return "input"  # every gap term joins the input's L1 columns (1-stability)


class GaussianColumns(CauchyColumns):
    """L2 balls: the input term ``eps ||row||_2`` from ``r`` Gaussian columns; gap terms stay
    L1 (Cauchy, merged into one set of columns). With ``delta`` the input term uses the
    exact chi-square quantile."""

    terms = 2

    def __init__(self, r: int, generator: torch.Generator | None = None, estimator: str = "median",
                 delta: float | None = None) -> None:
        super().__init__(r, generator, estimator, delta)
        q = r if delta is None else chi2_quantile(r, self.term_delta)
        self.l2_scale = 1.0 / math.sqrt(q)

    def input_columns(self, input_set: InputSet, unit_shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(input_set, L2Ball):
            raise DualgraphError(f"Gaussian projections estimate L2 norms: they need an L2 ball, "
                                 f"not {type(input_set).__name__}")
        return self._draw((1, self.r, *unit_shape), input_set.center, "normal") * input_set.eps

    def input_term(self, input_set: InputSet, cols: torch.Tensor) -> torch.Tensor:
        return cols.norm(dim=1) * self.l2_scale

    def source_key(self, node_name: str) -> object:
        return "gaps"  # L1 columns, kept apart from the L2 input columns


# ---- the scheduler's side: configuration, generators --------------------------------------

class Projections:
    """Random-projection state of one scheduler: one generator per device, fresh draws per call.

    With ``config.proj_seed`` set, the sequence of draws is reproducible (per device type:
    CPU and CUDA generators produce different streams); without it each generator is
    seeded from the operating system.
    """

    def __init__(self, config) -> None:
        self.config = config
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.config.proj_seed is None:
                g.seed()
            else:
                g.manual_seed(int(self.config.proj_seed))
            self._generators[device] = g
        return g

    def scheme(self, input_set: InputSet) -> CauchyColumns:
        cfg = self.config
        cls = GaussianColumns if isinstance(input_set, L2Ball) else CauchyColumns
        return cls(cfg.proj, self.generator(input_set.center.device), cfg.proj_estimator, cfg.delta)

    def bounds(self, graph, targets: list, input_set: InputSet, bounds: dict, widen=None, image=None) -> dict:
        """Estimated bounds of ``targets`` (topological order), filled into ``bounds``.

        One forward run pushes one set of draws through every layer (Algorithm 1). With
        ``delta`` every bounded value gets its own run with fresh draws instead: the slopes
        ``D`` of earlier layers come from earlier estimates, and a projection that also
        produced them is not independent of the matrix it estimates, which the tail bound
        needs (about ``(depth + 1) / 2`` times the work).
        """
        from .forward import ForwardBounds
        if self.config.delta is None:
            return ForwardBounds(graph, self.config, self.scheme(input_set)).bounds(targets, input_set, bounds, widen, image)
        for t in targets:
            ForwardBounds(graph, self.config, self.scheme(input_set)).bounds([t], input_set, bounds, widen, image)
        return bounds


def nonlinear_dual_nodes(nodes, config) -> list:
    """Nodes whose dual layer is not linear (random projections cannot run through them)."""
    from .dual_registry import runs_forward
    return [n for n in nodes if not runs_forward(n, config)]
