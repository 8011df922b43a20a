"""The bound scheduler: runs dual graphs on batches (Theorem 1, exact).

For every value that feeds a nonlinear op (in topological order) it computes elementwise
bounds ``l <= z <= u`` of all its units at once: the dual graph of that value is run on
identity rows (one row per unit, chunked to keep memory in check), and because the
paper's dual layers are linear in ``lam`` (:meth:`DualRule.linear`), one pass yields both bounds:
``l = sum offsets_lower + lam.c - rho(lam)`` and ``u = sum offsets_upper + lam.c + rho(lam)``.
With sign-dependent layers (CROWN slopes, MaxPool) the pass runs on ``-I`` as well.
The final objective ``J(C)`` is one more pass on the specification rows.

The identity rows are the same for every example, so they stay un-batched (batch 1)
until the first example-dependent layer (a ReLU's ``D``) is crossed; for the first
affine layers this makes the cost independent of the batch size.

Stable units are pruned (``BoundConfig.prune_stable``): each pass first stops after its
first relaxation and bounds the rest of the network by the box of that layer's bounds.
That bound is never tighter than the exact one, since ``min_z sum_k lam_k z_k >= sum_k
min_z lam_k z_k`` over the relaxed set (the box is each unit's own min/max over it);
units it already places on one linear piece of their activation (a stably active or
inactive ReLU) keep it, and only the other rows are run to the end. The relaxation of
a stable unit does not depend on its bounds, so every later bound and ``J(C)`` are the
same as without pruning in exact arithmetic (``rounding_allowance=False``). The rounding
allowance reads the magnitudes of the bounds, which the cut leaves looser on stable units:
with it ``J`` can come out a little lower (``resnet4b`` of the ResNet benchmark at eps
1/255, float32: -309.5 pruned, -304.7 unpruned, -212.3 without the allowance).

Floating point: every bound is sound for the network in exact arithmetic and as evaluated
in its own precision (:mod:`dualgraph.rounding`): every backward pass, intermediate or
final, adds each dual step's own allowance to its rows' offsets (``Batch.per_row``); the
forward direction widens its bounds by a propagated allowance. Budgets: :attr:`BoundScheduler.deadline` is
checked before every dual step, chunk and forward node; ``BoundConfig.max_memory`` sizes
the chunks and rules out a forward direction that would not fit.

This module is the façade (:class:`BoundScheduler`); the dual-graph interpreter with
pruning and the patch path is :mod:`dualgraph.dual_run`, the direction cost model
:mod:`dualgraph.direction`, the configuration :mod:`dualgraph.bound_config`. Bounds are
differentiable in the graph's constants.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import replace
from typing import Iterator

import torch

from . import patches
from .bound_config import BoundConfig
from .deadline import Deadline
from .direction import DirectionCost
from .dual_graph import build_dual
from .dual_registry import Bounds, ElementwiseRule, dual_rule
from .dual_run import Batch, DualRunner
from .errors import DualgraphError
from .forward import ForwardBounds
from .input_sets import InputSet
from .ir import Graph, Value
from .rounding import RoundingAllowance, full_precision_matmul

__all__ = ["Batch", "BoundConfig", "BoundMap", "BoundScheduler"]


class BoundMap(dict):
    """Bounds of one batch keyed by value (what :meth:`BoundScheduler.intermediate_bounds`
    returns), remembering the :class:`Batch` they were computed in so that ``J`` reuses its
    rounding analysis."""

    batch: Batch | None = None


class BoundScheduler:
    """Computes intermediate bounds and ``J(C)`` for one graph (dual graphs are built once).

    The pieces: :class:`~dualgraph.direction.DirectionCost` picks backward or forward,
    :class:`~dualgraph.dual_run.DualRunner` runs dual graphs (pruning, patches),
    :mod:`dualgraph.forward` and :mod:`dualgraph.projections` run the forward direction.
    """

    def __init__(self, graph: Graph, config: BoundConfig = BoundConfig()) -> None:
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise DualgraphError(f"bounds need a model with one input and one output; '{graph.name}' has "
                                 f"{len(graph.inputs)} and {len(graph.outputs)}")
        self.graph, self.config = graph, config
        self.output = graph.outputs[0]
        self._duals: dict[Value, Graph] = {}
        self._proj_state = None  # random-projection generators (dualgraph.projections), on first use
        self.runner = DualRunner(config)
        self.dual(self.output)  # fails early, listing every op without a dual layer
        needed: list[Value] = []
        for node in graph.ancestors(self.output):
            if dual_rule(node).bounds_needed(node):
                needed += [v for v in node.var_inputs if v not in needed]
        self.bound_targets = needed
        #: the bound targets whose bounds come from their producer's bounded inputs (DualRule.image_bounds)
        self.by_image = frozenset(v for v in needed if v.producer is not None and len(v.producer.outputs) == 1
                                  and all(x in needed for x in v.producer.var_inputs)
                                  and dual_rule(v.producer).has_image_bounds(v.producer))
        self.direction = DirectionCost(graph, needed, config, self.by_image)
        # seconds per bounded value of the backward loop, summed over calls, when a dict (benchmarks)
        self.phase_seconds: dict[str, float] | None = None

    @property
    def deadline(self) -> Deadline:
        """Checked before every dual step, chunk and forward node (set it to bound the time)."""
        return self.runner.deadline

    @deadline.setter
    def deadline(self, deadline: Deadline) -> None:
        self.runner.deadline = deadline

    def dual(self, target: Value) -> Graph:
        if target not in self._duals:
            self._duals[target] = build_dual(self.graph, target)
        return self._duals[target]

    # ---- public API ---------------------------------------------------------------------
    def intermediate_bounds(self, input_set: InputSet, optimise_slopes: bool | None = None,
                            floor: dict[Value, Bounds] | None = None) -> dict[Value, Bounds]:
        """Bounds of every value that feeds a nonlinear op, in topological order, each sound
        in floating point (:mod:`dualgraph.rounding`) before anything uses it.

        ``optimise_slopes`` (default: with ``relu_relaxation="alpha"``): each unit whose bound
        decides its relaxation (a crossing ReLU unit; every unit before a smooth activation
        with free lines, e.g. Sigmoid or Tanh) gets its lower and upper bound tightened
        by optimised slopes (:func:`dualgraph.alpha.optimise_rows`), layer by layer, and
        intersected with ``floor`` (CROWN's bounds, computed first when not given): CROWN's
        bound of a later layer can be looser on tighter earlier bounds, the intersection never is."""
        if optimise_slopes is None:
            optimise_slopes = self.config.relu_relaxation == "alpha" and self.config.alpha_steps > 0
        if optimise_slopes and floor is None:
            floor = self.intermediate_bounds(input_set, optimise_slopes=False)
        bounds = BoundMap()
        batch = bounds.batch = self.batch(input_set, bounds)
        with full_precision_matmul(input_set.center.device):
            widen = lambda v, b: batch.rounding.widen_forward(v, _no_nan(b))  # noqa: E731
            if self.bound_targets and self.config.proj is not None:
                return self._projections().bounds(self.graph, self.bound_targets, input_set, batch.bounds,
                                                  widen, self.image_bounds)
            center = input_set.center
            if self.bound_targets and self.forward_for(center.shape[0], center.element_size()):
                with _out_of_memory_as_error("the forward direction"):
                    forward = ForwardBounds(self.graph, self.config, deadline=self.deadline).bounds(
                        self.bound_targets, input_set, batch.bounds, widen, self.image_bounds)
                if (self.config.direction != "auto" or not batch.rounding.enabled
                        or not self.direction.too_loose(self._forward_shares(forward))):
                    return forward  # (asked for, or exact arithmetic, or tight enough)
                bounds = BoundMap()  # "auto": backward after all, from scratch
                batch = bounds.batch = self.batch(input_set, bounds)
            for v in self.bound_targets:
                start = time.perf_counter()
                with _out_of_memory_as_error(v.name):
                    image = self.image_bounds(v, batch.bounds)
                    if image is None:
                        raw = self.value_bounds(v, replace(batch, per_row=True))  # each row its own allowance
                        if optimise_slopes:
                            raw = self._optimise_unit_bounds(v, batch, raw)
                            raw = Bounds(torch.fmax(raw.lower, floor[v].lower),  # NaN: no bound
                                         torch.fmin(raw.upper, floor[v].upper))
                        image = batch.rounding.adopt(v, _no_nan(raw))
                    batch.bounds[v] = image
                if self.phase_seconds is not None:
                    self.phase_seconds[v.name] = self.phase_seconds.get(v.name, 0.0) + time.perf_counter() - start
        return batch.bounds

    def image_bounds(self, v: Value, bounds: BoundMap) -> Bounds | None:
        """For a target in :attr:`by_image`, its bounds as the image of its producer's input
        bounds (``DualRule.image_bounds``: a ReLU's ``[relu(l), relu(u)]``), as tight as a pass
        could make them and adopted by the rounding allowance; else None. Both directions take
        it, so that they agree in exact arithmetic."""
        if v not in self.by_image:
            return None
        node = v.producer
        raw = dual_rule(node).image_bounds(node, [bounds[x] for x in node.var_inputs])[0]
        return bounds.batch.rounding.adopt(v, raw)

    def _forward_shares(self, bounds: dict[Value, Bounds]) -> list[tuple[float, float]]:
        """Each target's forward rounding allowance and bound width, summed over units and examples."""
        rounding = bounds.batch.rounding
        out = []
        for v in self.bound_targets:
            b = bounds[v]
            allowance = rounding.forward_allowance(v).expand_as(b.lower)
            out.append((float(allowance.sum()), float((b.upper - b.lower).sum())))
        return out

    def batch(self, input_set: InputSet, bounds: dict[Value, Bounds]) -> Batch:
        """The state the passes over one batch share (bounds are filled in as computed)."""
        return Batch(input_set, bounds, RoundingAllowance(self.graph, input_set, bounds, self.config))

    @property
    def uses_forward(self) -> bool:
        """Whether intermediate bounds run forward (Appendix F) rather than backward (for one example)."""
        return self.forward_for(1, 4)

    def forward_for(self, batch: int, itemsize: int) -> bool:
        """Whether intermediate bounds of ``batch`` examples run forward (:class:`DirectionCost`)."""
        return self.direction.forward_for(batch, itemsize)

    def forward_peak_bytes(self, batch: int, itemsize: int) -> tuple[float, str]:
        """Estimated peak memory of the forward direction and the node where it is reached."""
        return self.direction.forward_peak_bytes(batch, itemsize)

    def projection_generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """The generator of the random projections on ``device`` (``config.proj`` set): saving
        and restoring its state replays the same draws (training checkpoints do)."""
        if self.config.proj is None:
            raise DualgraphError("projection_generator needs BoundConfig(proj=R)")
        return self._projections().generator(torch.device(device))

    def _projections(self):
        """Random-projection state (generators), created on first use; the network must have
        linear dual layers only (Theorem 2)."""
        if self._proj_state is None:
            from .projections import Projections, nonlinear_dual_nodes
            keep = {n for t in self.bound_targets for n in self.graph.ancestors(t)}
            nodes = [n for n in self.graph.nodes if n in keep]
            bad = nonlinear_dual_nodes(nodes, self.config)
            if bad:
                names = ", ".join(f"'{n.name}' ({n.op_type})" for n in bad[:5])
                raise DualgraphError(f"random projections (proj={self.config.proj}) need linear dual layers "
                                     f"everywhere (the paper's ReLU relaxation, no MaxPool); not linear: {names}. "
                                     "Compute exact bounds (no proj) or use relu_relaxation 'paper'")
            self._proj_state = Projections(self.config)
        return self._proj_state

    def value_bounds(self, v: Value, batch: Batch) -> Bounds:
        """Elementwise bounds of ``v`` (``[B, *unit_shape]``) given bounds of earlier values."""
        dual = self.dual(v)
        n = v.numel
        size = batch.input_set.center.shape[0]
        linear = all(d.meta["rule"].linear(d.meta["primal"], self.config) for d in dual.nodes if "rule" in d.meta)
        widest = max([int(torch.Size(val.shape[2:]).numel()) for val in dual.values.values()
                      if val.shape is not None and len(val.shape) > 2] + [n])
        elements = self.config.max_elements
        if self.config.max_memory is not None:  # a few tensors of the widest rows are alive at once
            elements = min(elements, self.config.max_memory // (6 * batch.input_set.center.element_size()))
        chunk = max(1, elements // (widest * size * (1 if linear else 2)))
        like = batch.input_set.center
        # an image of v's bounds (DualRule.image_bounds) needs them exact: pruned stable units' are looser
        feeds_image = any(o in self.by_image for user in v.users for o in user.outputs)
        prune = None if feeds_image else self.stable_pieces(v)
        if self.config.patches and patches.starts_on_patches(v):
            lo, up = self.runner.patch_bounds(dual, batch, linear, prune)
            return Bounds(lo.reshape(size, *v.unit_shape), up.reshape(size, *v.unit_shape))
        lows, ups = [], []
        for start in range(0, n, chunk):
            self.deadline.check()
            k = min(chunk, n - start)
            rows = torch.zeros(1, k, n, dtype=like.dtype, device=like.device)
            rows[0, torch.arange(k), torch.arange(start, start + k)] = 1.0
            rows = rows.view(1, k, *v.unit_shape)
            lo, up = self.runner.run(dual, rows, batch, prune, both=not linear)
            lows.append(lo)
            ups.append(up)
        shape = (size, *v.unit_shape)
        return Bounds(torch.cat(lows, 1).reshape(shape), torch.cat(ups, 1).reshape(shape))

    def stable_pieces(self, v: Value) -> tuple[float, ...] | None:
        """The breakpoints of every activation fed by ``v`` if its stable units may be pruned
        (``prune_stable`` and :meth:`breakpoints`)."""
        return self.breakpoints(v) if self.config.prune_stable else None

    @staticmethod
    def breakpoints(v: Value) -> tuple[float, ...] | None:
        """The breakpoints of every activation fed by ``v`` if all of them are piecewise linear
        (``DualRule.breakpoints``): only a unit between two of them has a relaxation that its
        bounds decide."""
        points: set[float] = set()
        for user in v.users:
            rule = dual_rule(user)
            if rule.bounds_needed(user):
                pieces = rule.breakpoints(user)
                if pieces is None:
                    return None
                points.update(pieces)
        return tuple(sorted(points)) or None

    def _smooth_users(self, v: Value, bounds: Bounds) -> bool:
        """Whether every op that relaxes ``v`` has free lines with their own offsets on
        ``bounds`` (:class:`~dualgraph.dual_registry.FreeLines`: Sigmoid, Tanh, ... with ``alpha``),
        whose every unit's bounds shape the lines an ascent can reach."""
        users = [u for u in v.users if dual_rule(u).bounds_needed(u)]
        for user in users:
            rule = dual_rule(user)
            if not isinstance(rule, ElementwiseRule):
                return False
            free = rule.relaxation(user, bounds, self.config).free
            if free is None or free.offsets is None:
                return False
        return bool(users)

    def bound_output(self, input_set: InputSet, spec: torch.Tensor,
                     bounds: dict[Value, Bounds] | None = None, *, goal: float | torch.Tensor | None = None,
                     candidates: torch.Tensor | None = None, record: dict | None = None,
                     steps: int | None = None, warm: dict | None = None) -> torch.Tensor:
        """Lower bounds ``J`` of ``spec @ f(x')`` over the input set: ``[B, m]``, valid for the
        network in exact arithmetic and as evaluated in its own precision (each dual step's
        rounding allowance is included, :mod:`dualgraph.rounding`).

        ``spec`` is ``[B or 1, m, n_out]``. Intermediate bounds are computed if not given.
        With ``relu_relaxation="alpha"`` each row's free slopes are then optimised
        (:mod:`dualgraph.alpha`): only rows at or below ``goal`` (all rows if None) of the
        ``candidates`` examples (a bool ``[B]``; default all), the others keep CROWN's bound;
        a branch-and-bound batch (``Batch.splits``) also optimises its split multipliers.
        ``record`` (with given bounds): the open rows' dual variables, see :meth:`_optimise_slopes`;
        ``steps``: the optimiser's steps (default ``config.alpha_steps``); ``warm``: the
        variables' start values per example (:data:`dualgraph.alpha.Warm`, ``[B, n]``); with
        ``steps=0`` the bound at them (one pass).
        """
        given = bounds
        if bounds is None:  # with optimised slopes: CROWN's first, optimised ones where still needed
            bounds = self.intermediate_bounds(input_set, optimise_slopes=False)
        if spec.dim() != 3 or spec.shape[2] != self.output.numel:
            raise DualgraphError(f"specification must have shape [batch, rows, {self.output.numel}], "
                                 f"got {tuple(spec.shape)}")
        rows = spec.to(input_set.center).reshape(spec.shape[0], spec.shape[1], *self.output.unit_shape)
        batch = getattr(bounds, "batch", None)
        if batch is None or batch.input_set is not input_set:
            batch = self.batch(input_set, bounds)
        batch = replace(batch, per_row=True)
        with full_precision_matmul(input_set.center.device), _out_of_memory_as_error(self.output.name):
            lower, _ = self.runner.run(self.dual(self.output), rows, batch)
            steps = self.config.alpha_steps if steps is None else steps
            if (self.config.relu_relaxation == "alpha" or batch.splits) and (steps or warm):
                lower = self._optimise_slopes(rows, batch, lower, goal, candidates, record, steps, warm)
                if given is None and self.config.relu_relaxation == "alpha" and steps:
                    lower = self._with_optimised_bounds(input_set, bounds, rows, lower, goal, candidates)
        return _without_overflow(lower, batch.rounding)

    def _with_optimised_bounds(self, input_set: InputSet, crown: dict[Value, Bounds], rows: torch.Tensor,
                               lower: torch.Tensor, goal: float | None,
                               candidates: torch.Tensor | None) -> torch.Tensor:
        """The examples that still have a row at or below ``goal`` after optimising the final
        slopes on CROWN's intermediate bounds, bounded again on optimised intermediate bounds."""
        open_rows = torch.ones_like(lower, dtype=torch.bool) if goal is None else lower <= goal
        if candidates is not None:
            open_rows &= candidates.to(lower.device).view(-1, 1)
        examples = open_rows.any(1).nonzero().flatten()
        if examples.numel() == 0:
            return lower
        subset = input_set.take(examples)
        bounds = self.intermediate_bounds(subset, optimise_slopes=True,
                                          floor={v: b.take(examples) for v, b in crown.items()})
        batch = replace(bounds.batch, per_row=True)
        picked = rows[examples] if rows.shape[0] > 1 else rows
        again, _ = self.runner.run(self.dual(self.output), picked, batch)
        if torch.is_tensor(goal) and goal.dim() > 0 and goal.shape[0] > 1:
            goal = goal[examples]
        again = self._optimise_slopes(picked, batch, again, goal, None)
        return lower.index_put((examples,), torch.maximum(lower[examples], again))

    def _optimise_unit_bounds(self, v: Value, batch: Batch, raw: Bounds) -> Bounds:
        """``raw`` with the units whose bounds decide their relaxation (those between two
        breakpoints of every activation they feed, or all of them before activations whose
        free lines all have their own offsets, :meth:`_smooth_users`) tightened by optimised
        slopes: one row ``+e_j`` for the lower and one ``-e_j`` for the upper bound of each, its
        goal the breakpoint when there is one (past it the unit is stable and its bound no
        longer matters).
        These passes add each dual step's rounding allowance to their rows (``per_row``), as
        every backward pass does."""
        from .alpha import optimise_rows
        from .dual_run import needed_bounds
        points = self.breakpoints(v)
        lo, up = raw.lower.flatten(1), raw.upper.flatten(1)
        if points is None:  # smooth activations: every unit's bounds decide its relaxation
            if not self._smooth_users(v, raw):
                return raw
            open_units = lo < up
        else:
            open_units = torch.zeros_like(lo, dtype=torch.bool)
            for p in points:
                open_units |= (lo < p) & (up > p)
        examples, units = open_units.nonzero(as_tuple=True)
        count = examples.numel()
        if count == 0:
            return raw
        dual = self.dual(v)
        needed = needed_bounds(dual, 0)
        signs = torch.cat([torch.ones(count), -torch.ones(count)]).to(lo)
        examples, units = torch.cat([examples, examples]), torch.cat([units, units])
        start = torch.cat([lo[examples[:count], units[:count]], -up[examples[count:], units[count:]]]).unsqueeze(1)
        goal = points[0] * signs.unsqueeze(1) if points is not None and len(points) == 1 else None
        on_windows = self.config.patches and batch.splits is None and patches.geometry(dual) is not None
        if on_windows:  # the rows' windows: far smaller than dense rows
            widest = patches.widest_row(v, self.graph.ancestors(v))
            identity = patches.identity(tuple(v.unit_shape), lo)
        else:
            widest = max([int(torch.Size(val.shape[2:]).numel()) for val in dual.values.values()
                          if val.shape is not None and len(val.shape) > 2] + [v.numel])
        chunk = max(1, self.config.max_elements // (16 * widest))
        best = []
        for first in range(0, 2 * count, chunk):
            sl = slice(first, first + chunk)
            n = len(units[sl])
            if on_windows:  # the rows carry their examples: the batch stays whole
                rows = patches.select(identity, None, examples[sl], units[sl])
                rows = replace(rows, data=rows.data * signs[sl].view(-1, 1, 1, 1, 1, 1))
                rows_batch = replace(batch, per_row=True)
            else:
                rows = torch.zeros(n, 1, v.numel, dtype=lo.dtype, device=lo.device)
                rows[torch.arange(n), 0, units[sl]] = signs[sl]
                rows = rows.view(-1, 1, *v.unit_shape)
                rows_batch = replace(batch.take(examples[sl], needed), per_row=True)
            best.append(optimise_rows(self.runner, dual, rows, rows_batch, start[sl],
                                      None if goal is None else goal[sl])[:, 0])
        best = torch.cat(best)
        lo = lo.index_put((examples[:count], units[:count]), best[:count])
        up = up.index_put((examples[count:], units[count:]), -best[count:])
        return Bounds(lo.view_as(raw.lower), up.view_as(raw.upper))

    def _optimise_slopes(self, rows: torch.Tensor, batch: Batch, lower: torch.Tensor,
                         goal: float | torch.Tensor | None, candidates: torch.Tensor | None,
                         record: dict | None = None, steps: int | None = None,
                         warm: dict | None = None) -> torch.Tensor:
        """Optimised-slope bounds (:func:`dualgraph.alpha.optimise_rows`) of the open rows,
        flattened to one row per ``(example, row)`` and run in chunks that fit the budget.
        ``goal``: a number or a tensor broadcasting to ``lower`` (``[B, m]``). ``record``:
        filled with the open rows' dual variables (:attr:`DualRunner.record`), their
        ``"examples"``/``"rows"`` and the variables' last values (``"variables"``), and the
        variables at which each optimised row last passed its goal (``"proving"``, a Warm over
        the rows ``"proving_examples"``/``"proving_rows"``); ``warm``: start values per example,
        shared by its rows."""
        from .alpha import cat_warm, optimise_rows
        from .dual_run import needed_bounds
        if goal is not None:
            goal = torch.as_tensor(goal, dtype=lower.dtype, device=lower.device).expand_as(lower)
        open_rows = torch.ones_like(lower, dtype=torch.bool) if goal is None else lower <= goal
        if candidates is not None:
            open_rows &= candidates.to(lower.device).view(-1, 1)
        examples, which = open_rows.nonzero(as_tuple=True)
        if record is not None:  # "proving_*": every optimised row (the open ones end up in examples/rows)
            record.update(examples=examples, rows=which, proving_examples=examples, proving_rows=which)
        if examples.numel() == 0:
            return lower
        dual = self.dual(self.output)
        needed = needed_bounds(dual, 0)
        widest = max(int(torch.Size(val.shape[2:]).numel()) for val in dual.values.values()
                     if val.shape is not None and len(val.shape) > 2)
        chunk = max(1, self.config.max_elements // (16 * widest))  # dual variables, slopes and their gradients
        best, parts, sizes = [], [], []
        for start in range(0, examples.numel(), chunk):
            ex, row = examples[start:start + chunk], which[start:start + chunk]
            picked = rows[ex if rows.shape[0] > 1 else 0, row].unsqueeze(1)
            part = None if record is None else {}
            best.append(optimise_rows(self.runner, dual, picked, batch.take(ex, needed), lower[ex, row].unsqueeze(1),
                                      None if goal is None else goal[ex, row].unsqueeze(1), part, steps,
                                      None if warm is None else {k: w[ex] for k, w in warm.items()})[:, 0])
            parts.append(part)
            sizes.append(len(ex))
        if record is not None:  # the rows still open, in the order of the parts
            alive = torch.cat([part["alive"] + start for part, start in zip(parts, range(0, len(examples), chunk))])
            record.update(examples=examples[alive], rows=which[alive])
            for key in dict.fromkeys(k for part in parts for k in part):  # a part whose rows all closed has none
                if key == "variables":
                    record[key] = cat_warm([(p.get(key, {}), len(p["alive"])) for p in parts])
                elif key == "proving":  # every row of every part
                    record[key] = cat_warm([(p.get(key, {}), n) for p, n in zip(parts, sizes)])
                elif key != "alive":
                    record[key] = torch.cat([p[key] for p in parts if key in p])
        return lower.index_put((examples, which), torch.cat(best))


@contextlib.contextmanager
def _out_of_memory_as_error(where: str) -> Iterator[None]:
    """Running out of memory is a one-line error naming what was being bounded and the size
    (also when a walk over the graph has already named the failing node: its cause)."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError, DualgraphError) as exc:
        failure = exc.__cause__ if isinstance(exc, DualgraphError) else exc
        if not _allocation_failure(failure):
            raise
        size = re.search(r"allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", str(failure))
        raise DualgraphError(f"out of memory while bounding '{where}'"
                             + (f" (asked for {size.group(1)})" if size else "")
                             + "; use a smaller --batch-size or a smaller --max-memory budget") from None


def _allocation_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` is an allocator's failure (torch's CPU allocator raises a RuntimeError)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "alloc" in str(exc)


def _no_nan(b: Bounds) -> Bounds:
    """Bounds whose NaN entries (a float32 pass whose own arithmetic overflowed) are no bounds:
    ``[-inf, inf]``, which every relaxation and pruning cut after reads as a crossing unit with
    no finite bound (and a NaN relaxation makes the final bound NaN, hence ``-inf``)."""
    if not (bool(torch.isnan(b.lower).any()) or bool(torch.isnan(b.upper).any())):
        return b
    return Bounds(torch.nan_to_num(b.lower, nan=float("-inf")), torch.nan_to_num(b.upper, nan=float("inf")))


def _without_overflow(lower: torch.Tensor, rounding: RoundingAllowance) -> torch.Tensor:
    """``lower`` with ``-inf`` for the examples whose evaluation may overflow (no certificate:
    the rounding model assumes finite values, :meth:`RoundingAllowance.may_overflow`), and a
    warning that names the node; a NaN bound (the bound's own arithmetic overflowed, e.g.
    ``inf - inf`` in float32 dual variables) is ``-inf`` too, no bound."""
    lower = torch.nan_to_num(lower, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    flags = rounding.may_overflow()
    if flags is None or not bool(flags.any()):
        return lower
    import warnings
    warnings.warn(f"node '{rounding.overflow_node()}' may overflow as the network evaluates it (its magnitudes "
                  f"reach {rounding.overflow_limit:.3g}): no bound where it may (the bound is -inf there)",
                  RuntimeWarning, stacklevel=3)  # one message per node: shown once
    return lower.masked_fill(flags.to(lower.device).view(-1, 1), float("-inf"))
