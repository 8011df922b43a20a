"""What ONNX tensor names refer to while :mod:`dualgraph.frontends.onnx` imports a model, and the
registry of per-op conversion handlers (filled by :mod:`dualgraph.frontends.onnx_ops`).

A name refers to a :class:`Var` (a variable tensor with its IR value and batch layout), a
:class:`Const` (a constant in the batch-1 and batch-2 worlds) or a :class:`Missing`
output; see :mod:`dualgraph.frontends.onnx` for the layouts and the two worlds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph.ir import Value

if TYPE_CHECKING:
    from dualgraph.frontends.onnx_context import HandlerContext

FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
                TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
CONTROL_FLOW_OPS = {"If", "Loop", "Scan", "SequenceMap"}  # subgraphs: never folded or lowered
SHAPE_OPS = {"Shape", "Size"}  # constant even on variable values: shapes are static


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


HANDLERS: dict[str, Callable[["HandlerContext", OnnxNode], list]] = {}


def handles(*ops: str):
    """Register a conversion handler for default-domain ONNX ops (like EVAL_RULES)."""
    def deco(fn):
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return deco


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """ONNX attributes as plain Python values (str, int, float, lists, torch tensors)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, TensorProto):
            value = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        elif isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated"):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out
