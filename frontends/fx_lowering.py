"""Lowering state of the torch.fx frontend (:mod:`dualgraph.frontends.fx`).

A rule is ``rule(lo, call) -> Value``: it gets the :class:`Lowering` environment and the
:class:`~dualgraph.lowering.Call` being lowered and emits IR nodes through ``lo.emit``, or
raises :class:`~dualgraph.lowering.Unsupported` for a form of the op it cannot lower. Rules
belong to op definitions (``OpDefinition.fx_lowering``, :mod:`dualgraph.op_registry`), which
keep the tables by module type, function and Tensor method name; the frontend's own plumbing
(``getattr``, ``size``, indexing) is registered with :func:`lowers` in
:mod:`dualgraph.frontends.fx_plumbing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx

from dualgraph.ir import Graph, Value
from dualgraph.lowering import BATCH_SIZE, FxRule, Unsupported
from dualgraph.op_registry import register_fx_rule

FRONTEND = "the torch.fx frontend"

TRANSPOSE_OF = "transpose_of_parameter"
"""``Value.meta`` key of a constant that is a 2-D parameter transposed (:meth:`Lowering.transposed`,
``nn.Linear`` on inputs of rank 3 or more): the parameter's name, so that training binds the
constant to the live parameter's transpose (:func:`dualgraph.training.bind_parameters`)."""

DERIVED_FROM = "derived_from_parameters"
"""``Value.meta`` key of a constant the frontend computed from parameters or buffers at lowering
time (``self.fc.weight.t()``): the sorted names of those parameters. It keeps their values of
that moment; :func:`dualgraph.training.lower_module` refuses it (training changes them)."""


def lowers(*targets: type | Callable | str) -> Callable[[FxRule], FxRule]:
    """Register a plumbing rule of the frontend itself (not an op) for the given targets."""
    def deco(rule: FxRule) -> FxRule:
        for t in targets:
            register_fx_rule(t, rule, FRONTEND)
        return rule
    return deco


class Poison:
    """Env entry of a node that could not be lowered; its consumers are skipped."""


POISON = Poison()


# ---- the lowering state ---------------------------------------------------------------

