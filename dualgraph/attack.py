"""Projected gradient descent (L-inf PGD) that searches a box for counterexamples.

Independent of the IR: ``f`` is any torch callable mapping ``[N, *input_shape]`` to
``[N, n_out]``. The unsafe set is a union of polyhedra ``{y : C_m y <= d_m}`` (as read from
VNN-LIB, see :mod:`dualgraph.vnnlib`), and the attack minimises over the box ``[lo, hi]``

    L(x) = min_m  max_k  (C_m f(x) - d_m)_k ,

which is ``<= 0`` exactly when ``f(x)`` is unsafe. Each step is
``x <- clip_[lo, hi](x - alpha * sign(grad L(x)))``, from several starts at once (the box
centre, then uniform random points), all in one batched forward pass. For a robustness
spec around label ``y`` use one conjunction per wrong class ``j``: the single row
``e_j - e_y`` with ``d = 0`` (class ``j`` scores at least as high as ``y``).

A hit is judged on ``f``'s own outputs in its own precision; a caller that reports
"falsified" should re-run the model on ``result.x`` (it is always inside the box).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dualgraph.errors import DualgraphError

Spec = Sequence[tuple[Tensor, Tensor]]  # the union of conjunctions C y <= d


@dataclass(frozen=True, eq=False)
class AttackResult:
    """Best point per example; ``margin <= 0`` (equivalently ``found``) is a counterexample."""

    found: Tensor  # bool [B]
    x: Tensor  # [B, *input_shape], inside [lo, hi]
    y: Tensor  # [B, n_out] = f(x)
    margin: Tensor  # [B], L(x); +inf when the unsafe set is empty
    iterations: int  # gradient steps taken (fewer than ``steps`` after an early stop)


def unsafe_margin(y: Tensor, unsafe: Spec) -> Tensor:
    """``L = min_m max_k (C_m y - d_m)_k`` for ``y: [..., n_out]`` and ``C_m: [..., k, n_out]``, ``d_m: [..., k]``.

    Leading dims broadcast (e.g. ``y: [R, B, n]`` with ``C: [B, k, n]``); returns ``y.shape[:-1]``
    or the broadcast shape. A conjunction with no rows is all of the output space (``-inf``),
    an empty ``unsafe`` is nothing (``+inf``).
    """
    if not unsafe:
        return y.new_full(y.shape[:-1], torch.inf)
    return conjunction_margins(y, unsafe).amin(-1)


def conjunction_margins(y: Tensor, unsafe: Spec) -> Tensor:
    """Each conjunction's ``max_k (C_m y - d_m)_k``, stacked on a last axis ``[..., len(unsafe)]``
    (``<= 0``: ``y`` lies in conjunction ``m``; ``-inf`` for a conjunction with no rows)."""
    return torch.stack([
        ((C @ y.unsqueeze(-1)).squeeze(-1) - d).amax(-1)
        if C.shape[-2] > 0
        else y.new_full(y.shape[:-1], -torch.inf)
        for C, d in unsafe
    ], -1)


def pgd_attack(
    f: Callable[[Tensor], Tensor],
    lo: Tensor,
    hi: Tensor,
    unsafe: Spec,
    *,
    steps: int = 100,
    restarts: int = 5,
    step_size: float | Tensor | None = None,
    seed: int = 0,
    time_limit: float | None = None,
    batched: bool = False,
    targeted: bool = False,
    schedule: Sequence[float] | None = None,
    starts: Tensor | None = None,
) -> AttackResult:
    """Search ``[lo, hi]`` for ``x`` with ``f(x)`` in the unsafe set (see the module docstring).

    Shapes. ``batched=False``: ``lo, hi`` have the input shape and each ``(C, d)`` of
    ``unsafe`` is ``C: [k, n_out]``, ``d: [k]``; the result still has a batch dim of 1.
    ``batched=True``: ``lo, hi`` are ``[B, *input_shape]`` (B independent boxes) and each
    ``C``/``d`` is either shared (``[k, n_out]``/``[k]``) or per example
    (``[B, k, n_out]``/``[B, k]``). Work happens in ``lo``'s dtype and device; ``f`` must
    accept them. ``step_size`` is in input units (scalar or broadcastable to ``lo``); the
    default ``2.5 * (hi - lo) / 2 / steps`` lets a run cross 2.5 half-widths of the box.
    ``schedule`` (overrides ``step_size``): the steps fall into ``len(schedule)`` equal stages,
    stage ``i`` stepping ``schedule[i] * (hi - lo)`` -- e.g. ``(0.5, 0.1, 0.02)``: jumps across
    the box first (past flat regions where the sign of a tiny gradient is all there is), then
    finer ones.

    ``targeted``: restart ``r`` descends on conjunction ``r mod M`` alone instead of on ``L``
    (whose gradient only follows the conjunction nearest at the moment), so each of the ``M``
    conjunctions gets its share of the starts; a hit in any conjunction still counts.
    Stops early once every example has a hit, or after ``time_limit`` seconds (checked
    after each step; the starting points are always evaluated).

    ``starts`` (``[R, *lo.shape]``, clamped into the box): the starting points instead of the
    centre and random ones, one restart each (``restarts`` is then ``R``) -- e.g. the box
    corners that minimise a branch-and-bound domain's bound.
    """
    deadline = None if time_limit is None else time.monotonic() + time_limit
    if lo.shape != hi.shape:
        raise DualgraphError(f"attack box bounds differ in shape: lo {tuple(lo.shape)} vs hi {tuple(hi.shape)}; pass equal shapes")
    if schedule is not None and (len(schedule) == 0 or min(schedule) <= 0):
        raise DualgraphError(f"attack schedule must be a non-empty list of positive step fractions, got {schedule!r}")
    if starts is not None:
        restarts = starts.shape[0]
    if steps < 0 or restarts < 1:
        raise DualgraphError(f"attack needs steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    lo, hi = (lo, hi) if batched else (lo[None], hi[None])
    if lo.dim() < 2 or bool((lo > hi).any()) or not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise DualgraphError("attack box must be finite with lo <= hi (and [B, *shape] when batched=True); fix the bounds")
    hi = hi.to(lo)
    spec = [_per_example(C, d, lo) for C, d in unsafe]
    B, shape, R = lo.shape[0], lo.shape[1:], restarts
    alpha = 1.25 * (hi - lo) / max(steps, 1) if step_size is None else torch.as_tensor(step_size).to(lo)
    stages = None if schedule is None else [float(f) * (hi - lo) for f in schedule]
    # restart r aims at conjunction r mod M (targeted) or at the union (all of them: min)
    aim = torch.arange(R, device=lo.device) % max(len(spec), 1) if targeted and len(spec) > 1 else None

    # All restarts in one batch [R, B, *shape]; restart 0 starts at the centre.
    gen = torch.Generator(device=lo.device).manual_seed(seed)
    if starts is None:
        x = lo + (hi - lo) * torch.rand((R, *lo.shape), generator=gen, dtype=lo.dtype, device=lo.device)
        x[0] = (lo + hi) / 2
    else:
        x = starts.to(lo).reshape(R, *lo.shape)
    x = torch.clamp(x, lo, hi)  # rounding in lo + (hi - lo) * u may leave the box by an ulp
    best_m = torch.full((B,), torch.inf, dtype=lo.dtype, device=lo.device)
    best_x, best_y = x[0].clone(), None
    it = 0
    for it in range(steps + 1):
        x_var = x.detach().requires_grad_(it < steps)
        with torch.enable_grad():  # gradients w.r.t. x only, even under a caller's no_grad
            y = f(x_var.reshape(R * B, *shape))
            if y.dim() != 2 or y.shape[0] != R * B:
                raise DualgraphError(f"the attacked function returned shape {tuple(y.shape)}; expected [{R * B}, n_out]")
            y = y.to(lo.dtype).reshape(R, B, -1)
            _check_outputs(spec, y.shape[-1])
            if not spec:
                m = y.new_full((R, B), torch.inf)
                objective = m
            else:
                per_conj = conjunction_margins(y, spec)  # [R, B, M]
                m = per_conj.amin(-1)  # [R, B]
                objective = m if aim is None else per_conj.gather(-1, aim.view(R, 1, 1).expand(R, B, 1))
            grad = torch.autograd.grad(objective.sum(), x_var)[0] if it < steps and objective.requires_grad else None
        with torch.no_grad():
            m_d = torch.where(m.isnan(), torch.inf, m.detach())  # a NaN output is never a hit
            m_best, r_best = m_d.amin(0), m_d.argmin(0)  # best restart per example
            take = m_best < best_m
            cols = torch.arange(B, device=lo.device)
            if best_y is None:
                best_y = y.detach()[r_best, cols].clone()
            best_x[take], best_y[take] = x[r_best, cols][take], y.detach()[r_best, cols][take]
            best_m = torch.where(take, m_best, best_m)
            done = bool((best_m <= 0).all()) or (deadline is not None and time.monotonic() > deadline)
            if it == steps or done or grad is None:
                break
            step = alpha if stages is None else stages[it * len(stages) // max(steps, 1)]
            x = torch.clamp(x - step * grad.sign().nan_to_num(0.0), lo, hi)
    return AttackResult(found=best_m <= 0, x=best_x, y=best_y, margin=best_m, iterations=it)


def _per_example(C: Tensor, d: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast one conjunction to ``C: [B, k, n_out]``, ``d: [B, k]`` in ``lo``'s dtype and device."""
    B = lo.shape[0]
    C, d = torch.as_tensor(C).to(lo), torch.as_tensor(d).to(lo)
    C = C.expand(B, *C.shape) if C.dim() == 2 else C
    d = d.expand(B, *d.shape) if d.dim() == 1 else d
    if C.dim() != 3 or d.dim() != 2 or C.shape[0] != B or d.shape[0] != B or C.shape[1] != d.shape[1]:
        raise DualgraphError(
            f"unsafe conjunction has C {tuple(C.shape)} and d {tuple(d.shape)}; expected C [k, n_out] and d [k],"
            f" or per example C [{B}, k, n_out] and d [{B}, k]"
        )
    return C, d


def _check_outputs(spec: list[tuple[Tensor, Tensor]], n_out: int) -> None:
    for C, _ in spec:
        if C.shape[-1] != n_out:
            raise DualgraphError(f"the unsafe set is over {C.shape[-1]} outputs but the function has {n_out}; fix the spec")
