"""Rule registries and lowering state of the torch.fx frontend (:mod:`dualgraph.frontends.fx`).

A rule is ``rule(lo, call) -> Value``: it gets the :class:`Lowering` environment and the
:class:`Call` being lowered and emits IR nodes through ``lo.emit``, or raises
:class:`Unsupported` for a form of the op it cannot lower. :func:`lowers` registers it by
module type, function or Tensor method name. The built-in rules live in
:mod:`dualgraph.frontends.fx_rules` (layers, activations, pooling, arithmetic) and
:mod:`dualgraph.frontends.fx_shape_rules` (shapes and indexing); both register into the tables here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from dualgraph.ir import Graph, Value


# ---- registries -----------------------------------------------------------------------

Rule = Callable[["Lowering", "Call"], Any]
MODULE_RULES: dict[type, Rule] = {}
"""Leaf module types (matched by exact type) -> lowering rule."""
FUNCTION_RULES: dict[Callable, Rule] = {}
"""``call_function`` targets (torch / F / operator functions) -> lowering rule."""
METHOD_RULES: dict[str, Rule] = {}
"""``call_method`` names (Tensor methods) -> lowering rule."""


def lowers(*targets: type | Callable | str) -> Callable[[Rule], Rule]:
    """Register ``rule(lo, call)`` for module types, functions and Tensor method names."""
    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                METHOD_RULES[t] = rule
            elif isinstance(t, type) and issubclass(t, nn.Module):
                MODULE_RULES[t] = rule
            else:
                FUNCTION_RULES[t] = rule
        return rule
    return deco


class _BatchSizeType:
    """Stands for ``x.size(0)``: the batch size, unknown until the graph runs.

    It deliberately supports no arithmetic, so folding ``x.size(0) * 2`` fails loudly
    instead of baking the example's batch size into the graph.
    """

    def __repr__(self) -> str:
        return "x.size(0)"


BATCH_SIZE = _BatchSizeType()


class Unsupported(Exception):
    """Raised by a rule for an unsupported form of a supported op (collected, not fatal)."""


class Poison:
    """Env entry of a node that could not be lowered; its consumers are skipped."""


POISON = Poison()
_REQUIRED = object()


@dataclass
class Call:
    """One fx call node with its arguments already mapped to IR values / Python objects."""

    node: torch.fx.Node
    args: tuple
    kwargs: dict
    module: nn.Module | None = None

    def arg(self, index: int, name: str, default: Any = _REQUIRED) -> Any:
        """Argument ``name`` given positionally at ``index`` or by keyword."""
        if index < len(self.args):
            return self.args[index]
        if name in self.kwargs:
            return self.kwargs[name]
        if default is _REQUIRED:
            raise Unsupported(f"missing argument '{name}'")
        return default

    def varargs(self, start: int, name: str) -> tuple:
        """Sizes given either as ``f(x, 2, 3)`` or as ``f(x, (2, 3))`` / ``f(x, name=(2, 3))``."""
        rest = self.args[start:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            return tuple(rest[0])
        if rest:
            return tuple(rest)
        if name not in self.kwargs:
            raise Unsupported(f"missing argument '{name}'")
        return tuple(self.kwargs[name])


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
    _consts: dict[int, tuple[torch.Tensor, Value]] = field(default_factory=dict)
    _node: torch.fx.Node | None = None

    # -- values --
    def const(self, x: torch.Tensor | float | int | bool, hint: str = "const") -> Value:
        """An IR constant for tensor or Python scalar ``x`` (one per distinct tensor)."""
        if not isinstance(x, torch.Tensor):
            x = torch.tensor(float(x), dtype=torch.float32)
        hit = self._consts.get(id(x))
        if hit is not None:
            return hit[1]
        hint = self.names.get(id(x), hint)  # parameters keep their module path, e.g. "fc1.weight"
        v = self.graph.add_const(self.graph.fresh_name(hint), x.detach().clone())
        self._consts[id(x)] = (x, v)  # keep x alive so its id is not reused
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


def ntuple(x: Any, n: int) -> list[int]:
    """torch's int-or-tuple convention, as a list of ``n`` ints."""
    if isinstance(x, (tuple, list)):
        if len(x) == 1:
            return [int(x[0])] * n
        if len(x) != n:
            raise Unsupported(f"expected {n} values, got {tuple(x)}")
        return [int(e) for e in x]
    return [int(x)] * n


# torch padding modes -> ONNX Pad modes
PAD_MODES = {"constant": "constant", "zeros": "constant", "reflect": "reflect",
              "replicate": "edge", "circular": "wrap"}


def reshape_to(lo: Lowering, x: Value, shape: Sequence[int]) -> Value:
    """Reshape ``x`` to the example output ``shape``, whose first entry is the batch."""
    target = torch.tensor([0, *shape[1:]], dtype=torch.int64)  # 0: copy the batch dimension
    return lo.emit("Reshape", [x, target])
