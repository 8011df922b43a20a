"""ONNX facts the importer needs beyond the op definitions: ops that are never converted
node by node (control flow, shape queries), and attributes as plain Python values.

What a tensor name refers to during an import (:class:`~dualgraph.lowering.Var`,
:class:`~dualgraph.lowering.Const`, :class:`~dualgraph.lowering.Missing`) is defined in the
core (:mod:`dualgraph.lowering`), where op definitions' import handlers read it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

CONTROL_FLOW_OPS = {"If", "Loop", "Scan", "SequenceMap"}  # subgraphs: never folded or lowered
SHAPE_OPS = {"Shape", "Size"}  # constant even on variable values: shapes are static


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
