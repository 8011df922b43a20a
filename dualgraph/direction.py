"""Which direction intermediate bounds run in: backward (one dual pass from each layer's
units) or forward (the paper's Appendix F: columns of the input and of every activation's
gap units pushed forward). Both give the same bounds in exact arithmetic (the rounding
allowance of the forward direction is looser, see :mod:`dualgraph.rounding`); the choice is
a cost model (multiply counts of the two, backward rows on convolution windows where they
run on patches), a memory check (the forward columns are not chunked), and, once a forward
run has been measured, its allowance's share of the widths (:data:`FORWARD_LOOSE_SHARE`).
"""

from __future__ import annotations

import functools

from .dual_registry import dual_rule
from .errors import DualgraphError
from .forward import forward_supported
from .ir import Graph, Node, Value
from .patches import window_shares


FORWARD_LOOSE_SHARE = 1 / 3
"""Under ``direction="auto"``, a forward run whose rounding allowance is more than this share of
some target's bound widths (summed over its units: the allowance on each side more than the
width it widens, so the bounds over 3x as wide) is run again backward, and the graph runs
backward from then on. The forward allowance is propagated with absolute weights, which
compound with depth; the backward direction's is per row and negligible. Measured on 50-wide
random MLPs with 5 inputs (8 examples, L-inf eps 0.01 / 0.1): the share is 0.002 / 0.000 at 2
layers, 0.08 / 0.006 at 4, 0.43 / 0.13 at 6, 0.51 / 0.44 at 8, 0.60 / 0.53 at 12, where the
forward margins are 0.4-0.9% (8 layers) and 17-24% (12 layers) below the backward ones, for
about half the backward time."""


class DirectionCost:
    """The direction cost model of one graph and its bound targets (computed once)."""

    def __init__(self, graph: Graph, bound_targets: list[Value], config, by_image: frozenset = frozenset()) -> None:
        self.graph, self.bound_targets, self.config = graph, bound_targets, config
        self.by_image = by_image  # targets the backward direction bounds without passes
        # set when a forward run's rounding allowance took too much of its bounds' widths
        # (:data:`FORWARD_LOOSE_SHARE`): "auto" then runs backward on this graph
        self.forward_too_loose = False

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
        if self.forward_too_loose:
            return False
        fwd, bwd = self.operation_counts
        return fwd < bwd

    def too_loose(self, widths: list[tuple[float, float]]) -> bool:
        """Whether a forward run under ``"auto"`` whose targets' allowances and widths (summed
        over units and examples) are ``widths`` was too loose; remembered."""
        self.forward_too_loose = any(allowance > FORWARD_LOOSE_SHARE * width for allowance, width in widths)
        return self.forward_too_loose

    def forward_peak_bytes(self, batch: int, itemsize: int) -> tuple[float, str]:
        """Estimated peak memory of the forward direction and the node where it is reached:
        the columns pushed through a node times its output units, for its input and output."""
        columns = self.forward_columns
        peak, where = 0.0, ""
        for n in self.bounded_nodes:
            k = columns[n.outputs[0]]
            size = 3.0 * k * sum(o.numel for o in n.outputs) * batch * itemsize
            if size > peak:
                peak, where = size, n.name
        return peak, where

    def _forward_possible(self) -> bool:
        if not self.forward_ok:
            if self.config.direction == "forward":
                raise DualgraphError("direction 'forward' needs linear dual layers everywhere (paper ReLU "
                                     "relaxation, no MaxPool before the last bounded value); use direction 'backward' or 'auto'")
            return False
        return True

    @functools.cached_property
    def forward_ok(self) -> bool:
        return forward_supported(self.graph, self.bounded_nodes, self.config)

    @functools.cached_property
    def bounded_nodes(self) -> list[Node]:
        """The nodes the intermediate bounds involve (ancestors of any bound target; not only
        of the last one: a later target need not depend on an earlier one, e.g. the two
        operands of a Max), in graph order."""
        involved = {n for t in self.bound_targets for n in self.graph.ancestors(t)}
        return [n for n in self.graph.nodes if n in involved]

    @functools.cached_property
    def forward_columns(self) -> dict[Value, float]:
        """Columns the forward direction pushes through each value: the input's, plus (about
        half of) each activation's units."""
        columns = {self.graph.inputs[0]: float(self.graph.inputs[0].numel)}
        for n in self.bounded_nodes:
            k = max((columns.get(v, 0.0) for v in n.var_inputs), default=0.0)
            if dual_rule(n).bounds_needed(n):
                k += n.output.numel / 2
            for o in n.outputs:
                columns[o] = k
        return columns

    @functools.cached_property
    def operation_counts(self) -> tuple[float, float]:
        """Rough multiply counts (per example) of the forward and backward directions.

        A row or column costs about one multiply-accumulate per weight use of each node.
        Backward: every target's units are rows pushed through all of its ancestors, at the
        share of each node's outputs their windows cover while they run on patches
        (:func:`~dualgraph.patches.window_shares`).
        Forward: the input's columns plus (about half of) each activation's units are
        columns pushed through every node once.
        """
        bwd = sum(t.numel * self.row_macs(t) for t in self.bound_targets if t not in self.by_image)
        columns = self.forward_columns
        fwd = sum(columns[n.outputs[0]] * _macs(n) for n in self.bounded_nodes)
        return fwd, bwd

    def row_macs(self, target: Value) -> float:
        """Rough multiply count of one backward row from a unit of ``target`` to the input (one
        sign, no pruning): each ancestor's :func:`_macs` at the share of its outputs the row's
        windows cover while it runs on patches (:func:`~dualgraph.patches.window_shares`)."""
        ancestors = self.graph.ancestors(target)
        shares = window_shares(target, ancestors, self.config.patches)
        return sum(_macs(n) * shares[n.outputs[0]] for n in ancestors)


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
