"""Constant folding at import time, in two worlds: every constant is evaluated with the
batch size 1 and 2 (``Const.t1``/``Const.t2``), so a value computed from the batch size
(``Shape`` of a variable, ``ConstantOfShape`` of it) is recognised as batch dependent and
a value that merely repeats per example is not. Nodes are evaluated with onnx's reference
implementation (ONNX semantics: shapes, indices, moved entries), and a node that computes
floating-point values (not one of :data:`MOVES_ENTRIES`) takes **onnxruntime's** value of it
where onnxruntime runs it: the constant of the network onnxruntime evaluates, which a
certificate is about. Its kernels can be far from the reference: Sigmoid(-20) is 2.06e-9
exactly and 0 in onnxruntime (a review: ``1e9 x sigmoid(-20) - 1`` certified at +1.04 where
onnxruntime gives -1), its Gelu, Elu, Selu and LogSoftmax are up to 1e5-1e7 ulps off."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dualgraph.errors import DualgraphError
from dualgraph.frontends.onnx_refs import SHAPE_OPS, node_attrs
from dualgraph.lowering import Const, Ref, Var


MOVES_ENTRIES = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
                 "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "ConstantOfShape", "Shape",
                 "Size", "Where", "Pad", "OneHot", "NonZero"}
"""Ops whose float outputs are entries of their inputs (or of constants): the reference's
value is every evaluator's, no need to ask onnxruntime."""


class ConstantFolder:
    """Folds the ONNX nodes whose inputs are all constant (or whose value is a shape)."""

    def __init__(self, model: onnx.ModelProto, dynamic: bool) -> None:
        self.model, self.dynamic = model, dynamic

    def fold(self, node: onnx.NodeProto, label: str, refs: list[Ref | None]) -> list[Const]:
        """The node's outputs as constants (both worlds where an input is batch dependent)."""
        if node.op_type in SHAPE_OPS and isinstance(refs[0], Var):
            x, attrs = refs[0], node_attrs(node)

            def value(batch: int) -> np.ndarray:
                shape = x.onnx_shape(batch)
                if node.op_type == "Size":
                    return np.array(math.prod(shape), dtype=np.int64)
                return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)
            t1 = value(1)
            return [Const(t1, value(2)) if self.dynamic and not x.added else Const.of(t1)]
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            return [Const.of(numpy_helper.to_array(node.attribute[0].t))]
        t1s = self.reference(node, label, [r.t1 if r is not None else None for r in refs])
        if not any(r is not None and r.batch_dependent for r in refs):
            return [Const.of(t) for t in t1s]
        t2s = self.reference(node, label, [r.t2 if r is not None else None for r in refs])
        return [Const.of(a) if a.shape == b.shape and np.array_equal(a, b) else Const(a, b)
                for a, b in zip(t1s, t2s)]

    def reference(self, node: onnx.NodeProto, label: str, arrays: list) -> list[np.ndarray]:
        """Evaluate one node on constant inputs with onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: a for name, a in zip(node.input, arrays) if name}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                  for name, a in feeds.items()]
        outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        try:
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DualgraphError(f"cannot evaluate constant node '{label}' ({node.op_type}) at load time: "
                                 f"{reason}") from None
        results = [np.asarray(r) for r in results]
        if node.op_type not in MOVES_ENTRIES and any(np.issubdtype(r.dtype, np.floating) for r in results):
            results = _onnxruntime_values(model, feeds, results)
        results = iter(results)
        return [next(results) if o else np.zeros(0) for o in node.output]


def _onnxruntime_values(model: onnx.ModelProto, feeds: dict, results: list) -> list[np.ndarray]:
    """``results`` with every floating-point output replaced by onnxruntime's value of it (the
    reference's where onnxruntime cannot run the node: it could not run the model either)."""
    import onnxruntime as ort
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        theirs = ort.InferenceSession(model.SerializeToString(), options,
                                      providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:  # noqa: BLE001 -- an op or type onnxruntime lacks
        return results
    return [np.asarray(t, dtype=r.dtype).reshape(r.shape) if np.issubdtype(r.dtype, np.floating) else r
            for r, t in zip(results, theirs)]
