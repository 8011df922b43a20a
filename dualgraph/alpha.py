"""Optimised slopes (alpha-CROWN): the free lower slopes of the relaxations as variables.

A crossing ReLU unit may take any lower line ``a z`` with ``0 <= a <= 1`` (LeakyReLU:
``alpha <= a <= 1``); every choice gives a sound dual layer (:class:`~dualgraph.dual_registry.
Relaxation` ``free``). The final bound ``J(C)`` is then a function of these slopes, and
this module maximises it by projected gradient ascent (Adam, then a clamp into the range),
starting from CROWN's slopes.

**One set of slopes per specification row.** Each ``(example, row)`` pair has its own
slopes for every free unit of the network, so the rows are independent problems: they are
flattened into a batch of single rows, a row stops once its bound reaches the ``goal``
(a certificate needs no more), and the best bound of every iterate is kept (each is valid,
so the maximum over iterates is too). The intermediate bounds are CROWN's; the slopes
that shape them are not optimised (see ``bench/certify_report.md`` for what that costs).
"""

from __future__ import annotations

import torch

from .dual_registry import ElementwiseRule, FreeSlopes, Relaxation


LR_DECAY = 0.95
"""The step size shrinks by this factor per step (late steps refine rather than jump)."""


def free_relaxations(runner, dual, bounds: dict) -> dict:
    """``{primal node name: relaxation}`` of the relaxations in ``dual`` (a dual graph) with
    free lower slopes on some unit of some example."""
    out = {}
    for node in dual.nodes:
        rule = node.meta.get("rule")
        if not isinstance(rule, ElementwiseRule):
            continue
        primal = node.meta["primal"]
        b = bounds.get(primal.var_inputs[0])
        if b is None:
            continue
        r = rule.relaxation(primal, b, runner.config)
        if r.free is not None and bool(r.free[0].any()):
            out[primal.name] = r
    return out


def optimise_rows(runner, dual, rows: torch.Tensor, batch, start: torch.Tensor,
                  goal: float | None) -> torch.Tensor:
    """The best lower bound ``[R, 1]`` of each single row over ``config.alpha_steps`` steps of
    projected gradient ascent on its own free slopes, from ``start`` (its bound with the
    relaxations' own slopes).

    ``rows`` is ``[R, 1, *target]`` with ``batch`` holding one example per row (``Batch.take``
    with repeated examples). Rows whose best bound exceeds ``goal`` (a number or ``[R, 1]``)
    stop moving.
    """
    config = runner.config
    relaxed = free_relaxations(runner, dual, batch.bounds)
    best = start
    if not relaxed or config.alpha_steps == 0:
        return best
    slopes = {name: _variables(r) for name, r in relaxed.items()}
    optimiser = torch.optim.Adam([f.values for f in slopes.values()], lr=config.alpha_lr)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimiser, LR_DECAY)
    moving = torch.ones_like(best, dtype=torch.bool) if goal is None else best <= goal
    with torch.no_grad():  # the layers before the first free slopes do not change: run them once
        first, env, offsets = runner.run_until(dual, rows, batch, set(relaxed))
    try:
        runner.slopes = slopes
        for step in range(config.alpha_steps + 1):
            last = step == config.alpha_steps
            if not bool(moving.any()):
                break
            with torch.set_grad_enabled(not last):
                lower = runner.run_from(dual, first, env, batch, offsets, 1)
                best = torch.maximum(best, lower.detach())
                if last:
                    break
                optimiser.zero_grad(set_to_none=True)
                (-lower[moving].sum()).backward()
            optimiser.step()
            decay.step()
            with torch.no_grad():
                for f in slopes.values():
                    f.values.clamp_(f.lo, f.hi)
            if goal is not None:
                moving &= best <= goal
    finally:
        runner.slopes = None
    return best


def _variables(r: Relaxation) -> FreeSlopes:
    """The free slopes of ``r`` (one example per row) as variables, at their starting values."""
    units, lo, hi = r.free
    units = units.flatten(1)
    index = units.any(0).nonzero().flatten()

    def per_row(t):
        return t.flatten(1)[:, index].unsqueeze(1) if torch.is_tensor(t) and t.dim() > 0 else t

    values = per_row(r.a_lo).detach().clone().requires_grad_(True)
    return FreeSlopes(index, values, per_row(units), per_row(lo), per_row(hi))
