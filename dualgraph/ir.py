"""The DAG IR: values, nodes and the graph that owns them.

Conventions every frontend, pass and rule relies on:

* Op keys are ``(domain, op_type)`` with ONNX semantics and ONNX attribute names for the
  default domain ``""`` (the torch.fx frontend emits the same ops). Plugins use their own
  domain, e.g. ``("my.package", "Swish")``.
* Every *variable* value (one that depends on a graph input) has the symbolic batch
  dimension :data:`BATCH` first; all axes in attributes count it. Constant values hold a
  tensor in ``const`` and have concrete shapes.
* Nodes keep ``inputs`` in ONNX order; an omitted optional input is ``None``.
* Analysis results go in ``meta`` dicts; bounds and dual variables never live on nodes
  (the scheduler keeps them in its own environment keyed by value).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import torch

from .errors import DualgraphError

BATCH = "N"
"""The symbolic batch dimension of variable values."""

Shape = tuple  # tuple[int | str, ...]; the first entry of a variable value is BATCH

EVALUATED_IN = "evaluated_in"
"""``Graph.meta`` key: the float dtypes the network as evaluated also computes in, besides its
input's (the targets of float ``Cast`` nodes, which the IR drops as identities); a set."""

FOLDED_ROUNDING = "folded_rounding"
"""``Node.meta`` key of a node that a pass made from several evaluated ops (a BatchNormalization
or an input normalisation folded into a Gemm or Conv): a :class:`FoldedRounding`."""


FOLD_GAIN = 2.0 ** 16
"""The most a pass may hide by folding: every factor it folds (and every partial product of a
merged chain) has ``1 / FOLD_GAIN <= |a| <= FOLD_GAIN`` and every shift ``|b| <= FOLD_GAIN``, so
the values the network as evaluated computes between the folded ops are within ``FOLD_GAIN``
times the node's own magnitudes plus one, and their rounding errors are amplified by at most
``FOLD_GAIN`` (:mod:`dualgraph.rounding`: underflow and overflow of a folded node)."""


def fold_gain(factors: torch.Tensor) -> float:
    """How far folding ``factors`` hides the evaluated values' size from the folded node's
    magnitudes, in either direction: ``max(|a|, 1/|a|)`` over the nonzero factors (at least 1)."""
    a = factors.abs()
    a = a[a > 0]
    return max(1.0, float(a.max()), float(1 / a.min())) if a.numel() else 1.0


def within_fold_gain(factors: torch.Tensor | None = None, shifts: torch.Tensor | None = None) -> bool:
    """Whether a pass may fold these constants (:data:`FOLD_GAIN`): nonzero factors within
    ``[1/FOLD_GAIN, FOLD_GAIN]`` in magnitude, shifts at most ``FOLD_GAIN``."""
    if factors is not None:
        a = factors.abs()
        if bool((a > FOLD_GAIN).any()) or bool(((a > 0) & (a < 1 / FOLD_GAIN)).any()):
            return False
    return shifts is None or not bool((shifts.abs() > FOLD_GAIN).any())


@dataclass
class FoldedRounding:
    """How the network as evaluated computes a node that stands for several of its ops: ``ops``
    roundings more than the node's own, on intermediate values whose magnitudes (carried to the
    node's output, per output unit, broadcastable to one example) are at most the node's own
    ``|A| m + |b|`` plus ``magnitude`` (:mod:`dualgraph.rounding`; a fold's cancellations, e.g.
    ``(W x + c - mean) s`` as ``W' x + c'``, make ``|b|`` alone too small)."""

    ops: int
    magnitude: torch.Tensor
    gain: float = 1.0  # the product of the folded factors' gains (fold_gain), at most FOLD_GAIN

    @staticmethod
    def of(node: Node) -> FoldedRounding:
        """``node``'s note, or none (no extra rounding, no extra magnitude)."""
        return node.meta.get(FOLDED_ROUNDING) or FoldedRounding(0, torch.zeros((), dtype=torch.float64))
