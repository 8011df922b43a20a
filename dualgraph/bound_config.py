"""How bounds are computed: :class:`BoundConfig`, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DualgraphError
from .projections import ESTIMATORS


@dataclass(frozen=True)
class BoundConfig:
    """How bounds are computed.

    relu_relaxation: ``"paper"`` (Corollary 2: lower slope = upper slope ``u/(u-l)``),
        ``"crown"`` (lower slope 1 if ``u > -l`` else 0; tighter, not a linear dual layer) or
        ``"alpha"`` (the lower slopes of crossing ReLU/LeakyReLU units optimised for each
        specification row, starting from CROWN's: :mod:`dualgraph.alpha`).
    alpha_steps, alpha_lr: iterations and step size of the slope optimisation (``"alpha"``).
    max_elements: memory budget for one chunk of dual variables, in tensor elements;
        the identity rows of a layer are split into chunks that fit.
    max_memory: a memory budget in bytes (None: only ``max_elements``). Chunks of rows are
        sized to fit it, and the forward direction (whose identity columns are not chunked)
        is not chosen when its estimated peak exceeds it (``direction="forward"`` is then an
        error naming the node and the size).
    direction: how intermediate bounds are computed: ``"backward"`` (one dual pass from
        each layer's units), ``"forward"`` (Appendix F: identity columns of the input and
        of every activation's crossing units pushed forward; needs linear dual layers) or
        ``"auto"`` (the cheaper by an operation count, unless a forward run's rounding
        allowance came out larger than the widths it widens: then backward, from then on,
        :data:`dualgraph.direction.FORWARD_LOOSE_SHARE`). The bounds are the same in exact
        arithmetic; their rounding allowances differ: backward rows pay each their own (tight),
        the forward direction a propagated one that grows with depth (:mod:`dualgraph.rounding`).
    patches: run backward passes from a feature map's units (a convolution's, a residual
        block's sum) on local windows (:mod:`dualgraph.patches`); same numbers, far less work.
        Off only for testing.
    rounding_allowance: widen every bound by a rigorous bound on its floating-point error
        and on the network's own evaluation error (:mod:`dualgraph.rounding`), so that a
        certificate holds in exact arithmetic and as the network is evaluated. False only
        to compare bound paths or implementations number for number: bounds are then not
        proofs (``sound`` is False).
    prune_stable: compute exact bounds only for units that a cheaper, never tighter bound
        (the backward pass cut after its first relaxation, see the module docstring)
        does not place on one linear piece of every activation they feed. The others keep
        that looser bound; as their relaxation depends only on the piece, every crossing
        unit's bound and ``J(C)`` are unchanged. False: every unit's exact bound (to
        inspect bound widths).
    proj, proj_seed, proj_estimator, delta: random projections for intermediate bounds
        (:mod:`dualgraph.projections`): dimension, seed, estimator of the L1 terms
        (``"median"``: median-unbiased; ``"lower-median"``: the paper code's, for training;
        ``"geometric"``: mean-unbiased, needed for ``delta``) and the failure probability of
        high-probability upper estimates.
    """

    relu_relaxation: str = "paper"
    alpha_steps: int = 20
    alpha_lr: float = 0.1
    max_elements: int = 1 << 25
    max_memory: int | None = None
    direction: str = "auto"
    patches: bool = True
    prune_stable: bool = True
    rounding_allowance: bool = True
    proj: int | None = None
    proj_seed: int | None = None
    proj_estimator: str = "median"
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("auto", "backward", "forward"):
            raise DualgraphError(f"unknown direction '{self.direction}'; use auto, backward or forward")
        if self.relu_relaxation not in ("paper", "crown", "alpha"):
            raise DualgraphError(f"unknown relu relaxation '{self.relu_relaxation}'; use paper, crown or alpha")
        if isinstance(self.alpha_steps, bool) or not isinstance(self.alpha_steps, int) or self.alpha_steps < 0:
            raise DualgraphError(f"alpha_steps must be a non-negative integer, got {self.alpha_steps!r}")
        if not self.alpha_lr > 0:
            raise DualgraphError(f"alpha_lr must be positive, got {self.alpha_lr!r}")
        if self.max_elements < 1:
            raise DualgraphError("max_elements must be positive")
        if self.max_memory is not None and self.max_memory < (1 << 20):
            raise DualgraphError(f"max_memory must be at least 1 MB, got {self.max_memory} bytes")
        self._check_projections()

    def _check_projections(self) -> None:
        if self.proj is None:
            if self.delta is not None or self.proj_seed is not None:
                raise DualgraphError("delta and proj_seed only apply with random projections (set proj)")
            return
        if isinstance(self.proj, bool) or not isinstance(self.proj, int) or self.proj < 1:
            raise DualgraphError(f"proj (projection dimension) must be a positive integer, got {self.proj!r}")
        if self.direction == "backward":
            raise DualgraphError("random projections run in the forward direction; use direction 'auto' or 'forward'")
        if self.proj_estimator not in ESTIMATORS:
            raise DualgraphError(f"unknown projection estimator '{self.proj_estimator}'; use {', '.join(ESTIMATORS)}")
        if self.delta is not None:
            if not 0 < self.delta < 1:
                raise DualgraphError(f"delta must be in (0, 1), got {self.delta}")
            if self.proj_estimator != "geometric":
                raise DualgraphError("high-probability bounds (delta) need proj_estimator 'geometric'")
        if self.proj_estimator == "geometric" and self.proj < 2:
            raise DualgraphError("the geometric estimator needs proj >= 2")

    @property
    def sound(self) -> bool:
        """Whether bounds are proofs: not with ``proj`` (estimates; ``delta``: probabilistic)
        nor without the rounding allowance."""
        return self.proj is None and self.rounding_allowance

    @property
    def probabilistic(self) -> bool:
        """Whether each intermediate bound holds with probability >= 1 - delta (not a proof)."""
        return self.proj is not None and self.delta is not None
