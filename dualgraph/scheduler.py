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
same as without pruning.

Floating point: every bound is sound for the network in exact arithmetic and as evaluated
in its own precision (:mod:`dualgraph.rounding`): intermediate bounds are widened by their
rounding allowance before they are used, and the final pass adds each dual step's own
allowance to its offsets (``Batch.per_row``). Budgets: :attr:`BoundScheduler.deadline` is
checked before every dual step, chunk and forward node; ``BoundConfig.max_memory`` sizes
the chunks and rules out a forward direction that would not fit.

The scheduler is an interpreter over the dual graph: an environment keyed by dual value,
one :meth:`run_node` per dual node, values freed as soon as they are consumed, errors
that name the primal node. Bounds are differentiable in the graph's constants.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from . import patches
from .deadline import NEVER, Deadline
from .dual_graph import build_dual
from .dual_registry import Bounds, DualStep, ElementwiseRule, dual_rule, naming_node
from .errors import DualgraphError
from .forward import ForwardBounds, forward_supported
from .input_sets import InputSet
from .ir import Graph, Node, Value
from .linalg import batched_dot, take_examples
from .projections import ESTIMATORS
from .rounding import RoundingAllowance, full_precision_matmul

@dataclass(frozen=True)
class BoundConfig:
    """How bounds are computed.

    relu_relaxation: ``"paper"`` (Corollary 2: lower slope = upper slope ``u/(u-l)``) or
        ``"crown"`` (lower slope 1 if ``u > -l`` else 0; tighter, not a linear dual layer).
    max_elements: memory budget for one chunk of dual variables, in tensor elements;
        the identity rows of a layer are split into chunks that fit.
    max_memory: a memory budget in bytes (None: only ``max_elements``). Chunks of rows are
        sized to fit it, and the forward direction (whose identity columns are not chunked)
        is not chosen when its estimated peak exceeds it (``direction="forward"`` is then an
        error naming the node and the size).
    direction: how intermediate bounds are computed: ``"backward"`` (one dual pass from
        each layer's units), ``"forward"`` (Appendix F: identity columns of the input and
        of every activation's crossing units pushed forward; needs linear dual layers) or
        ``"auto"`` (the cheaper by an operation count; the bounds are the same).
    patches: run backward passes from a convolution's units on local windows
        (:mod:`dualgraph.patches`); same numbers, far less work. Off only for testing.
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
        if self.relu_relaxation not in ("paper", "crown"):
            raise DualgraphError(f"unknown relu relaxation '{self.relu_relaxation}'; use paper or crown")
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


@dataclass
class Batch:
    """What every dual pass over one batch of examples reads: its input set, the bounds
    computed so far and their rounding allowance (:meth:`take` selects some examples)."""

    input_set: InputSet
    bounds: dict[Value, Bounds]
    rounding: RoundingAllowance
    per_row: bool = False  # add each dual step's rounding allowance to the rows' offsets

    def take(self, examples: torch.Tensor, values) -> Batch:
        """The given examples (an index tensor into the batch), with the bounds of ``values``."""
        return Batch(self.input_set.take(examples),
                     {v: self.bounds[v].take(examples) for v in values if v in self.bounds},
                     self.rounding.take(examples), self.per_row)


class BoundMap(dict):
    """Bounds of one batch keyed by value (what :meth:`BoundScheduler.intermediate_bounds`
    returns), remembering the :class:`Batch` they were computed in so that ``J`` reuses its
    rounding analysis."""

    batch: Batch | None = None


class BoundScheduler:
    """Computes intermediate bounds and ``J(C)`` for one graph (dual graphs are built once)."""

    def __init__(self, graph: Graph, config: BoundConfig = BoundConfig()) -> None:
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise DualgraphError(f"bounds need a model with one input and one output; '{graph.name}' has "
                                 f"{len(graph.inputs)} and {len(graph.outputs)}")
        self.graph, self.config = graph, config
        self.output = graph.outputs[0]
        self._duals: dict[Value, Graph] = {}
        self._patch_cache: dict = {}  # window-to-window transpose matrices of Convs
        self._proj_state = None  # random-projection generators (dualgraph.projections), on first use
        self.deadline: Deadline = NEVER  # checked before every dual step, chunk and forward node
        self.dual(self.output)  # fails early, listing every op without a dual layer
        needed: list[Value] = []
        for node in graph.ancestors(self.output):
            if dual_rule(node).needs_bounds:
                needed += [v for v in node.var_inputs if v not in needed]
        self.bound_targets = needed

    def dual(self, target: Value) -> Graph:
        if target not in self._duals:
            self._duals[target] = build_dual(self.graph, target)
        return self._duals[target]

    # ---- public API ---------------------------------------------------------------------
    def intermediate_bounds(self, input_set: InputSet) -> dict[Value, Bounds]:
        """Bounds of every value that feeds a nonlinear op, in topological order, each sound
        in floating point (:mod:`dualgraph.rounding`) before anything uses it."""
        bounds = BoundMap()
        batch = bounds.batch = self.batch(input_set, bounds)
        with full_precision_matmul(input_set.center.device):
            if self.bound_targets and self.config.proj is not None:
                return self._projections().bounds(self.graph, self.bound_targets, input_set, batch.bounds,
                                                  batch.rounding.widen_forward)
            center = input_set.center
            if self.bound_targets and self.forward_for(center.shape[0], center.element_size()):
                with _out_of_memory_as_error("the forward direction"):
                    return ForwardBounds(self.graph, self.config, deadline=self.deadline).bounds(
                        self.bound_targets, input_set, batch.bounds, batch.rounding.widen_forward)
            for v in self.bound_targets:
                with _out_of_memory_as_error(v.name):
                    batch.bounds[v] = batch.rounding.widen(v, self.value_bounds(v, batch))
        return batch.bounds

    def batch(self, input_set: InputSet, bounds: dict[Value, Bounds]) -> Batch:
        """The state the passes over one batch share (bounds are filled in as computed)."""
        return Batch(input_set, bounds, RoundingAllowance(self.graph, input_set, bounds, self.config))

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

    @property
    def uses_forward(self) -> bool:
        """Whether intermediate bounds run forward (Appendix F) rather than backward (for one example)."""
        return self.forward_for(1, 4)

    def forward_for(self, batch: int, itemsize: int) -> bool:
        """Whether intermediate bounds of ``batch`` examples run forward: linear dual layers,
        cheaper by the operation count, and within ``max_memory``."""
        if self.config.direction == "backward" or not self.bound_targets:
            return False
        if not self._forward_possible():
            return False
        peak, node = self.forward_peak_bytes(batch, itemsize)
        budget = self.config.max_memory
        if budget is not None and peak > budget:
            if self.config.direction == "forward":
                raise DualgraphError(f"the forward direction needs about {peak / 2**20:.0f} MB at node '{node}' "
                                     f"(budget {budget / 2**20:.0f} MB); use direction 'auto' or 'backward', or "
                                     "a larger --max-memory")
            return False
        if self.config.direction == "forward":
            return True
        fwd, bwd = self.operation_counts()
        return fwd < bwd

    def forward_peak_bytes(self, batch: int, itemsize: int) -> tuple[float, str]:
        """Estimated peak memory of the forward direction and the node where it is reached:
        the columns pushed through a node times its output units, for its input and output."""
        columns = self._forward_columns
        peak, where = 0.0, ""
        for n in self._bounded_nodes:
            k = columns[n.outputs[0]]
            size = 3.0 * k * sum(o.numel for o in n.outputs) * batch * itemsize
            if size > peak:
                peak, where = size, n.name
        return peak, where

    def _forward_possible(self) -> bool:
        if not self._forward_ok:
            if self.config.direction == "forward":
                raise DualgraphError("direction 'forward' needs linear dual layers everywhere (paper ReLU "
                                     "relaxation, no MaxPool); use direction 'backward' or 'auto'")
            return False
        return True

    @functools.cached_property
    def _forward_ok(self) -> bool:
        return forward_supported(self.graph, self._bounded_nodes, self.config)

    @functools.cached_property
    def _bounded_nodes(self) -> list[Node]:
        """The nodes the intermediate bounds involve (ancestors of the last bound target)."""
        return self.graph.ancestors(self.bound_targets[-1])

    @functools.cached_property
    def _forward_columns(self) -> dict[Value, float]:
        """Columns the forward direction pushes through each value: the input's, plus (about
        half of) each activation's units."""
        columns = {self.graph.inputs[0]: float(self.graph.inputs[0].numel)}
        for n in self._bounded_nodes:
            k = max((columns.get(v, 0.0) for v in n.var_inputs), default=0.0)
            if dual_rule(n).needs_bounds:
                k += n.output.numel / 2
            for o in n.outputs:
                columns[o] = k
        return columns

    def operation_counts(self) -> tuple[float, float]:
        """Rough multiply counts (per example) of the forward and backward directions
        (computed once per scheduler; see :attr:`_operation_counts`)."""
        return self._operation_counts

    @functools.cached_property
    def _operation_counts(self) -> tuple[float, float]:
        """A row or column costs about one multiply-accumulate per weight use of each node.
        Backward: every target's units are rows pushed through all of its ancestors.
        Forward: the input's columns plus (about half of) each activation's units are
        columns pushed through every node once.
        """
        ops = self._bounded_nodes
        size = {n: _macs(n) for n in ops}
        bwd = sum(t.numel * sum(size[n] for n in self.graph.ancestors(t)) for t in self.bound_targets)
        columns = self._forward_columns
        fwd = sum(columns[n.outputs[0]] * size[n] for n in ops)
        return fwd, bwd

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
        prune = self.stable_pieces(v) if linear else None
        if self.config.patches and v.producer is not None and patches.conv_geometry(v.producer) is not None:
            lo, up = self._patch_bounds(dual, batch, linear, prune)
            return Bounds(lo.reshape(size, *v.unit_shape), up.reshape(size, *v.unit_shape))
        lows, ups = [], []
        for start in range(0, n, chunk):
            self.deadline.check()
            k = min(chunk, n - start)
            rows = torch.zeros(1, k, n, dtype=like.dtype, device=like.device)
            rows[0, torch.arange(k), torch.arange(start, start + k)] = 1.0
            rows = rows.view(1, k, *v.unit_shape)
            if linear:
                lo, up = self.run(dual, rows, batch, prune)
            else:
                lo, _ = self.run(dual, rows, batch)
                up = -self.run(dual, -rows, batch)[0]
            lows.append(lo)
            ups.append(up)
        shape = (size, *v.unit_shape)
        return Bounds(torch.cat(lows, 1).reshape(shape), torch.cat(ups, 1).reshape(shape))

    def stable_pieces(self, v: Value) -> tuple[float, ...] | None:
        """The breakpoints of every activation fed by ``v`` if its stable units may be pruned
        (``prune_stable`` and all of them piecewise linear, see ``DualRule.breakpoints``)."""
        if not self.config.prune_stable:
            return None
        points: set[float] = set()
        for user in v.users:
            rule = dual_rule(user)
            if rule.needs_bounds:
                pieces = rule.breakpoints(user)
                if pieces is None:
                    return None
                points.update(pieces)
        return tuple(sorted(points)) or None

    def bound_output(self, input_set: InputSet, spec: torch.Tensor,
                     bounds: dict[Value, Bounds] | None = None) -> torch.Tensor:
        """Lower bounds ``J`` of ``spec @ f(x')`` over the input set: ``[B, m]``, valid for the
        network in exact arithmetic and as evaluated in its own precision (each dual step's
        rounding allowance is included, :mod:`dualgraph.rounding`).

        ``spec`` is ``[B or 1, m, n_out]``. Intermediate bounds are computed if not given.
        """
        if bounds is None:
            bounds = self.intermediate_bounds(input_set)
        if spec.dim() != 3 or spec.shape[2] != self.output.numel:
            raise DualgraphError(f"specification must have shape [batch, rows, {self.output.numel}], "
                                 f"got {tuple(spec.shape)}")
        rows = spec.to(input_set.center).reshape(spec.shape[0], spec.shape[1], *self.output.unit_shape)
        batch = getattr(bounds, "batch", None)
        if batch is None or batch.input_set is not input_set:
            batch = self.batch(input_set, bounds)
        with full_precision_matmul(input_set.center.device), _out_of_memory_as_error(self.output.name):
            lower, _ = self.run(self.dual(self.output), rows, replace(batch, per_row=True))
        return lower

    # ---- the interpreter over a dual graph ----------------------------------------------
    def run(self, dual: Graph, rows: torch.Tensor, batch: Batch,
            prune: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``dual`` on ``rows`` (``[b, m, *target_shape]``); returns (lower, upper) ``[B, m]``.

        ``upper`` is the bound for ``max rows . z`` and is None unless every layer is linear.
        With ``prune`` (breakpoints), rows whose cheaper bound lies between two breakpoints
        get that bound instead (see the module docstring).
        """
        return self._run_from(dual, 0, {dual.inputs[0]: rows}, batch, 0.0, 0.0, rows.shape[1], prune)

    def _run_from(self, dual: Graph, first: int, env: dict, batch: Batch,
                  lower, upper, m: int, prune=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        for i in range(first, len(dual.nodes)):
            self.deadline.check()
            node = dual.nodes[i]
            if prune is not None and upper is not None and self._can_prune_at(node, env, batch.bounds):
                return self._pruned(dual, i, env, batch, lower, upper, m, prune)
            step = self.run_node(node, env, batch)
            for v, lam in zip(node.outputs, step.lam_in):
                env[v] = lam
            lower = lower + step.lower
            upper = None if upper is None or step.upper is None else upper + step.upper
        like = batch.input_set.center
        shape = (like.shape[0], m)
        lower = torch.as_tensor(lower, dtype=like.dtype, device=like.device).expand(shape)
        if upper is not None:
            upper = torch.as_tensor(upper, dtype=like.dtype, device=like.device).expand(shape)
        return lower, upper

    # ---- pruning stable units ------------------------------------------------------------
    def _can_prune_at(self, node: Node, env: dict, bounds: dict) -> bool:
        """A linear elementwise dual layer whose input has bounds, on the only live rows."""
        rule = node.meta.get("rule")
        return (isinstance(rule, ElementwiseRule) and len(env) == 1 and node.inputs[0] in env
                and rule.linear(node.meta["primal"], self.config)
                and node.meta["primal"].var_inputs[0] in bounds)

    def _pruned(self, dual: Graph, i: int, env: dict, batch: Batch,
                lower, upper, m: int, prune: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run dual node ``i`` (an elementwise relaxation), bound the rest of the network by the
        box of its input's bounds, and run to the end only the rows that box leaves open."""
        node = dual.nodes[i]
        primal, rule = node.meta["primal"], node.meta["rule"]
        (lam,) = env.values()
        env.clear()
        w = batch.bounds[primal.var_inputs[0]]
        r, linear, absolute = rule.linear_terms(primal, lam, w, self.config)
        lower, upper = lower + linear - absolute, upper + linear + absolute
        slope = r.a_lo
        center = batched_dot(lam, slope * (w.lower + w.upper) / 2)
        radius = batched_dot(lam.abs(), slope.abs() * _box_radius(batch, primal.var_inputs[0], w))

        def exact(examples, rows):
            lam_in = lam[examples if lam.shape[0] > 1 else 0, rows] * take_examples(slope, examples)
            return self._run_from(dual, i + 1, {node.outputs[0]: lam_in.unsqueeze(1)},
                                  batch.take(examples, _needed_bounds(dual, i + 1)),
                                  _pick(lower, examples, rows), _pick(upper, examples, rows), 1)

        def every_row():
            env[node.outputs[0]] = lam * slope.unsqueeze(1)
            return self._run_from(dual, i + 1, env, batch, lower, upper, m)

        return _refine(lower + center - radius, upper + center + radius, prune, exact, every_row)

    # ---- the patch path -------------------------------------------------------------------
    def _patch_bounds(self, dual: Graph, batch: Batch, linear: bool, prune=None):
        """Bounds of a Conv output through the patch path (see :mod:`dualgraph.patches`)."""
        if linear:
            return self._run_patches(dual, 1.0, batch, prune)
        lower, _ = self._run_patches(dual, 1.0, batch)
        neg, _ = self._run_patches(dual, -1.0, batch)
        return lower, -neg

    def _run_patches(self, dual: Graph, sign: float, batch: Batch, prune=None):
        first = dual.nodes[0].meta["primal"]
        p, offset = patches.start(first, sign, batch.input_set.center)
        return self._patches_from(dual, 1, p, dual.nodes[0].outputs[0], first.inputs[0], batch,
                                  offset, offset, prune)

    def _patches_from(self, dual: Graph, first: int, p: patches.Patches, current: Value, space: Value,
                      batch: Batch, lower, upper, prune):
        """Continue a pass on patches ``p`` (rows of dual value ``current``, in the unit space
        of primal value ``space``) from dual node ``first``."""
        nodes = dual.nodes
        for i in range(first, len(nodes)):
            self.deadline.check()
            node = nodes[i]
            if node.inputs[0] is not current or len(node.inputs) != 1:
                break  # the dual graph branches here: continue densely
            if node.op_type == "InputSet":
                center, radius = patches.input_terms(p, batch.input_set)
                upper = None if upper is None else upper + center + radius
                return lower + center - radius, upper
            primal, rule = node.meta["primal"], node.meta["rule"]
            if patches.conv_geometry(primal) is not None:
                p, off = patches.through_conv(p, primal, self._patch_cache)
                lower, upper = lower + off, None if upper is None else upper + off
            elif isinstance(rule, ElementwiseRule):
                w = batch.bounds[primal.var_inputs[0]]
                if prune is not None and upper is not None and rule.linear(primal, self.config):
                    return self._pruned_patches(dual, i, p, batch, lower, upper, prune)
                p, lo, up = patches.through_elementwise(p, primal, rule, w, self.config)
                lower = lower + lo
                upper = None if upper is None or up is None else upper + up
            else:
                break
            current, space = node.outputs[0], primal.inputs[0]
        else:
            i = len(nodes)
        rows = p.to_dense(tuple(space.unit_shape))
        if p.rows is not None:  # one row per selected unit: each with its own example's data
            batch = batch.take(p.rows[0], _needed_bounds(dual, i))
        return self._run_from(dual, i, {current: rows}, batch, lower, upper, rows.shape[1], prune)

    def _pruned_patches(self, dual: Graph, i: int, p: patches.Patches, batch: Batch,
                        lower, upper, prune: tuple[float, ...]):
        """:meth:`_pruned` on patches: node ``i`` is a linear elementwise relaxation."""
        node = dual.nodes[i]
        primal, rule = node.meta["primal"], node.meta["rule"]
        w = batch.bounds[primal.var_inputs[0]]
        r = rule.relaxation(primal, w, self.config)
        linear, absolute = patches.relaxation_terms(p, r)
        lower, upper = lower + linear - absolute, upper + linear + absolute
        center, radius = patches.box_terms(p, r.a_lo, w, _box_radius(batch, primal.var_inputs[0], w))

        def exact(examples, rows):
            q = patches.select(p, r.a_lo, examples, rows)
            return self._patches_from(dual, i + 1, q, node.outputs[0], primal.inputs[0], batch,
                                      _pick(lower, examples, rows), _pick(upper, examples, rows), None)

        def every_row():
            q = replace(p, data=p.data * p.windows(r.a_lo))
            return self._patches_from(dual, i + 1, q, node.outputs[0], primal.inputs[0], batch,
                                      lower, upper, None)

        return _refine(lower + center - radius, upper + center + radius, prune, exact, every_row)

    def run_node(self, node: Node, env: dict[Value, torch.Tensor], batch: Batch) -> DualStep:
        """One dual step; on the specification rows (``batch.per_row``) its offsets are
        widened by the step's own rounding allowance."""
        lams = [env.pop(v) if v is not None else None for v in node.inputs]  # consumed: freed
        step = self._dual_step(node, lams, batch)
        if not batch.per_row:
            return step
        slack = batch.rounding.slack(node, lams)
        upper = None if step.upper is None else step.upper + slack
        return DualStep(step.lam_in, step.lower - slack, upper)

    def _dual_step(self, node: Node, lams: list, batch: Batch) -> DualStep:
        kind = node.op_type
        if kind == "Sum":
            total = lams[0]
            for t in lams[1:]:
                total = total + t
            return DualStep([total], 0.0, 0.0)
        if kind == "InputSet":
            lam = lams[0]
            center = batched_dot(lam, batch.input_set.center)
            radius = batch.input_set.support(lam)
            return DualStep([], center - radius, center + radius)
        primal: Node = node.meta["primal"]
        rule = node.meta["rule"]
        lam = lams[0] if len(lams) == 1 else _fill_unused(lams, primal)
        in_bounds = [batch.bounds.get(v) for v in primal.var_inputs] if rule.needs_bounds else []
        if rule.needs_bounds and any(b is None for b in in_bounds):
            raise DualgraphError(f"dual of node '{primal.name}' ({primal.op_type}) needs bounds of its inputs "
                                 "that were not computed")
        with naming_node(primal):
            step = rule.backward(primal, lam, in_bounds, self.config)
        if step.upper is None and rule.linear(primal, self.config):
            raise DualgraphError(f"the dual layer of node '{primal.name}' ({primal.op_type}) is declared linear "
                                 "but returned no upper offset; declare it non-linear (DualRule.linear)")
        return step


def _macs(node: Node) -> float:
    """Multiply-accumulates of one application of ``node``: outputs times weight fan-in."""
    out = float(sum(o.numel for o in node.outputs))
    if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and node.inputs[1].is_const:
        w = node.inputs[1].const
        if node.op_type == "Conv":
            return out * w[0].numel()
        k = w.shape[1] if node.op_type == "Gemm" and node.attrs.get("transB", 0) else w.shape[0]
        return out * float(k)
    return out


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


@contextlib.contextmanager
def _out_of_memory_as_error(where: str) -> Iterator[None]:
    """Running out of memory is a one-line error naming what was being bounded and the size."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in text:
            raise
        size = re.search(r"allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", text)
        raise DualgraphError(f"out of memory while bounding '{where}'"
                             + (f" (asked for {size.group(1)})" if size else "")
                             + "; use a smaller --batch-size or a smaller --max-memory budget") from None


def _box_radius(batch: Batch, v: Value, w: Bounds) -> torch.Tensor:
    """Half-widths ``(u - l)/2`` of ``v``'s box, plus the rounding of the box's dot products."""
    radius = (w.upper - w.lower) / 2
    g = batch.rounding.box_gamma(v)
    return radius + g * batch.rounding.magnitude(v) if g else radius


def _needed_bounds(dual: Graph, first: int) -> set[Value]:
    """The primal values whose bounds the dual nodes from ``first`` on read."""
    return {v for node in dual.nodes[first:] if node.meta.get("rule") is not None
            and node.meta["rule"].needs_bounds for v in node.meta["primal"].var_inputs}


def _pick(offset, examples: torch.Tensor, rows: torch.Tensor):
    """Offsets (``[b, m]`` or a number) of the selected rows, ``[R, 1]``."""
    if not torch.is_tensor(offset):
        return offset
    if offset.dim() < 2:
        return offset
    return offset[examples if offset.shape[0] > 1 else 0, rows].unsqueeze(1)


def _fill_unused(lams: list, primal: Node) -> list[torch.Tensor]:
    """Multi-output ops (Split) get one lam per output; outputs the target does not use get zeros."""
    ref = next(t for t in lams if t is not None)
    return [t if t is not None else ref.new_zeros((*ref.shape[:2], *v.unit_shape))
            for t, v in zip(lams, primal.outputs)]
