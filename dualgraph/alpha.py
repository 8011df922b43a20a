"""Optimised slopes (alpha-CROWN): the dual layers' free parameters as variables.

Each dual layer declares its free parameters (:meth:`~dualgraph.dual_registry.DualRule.
free_variables`), every value of which gives a sound step. A crossing ReLU unit may take any
lower line ``a z`` with ``0 <= a <= 1`` (LeakyReLU: ``alpha <= a <= 1``); a Sigmoid, Tanh,
Erf, Softplus, Exp, Abs or Clip unit any lower and upper line, each with the tightest
offset for its slope (for Sigmoid and Tanh the tangent lines, by their slopes)
(:class:`~dualgraph.dual_registry.FreeLines`); a max pool's lower line any convex
combination of its window's entries (normalised free weights; dense rows only). The final
bound ``J(C)`` is then a function of these variables, and this module maximises it by
projected gradient ascent (Adam, then a clamp into the range), starting from CROWN's slopes.
Slopes whose ranges differ in width from unit to unit (an S-shaped ``f'`` on ``[l, u]``) are
optimised in units of their range (:attr:`~dualgraph.dual_registry.FreeSlopes.scale`), so one
step size suits them all.

**One set of slopes per row.** Each ``(example, row)`` pair has its own slopes for every
free unit of the network, so the rows are independent problems: they are flattened into a
batch of single rows, a row stops once its bound reaches its ``goal`` (a certificate needs
no more; the rows still climbing go on alone once half have stopped), and the best bound
of every iterate is kept (each is valid, so the maximum over iterates is too). The layers
before the first free slopes do not change between steps and run once.

The same ascent serves three callers: the final bound ``J(C)`` (one row per specification
row), the intermediate bounds of crossing units (of every unit before a smooth activation;
rows ``+e_j`` and ``-e_j``, layer by layer,
:meth:`~dualgraph.scheduler.BoundScheduler.intermediate_bounds`), and branch and bound
(:mod:`dualgraph.bab`), whose split constraints add multipliers ``beta >= 0``
(:class:`~dualgraph.dual_registry.SplitMultipliers`) to the variables.

Floating point: like every backward pass, passes with optimised slopes add each dual
step's allowance to their rows (``Batch.per_row``), computed from the rows' own dual
variables, so any slopes are covered; the outward rounding of a relaxation's offsets
covers every slope in its range where the free lines share the fixed offsets (a ReLU's),
and lines with offsets of their own pay their own, at the chosen slope
(:class:`~dualgraph.dual_registry.FreeLines`), so the fixed lines keep CROWN's bounds.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .dual_registry import ElementwiseRule, FreeSlopes, Relaxation, SplitMultipliers
from .dual_run import needed_bounds
from .patches import Patches, geometry, windows_of
from .trust import SLOPES_CHECKED, needs_check, verify_free_slopes


LR_FINAL = 0.3
"""The step size shrinks geometrically to this share of ``alpha_lr`` over the steps (late
steps refine rather than jump; the same profile whatever the number of steps)."""


def free_variables(runner, dual, bounds: dict) -> dict[str, dict[str, FreeSlopes]]:
    """``{primal node name: {kind: FreeSlopes}}``: the free parameters that the dual layers of
    ``dual`` declare on ``bounds`` (:meth:`~dualgraph.dual_registry.DualRule.free_variables`),
    at their starting values, for dense rows."""
    out = {}
    for node in dual.nodes:
        rule, primal = node.meta.get("rule"), node.meta.get("primal")
        if rule is None or primal is None or not rule.bounds_needed(primal):
            continue
        b = [bounds.get(v) for v in primal.var_inputs]
        if not b or any(x is None for x in b):
            continue
        found = rule.free_variables(primal, b, runner.config)
        if found and rule.trust_source is not None and not isinstance(rule, ElementwiseRule) \
                and needs_check(rule, primal, SLOPES_CHECKED):  # a plugin's free variables, at the ends of their ranges
            verify_free_slopes(rule, primal, b, runner.config, found)
        if found:
            out[primal.name] = found
    return out


def window_relaxations(runner, dual, bounds: dict) -> dict:
    """``{primal node name: relaxation}`` of the relaxations in ``dual`` with free lines on some
    unit of some example: what runs on the rows' windows (max pools keep their fixed lines there)."""
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
        if r.free is not None and bool(r.free.units.any()):
            out[primal.name] = r
    return out


KINDS = ("slopes", "multipliers", "upper slopes")
"""The kinds of variables of a node, in the order of the runner's ``(FreeSlopes, SplitMultipliers,
FreeSlopes)`` triples: the lower lines' slopes (a max pool's weights), the split multipliers, the
upper lines' slopes (relaxations whose both lines are free, :class:`~dualgraph.dual_registry.FreeLines`)."""

