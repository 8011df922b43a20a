"""Which direction intermediate bounds run in: backward (one dual pass from each layer's
units) or forward (the paper's Appendix F: columns of the input and of every activation's
gap units pushed forward). Both give the same bounds in exact arithmetic (the rounding
allowance of the forward direction is looser, see :mod:`dualgraph.rounding`); the choice is
a cost model (multiply counts of the two, backward rows on convolution windows where they
run on patches) and a memory check (the forward columns are not chunked).
"""

from __future__ import annotations

import functools
import math

from .dual_registry import ElementwiseRule, dual_rule
from .errors import DualgraphError
from .forward import forward_supported
from .ir import Graph, Node, Value
from .patches import conv_geometry, starts_on_patches, sum_signs


class DirectionCost:
    """The direction cost model of one graph and its bound targets (computed once)."""

    def __init__(self, graph: Graph, bound_targets: list[Value], config) -> None:
        self.graph, self.bound_targets, self.config = graph, bound_targets, config

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
        fwd, bwd = self.operation_counts
        return fwd < bwd

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
                                     "relaxation, no MaxPool); use direction 'backward' or 'auto'")
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
        (:meth:`_window_shares`).
        Forward: the input's columns plus (about half of) each activation's units are
        columns pushed through every node once.
        """
        ops = self.bounded_nodes
        size = {n: _macs(n) for n in ops}
        bwd = sum(t.numel * sum(size[n] * share for n, share in self._window_shares(t).items())
                  for t in self.bound_targets)
        columns = self.forward_columns
        fwd = sum(columns[n.outputs[0]] * size[n] for n in ops)
        return fwd, bwd

    def _window_shares(self, target: Value) -> dict[Node, float]:
        """Per ancestor node of ``target``: the share of its outputs one backward row touches.

        A row of a feature map starts as one pixel (:mod:`dualgraph.patches`); going back
        through a convolution of kernel ``k`` and stride ``s`` its window grows from ``K`` to
        ``(K - 1) s + k`` (and the window's stride by ``s``); elementwise ops and sums keep it,
        fan-outs take the widest. The share is ``K^2 / (H W)`` of the node's output, 1 once
        a window covers its map or anything else (dense rows) has been reached."""
        window: dict[Value, tuple[float, float]] = {}  # value -> (window side, stride)
        if self.config.patches and starts_on_patches(target):
            window[target] = (1.0, 1.0)
        shares = {}
        for node in reversed(self.graph.ancestors(target)):
            out = node.outputs[0]
            side, step = window.get(out, (math.inf, 1.0))
            area = out.unit_shape[1] * out.unit_shape[2] if len(out.unit_shape) == 3 else 0
            shares[node] = min(1.0, side * side / area) if area else 1.0
            geometry = conv_geometry(node)
            if len(node.outputs) != 1 or side * side >= area:
                side = math.inf
            elif geometry is not None:
                side, step = (side - 1) * geometry[0] + node.inputs[1].const.shape[-1], step * geometry[0]
            elif sum_signs(node) is None and not isinstance(dual_rule(node), ElementwiseRule):
                side = math.inf
            for v in node.var_inputs:
                old = window.get(v)
                if old is not None and old[1] != step:  # windows of two strides do not add up on patches
                    side = math.inf
                window[v] = (side, step) if old is None else (max(old[0], side), step)
        return shares


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
