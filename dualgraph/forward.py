"""Intermediate bounds in the forward direction (the paper's Appendix F / Algorithm 1).

When every dual layer is linear (:meth:`DualRule.linear`), the dual network for all units of a
value ``v`` at once is a linear map, and its transpose can be run *forward* along the
primal DAG. Each linear relaxation ``a z + b_lo <= f(z) <= a z + b_up`` is split into
its linear part ``a z + mid`` (``mid = (b_lo + b_up)/2``) and a half-gap
``gap = (b_up - b_lo)/2 >= 0``, so for every unit ``j`` of ``v``

    bounds = center_j -/+ ( rho(F_x[:, j]) + sum_acts sum_k |F_act[k, j]| )

where ``center`` is the linearised network (ReLU -> ``a z + mid``) run on the input
set's centre, ``F_x`` holds the columns obtained by pushing the input set's directions
(the identity, one column per input dimension) forward, and ``F_act`` the columns pushed
from each activation's gap units (identity scaled by ``gap``; only units with a gap).
This is Theorem 1 with ``c = +-e_j`` for every ``j`` at once; for the paper's ReLU
``mid = gap = -d l / 2`` on the crossing set, which recovers ``sum l [nu]_+``.

Columns of different sources are kept apart and pushed through each primal node with
its linear map (skip connections: contributions are added where the primal DAG adds).
A :class:`ColumnScheme` decides which columns to push and how to reduce them to the
``rho`` / ``sum |.|`` terms: :class:`ExactColumns` (identity; exact) here, random
projections elsewhere.
"""

from __future__ import annotations

import torch

from .deadline import NEVER, Deadline
from .dual_registry import AffineRule, Bounds, dual_rule, runs_forward
from .errors import DualgraphError
from .input_sets import InputSet
from .interpreter import GraphWalk, node_args
from .ir import Graph, Node, Value


class ColumnScheme:
    """Which columns are pushed forward and how the pushed columns become bound terms."""

    def input_columns(self, input_set: InputSet, unit_shape: tuple[int, ...]) -> torch.Tensor:
        """Columns ``[b, k, *input_shape]`` for the input term."""
        raise NotImplementedError

    def input_term(self, input_set: InputSet, cols: torch.Tensor) -> torch.Tensor:
        """``rho`` of each unit's row from pushed columns ``[b, k, n_v]`` -> ``[B, n_v]``."""
        raise NotImplementedError

    def gap_columns(self, gap: torch.Tensor) -> torch.Tensor | None:
        """Columns ``[B, k, *unit]`` for an activation with half-gaps ``gap`` ``[B, *unit]``."""
        raise NotImplementedError

    def gap_term(self, cols: torch.Tensor) -> torch.Tensor:
        """``sum_k |F[k, j]|`` (or its estimate) from pushed columns ``[b, k, n_v]`` -> ``[b, n_v]``."""
        raise NotImplementedError

    def source_key(self, node_name: str) -> object:
        """Key under which an activation's gap columns are kept. Columns under one key are
        added together (a random projection may merge sources); ``"input"`` merges them
        into the input columns (reduced with :meth:`input_term`)."""
        return node_name


class ExactColumns(ColumnScheme):
    """One column per input dimension and per gap unit: the exact bound (quadratic cost)."""

    def input_columns(self, input_set, unit_shape):
        n = input_set.center[0].numel()
        like = input_set.center
        return torch.eye(n, dtype=like.dtype, device=like.device).view(1, n, *unit_shape)

    def input_term(self, input_set, cols):
        # cols[:, i, j] is the coefficient of input i in unit j: rows of unit j are cols^T
        rows = cols.transpose(1, 2)
        return input_set.support(rows.reshape(rows.shape[0], rows.shape[1], *input_set.center.shape[1:]))

    def gap_columns(self, gap):
        flat = gap.flatten(1)
        units = torch.nonzero(flat.ne(0).any(0)).flatten()  # union over the batch, like one tensor
        if units.numel() == 0:
            return None
        cols = flat.new_zeros(flat.shape[0], units.numel(), flat.shape[1])
        cols[:, torch.arange(units.numel(), device=flat.device), units] = flat[:, units]
        return cols.view(flat.shape[0], units.numel(), *gap.shape[1:])

    def gap_term(self, cols):
        return cols.abs().sum(1)


def forward_supported(graph: Graph, nodes: list[Node], config) -> bool:
    """Forward mode needs linear dual layers that know how to run forward."""
    return all(runs_forward(n, config) for n in nodes)


