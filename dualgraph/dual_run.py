"""The interpreter over a dual graph: one pass of dual steps on a batch of rows.

An environment keyed by dual value, one :meth:`DualRunner.run_node` per dual node, values
freed as soon as they are consumed, errors that name the primal node. Two refinements
ride on the same walk: **pruning** stable units (a pass stops after its first relaxation,
bounds the rest of the network by that layer's box and runs only the rows the box leaves
open; see :mod:`dualgraph.scheduler`) and the **patch path** (rows of a convolution's
units kept as local windows while the dual graph is a chain, :mod:`dualgraph.patches`).
Bounds are differentiable in the graph's constants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import patches
from .allocator import MMAP_THRESHOLD
from .deadline import NEVER, Deadline
from .dual_graph import FAN_OUT_SUM, INPUT_SET
from .dual_registry import Bounds, DualStep, ElementwiseRule, dual_rule
from .errors import DualgraphError
from .input_sets import InputSet
from .interpreter import GraphWalk, naming_node
from .ir import Graph, Node, Value, last_uses
from .linalg import batched_dot
from .rounding import RoundingAllowance
from .trust import needs_check, verify_dual_step


@dataclass
class Batch:
    """What every dual pass over one batch of examples reads: its input set, the bounds
    computed so far and their rounding allowance (:meth:`take` selects some examples)."""

    input_set: InputSet
    bounds: dict[Value, Bounds]
    rounding: RoundingAllowance
    per_row: bool = False  # add each dual step's rounding allowance to the rows' offsets
    #: branch-and-bound domains: per activation node name, the sign ``s`` ``[B, *unit]`` of each
    #: unit's split constraint ``s z <= 0`` (0: not split; see ``SplitMultipliers``)
    splits: dict[str, torch.Tensor] | None = None

    def take(self, examples: torch.Tensor, values) -> Batch:
        """The given examples (an index tensor into the batch), with the bounds of ``values``."""
        splits = None if self.splits is None else {k: t[examples] for k, t in self.splits.items()}
        return Batch(self.input_set.take(examples),
                     {v: self.bounds[v].take(examples) for v in values if v in self.bounds},
                     self.rounding.take(examples), self.per_row, splits)


class DualRunner:
    """Runs dual graphs for one scheduler: ``config`` (a :class:`~dualgraph.bound_config.BoundConfig`),
    ``deadline`` checked before every dual step, and a cache of the patch path's transpose
    matrices (window-to-window, per Conv)."""

    def __init__(self, config) -> None:
        self.config = config
        self.deadline: Deadline = NEVER
        self.patch_cache: dict = {}
        self.frees: dict[int, dict] = {}  # last uses per dual graph (the scheduler keeps its duals)
        self._widest: dict = {}  # widest dual value per dual graph (rows_per_chunk, channels_per_chunk)
        #: per primal node name, ``(FreeSlopes or None, SplitMultipliers or None, FreeSlopes or None)``
        #: (lower slopes, split multipliers, upper slopes): the variables of the slope optimiser
        #: (:mod:`dualgraph.alpha`), set around its passes; None: none
        self.variables: dict[str, tuple] | None = None
        #: when a dict: each pass stores the rows' dual variables at every elementwise layer's
        #: output (by primal node name) and at the input (``"input"``), for branching heuristics
        self.record: dict | None = None

    def frees_of(self, dual: Graph) -> dict:
        """The values to free after each dual node. A pass that starts at a later node reads
        the same table: a value's last consumer does not depend on where the pass began."""
        if id(dual) not in self.frees:
            self.frees[id(dual)] = last_uses(dual.nodes)
        return self.frees[id(dual)]

    def run(self, dual: Graph, rows: torch.Tensor, batch: Batch, prune: tuple[float, ...] | None = None,
            both: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``dual`` on ``rows`` (``[b, m, *target_shape]``); returns (lower, upper) ``[B, m]``.

        ``upper`` is the bound for ``max rows . z``: None unless every layer is linear, or
        ``both`` is set (then the pass **forks** at its first non-linear dual layer, going on
        with ``[rows; -rows]``, so the linear layers before it run once for both bounds).
        With ``prune`` (breakpoints), rows whose cheaper bound lies between two breakpoints
        get that bound instead (see the module docstring).
        """
        return self._run_from(dual, 0, {dual.inputs[0]: rows}, batch, 0.0, 0.0, rows.shape[1], prune, both)

    def _run_from(self, dual: Graph, first: int, env: dict, batch: Batch,
                  lower, upper, m: int, prune=None, both: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        run = _DualPass(self, dual, batch, lower, upper, m, prune, both)
        done = run.walk(env, first)
        return done if isinstance(done, tuple) else run.result()  # a tuple: the pass was pruned or forked

    def run_until(self, dual: Graph, rows: torch.Tensor, batch: Batch, stop: set[str]) -> tuple[int, dict, object]:
        """Run ``dual`` on ``rows`` up to the first dual node of a primal node named in ``stop``:
        ``(its index, the environment there, the lower offsets so far)``, from which
        :meth:`run_from` goes on (the slope optimiser runs the part before its first free
        slopes once). Without such a node: the end of the graph and an empty environment."""
        if isinstance(rows, patches.Patches):  # selected units of a feature map, on their windows
            run = _PatchPass(self, dual, batch, 0.0, None, None)
        else:
            run = _DualPass(self, dual, batch, 0.0, 0.0, rows.shape[1], None)
        run.stop_at = stop
        done = run.walk({dual.inputs[0]: rows}, 0)
        if isinstance(done, _Stopped):
            return done.index, done.env, done.lower
        if isinstance(done, tuple):  # a patch pass reached the input set
            return len(dual.nodes), {}, done[0]
        return len(dual.nodes), {}, run.lower

    def run_from(self, dual: Graph, first: int, env: dict, batch: Batch, lower, m: int) -> torch.Tensor:
        """The lower bounds ``[B, m]`` of a pass resumed at dual node ``first`` (see :meth:`run_until`)."""
        if first == len(dual.nodes):
            like = batch.input_set.center
            return torch.as_tensor(lower, dtype=like.dtype, device=like.device).expand(like.shape[0], m)
        if any(isinstance(t, patches.Patches) for t in env.values()):
            return self._patches_from(dual, first, dict(env), batch, lower, None, None)[0]
        return self._run_from(dual, first, dict(env), batch, lower, None, m)[0]

    def _forked(self, dual: Graph, i: int, env: dict, batch: Batch, lower, upper, m: int):
        """Both bounds from dual node ``i`` on (all earlier layers linear): one pass on the rows
        and their negatives, whose lower bounds are ``lower`` and ``-upper``."""
        like = batch.input_set.center
        doubled = {v: torch.cat([t, -t], 1) for v, t in env.items()}
        lo, up = _as_rows(lower, m, like), _as_rows(upper, m, like)
        b = max(lo.shape[0], up.shape[0])
        offsets = torch.cat([lo.expand(b, m), -up.expand(b, m)], 1)
        out, _ = self._run_from(dual, i, doubled, batch, offsets, None, 2 * m)
        return out[:, :m], -out[:, m:]

    def rows_per_chunk(self, dual: Graph, like: torch.Tensor, copies: int = 1) -> int:
        """How many dual rows of ``dual`` one pass may carry within the memory budget: a few
        tensors of its widest value are alive at once (``copies``: 2 for rows and their negatives)."""
        if id(dual) not in self._widest:
            self._widest[id(dual)] = max([int(torch.Size(v.shape[2:]).numel()) for v in dual.values.values()
                                          if v.shape is not None and len(v.shape) > 2] + [1])
        elements = self.config.max_elements
        if self.config.max_memory is not None:
            elements = min(elements, self.config.max_memory // (6 * like.element_size()))
        return max(1, elements // (self._widest[id(dual)] * like.shape[0] * copies))

    # ---- pruning stable units ------------------------------------------------------------
    def _can_prune_at(self, node: Node, env: dict, batch: Batch) -> bool:
        """An elementwise dual layer whose input has bounds, where every other live dual
        value multiplies a primal value with a known box (:meth:`value_box`): a residual
        block's skip branch is live while its inner ReLU is reached."""
        rule = node.meta.get("rule")
        if not (isinstance(rule, ElementwiseRule) and node.inputs[0] in env
                and node.meta["primal"].var_inputs[0] in batch.bounds):
            return False
        return all(v is node.inputs[0] or self.value_box(v.meta.get("primal_value"), batch) is not None
                   for v in env)

    def _pruned(self, dual: Graph, i: int, env: dict, batch: Batch,
                lower, upper, m: int, prune: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bound the rows' linear form at dual node ``i`` (an elementwise relaxation) by the box
        of that layer's relaxed outputs (:meth:`output_box`) and every other live dual value by
        the box of its primal value, and run on from node ``i`` only the rows that leaves open
        (both signs of them if a layer after is not linear)."""
        node = dual.nodes[i]
        linear, absolute = 0.0, 0.0
        for v, lam in env.items():
            centre, radius = (self.output_box(node.meta["primal"], batch) if v is node.inputs[0]
                              else self.value_box(v.meta["primal_value"], batch))
            linear, absolute = linear + batched_dot(lam, centre), absolute + batched_dot(lam.abs(), radius)
        absolute = absolute + batch.rounding.cut_constant()

        def exact(examples, rows):
            picked = {v: lam[examples if lam.shape[0] > 1 else 0, rows].unsqueeze(1) for v, lam in env.items()}
            return self._run_from(dual, i, picked, batch.take(examples, needed_bounds(dual, i)),
                                  _pick(lower, examples, rows), _pick(upper, examples, rows), 1, both=True)

        def every_row():
            return self._run_from(dual, i, env, batch, lower, upper, m, both=True)

        return _refine(lower + linear - absolute, upper + linear + absolute, prune, exact, every_row)

    def value_box(self, v: Value | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Centre and half-width of a box holding primal value ``v`` over the relaxed set: its
        own bounds, or the relaxed outputs' box of the elementwise layer producing it
        (:meth:`output_box`); None when neither is known."""
        if v is None:
            return None
        b = batch.bounds.get(v)
        if b is not None:
            return (b.lower + b.upper) / 2, _box_radius(batch, v, b)
        producer = v.producer
        if (producer is not None and producer.var_inputs and producer.var_inputs[0] in batch.bounds
                and isinstance(dual_rule(producer), ElementwiseRule)):
            return self.output_box(producer, batch)
        return None

    def output_box(self, primal: Node, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and half-width ``[B, *unit]`` of a box holding the relaxed outputs of the
        elementwise layer ``primal`` over its input's box ``[l, u]``: from
        ``min over [l, u] of a_lo z + b_lo`` to ``max over [l, u] of a_up z + b_up``, widened by
        the rounding of the dot products with it. Kept with the input's bounds.

        The cut bound ``lam . centre -/+ |lam| . radius`` is a valid bound by itself. With
        intermediate bounds from one relaxation (paper, CROWN) it is never tighter than a full
        pass, whose relaxed set ``S`` keeps every unit inside its own box: ``J(lam) = min over
        S of lam . y`` is superadditive over the rows' units (a minimum of a sum is at least the
        sum of the minima), so a unit the cut bound places on one linear piece is on it in the
        full pass too, and crossing units' bounds are those of the unpruned computation. With
        optimised or intersected intermediate bounds the cut can occasionally be the tighter
        one; every bound kept is still sound."""
        rule = dual_rule(primal)
        v = primal.var_inputs[0]
        w = batch.bounds[v]
        key = ("output box", primal.name, id(self.config))
        if key not in w.cache:
            r = rule.relaxation(primal, w, self.config)
            centre, half = (w.lower + w.upper) / 2, _box_radius(batch, v, w)
            low = r.a_lo * centre - r.a_lo.abs() * half + r.b_lo
            high = r.a_up * centre + r.a_up.abs() * half + r.b_up
            radius = (high - low) / 2
            g = batch.rounding.box_gamma(v)
            if g:
                radius = radius + g * r.magnitudes()[1] + batch.rounding.box_absolute()
            w.cache[key] = ((low + high) / 2, radius)
        return w.cache[key]

    # ---- the patch path -------------------------------------------------------------------
    def patch_bounds(self, dual: Graph, batch: Batch, linear: bool, prune=None):
        """Bounds of a feature map's units through the patch path (see :mod:`dualgraph.patches`),
        from the target's identity rows, a block of target channels at a time
        (:meth:`channels_per_chunk`); ``[B, units]`` each."""
        target = dual.meta["target"]
        p = patches.identity(tuple(target.unit_shape), batch.input_set.center)
        step = self.channels_per_chunk(dual, batch.input_set.center, 1 if linear else 2)
        parts = [self._patches_from(dual, 0, {dual.inputs[0]: replace(p, data=p.data[:, :, c:c + step])}, batch,
                                    0.0, 0.0, prune, both=not linear)
                 for c in range(0, target.unit_shape[0], step)]
        return tuple(torch.cat(side, 1) for side in zip(*parts)) if len(parts) > 1 else parts[0]

    def channels_per_chunk(self, dual: Graph, like: torch.Tensor, copies: int) -> int:
        """How many target channels one patch pass may carry within the memory budget: the
        widest windows any of its values reaches (:func:`patches.widest_row`; the rows are
        shared by the batch until the first per-example layer, then per example) times the
        target's positions, as :meth:`rows_per_chunk` counts dense rows. The budget is at
        most half of :data:`~dualgraph.allocator.MMAP_THRESHOLD` in bytes, so that the pass's
        buffers stay below it and are reused from the heap rather than mapped afresh at every
        step (:func:`~dualgraph.allocator.keep_freed_memory`). Measured here (one thread, one
        example, the command line's allocator settings; against the ``max_elements`` budget
        alone, 2^25 elements): the paper's CIFAR ResNet at eps 2/255 10.1-11.3 s -> 7.8-8.2 s
        (system time 3.8-4.8 s -> 0.6-0.8 s), with CROWN 25.2 -> 18.2 s, ``resnet8`` 17.3-20.7 s
        -> 13.9 s; ``resnet4b``'s peak resident size with CROWN 770-840 MB -> 530-560 MB."""
        key = ("patch rows", id(dual))
        if key not in self._widest:
            target, graph = dual.meta["target"], dual.meta["primal"]
            self._widest[key] = patches.widest_row(target, graph.ancestors(target))
        elements = min(self.config.max_elements, MMAP_THRESHOLD // (2 * like.element_size()))
        if self.config.max_memory is not None:
            elements = min(elements, self.config.max_memory // (6 * like.element_size()))
        positions = int(torch.Size(dual.meta["target"].unit_shape[1:]).numel())
        return max(1, elements // (self._widest[key] * positions * like.shape[0] * copies))

    def _patches_from(self, dual: Graph, first: int, env: dict, batch: Batch, lower, upper, prune,
                      both: bool = False):
        """Continue a pass on the patches in ``env`` (the live dual values, each in the unit
        space of the primal value it multiplies) from dual node ``first``; ``both``: see :meth:`run`."""
        run = _PatchPass(self, dual, batch, lower, upper, prune, both)
        done = run.walk(env, first)
        return done if isinstance(done, tuple) else run.densify(len(dual.nodes), done)

    def _forked_patches(self, dual: Graph, i: int, env: dict, batch: Batch, lower, upper):
        """:meth:`_forked` on patches: the negated rows become more target channels."""
        p = next(iter(env.values()))
        m = p.data.shape[2] * (1 if p.rows is not None else p.positions)
        like = batch.input_set.center
        lo, up = _as_rows(lower, m, like), _as_rows(upper, m, like)
        b = max(lo.shape[0], up.shape[0])
        offsets = torch.cat([lo.expand(b, m), -up.expand(b, m)], 1)
        doubled = {v: replace(q, data=torch.cat([q.data, -q.data], 2)) for v, q in env.items()}
        out, _ = self._patches_from(dual, i, doubled, batch, offsets, None, None)
        return out[:, :m], -out[:, m:]

    def _pruned_patches(self, dual: Graph, i: int, env: dict, batch: Batch, lower, upper,
                        prune: tuple[float, ...]):
        """:meth:`_pruned` on patches: every live value's windows against its box."""
        node = dual.nodes[i]
        linear, absolute = 0.0, 0.0
        for v, p in env.items():
            box = (self.output_box(node.meta["primal"], batch) if v is node.inputs[0]
                   else self.value_box(v.meta["primal_value"], batch))
            centre, radius = patches.box_terms(p, *box)
            linear, absolute = linear + centre, absolute + radius
        absolute = absolute + batch.rounding.cut_constant()

        def exact(examples, rows):
            picked = {v: patches.select(p, None, examples, rows) for v, p in env.items()}
            return self._patches_from(dual, i, picked, batch, _pick(lower, examples, rows),
                                      _pick(upper, examples, rows), None, both=True)

        def every_row():
            return self._patches_from(dual, i, env, batch, lower, upper, None, both=True)

        return _refine(lower + linear - absolute, upper + linear + absolute, prune, exact, every_row)

    def run_node(self, node: Node, env: dict[Value, torch.Tensor], batch: Batch) -> DualStep:
        """One dual step; on the specification rows (``batch.per_row``) its offsets are
        widened by the step's own rounding allowance."""
        lams = [env[v] if v is not None else None for v in node.inputs]
        step = self._dual_step(node, lams, batch)
        if not batch.per_row:
            return step
        slack = batch.rounding.slack(node, lams)
        upper = None if step.upper is None else step.upper + slack
        return DualStep(step.lam_in, step.lower - slack, upper)

    def _dual_step(self, node: Node, lams: list, batch: Batch) -> DualStep:
        if node.op == FAN_OUT_SUM:
            total = lams[0]
            for t in lams[1:]:
                total = total + t
            return DualStep([total], 0.0, 0.0)
        if node.op == INPUT_SET:
            lam = lams[0]
            if self.record is not None:
                self.record["input"] = lam.detach()
            center = batched_dot(lam, batch.input_set.center)
            radius = batch.input_set.support(lam)
            return DualStep([], center - radius, center + radius)
        primal: Node = node.meta["primal"]
        rule = node.meta["rule"]
        lam = lams[0] if len(lams) == 1 else _fill_unused(lams, primal)
        needed = rule.bounds_needed(primal)
        in_bounds = [batch.bounds.get(v) for v in primal.var_inputs] if needed else []
        if needed and any(b is None for b in in_bounds):
            raise DualgraphError(f"dual of node '{primal.name}' ({primal.op_type}) needs bounds of its inputs "
                                 "that were not computed")
        variables = None if self.variables is None else self.variables.get(primal.name)
        if self.record is not None and isinstance(rule, ElementwiseRule):
            self.record[primal.name] = lam.detach()
        with naming_node(primal):
            if variables is not None:
                step = rule.backward_with_slopes(primal, lam, in_bounds[0], self.config, *variables)
                if variables[1] is not None:
                    step = self._split_rounding(primal, step, variables[1], batch)
            else:
                step = rule.backward(primal, lam, in_bounds, self.config)
        if step.upper is None and rule.linear(primal, self.config):
            raise DualgraphError(f"the dual layer of node '{primal.name}' ({primal.op_type}) is declared linear "
                                 "but returned no upper offset; declare it non-linear (DualRule.linear)")
        if rule.trust_source is not None and not isinstance(rule, ElementwiseRule) and needs_check(rule, primal):
            with naming_node(primal, "first-use check"):
                verify_dual_step(rule, primal, lam, in_bounds, self.config, step)  # a plugin's first step here
        return step


    @staticmethod
    def _split_rounding(primal: Node, step: DualStep, splits, batch: Batch) -> DualStep:
        """The rounding of adding ``beta s`` to ``lam_in`` (one addition per split unit, its
        error times ``|z_j|``), taken off the step's lower offset."""
        if not batch.rounding.enabled:
            return step
        from .rounding import SAFETY, gamma
        lam_in = step.lam_in[0].flatten(2)[..., splits.index]
        m = batch.rounding.magnitude(primal.var_inputs[0]).flatten(1)[:, splits.index]
        slack = SAFETY * gamma(2, batch.rounding.u_c) * batched_dot(lam_in.abs(), m)
        return DualStep(step.lam_in, step.lower - slack, step.upper)


class _DualPass(GraphWalk):
    """One pass of dual steps over ``dual.nodes[first:]`` (a walk whose environment holds
    the dual variables), summing the steps' offsets into ``lower``/``upper``; with
    ``prune``, the first linear relaxation on the only live rows ends the walk with the
    pruned bounds (:meth:`DualRunner._pruned`)."""

    activity = "dual step"
    stop_at: set[str] | None = None  # primal node names that end the walk (DualRunner.run_until)

    def __init__(self, runner: DualRunner, dual: Graph, batch: Batch, lower, upper, m: int, prune,
                 both: bool = False) -> None:
        self.nodes, self.frees, self.deadline = dual.nodes, runner.frees_of(dual), runner.deadline
        self.runner, self.dual, self.batch, self.m, self.prune = runner, dual, batch, m, prune
        self.lower, self.upper, self.both = lower, upper, both

    def before(self, index: int, node: Node, env: dict):
        if self.stop_at is not None and "primal" in node.meta and node.meta["primal"].name in self.stop_at:
            return _Stopped(index, dict(env), self.lower)
        if self.upper is None:
            return None
        runner = self.runner
        if self.prune is not None and runner._can_prune_at(node, env, self.batch):
            return runner._pruned(self.dual, index, env, self.batch, self.lower, self.upper, self.m, self.prune)
        if self.both and _nonlinear(node, runner.config):
            return runner._forked(self.dual, index, env, self.batch, self.lower, self.upper, self.m)
        return None

    def run_node(self, node: Node, env: dict) -> list[torch.Tensor]:
        step = self.runner.run_node(node, env, self.batch)
        self.lower = self.lower + step.lower
        self.upper = None if self.upper is None or step.upper is None else self.upper + step.upper
        return step.lam_in

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lower, upper)`` as ``[B, m]`` tensors (offsets may still be plain numbers)."""
        like = self.batch.input_set.center
        shape = (like.shape[0], self.m)
        lower = torch.as_tensor(self.lower, dtype=like.dtype, device=like.device).expand(shape)
        upper = self.upper
        if upper is not None:
            upper = torch.as_tensor(upper, dtype=like.dtype, device=like.device).expand(shape)
        return lower, upper


class _PatchPass(GraphWalk):
    """A pass on patches (:mod:`dualgraph.patches`): the walk's environment holds the live
    dual variables as local windows while the dual graph is made of convolutions, elementwise
    relaxations, residual sums and fan-out sums of windows of one stride; at anything else
    the rows are made dense and the pass continues as a :class:`_DualPass`."""

    activity = "dual step (patches)"

    def __init__(self, runner: DualRunner, dual: Graph, batch: Batch, lower, upper, prune,
                 both: bool = False) -> None:
        self.nodes, self.frees, self.deadline = dual.nodes, runner.frees_of(dual), runner.deadline
        self.runner, self.dual, self.batch, self.prune = runner, dual, batch, prune
        self.lower, self.upper, self.both = lower, upper, both

    stop_at: set[str] | None = None  # primal node names that end the walk (DualRunner.run_until)

    def before(self, index: int, node: Node, env: dict):
        if self.stop_at is not None and "primal" in node.meta and node.meta["primal"].name in self.stop_at:
            return _Stopped(index, dict(env), self.lower)
        if node.op == INPUT_SET and node.inputs[0] in env:
            center, radius = patches.input_terms(env[node.inputs[0]], self.batch.input_set)
            radius = radius + self._slack(node, env)
            upper = None if self.upper is None else self.upper + (center + radius)
            return self.lower + (center - radius), upper
        if not self._on_patches(node, env):
            return self.densify(index, env)
        if self.upper is None or node.op == FAN_OUT_SUM:
            return None
        runner = self.runner
        if self.prune is not None and runner._can_prune_at(node, env, self.batch):
            return runner._pruned_patches(self.dual, index, env, self.batch, self.lower, self.upper, self.prune)
        if self.both and _nonlinear(node, runner.config):
            return runner._forked_patches(self.dual, index, env, self.batch, self.lower, self.upper)
        return None

    def _on_patches(self, node: Node, env: dict) -> bool:
        """Whether dual node ``node`` runs on patches (see the class docstring)."""
        if any(v is None or v not in env for v in node.inputs):
            return False
        if any(patches.covers_value(p, v.meta["primal_value"].unit_shape) for v, p in env.items()):
            return False
        if node.op == FAN_OUT_SUM:
            return len({env[v].stride for v in node.inputs}) == 1
        primal = node.meta.get("primal")
        if primal is None:
            return False
        if patches.conv_geometry(primal) is not None or patches.sum_signs(primal) is not None:
            return True
        return ((isinstance(node.meta["rule"], ElementwiseRule) or patches.pool_geometry(primal) is not None)
                and primal.var_inputs[0] in self.batch.bounds)

    def run_node(self, node: Node, env: dict) -> list:
        slack = self._slack(node, env)
        if node.op == FAN_OUT_SUM:
            outs, lo, up = [patches.aligned_sum([env[v] for v in node.inputs])], 0.0, 0.0
        else:
            p, primal = env[node.inputs[0]], node.meta["primal"]
            if patches.sum_signs(primal) is not None:
                outs, lo, up = patches.through_sum(p, primal), 0.0, 0.0
            elif patches.conv_geometry(primal) is not None:
                p, lo = patches.through_conv(p, primal, self.runner.patch_cache)
                outs, up = [p], lo
            elif patches.pool_geometry(primal) is not None:
                p, lo = patches.through_max_pool(p, primal, self.batch.bounds[primal.var_inputs[0]])
                outs, up = [p], None
            else:
                w, rule = self.batch.bounds[primal.var_inputs[0]], node.meta["rule"]
                variables = None if self.runner.variables is None else self.runner.variables.get(primal.name)
                if variables is not None:  # optimised slopes on the rows' windows (dualgraph.alpha)
                    p, lo = patches.through_elementwise_with_slopes(p, primal, rule, w, self.runner.config,
                                                                    variables[0], variables[2])
                    up = None
                else:
                    p, lo, up = patches.through_elementwise(p, primal, rule, w, self.runner.config)
                outs = [p]
        # the step's offset with its allowance first, then one addition to the running sum (as dense rows do)
        self.lower = self.lower + (lo - slack)
        self.upper = None if self.upper is None or up is None else self.upper + (up + slack)
        return outs

    def _slack(self, node: Node, env: dict):
        """The step's rounding allowance on the rows (``Batch.per_row``, see :meth:`DualRunner.run_node`)."""
        rounding = self.batch.rounding
        if not (self.batch.per_row and rounding.enabled):
            return 0.0
        total = rounding.step_constant(node)
        for v, w in zip(node.inputs, rounding.step_weights(node, len(node.inputs))):
            if w is not None:
                total = total + patches.abs_dot(env[v], w.to(env[v].data.dtype))
        return total

    def densify(self, index: int, env: dict):
        """Continue densely from node ``index`` on the rows of the live patches, in chunks of
        rows that fit the memory budget (:meth:`DualRunner.rows_per_chunk`): by blocks of
        target channels, or of selected units after :func:`patches.select`."""
        runner = self.runner
        per_chunk = runner.rows_per_chunk(self.dual, self.batch.input_set.center, 2 if self.both else 1)
        per_chunk = max(1, per_chunk // len(env))
        p = next(iter(env.values()))
        if p.rows is not None:  # one row block per selected unit: each with its own example's data
            units, block = p.data.shape[0], p.data.shape[2]
            step = max(1, per_chunk // block)
            parts = [self._dense_part(index, {v: q.take_rows(slice(u, u + step)) for v, q in env.items()},
                                      _row_slice(self.lower, slice(u, u + step), None),
                                      _row_slice(self.upper, slice(u, u + step), None))
                     for u in range(0, units, step)]
            return tuple(None if side[0] is None else torch.cat(side, 0) for side in zip(*parts))
        channels, positions = p.data.shape[2], p.positions
        step = max(1, per_chunk // positions)
        parts = [self._dense_part(index, {v: replace(q, data=q.data[:, :, c:c + step]) for v, q in env.items()},
                                  _row_slice(self.lower, None, slice(c * positions, (c + step) * positions)),
                                  _row_slice(self.upper, None, slice(c * positions, (c + step) * positions)))
                 for c in range(0, channels, step)]
        return tuple(None if side[0] is None else torch.cat(side, 1) for side in zip(*parts))

    def _dense_part(self, index: int, env: dict, lower, upper):
        rows = {v: p.to_dense(tuple(v.meta["primal_value"].unit_shape)) for v, p in env.items()}
        batch, p = self.batch, next(iter(env.values()))
        if p.rows is not None:
            batch = batch.take(p.rows[0], needed_bounds(self.dual, index))
        m = next(iter(rows.values())).shape[1]
        return self.runner._run_from(self.dual, index, rows, batch, lower, upper, m, self.prune, self.both)


@dataclass
class _Stopped:
    """Where :meth:`DualRunner.run_until` stopped."""

    index: int
    env: dict
    lower: object


MAX_OPEN_SHARE = 0.5
"""Above this share of open rows, all rows run to the end: taking each open row's example
data along would cost more than the rows saved."""


def _refine(lower: torch.Tensor, upper: torch.Tensor, breakpoints: tuple[float, ...], exact, every_row):
    """Cheaper bounds ``[B, m]`` with the rows that straddle a breakpoint replaced by
    ``exact(examples, rows)`` (bounds ``[R, 1]`` of those rows, run to the end), or, when
    most rows are open, ``every_row()`` (exact bounds ``[B, m]`` of all rows)."""
    open_rows = torch.zeros_like(lower, dtype=torch.bool)
    for point in breakpoints:
        open_rows |= (lower < point) & (upper > point)
    examples, rows = open_rows.nonzero(as_tuple=True)
    if examples.numel() == 0:
        return lower, upper
    if examples.numel() > MAX_OPEN_SHARE * open_rows.numel():
        return every_row()
    lo, up = exact(examples, rows)
    return lower.index_put((examples, rows), lo[:, 0]), upper.index_put((examples, rows), up[:, 0])


def _box_radius(batch: Batch, v: Value, w: Bounds) -> torch.Tensor:
    """Half-widths ``(u - l)/2`` of ``v``'s box, plus the rounding of the box's dot products."""
    radius = (w.upper - w.lower) / 2
    g = batch.rounding.box_gamma(v)
    return radius + g * batch.rounding.magnitude(v) + batch.rounding.box_absolute() if g else radius


def needed_bounds(dual: Graph, first: int) -> set[Value]:
    """The primal values whose bounds the dual nodes from ``first`` on read."""
    return {v for node in dual.nodes[first:] if node.meta.get("rule") is not None
            and node.meta["rule"].bounds_needed(node.meta["primal"]) for v in node.meta["primal"].var_inputs}


def _pick(offset, examples: torch.Tensor, rows: torch.Tensor):
    """Offsets (``[b, m]`` or a number) of the selected rows, ``[R, 1]``."""
    if not torch.is_tensor(offset):
        return offset
    if offset.dim() < 2:
        return offset
    return offset[examples if offset.shape[0] > 1 else 0, rows].unsqueeze(1)


def _row_slice(offset, examples: slice | None, columns: slice | None):
    """Part of an offset (a number, or ``[b, m]`` with ``b`` 1 or per example/unit)."""
    if not torch.is_tensor(offset) or offset.dim() < 2:
        return offset
    if examples is not None and offset.shape[0] > 1:
        offset = offset[examples]
    return offset if columns is None else offset[:, columns]


def _nonlinear(node: Node, config) -> bool:
    """Whether dual node ``node`` is a layer that depends on the sign of its ``lam``."""
    rule = node.meta.get("rule")
    return rule is not None and not rule.linear(node.meta["primal"], config)


def _as_rows(offset, m: int, like: torch.Tensor) -> torch.Tensor:
    """An offset (a number or ``[b, m]``) as a ``[b, m]`` tensor like ``like``."""
    if torch.is_tensor(offset) and offset.dim() == 2:
        return offset.expand(offset.shape[0], m)
    return torch.as_tensor(offset, dtype=like.dtype, device=like.device).expand(1, m)


def _fill_unused(lams: list, primal: Node) -> list[torch.Tensor]:
    """Multi-output ops (Split) get one lam per output; outputs the target does not use get zeros."""
    ref = next(t for t in lams if t is not None)
    return [t if t is not None else ref.new_zeros((*ref.shape[:2], *v.unit_shape))
            for t, v in zip(lams, primal.outputs)]
