"""What an ONNX op handler gets: :class:`HandlerContext`, the public building blocks of the
ONNX frontend (the graph being built, the two layouts of a variable, constants in the
batch-1 and batch-2 worlds, broadcasting, MatMul). Handlers are registered with
:func:`dualgraph.frontends.onnx_refs.handles` and receive the context and the node
(:class:`~dualgraph.frontends.onnx_refs.OnnxNode`); :class:`~dualgraph.frontends.onnx_importer.Importer`
is the context plus the driver.

*Layouts.* A variable is either batch-first (``added=False``: its axis 0 is the batch) or
"added" (the ONNX tensor has no batch axis; the IR adds one in front). Handlers convert
with :meth:`HandlerContext.to_added` / :meth:`HandlerContext.to_native`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import torch

from dualgraph.errors import DualgraphError
from dualgraph.interpreter import ShapeProp
from dualgraph.ir import Graph, Node, Value, normalize_axis
from dualgraph.lowering import Const, Missing, OnnxNode, Ref, Var


class HandlerContext:
    """The state of one import and the building blocks handlers call."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        newest = onnx.defs.onnx_opset_version()
        if not 1 <= self.opset <= newest:
            raise DualgraphError(f"the model claims ONNX opset {self.opset}, but opsets 1 to {newest} exist (onnx "
                                 f"{onnx.__version__}); re-export it with a real opset")
        self.g = Graph(model.graph.name or "onnx_model")
        self.env: dict[str, Ref | Missing] = {}
        self.dynamic = False            # some input has a symbolic batch dimension
        self.dtype = torch.float32
        self._meta: dict[Value, torch.Tensor] = {}     # meta tensors (batch 2) of variables
        self._shapes = ShapeProp(self.g)               # shapes of each node as it is emitted
        self._const_cache: dict[int, tuple[np.ndarray, Value]] = {}
        self._node_names: set[str] = set()

    def unique(self, base: str) -> str:
        """A node name not used yet (``base``, else ``base_1``, ...)."""
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
            name = self.unique(f"{n.name}/dg_{op}")
            names = [name]
        else:
            name = n.name
            names = [o or f"{name}:{i}" for i, o in enumerate(outs)]
        node = self.g.add_node((domain, op), inputs, attrs, name=name, output_names=names)
        self._infer(n, node)
        return [Var(v, added) for v in node.outputs]

    def _infer(self, n: OnnxNode, node: Node) -> None:
        """Shapes of a node just emitted: one step of shape propagation (:class:`ShapeProp`,
        the interpreter on meta tensors, batch 2) on the meta tensors of its inputs."""
        like = torch.empty(0, device="meta", dtype=self.dtype)
        try:
            self._shapes.store(node, self._shapes.run_node(node, self._meta, like), self._meta)
        except DualgraphError as exc:
            shapes = [None if v is None else tuple(v.const.shape) if v.is_const else tuple(self._meta[v].shape)
                      for v in node.inputs]
            where = "" if node.name == n.name else f" (importing ONNX node '{n.name}', {n.op})"
            raise DualgraphError(f"{exc}{where}; input shapes with batch 2: {shapes}") from None

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

    def axis(self, n: OnnxNode, axis: int, rank: int, inclusive: bool = False) -> int:
        """ONNX ``axis`` normalised to ``[0, rank)`` (``[0, rank]`` with ``inclusive``)."""
        return normalize_axis(axis, rank, f"node '{n.name}' ({n.op})", inclusive=inclusive)

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

    def generic(self, n: OnnxNode, domain: str) -> list[Var]:
        """Ops known only through an evaluation rule (plugins): batch-first operands as is."""
        inputs = [self.to_native(n, r).value if isinstance(r, Var) else
                  (self.const_input(n, i) if r is not None else None) for i, r in enumerate(n.ins)]
        return self.emit(n, n.op, inputs, n.attrs, False, n.outs, domain)