Warm = dict[tuple[str, str], torch.Tensor]
"""Start values of the variables in full layout: ``(primal node name, kind)`` (one of
:data:`KINDS`) -> ``[R, n]`` over the node's flat positions (slopes as slopes, whatever their
:attr:`~dualgraph.dual_registry.FreeSlopes.scale`), NaN where the usual start applies (CROWN's
slope, multiplier 0)."""


def cat_warm(blocks: list[tuple[Warm, int]]) -> Warm:
    """The start values of consecutive blocks of rows (each ``(warm, rows)``) as one
    :data:`Warm`, NaN where a block has no values for some variable."""
    found = {k: t for warm, _ in blocks for k, t in warm.items()}
    return {k: torch.cat([warm.get(k, t.new_full((n, t.shape[1]), torch.nan)) for warm, n in blocks])
            for k, t in found.items()}


def optimise_rows(runner, dual, rows: torch.Tensor, batch, start: torch.Tensor,
                  goal: float | torch.Tensor | None, record: dict | None = None,
                  steps: int | None = None, warm: Warm | None = None) -> torch.Tensor:
    """The best lower bound ``[R, 1]`` of each single row over ``steps`` (default
    ``config.alpha_steps``) steps of projected gradient ascent on its own variables, from
    ``start`` (its bound with the relaxations' own slopes): the free slopes
    (``relu_relaxation="alpha"``) and the multipliers of the batch's branch-and-bound splits
    (``Batch.splits``, starting at 0).

    ``rows`` is ``[R, 1, *target]`` with ``batch`` holding one example per row (``Batch.take``
    with repeated examples), or selected units of a feature map as patches
    (:func:`dualgraph.patches.select`, each row with its example in ``batch``) when the whole
    pass runs on patches (:func:`dualgraph.patches.geometry`); the slopes then live on each
    row's window (no branch-and-bound splits). Rows whose best bound exceeds ``goal`` (a number or ``[R, 1]``)
    stop; once half of the rows have, the others go on alone. ``record``: filled with the
    dual variables of a last pass over the rows still below their goal (:attr:`DualRunner.record`)
    and their positions (``"alive"``), and (on dense rows) the variables' last values in
    full layout (``"variables"``, a :data:`Warm`), from which ``warm`` restarts a later ascent
    (branch and bound starts a domain's children from their parent's slopes and multipliers),
    and for every row, in the order of ``rows``, the variables of the last iterate whose bound
    passed its ``goal`` (``"proving"``, NaN for rows that never did in the ascent): a bound
    computed at them again, e.g. in another precision, starts from a proof.

    ``steps=0`` with ``warm``: the bound at the ``warm`` values (one pass), or ``start`` if higher.
    """
    config = runner.config
    steps = config.alpha_steps if steps is None else steps
    alpha = config.relu_relaxation == "alpha"
    warm = warm or {}
    split = {name: _multipliers(sign, warm.get((name, "multipliers"))) for name, sign in (batch.splits or {}).items()
             if bool(sign.any())}
    if isinstance(rows, Patches):  # each row's slopes on its own window, wherever the row is
        windows = _window_geometries(dual, rows)
        relaxed = window_relaxations(runner, dual, batch.bounds) if alpha else {}
        variables = {name: (_window_variables(r, windows[name], -1), None,
                            _window_variables(r, windows[name], 1) if r.free.upper is not None else None)
                     for name, r in relaxed.items()}
    else:
        free = free_variables(runner, dual, batch.bounds) if alpha else {}
        variables = {name: tuple(split.get(name) if kind == "multipliers" else
                                 _warmed(free.get(name, {}).get(kind), warm.get((name, kind))) for kind in KINDS)
                     for name in set(free) | set(split)}
    if not variables or (steps == 0 and not warm):
        if record is not None:
            runner.record = record
            try:
                with torch.no_grad():
                    runner.run(dual, rows, batch)
            finally:
                runner.record = None
            record["alive"] = torch.arange(rows.shape[0])
        return start
    with torch.no_grad():  # the layers before the first variables do not change: run them once
        first, env, offsets = runner.run_until(dual, rows, batch, set(variables))
    dense = not isinstance(rows, Patches)
    run = _Ascent(runner, dual, first, env, offsets, batch, variables, start, goal,
                  stash=record is not None and dense and goal is not None)
    best = run.climb(steps, record)
    if record is not None and dense:
        widths = {name: t.width for name, triple in variables.items() for t in triple[::2] if t is not None}
        widths.update({name: sign[0].numel() for name, sign in (batch.splits or {}).items()})
        record["variables"] = _full_layout(variables, widths)
        if run.proving is not None:
            record["proving"] = _full_layout(variables, widths, run.proving)
    return best