OpKey = tuple  # (domain, op_type)


@dataclass(slots=True, eq=False)
class Value:
    """A tensor-valued edge: produced by at most one node, consumed by any number.

    ``users`` has **one entry per input slot** that reads the value: a node reading it
    twice (``Add(v, v)``, ``Concat(v, v)``) is listed twice. Every pass and the dual-graph
    builder count uses this way (one dual contribution per slot); :func:`check_graph` checks it.
    """

    name: str
    shape: Shape | None = None
    dtype: torch.dtype = torch.float32
    producer: Node | None = None
    users: list[Node] = field(default_factory=list)
    const: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """Shape of one example (the batch dimension dropped)."""
        if self.shape is None:
            raise DualgraphError(f"value '{self.name}' has no inferred shape; run infer_shapes first")
        return tuple(self.shape[1:]) if not self.is_const else tuple(self.shape)

    @property
    def numel(self) -> int:
        """Number of scalar units per example."""
        n = 1
        for d in self.unit_shape:
            n *= int(d)
        return n

    def __repr__(self) -> str:
        return f"Value({self.name!r}, shape={self.shape})"


@dataclass(slots=True, eq=False)
class Node:
    """One op application: ``outputs = op(inputs; attrs)``."""

    name: str
    op: OpKey
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def op_type(self) -> str:
        return self.op[1]

    @property
    def var_inputs(self) -> list[Value]:
        """The inputs that depend on graph inputs (not constants, not omitted)."""
        return [v for v in self.inputs if v is not None and not v.is_const]

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise DualgraphError(f"node '{self.name}' ({self.op_type}) has {len(self.outputs)} outputs, expected 1")
        return self.outputs[0]

    def const_input(self, index: int) -> torch.Tensor | None:
        """The constant tensor at input ``index`` (None if omitted)."""
        if index >= len(self.inputs) or self.inputs[index] is None:
            return None
        v = self.inputs[index]
        if not v.is_const:
            raise DualgraphError(
                f"node '{self.name}' ({self.op_type}): input {index} ('{v.name}') must be a constant "
                "but depends on the network input; this form of the op is not supported")
        return v.const

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.op_type})"


