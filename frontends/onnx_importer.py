"""The importer behind :func:`dualgraph.frontends.onnx.load_onnx`: reads inputs and
initializers, drops dead nodes, folds constant nodes (:mod:`~dualgraph.frontends.onnx_folding`),
converts the others with their op definitions' import handlers (:mod:`dualgraph.op_registry`;
an op defined with an evaluation rule only is emitted as it is), which build on
:class:`~dualgraph.frontends.onnx_context.HandlerContext`.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph, check_graph
from dualgraph.lowering import FLOAT_TYPES, Const, Missing, OnnxNode, Ref, Var
from dualgraph.op_registry import OPS, ensure_ops_loaded
from dualgraph.plugins import failed_plugins_note
from dualgraph.frontends.onnx_context import HandlerContext
from dualgraph.frontends.onnx_folding import ConstantFolder
from dualgraph.frontends.onnx_fusions import check_fusions
from dualgraph.frontends.onnx_refs import CONTROL_FLOW_OPS, SHAPE_OPS, node_attrs


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    tensor = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


class Importer(HandlerContext):
    """One import: the handler context plus the driver (:meth:`build`)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        ensure_ops_loaded()  # built-ins and plugins, before any node is looked at
        super().__init__(model)

    # ---- driver ---------------------------------------------------------------------------
    def build(self) -> Graph:
        gp = self.model.graph
        for init in gp.initializer:
            try:
                self.env[init.name] = Const.of(numpy_helper.to_array(init))
            except Exception as exc:
                raise DualgraphError(f"cannot read initializer '{init.name}': {exc}") from None
        inputs = [vi for vi in gp.input if vi.name not in self.env]
        if not inputs:
            raise DualgraphError("the ONNX model has no inputs (every graph input is an initializer)")
        specs = [self._add_input(vi) for vi in inputs]
        self.folder = ConstantFolder(self.model, self.dynamic)  # the inputs decide whether the batch is symbolic
        nodes = self._live_nodes()
        self._check_supported(nodes)
        check_fusions(self.model)
        for node in nodes:
            self._convert(node)
        self.g.meta["onnx_inputs"] = specs
        self.g.meta["onnx_outputs"] = [self._add_output(vi) for vi in gp.output]
        self.g.meta["onnx_opset"] = self.opset
        infer_shapes(self.g, self.dtype)
        check_graph(self.g)
        return self.g

    def _add_input(self, vi: onnx.ValueInfoProto) -> dict[str, Any]:
        dims = _dims(vi)
        elem = vi.type.tensor_type.elem_type
        if elem not in FLOAT_TYPES:
            raise DualgraphError(f"input '{vi.name}' has element type {TensorProto.DataType.Name(elem)}; "
                                 "only floating-point inputs are supported")
        if dims is None:
            raise DualgraphError(f"input '{vi.name}' has no shape in the model; "
                                 "re-export it with static shapes")
        for axis, d in enumerate(dims[1:], start=1):
            if not isinstance(d, int) or d <= 0:
                raise DualgraphError(f"input '{vi.name}' has shape {dims}: dimension {axis} ({d!r}) "
                                     "cannot be resolved; only axis 0 (the batch) may be symbolic -- "
                                     "re-export with static shapes")
        dynamic = bool(dims) and not isinstance(dims[0], int)
        if dims and dims[0] == 0:
            raise DualgraphError(f"input '{vi.name}' has shape {dims} with an empty axis 0")
        batch_first = dynamic or (len(dims) >= 2 and dims[0] == 1)
        unit = dims[1:] if batch_first else dims
        self.dynamic |= dynamic
        self.dtype = FLOAT_TYPES[elem] if not self.g.inputs else self.dtype
        v = self.g.add_input(vi.name, unit, FLOAT_TYPES[elem])
        self._meta[v] = torch.empty((2, *unit), device="meta", dtype=v.dtype)
        self.env[vi.name] = Var(v, added=not batch_first)
        return {"name": vi.name, "shape": dims, "layout": "batch" if batch_first else "added",
                "dynamic": dynamic, "dtype": str(helper.tensor_dtype_to_np_dtype(elem))}

    def _add_output(self, vi: onnx.ValueInfoProto) -> dict[str, Any]:
        ref = self.env.get(vi.name)
        if isinstance(ref, Missing):
            raise DualgraphError(ref.reason)
        if ref is None:
            raise DualgraphError(f"graph output '{vi.name}' is not produced by any node")
        if not isinstance(ref, Var):
            raise DualgraphError(f"graph output '{vi.name}' does not depend on the network input")
        self.g.outputs.append(ref.value)
        return {"name": vi.name, "shape": _dims(vi), "layout": "added" if ref.added else "batch"}

    def _live_nodes(self) -> list[onnx.NodeProto]:
        """Nodes the graph outputs depend on (dead code is dropped before anything else)."""
        needed = {vi.name for vi in self.model.graph.output}
        live = []
        for node in reversed(self.model.graph.node):
            if any(o in needed for o in node.output):
                live.append(node)
                needed.update(i for i in node.input if i)
        return live[::-1]

    @staticmethod
    def _key(node: onnx.NodeProto) -> tuple[str, str]:
        return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)

    def _check_supported(self, nodes: list[onnx.NodeProto]) -> None:
        """One error listing every op that can be neither folded nor lowered."""
        const = {name for name, ref in self.env.items() if isinstance(ref, Const)}
        bad: dict[str, list[str]] = {}
        for node in nodes:
            domain, op = self._key(node)
            label = op if not domain else f"{domain}.{op}"
            if not domain and op in CONTROL_FLOW_OPS:
                bad.setdefault(label, []).append(node.name or node.output[0])
            elif (not domain and op in SHAPE_OPS) or all(not i or i in const for i in node.input):
                const.update(node.output)
            elif not _convertible((domain, op)):
                bad.setdefault(label, []).append(node.name or node.output[0])
        if bad:
            listing = ", ".join(f"{op} (nodes {', '.join(repr(n) for n in names)})"
                                for op, names in sorted(bad.items()))
            raise UnsupportedOpError(f"unsupported ONNX ops: {listing}; supported: "
                                     f"{', '.join(supported_ops())}, and any op on constants only; "
                                     "a plugin can define more (README 'Writing a dual layer')"
                                     f"{failed_plugins_note()}")

    def _convert(self, node: onnx.NodeProto) -> None:
        domain, op = self._key(node)
        label = node.name or node.output[0]
        refs: list[Ref | None] = []
        for name in node.input:
            ref = self.env.get(name) if name else None
            if name and ref is None:
                raise DualgraphError(f"node '{label}' ({op}) reads '{name}', which no node, graph input "
                                     "or initializer defines")
            if isinstance(ref, Missing):
                raise DualgraphError(ref.reason)
            refs.append(ref)
        if not (not domain and op in CONTROL_FLOW_OPS) and (
                (not domain and op in SHAPE_OPS) or all(r is None or isinstance(r, Const) for r in refs)):
            outs = self.folder.fold(node, label, refs)
        else:
            n = OnnxNode(self.unique(label), op, node_attrs(node), refs, list(node.input), list(node.output))
            definition = OPS.get((domain, op))
            handler = definition.onnx_handler if definition is not None else None
            outs = handler(self, n) if handler else self.generic(n, domain)
        for name, ref in zip(node.output, outs):
            if name:
                self.env[name] = ref


def _convertible(key: tuple[str, str]) -> bool:
    """An op the importer can convert: its definition imports it, or evaluates it as it is."""
    definition = OPS.get(key)
    return definition is not None and (definition.onnx_handler is not None or definition.eval_rule is not None)


def supported_ops() -> list[str]:
    """ONNX ops the frontend converts (plugins included), sorted."""
    ensure_ops_loaded()
    return sorted(d.name for d in OPS.values() if _convertible(d.key) and d.key != ("", "Constant"))