class _Ascent:
    """The state of :func:`optimise_rows`: the rows still climbing (``alive``, positions in
    the caller's rows), their dual variables where the variables begin, their batch, the
    variables and the optimiser; :meth:`keep` drops the rows that reached their goal."""

    def __init__(self, runner, dual, first: int, env: dict, offsets, batch, variables: dict,
                 start: torch.Tensor, goal, stash: bool = False) -> None:
        self.runner, self.dual, self.first = runner, dual, first
        self.needed = needed_bounds(dual, first)  # the bounds the passes from ``first`` read
        self.env, self.offsets, self.batch, self.variables = env, offsets, batch, variables
        self.best = start.clone()
        self.goal = goal
        self.alive = torch.arange(start.shape[0])
        #: per ``(node name, kind)``: each row's variables ``[R, 1, K]`` at the last iterate whose
        #: bound passed its goal (NaN: none did); see :func:`optimise_rows`
        self.proving: dict[tuple[str, str], torch.Tensor] | None = None
        if stash:
            self.proving = {(name, kind): t.values.detach().new_full(t.values.shape, torch.nan)
                            for name, pair in variables.items() for kind, t in zip(KINDS, pair) if t is not None}
        lr = runner.config.alpha_lr
        self.optimiser = torch.optim.Adam(self._params(), lr=lr)

    def _params(self) -> list[torch.Tensor]:
        return [t.values for pair in self.variables.values() for t in pair if t is not None]

    def _goal(self):
        g = self.goal
        return g[self.alive] if torch.is_tensor(g) and g.dim() > 0 else g

    def climb(self, steps: int, record: dict | None) -> torch.Tensor:
        runner = self.runner
        try:
            runner.variables = self.variables
            for step in range(steps):
                best = self.best[self.alive]
                moving = torch.ones_like(best, dtype=torch.bool) if self.goal is None else best <= self._goal()
                if not bool(moving.any()):
                    self.keep(moving[:, 0])
                    break
                if 2 * int(moving.sum()) <= len(moving):
                    self.keep(moving[:, 0])
                with torch.enable_grad():
                    lower = runner.run_from(self.dual, self.first, self.env, self.batch, self.offsets, 1)
                    self.optimiser.zero_grad(set_to_none=True)
                    (-lower.sum()).backward()
                # fmax: an iterate whose bound is NaN (a NaN gradient reached its variables) is
                # no bound at all, and the best valid one stays
                self.best[self.alive] = torch.fmax(self.best[self.alive], lower.detach())
                if self.proving is not None:
                    self._stash((lower.detach() > self._goal())[:, 0])
                for group in self.optimiser.param_groups:
                    group["lr"] = runner.config.alpha_lr * LR_FINAL ** ((step + 1) / steps)
                self.optimiser.step()
                with torch.no_grad():
                    for slopes, multipliers, upper in self.variables.values():
                        for t in (slopes, upper):
                            if t is not None:
                                t.values.clamp_(t.lo, t.hi)
                        if multipliers is not None:
                            multipliers.values.clamp_(min=0)
            if self.goal is not None:  # the last step's variables, on the rows still open
                self.keep((self.best[self.alive] <= self._goal())[:, 0])
            runner.record = record
            if len(self.alive):
                with torch.no_grad():
                    lower = runner.run_from(self.dual, self.first, self.env, self.batch, self.offsets, 1)
                self.best[self.alive] = torch.fmax(self.best[self.alive], lower)
                if self.proving is not None:
                    self._stash((lower > self._goal())[:, 0])
            elif record is not None:
                record.clear()
            if record is not None:
                record["alive"] = self.alive
        finally:
            runner.variables = runner.record = None
        return self.best

    def _stash(self, reached: torch.Tensor) -> None:
        """Keep the variables of the alive rows ``reached`` (a bool over them), whose bound at
        the current variables passed the goal (before the optimiser moves them)."""
        if not bool(reached.any()):
            return
        rows = self.alive[reached]
        for name, pair in self.variables.items():
            for kind, t in zip(KINDS, pair):
                if t is not None:
                    self.proving[(name, kind)][rows] = _in_slopes(t)[reached]

    def keep(self, moving: torch.Tensor) -> None:
        """Go on with the rows ``moving`` (a bool over the alive rows) only."""
        if bool(moving.all()):
            return
        index = moving.nonzero().flatten()
        self.alive = self.alive[index]
        on_windows = any(isinstance(t, Patches) for t in self.env.values())
        self.env = {v: t.take_rows(index) if on_windows else t[index] for v, t in self.env.items()}
        if torch.is_tensor(self.offsets) and self.offsets.dim() > 0 and self.offsets.shape[0] > 1:
            self.offsets = self.offsets[index]
        if not on_windows:  # patches carry their rows' examples: the batch stays whole
            self.batch = self.batch.take(index, self.needed)
        state = self.optimiser.state
        for pair in self.variables.values():
            for t in pair:
                if t is None:
                    continue
                old = t.values
                t.values = old.detach()[index].requires_grad_(True)
                for name in ("free", "sign"):
                    if hasattr(t, name):
                        setattr(t, name, getattr(t, name)[index])
                for name in ("lo", "hi", "scale"):
                    if hasattr(t, name) and torch.is_tensor(getattr(t, name)) and getattr(t, name).dim() > 0:
                        setattr(t, name, getattr(t, name)[index])
                if old in state:
                    moments = state.pop(old)
                    state[t.values] = {k: (v[index] if torch.is_tensor(v) and v.dim() > 0 else v)
                                       for k, v in moments.items()}
        groups = self.optimiser.param_groups
        groups[0]["params"] = self._params()