@dataclass
class Lowering:
    """Environment of one lowering: fx node -> IR ``Value`` (variable) or Python constant."""

    gm: torch.fx.GraphModule
    graph: Graph
    env: dict[torch.fx.Node, Any] = field(default_factory=dict)
    shapes: dict[Value, tuple[int, ...]] = field(default_factory=dict)  # example shapes
    problems: list[str] = field(default_factory=list)
    unknown_targets: bool = False  # some problem is a target without any rule
    names: dict[int, str] = field(default_factory=dict)  # id(parameter/buffer) -> qualified name
    derived: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = field(default_factory=dict)  # folded from those
    _consts: dict[int, tuple[torch.Tensor, Value]] = field(default_factory=dict)
    _node: torch.fx.Node | None = None

    # -- values --
    def note_folded(self, result: Any, inputs: Sequence[Any], module: torch.nn.Module | None) -> None:
        """Remember which parameters and buffers a folded constant ``result`` was computed from
        (its tensor ``inputs`` and, for a module call, the module's own): :data:`DERIVED_FROM`."""
        sources = {self.names[id(t)] for t in inputs if isinstance(t, torch.Tensor) and id(t) in self.names}
        sources.update(n for t in inputs if isinstance(t, torch.Tensor) and id(t) in self.derived
                       for n in self.derived[id(t)][1])
        if module is not None:
            sources.update(self.names[id(t)] for t in [*module.parameters(), *module.buffers()] if id(t) in self.names)
        if sources:
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    self.derived[id(t)] = (t, tuple(sorted(sources)))  # keeps t alive: its id is not reused

    def const(self, x: torch.Tensor | float | int | bool, hint: str = "const") -> Value:
        """An IR constant for tensor or Python scalar ``x`` (one per distinct tensor)."""
        if not isinstance(x, torch.Tensor):
            x = torch.tensor(float(x), dtype=torch.float32)
        hit = self._consts.get(id(x))
        if hit is not None:
            return hit[1]
        hint = self.names.get(id(x), hint)  # parameters keep their module path, e.g. "fc1.weight"
        v = self.graph.add_const(self.graph.fresh_name(hint), x.detach().clone())
        if id(x) in self.derived:
            v.meta[DERIVED_FROM] = self.derived[id(x)][1]
        self._consts[id(x)] = (x, v)  # keep x alive so its id is not reused
        return v

    def transposed(self, matrix: torch.Tensor) -> Value:
        """An IR constant holding ``matrix.t()``, which remembers where it came from: a parameter
        (:data:`TRANSPOSE_OF`) or constants folded from parameters (:data:`DERIVED_FROM`)."""
        v = self.graph.add_const(self.graph.fresh_name(f"{self.names.get(id(matrix), self._node.name)}_t"),
                                 matrix.detach().t().contiguous())
        if id(matrix) in self.names:
            v.meta[TRANSPOSE_OF] = self.names[id(matrix)]
        elif id(matrix) in self.derived:
            v.meta[DERIVED_FROM] = self.derived[id(matrix)][1]
        return v

    def var(self, x: Any, what: str = "input") -> Value:
        """``x`` as a variable value; constants here would have no batch dimension."""
        if not isinstance(x, Value):
            raise Unsupported(f"{what} must depend on the network input")
        return x

    @staticmethod
    def constant(x: Any, what: str) -> Any:
        """``x`` as a constant (tensor or number); the op is affine only in that case."""
        if isinstance(x, Value):
            raise Unsupported(f"{what} must be a constant (parameter, buffer or number), "
                               "not computed from the network input")
        if x is BATCH_SIZE:
            raise Unsupported(f"{what} may not use the batch size")
        return x

    def shape(self, v: Value) -> tuple[int, ...]:
        """Concrete shape of ``v`` on the example input (batch dimension included)."""
        return self.shapes[v]

    def rank(self, v: Value) -> int:
        return len(self.shapes[v])

    def out_shape(self) -> tuple[int, ...]:
        """Concrete example shape of the fx node being lowered."""
        return example_shape(self._node)

    def out_shapes(self) -> list[tuple[int, ...]]:
        """Concrete example shapes of the fx node being lowered, when it returns a tuple."""
        return example_shapes(self._node)

    @property
    def node_name(self) -> str:
        """Name of the fx node being lowered (a hint for the names of the IR nodes it emits)."""
        return self._node.name

    def emit(self, op: str, inputs: Sequence[Value | torch.Tensor | float | None],
             attrs: dict | None = None, *, hint: str | None = None, n_outputs: int = 1) -> Any:
        """Append one IR node; constants in ``inputs`` become IR constants.

        Returns its output value, or the tuple of them when ``n_outputs > 1``.
        """
        ins = [None if x is None else x if isinstance(x, Value) else self.const(x, f"{self._node.name}_c")
               for x in inputs]
        while ins and ins[-1] is None:  # trailing omitted optional inputs are simply absent
            ins.pop()
        name = self.graph.fresh_name(hint or self._node.name)
        node = self.graph.add_node(op, ins, attrs, name=name, n_outputs=n_outputs)
        node.meta["fx_node"] = self._node.name
        return node.output if n_outputs == 1 else tuple(node.outputs)

    def axis(self, v: Value, dim: int, what: str = "dim") -> int:
        """Normalise ``dim`` of ``v``; axis 0 (the batch) is rejected."""
        r = self.rank(v)
        d = int(dim) + r if int(dim) < 0 else int(dim)
        if not 0 < d < r:
            raise Unsupported(f"{what}={dim} is the batch dimension or out of range; "
                               "ops across the examples of a batch are not supported")
        return d


def example_shape(node: torch.fx.Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise Unsupported(f"node '{node.name}' does not produce a single tensor")
    return tuple(tm.shape)


def example_shapes(node: torch.fx.Node) -> list[tuple[int, ...]]:
    """Example shapes of a node that returns a tuple of tensors (split, chunk)."""
    tms = node.meta.get("tensor_meta")
    if not isinstance(tms, (tuple, list)) or not all(hasattr(t, "shape") for t in tms):
        raise Unsupported(f"node '{node.name}' does not produce a tuple of tensors")
    return [tuple(t.shape) for t in tms]