class ForwardBounds(GraphWalk):
    """Runs the transposed dual network forward once, giving bounds of every target: a
    walk whose environment holds, per value, the linearised network's centre and the
    pushed columns of each source."""

    activity = "forward dual layer"

    def __init__(self, graph: Graph, config, scheme: ColumnScheme | None = None, deadline: Deadline = NEVER) -> None:
        super().__init__([], deadline=deadline)
        self.graph, self.config = graph, config
        self.scheme = scheme or ExactColumns()

    def bounds(self, targets: list[Value], input_set: InputSet,
               bounds: dict[Value, Bounds] | None = None, widen=None, image=None) -> dict[Value, Bounds]:
        """Bounds of ``targets`` (in topological order); fills and returns ``bounds``.

        ``widen(v, bounds) -> bounds`` (the rounding allowance) is applied to each target's
        bounds as soon as they are formed, before any later relaxation uses them.
        ``image(v, bounds) -> bounds or None``: a target's bounds from those of its producer's
        inputs (:meth:`dualgraph.scheduler.BoundScheduler.image_bounds`), taken instead of the
        pushed columns' where given (a ReLU before a max pool: as the backward direction does)."""
        self._widen = widen or (lambda v, b: b)
        self._image = image or (lambda v, b: None)
        self.out = bounds = {} if bounds is None else bounds
        if not targets:
            return bounds
        keep = set()
        for t in targets:
            keep.update(self.graph.ancestors(t))
        self.use_nodes([n for n in self.graph.nodes if n in keep])
        self.wanted, self.input_set = set(targets), input_set
        x = self.graph.inputs[0]
        env = {x: (input_set.center, {"input": self.scheme.input_columns(input_set, tuple(x.unit_shape))})}
        if x in self.wanted:
            bounds[x] = self._finish(x, *env[x])
        self.walk(env)
        return bounds

    def store(self, node: Node, outs: list, env: dict) -> None:
        for v, out in zip(node.outputs, outs):
            env[v] = out
            if v in self.wanted:
                image = self._image(v, self.out)
                self.out[v] = image if image is not None else self._finish(v, *out)

    def _finish(self, v: Value, c: torch.Tensor, srcs: dict) -> Bounds:
        n = v.numel
        radius = torch.zeros_like(c).flatten(1)
        for key, f in srcs.items():
            f = f.reshape(f.shape[0], f.shape[1], n)
            radius = radius + (self.scheme.input_term(self.input_set, f) if key == "input"
                               else self.scheme.gap_term(f))
        radius = radius.view_as(c)
        return self._widen(v, Bounds(c - radius, c + radius))

    def run_node(self, node: Node, env: dict) -> list[tuple[torch.Tensor, dict]]:
        """``(centre, columns by source)`` of each output of ``node``."""
        rule = dual_rule(node)
        ins = node.var_inputs
        if isinstance(rule, AffineRule):
            centers = _eval(node, node_args(node, {v: env[v][0] for v in ins}, env[ins[0]][0]))
            sources = list(dict.fromkeys(k for v in ins for k in env[v][1]))  # fixed order: float sums repeat
            out_cols: list[dict] = [{} for _ in node.outputs]
            for key in sources:
                parts = [env[v][1].get(key) for v in ins]
                b = max(p.shape[0] for p in parts if p is not None)
                k = next(p.shape[1] for p in parts if p is not None)
                rows = [None if p is None else p.expand(b, *p.shape[1:]).reshape(b * k, *p.shape[2:]) for p in parts]
                for i, o in enumerate(rule.apply_linear(node, rows)):
                    out_cols[i][key] = o.reshape(b, k, *o.shape[1:])
            return list(zip(centers, out_cols))
        if not runs_forward(node, self.config):
            raise DualgraphError(f"node '{node.name}' ({node.op_type}) has no linear dual layer; "
                                 "the forward direction cannot be used (use direction='backward')")
        z = ins[0]
        center_z, cols_z = env[z]
        r = rule.relaxation(node, self.out[z], self.config)
        mid = (_as_tensor(r.b_lo, center_z) + _as_tensor(r.b_up, center_z)) / 2
        gap = (_as_tensor(r.b_up, center_z) - _as_tensor(r.b_lo, center_z)) / 2
        a = r.a_lo.unsqueeze(1)
        new = self.scheme.gap_columns(gap)
        key = None if new is None else self.scheme.source_key(node.name)
        # a * f for every source; the new gap columns join their source's in the same pass
        cols = {k: torch.addcmul(new, a, f) if k == key else a * f for k, f in cols_z.items()}
        if key is not None and key not in cols:
            cols[key] = new
        return [(r.a_lo * center_z + mid, cols)]


def _as_tensor(b, like: torch.Tensor) -> torch.Tensor:
    return b if torch.is_tensor(b) else torch.full_like(like, float(b))


def _eval(node: Node, args: list) -> list[torch.Tensor]:
    from .dual_registry import eval_node
    return eval_node(node, args)