def _multipliers(sign: torch.Tensor, warm: torch.Tensor | None = None) -> SplitMultipliers:
    """Multipliers of the split units of the rows' domains, at 0 (the bound without them) or
    at ``warm``'s values."""
    sign = sign.flatten(1)
    index = (sign != 0).any(0).nonzero().flatten()
    picked = sign[:, index].unsqueeze(1)
    values = _started(torch.zeros_like(picked), warm, index).clamp(min=0)
    return SplitMultipliers(index, values.requires_grad_(True), picked)


def _started(values: torch.Tensor, warm: torch.Tensor | None, index: torch.Tensor,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` ``[R, 1, K]`` (the usual starts at the flat units ``index``), replaced by
    ``warm``'s ``[R, n]`` values (slopes, divided by ``scale`` when given) where it has a number."""
    if warm is None:
        return values.detach().clone()
    w = warm.to(values).flatten(1)[:, index].unsqueeze(1)
    if scale is not None:
        w = w / scale
    return torch.where(w.isnan(), values, w).detach()


def _in_slopes(t) -> torch.Tensor:
    """The values of variables ``t`` as slopes (:attr:`FreeSlopes.scale` undone), detached."""
    values = t.values.detach()
    return values * t.scale if getattr(t, "scale", None) is not None else values


def _full_layout(variables: dict, widths: dict[str, int], stash: dict | None = None) -> Warm:
    """The variables' values (rows still alive), or the ``stash`` of :class:`_Ascent` (per
    ``(name, kind)``, ``[R, 1, K]`` like theirs), as a :data:`Warm`: each node's ``[R, n]``, NaN
    where a row has no variable."""
    out = {}
    for name, pair in variables.items():
        for kind, t in zip(KINDS, pair):
            if t is None:
                continue
            values_of = _in_slopes(t) if stash is None else stash[(name, kind)]
            values_of = values_of[:, 0]
            full = values_of.new_full((values_of.shape[0], widths[name]), torch.nan)
            full[:, t.index] = values_of
            out[(name, kind)] = full
    return out


def _warmed(variables: FreeSlopes | None, warm: torch.Tensor | None) -> FreeSlopes | None:
    """``variables`` (a rule's free parameters at their usual start) started at ``warm``'s
    values (:data:`Warm`, in slopes) where it has them, clamped into their range."""
    if variables is None or warm is None:
        return variables
    values = _started(variables.values.detach(), warm, variables.index, variables.scale)
    values = values.clamp(min=variables.lo).clamp(max=variables.hi).requires_grad_(True)
    return replace(variables, values=values)


def _window_geometries(dual, rows: Patches) -> dict:
    """Per primal node name of an elementwise dual layer: a function giving the windows of a
    ``[R, *unit]`` tensor on the rows' windows at that layer (:func:`dualgraph.patches.geometry`)."""
    geom = geometry(dual)
    out = {}
    for node in dual.nodes:
        if isinstance(node.meta.get("rule"), ElementwiseRule):
            shape = geom[node.meta["primal"].outputs[0]]
            out[node.meta["primal"].name] = (
                lambda t, shape=shape: windows_of(shape, rows.rows, rows.out_hw, t))
    return out


def _window_variables(r: Relaxation, windows, side: int) -> FreeSlopes:
    """The free slopes of the lower (``side = -1``) or upper (``+1``) lines of ``r`` (one
    example per row) on each row's window, ``[R, 1, 1, C, K, K]``; with offsets of their own,
    in units of each unit's range (as :meth:`~dualgraph.dual_registry.FreeLines.variables`)."""
    def win(t):
        return windows(t) if torch.is_tensor(t) and t.dim() > 0 else t

    lo, hi, start, scale = r.free.scaled(side, r, win)
    values = start.detach().clone().requires_grad_(True)
    units = win(r.free.units.to(r.a_lo.dtype)) > 0.5
    return FreeSlopes(None, values, units, lo, hi, scale)