class Graph:
    """Owns values and nodes; ``nodes`` is kept in a valid topological order."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.values: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._fresh = itertools.count()

    # ---- construction -------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """A value name not yet used in this graph, derived from ``hint``."""
        name = hint
        while name in self.values:
            name = f"{hint}_{next(self._fresh)}"
        return name

    def add_input(self, name: str, unit_shape: Sequence[int], dtype=torch.float32) -> Value:
        v = self._new_value(name, (BATCH, *map(int, unit_shape)), dtype)
        self.inputs.append(v)
        return v

    def add_const(self, name: str, tensor: torch.Tensor) -> Value:
        v = self._new_value(name, tuple(tensor.shape), tensor.dtype)
        v.const = tensor
        return v

    def add_node(self, op: OpKey | str, inputs: Sequence[Value | None], attrs: dict | None = None,
                 *, name: str | None = None, n_outputs: int = 1,
                 output_names: Sequence[str] | None = None) -> Node:
        """Append a node (its inputs must already exist) and create its outputs."""
        op = ("", op) if isinstance(op, str) else tuple(op)
        name = name or self.fresh_name(op[1].lower())
        names = list(output_names) if output_names else [
            name if n_outputs == 1 else f"{name}:{i}" for i in range(n_outputs)]
        outs = [self._new_value(self.fresh_name(n), None, torch.float32) for n in names]
        node = Node(name, op, list(inputs), outs, dict(attrs or {}))
        for v in outs:
            v.producer = node
        for v in inputs:
            if v is not None:
                v.users.append(node)
        self.nodes.append(node)
        return node

    def _new_value(self, name: str, shape, dtype) -> Value:
        if name in self.values:
            raise DualgraphError(f"duplicate value name '{name}' in graph '{self.name}'")
        v = Value(name, shape, dtype)
        self.values[name] = v
        return v

    def copy(self) -> Graph:
        """A structural copy: new values and nodes, so that editing one graph never changes
        the other (constant tensors and attribute values are shared, not cloned)."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        new: dict[int, Value] = {}

        def value(v: Value | None) -> Value | None:
            if v is None:
                return None
            if id(v) not in new:
                w = Value(v.name, v.shape, v.dtype, const=v.const, meta=dict(v.meta))
                new[id(v)] = g.values[v.name] = w
            return new[id(v)]

        g.inputs = [value(v) for v in self.inputs]
        for n in self.nodes:
            m = Node(n.name, n.op, [value(v) for v in n.inputs], [value(v) for v in n.outputs],
                     dict(n.attrs), dict(n.meta))
            for out in m.outputs:
                out.producer = m
            for v in m.inputs:
                if v is not None:
                    v.users.append(m)
            g.nodes.append(m)
        g.outputs = [value(v) for v in self.outputs]
        for v in self.values.values():
            value(v)
        return g

    # ---- editing (used by passes) ---------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every consumer of ``old`` (and the graph outputs) read ``new`` instead."""
        for node in dict.fromkeys(old.users):  # each node once; every slot it reads old in
            for i, v in enumerate(node.inputs):
                if v is old:
                    self.set_input(node, i, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        """Make input slot ``index`` of ``node`` read ``value`` (slots past the end are
        created as omitted inputs); ``users`` keeps one entry per slot."""
        while len(node.inputs) <= index:
            node.inputs.append(None)
        old = node.inputs[index]
        if old is not None:
            old.users.remove(node)
        node.inputs[index] = value
        if value is not None:
            value.users.append(node)

    def rename(self, value: Value, name: str) -> None:
        """Give ``value`` the name ``name`` (which no other value of the graph may have)."""
        if value.name == name:
            return
        if name in self.values:
            raise DualgraphError(f"cannot rename '{value.name}' to '{name}': the name is taken")
        self.values.pop(value.name)
        value.name = name
        self.values[name] = value

    def move_node(self, node: Node, *, before: Node | None = None, after: Node | None = None) -> None:
        """Move ``node`` in the node list to just before ``before`` or just after ``after``
        (the caller keeps the order topological; :func:`check_graph` checks it)."""
        if (before is None) == (after is None):
            raise DualgraphError("move_node needs exactly one of before= and after=")
        self.nodes.remove(node)
        anchor = before if before is not None else after
        self.nodes.insert(self.nodes.index(anchor) + (after is not None), node)

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for out in node.outputs:
            if out.users or out in self.outputs:
                raise DualgraphError(f"cannot remove node '{node.name}': output '{out.name}' is still used")
            self.values.pop(out.name, None)
        for v in node.inputs:
            if v is not None and node in v.users:
                v.users.remove(node)
        self.nodes.remove(node)

    def prune_values(self) -> None:
        """Drop constants and values that nothing references any more."""
        live = {id(v) for v in self.inputs + self.outputs}
        for n in self.nodes:
            live.update(id(v) for v in n.inputs if v is not None)
            live.update(id(v) for v in n.outputs)
        self.values = {k: v for k, v in self.values.items() if id(v) in live}

    # ---- structure ------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """Node-level DAG: an edge ``a -> b`` when ``b`` consumes an output of ``a``."""
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for node in self.nodes:
            for v in node.inputs:
                if v is not None and v.producer is not None:
                    g.add_edge(v.producer, node)
        return g

    def toposort(self) -> None:
        """Re-order ``nodes`` topologically (stable: ties keep their current order)."""
        order = {n: i for i, n in enumerate(self.nodes)}
        g = self.to_networkx()
        try:
            self.nodes = list(nx.lexicographical_topological_sort(g, key=order.__getitem__))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(g)
            raise DualgraphError(f"graph '{self.name}' has a cycle through node '{cycle[0][0].name}'; "
                                 "only acyclic networks can be analysed") from None

    def ancestors(self, value: Value) -> list[Node]:
        """Nodes that ``value`` depends on, in topological order (including its producer)."""
        if value.producer is None:
            return []
        g = self.to_networkx()
        keep = nx.ancestors(g, value.producer) | {value.producer}
        return [n for n in self.nodes if n in keep]

    def last_uses(self) -> dict[Node, list[Value]]:
        """For each node, the values whose last consumer it is (so they can be freed)."""
        return last_uses(self.nodes, keep=self.outputs)

    def num_parameters(self) -> int:
        seen = {id(v): v for n in self.nodes for v in n.inputs if v is not None and v.is_const}
        return sum(v.const.numel() for v in seen.values())

    def __str__(self) -> str:
        from .printer import format_text  # local import: printer depends on this module
        return format_text(self)


def last_uses(nodes: Sequence[Node], keep: Sequence[Value] = ()) -> dict[Node, list[Value]]:
    """For each of ``nodes`` (in order), the variable values whose last consumer among them
    it is, except those in ``keep``: what a walk over ``nodes`` can free after each node."""
    last: dict[int, Node] = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and not v.is_const:
                last[id(v)] = node
    kept = {id(v) for v in keep}
    freed: dict[Node, list[Value]] = {n: [] for n in nodes}
    for node in nodes:
        for v in node.inputs:
            if v is None or v.is_const or last[id(v)] is not node or id(v) in kept:
                continue
            if v not in freed[node]:
                freed[node].append(v)
    return freed


def normalize_axis(axis: int, rank: int, where: str, *, inclusive: bool = False) -> int:
    """An ONNX ``axis`` in ``[-rank, rank)`` (``[-rank, rank]`` with ``inclusive``, as
    Flatten's) as a non-negative index; out of range is an error naming ``where`` (e.g.
    ``"node 'f' (Flatten)"``)."""
    top = rank + 1 if inclusive else rank
    if not -rank <= axis < top:
        raise DualgraphError(f"{where}: axis {axis} is out of range for a tensor of rank {rank}")
    return axis + rank if axis < 0 else axis


def check_graph(graph: Graph) -> None:
    """Check that ``graph`` is a well-formed DAG with consistent links and shapes.

    Raises DualgraphError naming the first problem: a value used before it is produced,
    broken producer/user links, a variable value without the batch dimension, a cycle,
    or an output that nothing produces.
    """
    produced = {id(v) for v in graph.inputs}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if graph.values.get(v.name) is not v:
                raise DualgraphError(f"node '{node.name}': input {i} '{v.name}' is not owned by the graph")
            if not v.is_const and id(v) not in produced:
                raise DualgraphError(f"node '{node.name}': input '{v.name}' is used before it is produced")
            if v.users.count(node) != sum(1 for w in node.inputs if w is v):
                raise DualgraphError(f"value '{v.name}' lists its user '{node.name}' {v.users.count(node)} "
                                     f"times, but the node reads it in {sum(1 for w in node.inputs if w is v)} "
                                     "input slots (users has one entry per slot)")
        for v in node.outputs:
            if v.producer is not node:
                raise DualgraphError(f"value '{v.name}' does not name '{node.name}' as its producer")
            if id(v) in produced:
                raise DualgraphError(f"value '{v.name}' is produced twice")
            produced.add(id(v))
            if v.shape is not None and (not v.shape or v.shape[0] != BATCH):
                raise DualgraphError(f"value '{v.name}' of node '{node.name}' has shape {v.shape} "
                                     "without the leading batch dimension")
    for v in graph.outputs:
        if id(v) not in produced:
            raise DualgraphError(f"graph output '{v.name}' is not produced by any node")
    for v in graph.inputs:
        if v.shape is None or v.shape[0] != BATCH:
            raise DualgraphError(f"graph input '{v.name}' must have the batch dimension first")
    if not nx.is_directed_acyclic_graph(graph.to_networkx()):
        raise DualgraphError(f"graph '{graph.name}' has a cycle")

