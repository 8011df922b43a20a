"""Constant folding at import time, in two worlds: every constant is evaluated with the
batch size 1 and 2 (``Const.t1``/``Const.t2``), so a value computed from the batch size
(``Shape`` of a variable, ``ConstantOfShape`` of it) is recognised as batch dependent and
a value that merely repeats per example is not. Nodes are evaluated with onnx's reference
implementation, so folding follows ONNX semantics exactly -- except where onnxruntime computes
an op differently (:data:`APPROXIMATED`): there onnxruntime's constant must be within
:data:`CONSTANT_ULPS` of the reference's, or the model is refused (a certificate holds for one
network, not for two); within it, the graph records the discrepancy (``Graph.meta[
APPROXIMATE_CONSTANTS]``) and the rounding allowance counts it as that many more roundings of
every evaluation (the constant's relative error carries through products)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dualgraph.errors import DualgraphError
from dualgraph.frontends.onnx_refs import SHAPE_OPS, node_attrs
from dualgraph.lowering import Const, Ref, Var


APPROXIMATED = {"Sigmoid"}
"""Ops whose float32 kernel in onnxruntime is an approximation off by more than an ulp (its
Sigmoid: up to 1.7e-7 absolute, 0 for inputs below about -17.9)."""


CONSTANT_ULPS = 8
"""The most ulps onnxruntime's value of a folded :data:`APPROXIMATED` constant may differ by."""


class ConstantFolder:
    """Folds the ONNX nodes whose inputs are all constant (or whose value is a shape)."""

    def __init__(self, model: onnx.ModelProto, dynamic: bool) -> None:
        self.model, self.dynamic = model, dynamic
        self.approximate_ulps = 0  # the largest discrepancy of a folded APPROXIMATED constant

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
        if node.op_type in APPROXIMATED:
            ulps = _onnxruntime_discrepancy(model, feeds, results)
            if ulps > CONSTANT_ULPS:
                raise DualgraphError(f"constant node '{label}' ({node.op_type}): onnxruntime computes it {ulps:.3g} "
                                     "ulps away from its exact value (its kernel is an approximation), so the "
                                     "network would differ between evaluators; store the constant as an initializer")
            self.approximate_ulps = max(self.approximate_ulps, math.ceil(ulps))
        results = iter(results)
        return [next(results) if o else np.zeros(0) for o in node.output]


def _onnxruntime_discrepancy(model: onnx.ModelProto, feeds: dict, results: list) -> float:
    """The most ulps (of the larger of the two) by which onnxruntime's floating-point outputs
    differ from ``results``."""
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for ours, theirs in zip(results, session.run(None, feeds)):
        if not np.issubdtype(ours.dtype, np.floating) or ours.size == 0:
            continue
        theirs = np.asarray(theirs, dtype=ours.dtype)
        ulp = np.spacing(np.maximum(np.abs(ours), np.abs(theirs))).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs) / ulp)))
    return worst
