"""The importer behind :func:`dualgraph.frontends.onnx.load_onnx`: folds constant nodes (batch-1 and
batch-2 worlds), converts the others with :mod:`dualgraph.frontends.onnx_ops` (or a plugin's evaluation
rule), and gives those handlers their building blocks (layouts, constants, broadcasting, MatMul).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph import eval_rules  # noqa: F401  (fills EVAL_RULES)
from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.interpreter import EVAL_RULES, infer_shapes
from dualgraph.ir import BATCH, Graph, Node, Value, verify
from dualgraph.plugins import load_plugins
from dualgraph.frontends import onnx_ops  # noqa: F401  (fills HANDLERS)
from dualgraph.frontends.onnx_refs import (CONTROL_FLOW_OPS, FLOAT_TYPES, HANDLERS, SHAPE_OPS, Ref, Const, Missing,
                                 OnnxNode, Var)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
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


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    tensor = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


class Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        load_plugins()
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.g = Graph(model.graph.name or "onnx_model")
        self.env: dict[str, Ref | Missing] = {}
        self.dynamic = False            # some input has a symbolic batch dimension
        self.dtype = torch.float32
        self._meta: dict[Value, torch.Tensor] = {}     # meta tensors (batch 2) of variables
        self._const_cache: dict[int, tuple[np.ndarray, Value]] = {}
        self._node_names: set[str] = set()

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
        nodes = self._live_nodes()
        self._check_supported(nodes)
        for node in nodes:
            self._convert(node)
        self.g.meta["onnx_inputs"] = specs
        self.g.meta["onnx_outputs"] = [self._add_output(vi) for vi in gp.output]
        self.g.meta["onnx_opset"] = self.opset
        infer_shapes(self.g, self.dtype)
        verify(self.g)
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
            elif not ((not domain and op in HANDLERS) or (domain, op) in EVAL_RULES):
                bad.setdefault(label, []).append(node.name or node.output[0])
        if bad:
            listing = ", ".join(f"{op} (nodes {', '.join(repr(n) for n in names)})"
                                for op, names in sorted(bad.items()))
            raise UnsupportedOpError(f"unsupported ONNX ops: {listing}; supported: "
                                     f"{', '.join(supported_ops())}, and any op on constants only; "
                                     "a plugin can add rules (see README)")

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
            outs = self._fold(node, label, refs)
        else:
            n = OnnxNode(self._unique(label), op, _attrs(node), refs, list(node.input), list(node.output))
            handler = HANDLERS.get(op) if not domain else None
            outs = handler(self, n) if handler else self._generic(n, domain)
        for name, ref in zip(node.output, outs):
            if name:
                self.env[name] = ref

    # ---- constant folding -------------------------------------------------------------------
    def _fold(self, node: onnx.NodeProto, label: str, refs: list[Ref | None]) -> list[Const]:
        if node.op_type in SHAPE_OPS and isinstance(refs[0], Var):
            x, attrs = refs[0], _attrs(node)

            def value(batch: int) -> np.ndarray:
                shape = x.onnx_shape(batch)
                if node.op_type == "Size":
                    return np.array(math.prod(shape), dtype=np.int64)
                return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)
            t1 = value(1)
            return [Const(t1, value(2)) if self.dynamic and not x.added else Const.of(t1)]
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            return [Const.of(numpy_helper.to_array(node.attribute[0].t))]
        t1s = self._reference(node, label, [r.t1 if r is not None else None for r in refs])
        if not any(r is not None and r.batch_dependent for r in refs):
            return [Const.of(t) for t in t1s]
        t2s = self._reference(node, label, [r.t2 if r is not None else None for r in refs])
        return [Const.of(a) if a.shape == b.shape and np.array_equal(a, b) else Const(a, b)
                for a, b in zip(t1s, t2s)]

    def _reference(self, node: onnx.NodeProto, label: str, arrays: list) -> list[np.ndarray]:
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
        results = iter(np.asarray(r) for r in results)
        return [next(results) if o else np.zeros(0) for o in node.output]

    # ---- building blocks for the handlers ------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._node_names:
            name, k = f"{base}_{k}", k + 1
        self._node_names.add(name)
        return name

    def var(self, n: OnnxNode, index: int) -> Var:
        ref = n.ins[index] if index < len(n.ins) else None
        if not isinstance(ref, Var):
            raise DualgraphError(f"node '{n.name}' ({n.op}): input {index} must depend on the network input")
        return ref

    def const(self, n: OnnxNode, index: int, what: str | None = None) -> Const | None:
        """The constant at input ``index`` (None if omitted); an error if it is variable."""
        ref = n.ins[index] if index < len(n.ins) else None
        if isinstance(ref, Var):
            what = what or f"input {index}"
            raise DualgraphError(f"node '{n.name}' ({n.op}): {what} depends on the network input; "
                                 "only constant values are supported there")
        return ref

    def ints(self, n: OnnxNode, index: int, attr: str | None = None) -> list[int] | None:
        """Integer list from a constant input (opsets that moved it there) or an attribute."""
        c = self.const(n, index)
        if c is not None:
            return [int(v) for v in self.batch_free(n, c).reshape(-1)]
        value = n.attrs.get(attr) if attr else None
        return None if value is None else [int(v) for v in value]

    def batch_free(self, n: OnnxNode, c: Const) -> np.ndarray:
        """The batch-1 value of ``c``, which must not depend on the batch size.

        Allowed: a tensor that merely repeats one row per example (a leading axis of 1 that
        broadcasts, e.g. zeros built with ConstantOfShape from the batch size).
        """
        if not c.batch_dependent:
            return c.t1
        t1, t2 = c.t1, c.t2
        if t1.ndim and t1.shape[0] == 1 and t2.shape == (2, *t1.shape[1:]) and np.array_equal(
                t2, np.broadcast_to(t1, t2.shape)):
            return t1
        raise DualgraphError(f"node '{n.name}' ({n.op}) uses a tensor computed from the batch size; "
                             "only per-example computations are supported")

    def ir_const(self, array: np.ndarray, hint: str) -> Value:
        """An IR constant for ``array``; the same array object always gives the same value."""
        hit = self._const_cache.get(id(array))
        if hit is not None and hit[0] is array:
            return hit[1]
        if array.dtype.kind not in "biuf":
            raise DualgraphError(f"constant '{hint}' has unsupported element type {array.dtype}")
        value = self.g.add_const(self.g.fresh_name(hint), torch.from_numpy(np.array(array)))
        self._const_cache[id(array)] = (array, value)
        return value

    def const_input(self, n: OnnxNode, index: int) -> Value | None:
        """The IR constant for input ``index`` (None if omitted), shared by all its users."""
        c = self.const(n, index)
        return None if c is None else self.ir_const(self.batch_free(n, c), n.in_names[index])

    def int_const(self, n: OnnxNode, values: Sequence[int], what: str) -> Value:
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
        return self.g.add_const(self.g.fresh_name(f"{n.name}/dg_{what}"), tensor)

    def emit(self, n: OnnxNode, op: str, inputs: list[Value | None], attrs: dict[str, Any], added: bool,
             outs: list[str] | None = None, domain: str = "") -> list[Var]:
        """Append an IR node; ``outs`` (the ONNX output names) marks the node's final op.

        Helper nodes (``outs`` None) get derived names. Output shapes are inferred right
        away so that later handlers can rely on them.
        """
        if outs is None:
            name = self._unique(f"{n.name}/dg_{op}")
            names = [name]
        else:
            name = n.name
            names = [o or f"{name}:{i}" for i, o in enumerate(outs)]
        node = self.g.add_node((domain, op), inputs, attrs, name=name, output_names=names)
        self._infer(n, node)
        return [Var(v, added) for v in node.outputs]

    def _infer(self, n: OnnxNode, node: Node) -> None:
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
            elif v.is_const:
                c = v.const
                args.append(c.to("meta", self.dtype) if c.is_floating_point() else c.to("meta"))
            else:
                args.append(self._meta[v])
        try:
            out = EVAL_RULES[node.op](node, args)
        except DualgraphError:
            raise
        except Exception as exc:
            shapes = [tuple(a.shape) if a is not None else None for a in args]
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DualgraphError(f"node '{n.name}' ({n.op}): cannot apply {node.op_type} to inputs of "
                                 f"shapes {shapes} (batch 2): {reason}") from None
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        for v, t in zip(node.outputs, outs):
            if t.dim() == 0 or t.shape[0] != 2:
                raise DualgraphError(f"node '{n.name}' ({n.op}) mixes the examples of a batch (its output "
                                     "does not keep the batch axis first); this is not supported")
            v.shape, v.dtype = (BATCH, *t.shape[1:]), t.dtype
            self._meta[v] = t

    def reshape_ir(self, n: OnnxNode, x: Var, rest: Sequence[int], added: bool,
                   outs: list[str] | None = None) -> Var:
        """IR Reshape of ``x`` to ``[batch, *rest]``."""
        shape = self.int_const(n, [-1, *rest], "shape")
        return self.emit(n, "Reshape", [x.value, shape], {}, added, outs)[0]

    def to_added(self, n: OnnxNode, x: Var) -> Var:
        """Make ONNX axis 0 of a batch-first value an ordinary axis (fixed batch 1 only)."""
        if x.added:
            return x
        if self.dynamic:
            raise DualgraphError(f"node '{n.name}' ({n.op}) acts on the batch axis (axis 0) of "
                                 f"'{x.value.name}', which would mix the examples of a batch; "
                                 "this is not supported")
        return self.reshape_ir(n, x, x.onnx_shape(), added=True)

    def to_native(self, n: OnnxNode, x: Var) -> Var:
        """Make ONNX axis 0 (which must be 1) the batch axis, for ops that need it first."""
        if not x.added:
            return x
        shape = x.onnx_shape()
        if not shape or shape[0] != 1:
            raise DualgraphError(f"node '{n.name}' ({n.op}) needs an input whose axis 0 is the batch, "
                                 f"but '{x.value.name}' has the per-example shape {shape}")
        return self.reshape_ir(n, x, shape[1:], added=False)

    def axis(self, n: OnnxNode, axis: int, rank: int) -> int:
        """ONNX ``axis`` normalised to ``[0, rank)``."""
        if not -rank <= axis < rank:
            raise DualgraphError(f"node '{n.name}' ({n.op}): axis {axis} out of range for rank {rank}")
        return axis % rank

    # ---- composite conversions (used by several handlers) --------------------------------------
    def reshape_to(self, n: OnnxNode, x: Var, t1: list[int], t2: list[int] | None,
                   outs: list[str] | None) -> Var:
        """Reshape ``x`` to the resolved ONNX shape ``t1`` (``t2``: the same for batch 2)."""
        if not x.added and self.dynamic:
            if not (t2 and len(t1) == len(t2) and t1[0] == 1 and t2[0] == 2 and t1[1:] == t2[1:]):
                raise DualgraphError(f"node '{n.name}' ({n.op}) merges the batch axis with other axes "
                                     f"(shape {t1} for batch 1, {t2} for batch 2); only per-example "
                                     "reshapes are supported")
            return self.reshape_ir(n, x, t1[1:], False, outs)
        if t1 and t1[0] == 1 and not (self.dynamic and x.added):
            return self.reshape_ir(n, x, t1[1:], False, outs)
        return self.reshape_ir(n, x, t1, True, outs)

    def transpose(self, n: OnnxNode, x: Var, perm: Sequence[int] | None, outs: list[str] | None) -> Var:
        perm = list(perm) if perm else list(reversed(range(x.rank)))
        if sorted(perm) != list(range(x.rank)):
            raise DualgraphError(f"node '{n.name}' ({n.op}): perm {perm} is invalid for rank {x.rank}")
        if not x.added and perm[0] != 0:
            x = self.to_added(n, x)
        ir_perm = [0, *(p + 1 for p in perm)] if x.added else perm
        return self.emit(n, "Transpose", [x.value], {"perm": ir_perm}, x.added, outs)[0]

    def binary(self, n: OnnxNode, op: str, a: Ref, b: Ref, outs: list[str] | None,
               hints: tuple[str, str] = ("", "")) -> Var:
        """Elementwise ``op`` with numpy broadcasting, constants made to broadcast past the batch."""
        if isinstance(a, Var) and isinstance(b, Var):
            if a.added != b.added:
                a, b = self.to_added(n, a), self.to_added(n, b)
            if len(a.value.shape) != len(b.value.shape):
                raise DualgraphError(f"node '{n.name}' ({n.op}): broadcasting two network tensors of "
                                     "different rank is not supported")
            return self.emit(n, op, [a.value, b.value], {}, a.added, outs)[0]
        var_first = isinstance(a, Var)
        x, c = (a, b) if var_first else (b, a)
        hint = hints[1] if var_first else hints[0]
        array = self.batch_free(n, c)
        lands_on_batch = not x.added and array.ndim == x.rank and array.ndim and array.shape[0] != 1
        if array.ndim > x.rank or lands_on_batch:
            x = self.to_added(n, x)  # the constant's leading axes would broadcast against the batch
        if x.added and array.ndim > x.rank:
            array = array.reshape(1, *array.shape)
            hint = f"{n.name}/dg_{hint or 'const'}"
        cv = self.ir_const(array, hint or f"{n.name}/dg_const")
        inputs = [x.value, cv] if var_first else [cv, x.value]
        return self.emit(n, op, inputs, {}, x.added, outs)[0]

    def matmul(self, n: OnnxNode, a: Ref, b: Ref, outs: list[str] | None,
               hints: tuple[str, str] = ("", "")) -> Var:
        """ONNX MatMul where at least one operand depends on the input."""
        if isinstance(a, Var) and isinstance(b, Var):
            # only products batched over examples: same layout and rank, matrices per example
            if a.added != b.added or a.rank != b.rank or a.rank < (2 if a.added else 3):
                raise DualgraphError(f"node '{n.name}' ({n.op}): this product of two network tensors "
                                     "is not supported")
            return self.emit(n, "MatMul", [a.value, b.value], {}, a.added, outs)[0]
        if isinstance(a, Var):  # x @ W
            w = self.batch_free(n, b)
            if w.ndim > 2:
                raise DualgraphError(f"node '{n.name}' ({n.op}): a constant right operand of rank "
                                     f"{w.ndim} is not supported")
            x = self.to_added(n, a) if not a.added and a.rank == 1 else a  # would contract the batch
            return self.emit(n, "MatMul", [x.value, self.ir_const(w, hints[1] or f"{n.name}/dg_w")], {},
                             x.added, outs)[0]
        w, x = self.batch_free(n, a), b  # W @ x
        if w.ndim > 2:
            raise DualgraphError(f"node '{n.name}' ({n.op}): a constant left operand of rank "
                                 f"{w.ndim} is not supported")
        if x.rank == 1:  # W @ x for a vector x is x @ W^T, row-wise per example
            x = self.to_added(n, x)
            wt = self.ir_const(w.T.copy() if w.ndim == 2 else w, f"{n.name}/dg_{hints[0] or 'w'}T")
            return self.emit(n, "MatMul", [x.value, wt], {}, True, outs)[0]
        if not x.added and x.rank == 2:
            x = self.to_added(n, x)  # W @ x would contract the batch axis
        return self.emit(n, "MatMul", [self.ir_const(w, hints[0] or f"{n.name}/dg_w"), x.value], {},
                         x.added, outs)[0]

    def _generic(self, n: OnnxNode, domain: str) -> list[Var]:
        """Ops known only through an evaluation rule (plugins): batch-first operands as is."""
        inputs = [self.to_native(n, r).value if isinstance(r, Var) else
                  (self.const_input(n, i) if r is not None else None) for i, r in enumerate(n.ins)]
        return self.emit(n, n.op, inputs, n.attrs, False, n.outs, domain)


def supported_ops() -> list[str]:
    """ONNX ops the frontend lowers (plugins included), sorted."""
    load_plugins()
    ops = set(HANDLERS) | {op for d, op in EVAL_RULES if not d} | {f"{d}.{op}" for d, op in EVAL_RULES if d}
    return sorted(ops - {"Constant"})
