"""ONNX frontend: an ``.onnx`` file or ``onnx.ModelProto`` -> dualgraph IR.

Batch layouts. The IR puts a symbolic batch axis first on every variable value; ONNX
models come in two kinds, and every variable ONNX tensor is tracked with one of them:

* **batch** -- the ONNX tensor's axis 0 *is* the batch: the model's input had a symbolic
  leading dimension (``dynamic``: any batch can be fed to onnxruntime at once) or a fixed
  leading 1 with rank >= 2 (one example at a time). IR shape = ONNX shape, axes unchanged.
* **added** -- the ONNX tensor has no batch axis (an input like ``[5]``, or ``[1]`` as in
  vnncomp's ``test_nano.onnx``): the IR prepends one, so ONNX axis ``a`` is IR axis ``a+1``.

In models without a dynamic batch, a batch-first value whose op would touch axis 0 (say a
Reshape from ``[1, 784]`` to ``[784]``) simply switches to the *added* layout (its leading
1 becomes an ordinary per-example axis), and back when an op such as Gemm or Conv needs a
batch-first operand. With a dynamic batch such an op would mix the examples of a batch,
and the node is rejected with an error that names it.

Constant folding. Every node whose inputs are all constants is evaluated at load time
(``onnx.reference``), as are ``Shape``/``Size`` of variable values, whose shapes are
static. Folding runs in two "worlds", batch 1 and batch 2, so that a constant derived
from the batch size (exporters build Reshape targets from ``Shape(x)[0]``) is recognised
by how it changes between them: a Reshape whose target tracks the batch keeps it first.

:func:`load_onnx` records the original input/output names, shapes and layouts in
``graph.meta["onnx_inputs"]`` / ``["onnx_outputs"]``; :func:`onnx_feeds` and
:func:`run_onnxruntime` use them to run the original model on IR-layout batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph import eval_rules  # noqa: F401  (fills EVAL_RULES; shares conv_pads/slice_range)
from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.interpreter import EVAL_RULES, infer_shapes
from dualgraph.ir import BATCH, Graph, Node, Value, verify
from dualgraph.plugins import load_plugins

_FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
                TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}  # subgraphs: never folded or lowered
_SHAPE_OPS = {"Shape", "Size"}  # constant even on variable values: shapes are static


@dataclass(slots=True)
class _Var:
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
class _Const:
    """A constant ONNX tensor in the batch-1 and batch-2 worlds (``t2 is t1`` when equal)."""

    t1: np.ndarray
    t2: np.ndarray

    @staticmethod
    def of(array: np.ndarray) -> _Const:
        return _Const(array, array)

    @property
    def batch_dependent(self) -> bool:
        return self.t2 is not self.t1

    def map(self, f: Callable[[np.ndarray], np.ndarray]) -> _Const:
        t1 = f(self.t1)
        return _Const(t1, f(self.t2) if self.batch_dependent else t1)


@dataclass(slots=True)
class _Missing:
    """An ONNX output the frontend does not provide (e.g. Dropout's mask); using it fails."""

    reason: str


Ref = _Var | _Const


@dataclass(slots=True)
class _N:
    """The ONNX node being converted, as the handlers see it."""

    name: str                   # unique IR node name (ONNX name, else its first output)
    op: str
    attrs: dict[str, Any]
    ins: list[Ref | None]
    in_names: list[str]
    outs: list[str]             # ONNX output names ('' for an omitted optional output)


# ---- public API -------------------------------------------------------------------------------
def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Load an ONNX model (a file path or a ``ModelProto``) into a verified IR graph.

    Raises :class:`DualgraphError` (one line) for unreadable files, models without inputs,
    unresolvable shapes and ops that mix the examples of a batch, and one
    :class:`UnsupportedOpError` that lists every unsupported op with its nodes.
    """
    model = source if isinstance(source, onnx.ModelProto) else _read_model(Path(source))
    if not model.HasField("graph"):
        raise DualgraphError("the ONNX model has no graph; is this really an ONNX model file?")
    return _Importer(model).build()


def onnx_feeds(graph: Graph, *inputs: torch.Tensor | np.ndarray) -> list[dict[str, np.ndarray]]:
    """onnxruntime feeds for IR-layout inputs (batch first) of a graph from :func:`load_onnx`.

    One feed holding the whole batch when every ONNX input has a dynamic batch axis;
    otherwise one feed per example (a leading 1 for batch-first inputs, none for inputs
    whose batch axis the IR added).
    """
    specs = graph.meta["onnx_inputs"]
    if len(inputs) != len(specs):
        raise DualgraphError(f"model expects {len(specs)} input(s), got {len(inputs)}")
    arrays = [np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                         dtype=spec["dtype"]) for x, spec in zip(inputs, specs)]
    if all(s["layout"] == "batch" and s["dynamic"] for s in specs):
        return [{s["name"]: a for s, a in zip(specs, arrays)}]
    return [{s["name"]: (a[i:i + 1] if s["layout"] == "batch" else a[i]) for s, a in zip(specs, arrays)}
            for i in range(arrays[0].shape[0])]


def run_onnxruntime(source: str | os.PathLike | onnx.ModelProto, graph: Graph,
                    *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Run the original ONNX model with onnxruntime on IR-layout inputs; IR-layout outputs."""
    import onnxruntime as ort  # only needed here

    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outs = graph.meta["onnx_outputs"]
    feeds = onnx_feeds(graph, *inputs)
    results = [session.run([o["name"] for o in outs], feed) for feed in feeds]
    if len(feeds) == 1 and all(s["dynamic"] for s in graph.meta["onnx_inputs"]):
        return results[0]
    return [np.concatenate([r[j] for r in results]) if o["layout"] == "batch"
            else np.stack([r[j] for r in results]) for j, o in enumerate(outs)]


# ---- reading ---------------------------------------------------------------------------------
def _read_model(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise DualgraphError(f"ONNX file '{path}' does not exist")
    if path.is_dir():
        raise DualgraphError(f"'{path}' is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, truncated files, bad external-data references
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DualgraphError(f"'{path}' is not a valid ONNX model (cannot parse it: {reason})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.input):
        raise DualgraphError(f"'{path}' is not an ONNX model (it holds no graph)")
    return model


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


def _resolve_reshape(n: _N, target: np.ndarray, shape: list[int], allowzero: int) -> list[int]:
    """ONNX Reshape's output shape for input ``shape`` (0 copies an axis, -1 is inferred)."""
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(dims)]
    total = math.prod(shape)
    if out.count(-1) == 1:
        known = math.prod(d for d in out if d != -1)
        if known and total % known == 0:
            out[out.index(-1)] = total // known
    if any(d < 0 for d in out) or math.prod(out) != total:
        raise DualgraphError(f"node '{n.name}' ({n.op}): cannot reshape a tensor of shape {shape} "
                             f"to {dims}")
    return out


# ---- the importer ------------------------------------------------------------------------------
_HANDLERS: dict[str, Callable[["_Importer", _N], list]] = {}


def _handles(*ops: str):
    """Register a conversion handler for default-domain ONNX ops (like EVAL_RULES)."""
    def deco(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return deco


class _Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        load_plugins()
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.g = Graph(model.graph.name or "onnx_model")
        self.env: dict[str, Ref | _Missing] = {}
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
                self.env[init.name] = _Const.of(numpy_helper.to_array(init))
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
        if elem not in _FLOAT_TYPES:
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
        self.dtype = _FLOAT_TYPES[elem] if not self.g.inputs else self.dtype
        v = self.g.add_input(vi.name, unit, _FLOAT_TYPES[elem])
        self._meta[v] = torch.empty((2, *unit), device="meta", dtype=v.dtype)
        self.env[vi.name] = _Var(v, added=not batch_first)
        return {"name": vi.name, "shape": dims, "layout": "batch" if batch_first else "added",
                "dynamic": dynamic, "dtype": str(helper.tensor_dtype_to_np_dtype(elem))}

    def _add_output(self, vi: onnx.ValueInfoProto) -> dict[str, Any]:
        ref = self.env.get(vi.name)
        if isinstance(ref, _Missing):
            raise DualgraphError(ref.reason)
        if ref is None:
            raise DualgraphError(f"graph output '{vi.name}' is not produced by any node")
        if not isinstance(ref, _Var):
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
        const = {name for name, ref in self.env.items() if isinstance(ref, _Const)}
        bad: dict[str, list[str]] = {}
        for node in nodes:
            domain, op = self._key(node)
            label = op if not domain else f"{domain}.{op}"
            if not domain and op in _CONTROL_FLOW:
                bad.setdefault(label, []).append(node.name or node.output[0])
            elif (not domain and op in _SHAPE_OPS) or all(not i or i in const for i in node.input):
                const.update(node.output)
            elif not ((not domain and op in _HANDLERS) or (domain, op) in EVAL_RULES):
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
            if isinstance(ref, _Missing):
                raise DualgraphError(ref.reason)
            refs.append(ref)
        if not (not domain and op in _CONTROL_FLOW) and (
                (not domain and op in _SHAPE_OPS) or all(r is None or isinstance(r, _Const) for r in refs)):
            outs = self._fold(node, label, refs)
        else:
            n = _N(self._unique(label), op, _attrs(node), refs, list(node.input), list(node.output))
            handler = _HANDLERS.get(op) if not domain else None
            outs = handler(self, n) if handler else self._generic(n, domain)
        for name, ref in zip(node.output, outs):
            if name:
                self.env[name] = ref

    # ---- constant folding -------------------------------------------------------------------
    def _fold(self, node: onnx.NodeProto, label: str, refs: list[Ref | None]) -> list[_Const]:
        if node.op_type in _SHAPE_OPS and isinstance(refs[0], _Var):
            x, attrs = refs[0], _attrs(node)

            def value(batch: int) -> np.ndarray:
                shape = x.onnx_shape(batch)
                if node.op_type == "Size":
                    return np.array(math.prod(shape), dtype=np.int64)
                return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)
            t1 = value(1)
            return [_Const(t1, value(2)) if self.dynamic and not x.added else _Const.of(t1)]
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            return [_Const.of(numpy_helper.to_array(node.attribute[0].t))]
        t1s = self._reference(node, label, [r.t1 if r is not None else None for r in refs])
        if not any(r is not None and r.batch_dependent for r in refs):
            return [_Const.of(t) for t in t1s]
        t2s = self._reference(node, label, [r.t2 if r is not None else None for r in refs])
        return [_Const.of(a) if a.shape == b.shape and np.array_equal(a, b) else _Const(a, b)
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

    def var(self, n: _N, index: int) -> _Var:
        ref = n.ins[index] if index < len(n.ins) else None
        if not isinstance(ref, _Var):
            raise DualgraphError(f"node '{n.name}' ({n.op}): input {index} must depend on the network input")
        return ref

    def const(self, n: _N, index: int, what: str | None = None) -> _Const | None:
        """The constant at input ``index`` (None if omitted); an error if it is variable."""
        ref = n.ins[index] if index < len(n.ins) else None
        if isinstance(ref, _Var):
            what = what or f"input {index}"
            raise DualgraphError(f"node '{n.name}' ({n.op}): {what} depends on the network input; "
                                 "only constant values are supported there")
        return ref

    def ints(self, n: _N, index: int, attr: str | None = None) -> list[int] | None:
        """Integer list from a constant input (opsets that moved it there) or an attribute."""
        c = self.const(n, index)
        if c is not None:
            return [int(v) for v in self.batch_free(n, c).reshape(-1)]
        value = n.attrs.get(attr) if attr else None
        return None if value is None else [int(v) for v in value]

    def batch_free(self, n: _N, c: _Const) -> np.ndarray:
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

    def const_input(self, n: _N, index: int) -> Value | None:
        """The IR constant for input ``index`` (None if omitted), shared by all its users."""
        c = self.const(n, index)
        return None if c is None else self.ir_const(self.batch_free(n, c), n.in_names[index])

    def int_const(self, n: _N, values: Sequence[int], what: str) -> Value:
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
        return self.g.add_const(self.g.fresh_name(f"{n.name}/dg_{what}"), tensor)

    def emit(self, n: _N, op: str, inputs: list[Value | None], attrs: dict[str, Any], added: bool,
             outs: list[str] | None = None, domain: str = "") -> list[_Var]:
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
        return [_Var(v, added) for v in node.outputs]

    def _infer(self, n: _N, node: Node) -> None:
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

    def reshape_ir(self, n: _N, x: _Var, rest: Sequence[int], added: bool,
                   outs: list[str] | None = None) -> _Var:
        """IR Reshape of ``x`` to ``[batch, *rest]``."""
        shape = self.int_const(n, [-1, *rest], "shape")
        return self.emit(n, "Reshape", [x.value, shape], {}, added, outs)[0]

    def to_added(self, n: _N, x: _Var) -> _Var:
        """Make ONNX axis 0 of a batch-first value an ordinary axis (fixed batch 1 only)."""
        if x.added:
            return x
        if self.dynamic:
            raise DualgraphError(f"node '{n.name}' ({n.op}) acts on the batch axis (axis 0) of "
                                 f"'{x.value.name}', which would mix the examples of a batch; "
                                 "this is not supported")
        return self.reshape_ir(n, x, x.onnx_shape(), added=True)

    def to_native(self, n: _N, x: _Var) -> _Var:
        """Make ONNX axis 0 (which must be 1) the batch axis, for ops that need it first."""
        if not x.added:
            return x
        shape = x.onnx_shape()
        if not shape or shape[0] != 1:
            raise DualgraphError(f"node '{n.name}' ({n.op}) needs an input whose axis 0 is the batch, "
                                 f"but '{x.value.name}' has the per-example shape {shape}")
        return self.reshape_ir(n, x, shape[1:], added=False)

    def axis(self, n: _N, axis: int, rank: int) -> int:
        """ONNX ``axis`` normalised to ``[0, rank)``."""
        if not -rank <= axis < rank:
            raise DualgraphError(f"node '{n.name}' ({n.op}): axis {axis} out of range for rank {rank}")
        return axis % rank

    # ---- composite conversions (used by several handlers) --------------------------------------
    def reshape_to(self, n: _N, x: _Var, t1: list[int], t2: list[int] | None,
                   outs: list[str] | None) -> _Var:
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

    def transpose(self, n: _N, x: _Var, perm: Sequence[int] | None, outs: list[str] | None) -> _Var:
        perm = list(perm) if perm else list(reversed(range(x.rank)))
        if sorted(perm) != list(range(x.rank)):
            raise DualgraphError(f"node '{n.name}' ({n.op}): perm {perm} is invalid for rank {x.rank}")
        if not x.added and perm[0] != 0:
            x = self.to_added(n, x)
        ir_perm = [0, *(p + 1 for p in perm)] if x.added else perm
        return self.emit(n, "Transpose", [x.value], {"perm": ir_perm}, x.added, outs)[0]

    def binary(self, n: _N, op: str, a: Ref, b: Ref, outs: list[str] | None,
               hints: tuple[str, str] = ("", "")) -> _Var:
        """Elementwise ``op`` with numpy broadcasting, constants made to broadcast past the batch."""
        if isinstance(a, _Var) and isinstance(b, _Var):
            if a.added != b.added:
                a, b = self.to_added(n, a), self.to_added(n, b)
            if len(a.value.shape) != len(b.value.shape):
                raise DualgraphError(f"node '{n.name}' ({n.op}): broadcasting two network tensors of "
                                     "different rank is not supported")
            return self.emit(n, op, [a.value, b.value], {}, a.added, outs)[0]
        var_first = isinstance(a, _Var)
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

    def matmul(self, n: _N, a: Ref, b: Ref, outs: list[str] | None,
               hints: tuple[str, str] = ("", "")) -> _Var:
        """ONNX MatMul where at least one operand depends on the input."""
        if isinstance(a, _Var) and isinstance(b, _Var):
            # only products batched over examples: same layout and rank, matrices per example
            if a.added != b.added or a.rank != b.rank or a.rank < (2 if a.added else 3):
                raise DualgraphError(f"node '{n.name}' ({n.op}): this product of two network tensors "
                                     "is not supported")
            return self.emit(n, "MatMul", [a.value, b.value], {}, a.added, outs)[0]
        if isinstance(a, _Var):  # x @ W
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

    def _generic(self, n: _N, domain: str) -> list[_Var]:
        """Ops known only through an evaluation rule (plugins): batch-first operands as is."""
        inputs = [self.to_native(n, r).value if isinstance(r, _Var) else
                  (self.const_input(n, i) if r is not None else None) for i, r in enumerate(n.ins)]
        return self.emit(n, n.op, inputs, n.attrs, False, n.outs, domain)


def supported_ops() -> list[str]:
    """ONNX ops the frontend lowers (plugins included), sorted."""
    load_plugins()
    ops = set(_HANDLERS) | {op for d, op in EVAL_RULES if not d} | {f"{d}.{op}" for d, op in EVAL_RULES if d}
    return sorted(ops - {"Constant"})


# ---- handlers: one per ONNX op family ------------------------------------------------------------
@_handles("Relu", "Sigmoid", "Tanh", "Neg", "Identity", "LeakyRelu")
def _unary(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    attrs = {"alpha": float(n.attrs.get("alpha", 0.01))} if n.op == "LeakyRelu" else {}
    return imp.emit(n, n.op, [x.value], attrs, x.added, n.outs)


@_handles("Dropout")
def _dropout(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    mask = _Missing(f"the mask output of Dropout node '{n.name}' is not supported")
    return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs[:1]) + [mask] * (len(n.outs) - 1)


@_handles("Cast")
def _cast(imp: _Importer, n: _N) -> list:
    if int(n.attrs.get("to", 0)) not in _FLOAT_TYPES:
        raise DualgraphError(f"node '{n.name}' (Cast) casts a network tensor to a non-float type; "
                             "not supported")
    x = imp.var(n, 0)  # a float-to-float cast is the identity for analysis purposes
    return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs)


@_handles("Clip")
def _clip(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    if imp.opset < 11:  # bounds were attributes; normalise them to inputs
        bounds = [imp.ir_const(np.array(n.attrs[k], dtype=np.float32), f"{n.name}/dg_{k}")
                  if k in n.attrs else None for k in ("min", "max")]
    else:
        bounds = [imp.const_input(n, i) for i in (1, 2)]
    inputs = [x.value, *bounds]
    while inputs[-1] is None:
        inputs.pop()
    return imp.emit(n, "Clip", inputs, {}, x.added, n.outs)


@_handles("Add", "Sub", "Mul", "Div")
def _binary(imp: _Importer, n: _N) -> list:
    return [imp.binary(n, n.op, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


@_handles("MatMul")
def _matmul(imp: _Importer, n: _N) -> list:
    return [imp.matmul(n, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


@_handles("Gemm")
def _gemm(imp: _Importer, n: _N) -> list:
    a, b = n.ins[0], n.ins[1]
    c = n.ins[2] if len(n.ins) > 2 else None
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    trans_a, trans_b = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    if isinstance(a, _Var) and isinstance(b, _Const) and not isinstance(c, _Var) and not trans_a:
        x = a
        if x.added and x.onnx_shape()[0] == 1:
            x = imp.to_native(n, x)
        if not x.added:  # the common case: x @ op(W) + C with one example per row
            attrs = {"alpha": alpha, "beta": beta, "transA": 0, "transB": trans_b}
            inputs = [x.value, imp.const_input(n, 1), imp.const_input(n, 2) if c is not None else None]
            return imp.emit(n, "Gemm", inputs if c is not None else inputs[:2], attrs, False, n.outs)
    # Otherwise lower to MatMul (+ Add): y = alpha * op(A) @ op(B) + beta * C.
    def op_of(ref: Ref, trans: int) -> Ref:
        if not trans:
            return ref
        if isinstance(ref, _Const):
            return ref.map(lambda t: t.T.copy())
        return imp.transpose(n, ref, [1, 0], None)
    a, b = op_of(a, trans_a), op_of(b, trans_b)
    if alpha != 1.0 and isinstance(b, _Const):
        b = b.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    elif alpha != 1.0 and isinstance(a, _Const):
        a = a.map(lambda t: t * np.asarray(alpha, dtype=t.dtype))
    scale_after = alpha != 1.0 and isinstance(a, _Var) and isinstance(b, _Var)
    y = imp.matmul(n, a, b, n.outs if c is None and not scale_after else None)
    if scale_after:
        y = imp.binary(n, "Mul", y, _Const.of(np.asarray(alpha, dtype=np.float32)),
                       n.outs if c is None else None)
    if c is None:
        return [y]
    if isinstance(c, _Const):
        c = c.map(lambda t: t * np.asarray(beta, dtype=t.dtype)) if beta != 1.0 else c
    elif beta != 1.0:
        c = imp.binary(n, "Mul", c, _Const.of(np.asarray(beta, dtype=np.float32)), None)
    return [imp.binary(n, "Add", y, c, n.outs)]


@_handles("Conv")
def _conv(imp: _Importer, n: _N) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    w = imp.const(n, 1, "the Conv weight")
    spatial = [int(d) for d in x.value.shape[2:]]
    kernel = [int(k) for k in (n.attrs.get("kernel_shape") or imp.batch_free(n, w).shape[2:])]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": eval_rules.conv_pads(n.attrs, spatial, kernel),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "group": int(n.attrs.get("group", 1))}
    inputs = [x.value, imp.const_input(n, 1)]
    if len(n.ins) > 2 and n.ins[2] is not None:
        inputs.append(imp.const_input(n, 2))
    return imp.emit(n, "Conv", inputs, attrs, False, n.outs)


@_handles("BatchNormalization")
def _batch_norm(imp: _Importer, n: _N) -> list:
    if int(n.attrs.get("training_mode", 0)):
        raise DualgraphError(f"node '{n.name}' (BatchNormalization) is in training mode; export the model "
                             "in eval mode")
    x = imp.to_native(n, imp.var(n, 0))
    inputs = [x.value] + [imp.const_input(n, i) for i in range(1, 5)]
    out = imp.emit(n, "BatchNormalization", inputs, {"epsilon": float(n.attrs.get("epsilon", 1e-5))}, False,
                   n.outs[:1])
    extra = _Missing(f"the training outputs of BatchNormalization node '{n.name}' are not supported")
    return out + [extra] * (len(n.outs) - 1)


@_handles("AveragePool", "MaxPool")
def _pool(imp: _Importer, n: _N) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    if "kernel_shape" not in n.attrs:
        raise DualgraphError(f"node '{n.name}' ({n.op}) has no kernel_shape")
    kernel = [int(k) for k in n.attrs["kernel_shape"]]
    attrs = {"kernel_shape": kernel, "strides": list(n.attrs.get("strides") or [1] * len(kernel)),
             "pads": eval_rules.conv_pads(n.attrs, [int(d) for d in x.value.shape[2:]], kernel),
             "dilations": list(n.attrs.get("dilations") or [1] * len(kernel)),
             "ceil_mode": int(n.attrs.get("ceil_mode", 0))}
    if n.op == "AveragePool":
        attrs["count_include_pad"] = int(n.attrs.get("count_include_pad", 0))
    out = imp.emit(n, n.op, [x.value], attrs, False, n.outs[:1])
    indices = _Missing(f"the indices output of MaxPool node '{n.name}' is not supported")
    return out + [indices] * (len(n.outs) - 1)


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp: _Importer, n: _N) -> list:
    x = imp.to_native(n, imp.var(n, 0))
    return imp.emit(n, n.op, [x.value], {}, False, n.outs)


@_handles("Flatten")
def _flatten(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    axis = int(n.attrs.get("axis", 1))
    axis = axis + x.rank if axis < 0 else axis
    if not 0 <= axis <= x.rank:
        raise DualgraphError(f"node '{n.name}' (Flatten): axis {axis} out of range for rank {x.rank}")
    if not x.added and axis == 1:
        return imp.emit(n, "Flatten", [x.value], {"axis": 1}, False, n.outs)

    def target(batch: int) -> list[int]:
        shape = x.onnx_shape(batch)
        return [math.prod(shape[:axis]), math.prod(shape[axis:])]
    return [imp.reshape_to(n, x, target(1), target(2), n.outs)]


@_handles("Reshape")
def _reshape(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    t = imp.const(n, 1, "the Reshape target shape")
    allowzero = int(n.attrs.get("allowzero", 0))
    t1 = _resolve_reshape(n, t.t1, x.onnx_shape(1), allowzero)
    t2 = _resolve_reshape(n, t.t2, x.onnx_shape(2), allowzero) if imp.dynamic and not x.added else None
    return [imp.reshape_to(n, x, t1, t2, n.outs)]


@_handles("Transpose")
def _transpose(imp: _Importer, n: _N) -> list:
    return [imp.transpose(n, imp.var(n, 0), n.attrs.get("perm"), n.outs)]


@_handles("Squeeze")
def _squeeze(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    shape = x.onnx_shape()
    axes = imp.ints(n, 1, "axes") if imp.opset >= 13 else n.attrs.get("axes")
    if axes is None:  # all axes of size 1, except a dynamic batch axis
        axes = [i for i, d in enumerate(shape) if d == 1 and (x.added or i or not imp.dynamic)]
    axes = sorted({imp.axis(n, int(a), x.rank) for a in axes})
    if any(shape[a] != 1 for a in axes if a or x.added):
        raise DualgraphError(f"node '{n.name}' (Squeeze): axes {axes} of shape {shape} are not all of size 1")
    if not x.added and 0 in axes:
        x = imp.to_added(n, x)
    return imp.emit(n, "Squeeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@_handles("Unsqueeze")
def _unsqueeze(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    axes = imp.ints(n, 1, "axes") if imp.opset >= 13 else n.attrs.get("axes")
    if axes is None:
        raise DualgraphError(f"node '{n.name}' (Unsqueeze) has no axes")
    rank = x.rank + len(axes)
    axes = sorted(imp.axis(n, int(a), rank) for a in axes)
    if not x.added and 0 in axes:
        x = imp.to_added(n, x)
    return imp.emit(n, "Unsqueeze", [x.value], {"axes": [a + x.added for a in axes]}, x.added, n.outs)


@_handles("Concat")
def _concat(imp: _Importer, n: _N) -> list:
    vars_ = [r for r in n.ins if isinstance(r, _Var)]
    axis = imp.axis(n, int(n.attrs["axis"]), vars_[0].rank)
    added = axis == 0 or any(v.added for v in vars_)
    inputs = []
    for i, ref in enumerate(n.ins):
        if isinstance(ref, _Var):
            inputs.append((imp.to_added(n, ref) if added else ref).value)
            continue
        array = imp.batch_free(n, ref)
        if added:  # give the constant a leading axis of 1 that the rule broadcasts
            inputs.append(imp.ir_const(array.reshape(1, *array.shape), f"{n.name}/dg_{n.in_names[i]}"))
        elif array.ndim and array.shape[0] == 1:
            inputs.append(imp.ir_const(array, n.in_names[i]))
        else:
            raise DualgraphError(f"node '{n.name}' (Concat): constant '{n.in_names[i]}' of shape "
                                 f"{list(array.shape)} does not have one row per example")
    return imp.emit(n, "Concat", inputs, {"axis": axis + added}, added, n.outs)


@_handles("Slice")
def _slice(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    if imp.opset < 10:
        starts, ends, axes, steps = (n.attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
    else:
        starts, ends, axes, steps = (imp.ints(n, i) for i in (1, 2, 3, 4))
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    kept = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = imp.axis(n, int(axis), x.rank)
        if axis == 0 and not x.added:
            batches = (1, 2) if imp.dynamic else (1,)
            if all(eval_rules.slice_range(start, end, step, b) == range(b) for b in batches):
                continue  # slicing the whole batch axis is a no-op
            x = imp.to_added(n, x)
        kept.append((int(start), int(end), axis, int(step)))
    if not kept:
        return imp.emit(n, "Identity", [x.value], {}, x.added, n.outs)
    cols = list(zip(*kept))
    inputs = [x.value, imp.int_const(n, cols[0], "starts"), imp.int_const(n, cols[1], "ends"),
              imp.int_const(n, [a + x.added for a in cols[2]], "axes"), imp.int_const(n, cols[3], "steps")]
    return imp.emit(n, "Slice", inputs, {}, x.added, n.outs)


@_handles("Split")
def _split(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    axis = imp.axis(n, int(n.attrs.get("axis", 0)), x.rank)
    sizes = imp.ints(n, 1) if imp.opset >= 13 else n.attrs.get("split")
    if sizes is None:
        dim = x.onnx_shape()[axis]
        parts = int(n.attrs.get("num_outputs", len(n.outs)))
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    if not x.added and axis == 0:
        x = imp.to_added(n, x)
    inputs = [x.value, imp.int_const(n, sizes, "split")]
    return imp.emit(n, "Split", inputs, {"axis": axis + x.added}, x.added, n.outs)


@_handles("Pad")
def _pad(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    mode = n.attrs.get("mode", "constant")
    if imp.opset < 11:
        pads, value, axes = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0)), None
    else:
        pads, axes = imp.ints(n, 1), imp.ints(n, 3)
        c = imp.const(n, 2, "the Pad value")
        value = float(imp.batch_free(n, c).reshape(-1)[0]) if c is not None and c.t1.size else 0.0
    rank = x.rank
    if axes is not None:
        full = [0] * (2 * rank)
        for i, a in enumerate(imp.axis(n, a, rank) for a in axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * rank:
        raise DualgraphError(f"node '{n.name}' (Pad): {len(pads)} pads for a tensor of rank {rank}")
    if not x.added and (pads[0] or pads[rank]):
        x = imp.to_added(n, x)
    if x.added:
        pads = [0, *pads[:rank], 0, *pads[rank:]]
    inputs = [x.value, imp.int_const(n, pads, "pads")]
    if mode == "constant":
        inputs.append(imp.ir_const(np.array(value, dtype=np.float32), f"{n.name}/dg_value"))
    return imp.emit(n, "Pad", inputs, {"mode": mode}, x.added, n.outs)


@_handles("Softmax")
def _softmax(imp: _Importer, n: _N) -> list:
    x = imp.var(n, 0)
    axis = imp.axis(n, int(n.attrs.get("axis", -1 if imp.opset >= 13 else 1)), x.rank)
    if imp.opset < 13 and math.prod(x.onnx_shape()[axis + 1:]) != 1:
        raise DualgraphError(f"node '{n.name}' (Softmax, opset {imp.opset}) normalises over several axes; "
                             "only a softmax over one axis is supported")
    if not x.added and axis == 0:
        x = imp.to_added(n, x)
    return imp.emit(n, "Softmax", [x.value], {"axis": axis + x.added}, x.added, n.outs)
