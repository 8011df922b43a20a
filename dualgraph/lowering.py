"""What an op's ONNX import handler and torch.fx lowering rule see, and what they may raise.

An op definition (:mod:`dualgraph.op_registry`) may carry an ONNX import handler
``handler(ctx, n) -> refs`` and torch.fx lowering rules ``rule(lo, call) -> value``. The
contexts (``ctx``: :class:`dualgraph.frontends.onnx_context.HandlerContext`, ``lo``:
:class:`dualgraph.frontends.fx_lowering.Lowering`) belong to the frontends and are only
passed in; the values they exchange with the rules are defined here, in the core, so that op
modules (built-in or plugin) import nothing from a frontend.

ONNX side: a tensor name refers to a :class:`Var` (a variable tensor: its IR value and its
batch layout), a :class:`Const` (a constant in the batch-1 and batch-2 worlds, see
:mod:`dualgraph.frontends.onnx`) or a :class:`Missing` output. torch.fx side: a rule gets
the :class:`Call` being lowered and raises :class:`Unsupported` for a form it cannot lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from .ir import Value

# ---- ONNX import ------------------------------------------------------------------------------

FLOAT_TYPES = {1: torch.float32, 11: torch.float64, 10: torch.float16, 16: torch.bfloat16}
"""ONNX ``TensorProto`` element types (FLOAT, DOUBLE, FLOAT16, BFLOAT16) -> torch dtypes."""


@dataclass(slots=True)
class Var:
    """A variable ONNX tensor: its IR value and whether the IR added the batch axis."""

    value: Value
    added: bool

    @property
    def rank(self) -> int:
        """Rank of the ONNX tensor."""
        return len(self.value.shape) - (1 if self.added else 0)

    def onnx_shape(self, batch: int = 1) -> list[int]:
        """Shape of the ONNX tensor for one example (batch-first values: ``batch`` examples)."""
        rest = [int(d) for d in self.value.shape[1:]]
        return rest if self.added else [batch, *rest]


@dataclass(slots=True)
class Const:
    """A constant ONNX tensor in the batch-1 and batch-2 worlds (``t2 is t1`` when equal)."""

    t1: np.ndarray
    t2: np.ndarray

    @staticmethod
    def of(array: np.ndarray) -> Const:
        return Const(array, array)

    @property
    def batch_dependent(self) -> bool:
        return self.t2 is not self.t1

    def map(self, f: Callable[[np.ndarray], np.ndarray]) -> Const:
        t1 = f(self.t1)
        return Const(t1, f(self.t2) if self.batch_dependent else t1)


@dataclass(slots=True)
class Missing:
    """An ONNX output the frontend does not provide (e.g. Dropout's mask); using it fails."""

    reason: str


Ref = Var | Const


@dataclass(slots=True)
class OnnxNode:
    """The ONNX node being converted, as the handlers see it."""

    name: str                   # unique IR node name (ONNX name, else its first output)
    op: str
    attrs: dict[str, Any]
    ins: list[Ref | None]
    in_names: list[str]
    outs: list[str]             # ONNX output names ('' for an omitted optional output)


OnnxHandler = Callable[[Any, OnnxNode], list]
"""``handler(ctx, n)``: one ref per ONNX output of ``n``, made with the context's building blocks."""


# ---- torch.fx lowering ------------------------------------------------------------------------

class Unsupported(Exception):
    """Raised by a lowering rule for an unsupported form of a supported op (collected, not fatal)."""


class _BatchSizeType:
    """Stands for ``x.size(0)``: the batch size, unknown until the graph runs.

    It deliberately supports no arithmetic, so folding ``x.size(0) * 2`` fails loudly
    instead of baking the example's batch size into the graph.
    """

    def __repr__(self) -> str:
        return "x.size(0)"


BATCH_SIZE = _BatchSizeType()
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


FxRule = Callable[[Any, Call], Any]
"""``rule(lo, call)``: emits IR nodes through ``lo.emit`` and returns the output value(s)."""


def ntuple(x: Any, n: int) -> list[int]:
    """torch's int-or-tuple convention, as a list of ``n`` ints."""
    if isinstance(x, (tuple, list)):
        if len(x) == 1:
            return [int(x[0])] * n
        if len(x) != n:
            raise Unsupported(f"expected {n} values, got {tuple(x)}")
        return [int(e) for e in x]
    return [int(x)] * n


PAD_MODES = {"constant": "constant", "zeros": "constant", "reflect": "reflect",
             "replicate": "edge", "circular": "wrap"}
"""torch padding modes -> ONNX Pad modes."""


def reshape_to(lo: Any, x: Value, shape: Any) -> Value:
    """Reshape ``x`` to the example output ``shape``, whose first entry is the batch."""
    target = torch.tensor([0, *shape[1:]], dtype=torch.int64)  # 0: copy the batch dimension
    return lo.emit("Reshape", [x, target])
