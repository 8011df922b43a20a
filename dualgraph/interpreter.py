"""Reference interpreter: runs the IR on concrete batches with torch.

Like ``torch.fx.Interpreter``: an environment keyed by value, one ``run_node`` per node,
values freed after their last use, and errors that name the node. Per-op semantics live
in the :data:`EVAL_RULES` registry (ONNX semantics for the default domain), filled by each
op's definition (``OpDefinition.evaluate``, :mod:`dualgraph.op_registry`): the built-in op
families in :mod:`dualgraph.ops`, plugins' ops the same way.

Shape inference reuses the interpreter on torch's ``meta`` device, so an op needs only
its evaluation rule to get shapes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from .deadline import NEVER, Deadline
from .errors import DualgraphError, UnsupportedOpError
from .ir import BATCH, Graph, Node, OpKey, Value, last_uses
from .linalg import tensor_key

EvalRule = Callable[[Node, list], Sequence[torch.Tensor] | torch.Tensor]
EVAL_RULES: dict[OpKey, EvalRule] = {}
"""``rule(node, inputs) -> tensor(s)`` per op; filled only through op definitions."""


def constant_like(v: Value, like: torch.Tensor) -> torch.Tensor:
    """Constant ``v`` in the dtype (floating constants only) and device of ``like``.

    The converted copy is cached in ``v.meta`` keyed by dtype, device and the tensor's
    identity and version, so float64 runs do not convert every weight on every call;
    constants that require gradients are converted afresh (the conversion is differentiable).
    """
    c = v.const
    dtype = like.dtype if c.is_floating_point() else c.dtype
    if c.dtype == dtype and c.device == like.device:
        return c
    if c.requires_grad:
        return c.to(device=like.device, dtype=dtype)
    key = (dtype, like.device, tensor_key(c))
    cached = v.meta.get("_cast")
    if cached is None or cached[0] != key:
        cached = (key, c.to(device=like.device, dtype=dtype))
        v.meta["_cast"] = cached
    return cached[1]


def node_args(node: Node, env: dict[Value, torch.Tensor] | None, like: torch.Tensor) -> list:
    """The node's inputs: constants cast like ``like``, variables from ``env`` (None without env)."""
    out = []
    for v in node.inputs:
        if v is None:
            out.append(None)
        elif v.is_const:
            out.append(constant_like(v, like))
        else:
            out.append(env[v] if env is not None else None)
    return out


def _ensure_rules_loaded() -> None:
    from .op_registry import ensure_ops_loaded
    ensure_ops_loaded()


def missing_eval_rules(graph: Graph) -> list[Node]:
    _ensure_rules_loaded()
    return [n for n in graph.nodes if n.op not in EVAL_RULES]


def node_failed(node: Node, what: str, exc: Exception) -> DualgraphError:
    """The one error for rule code failing at ``node``: names the node, the op and the cause."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return DualgraphError(f"{what} of node '{node.name}' ({'.'.join(filter(None, node.op))}) failed: "
                          f"{type(exc).__name__}: {first}")


@contextmanager
def naming_node(node: Node, what: str = "dual layer") -> Iterator[None]:
    """Re-raise any failure of rule code as :func:`node_failed` (every walk runs rule code
    inside this or the same ``try``); a DualgraphError passes through unchanged."""
    try:
        yield
    except DualgraphError:
        raise
    except Exception as exc:  # a rule failing on real data is the user's model or input
        raise node_failed(node, what, exc) from exc


class GraphWalk:
    """The walk every interpreter over a graph shares, like ``torch.fx.Interpreter``: the
    nodes in order, an environment keyed by value, :meth:`run_node` per node (its failures
    named by :func:`naming_node`), and each value freed after its last use among the nodes.

    Subclasses define :meth:`run_node`; :meth:`store` (where the outputs go) and
    :meth:`before` (a hook that may end the walk early with a result) are optional. The
    evaluation :class:`Interpreter` and shape inference (:class:`ShapeProp`), the forward
    bounds (:class:`dualgraph.forward.ForwardBounds`) and the dual-graph runs
    (:mod:`dualgraph.dual_run`) are walks.
    """

    #: what a failing node was doing, for the error message ("evaluation of node ...")
    activity = "evaluation"

    def __init__(self, nodes: Sequence[Node], keep: Sequence[Value] = (), deadline: Deadline = NEVER) -> None:
        self.use_nodes(nodes, keep)
        self.deadline = deadline

    def use_nodes(self, nodes: Sequence[Node], keep: Sequence[Value] = ()) -> None:
        """Walk ``nodes`` (in this order); values in ``keep`` are never freed."""
        self.nodes = list(nodes)
        self.frees = last_uses(self.nodes, keep)

    def run_node(self, node: Node, env: dict) -> list:
        """The outputs of ``node`` (one per output value) from its inputs in ``env``."""
        raise NotImplementedError

    def store(self, node: Node, outs: list, env: dict) -> None:
        for v, t in zip(node.outputs, outs):
            env[v] = t

    def before(self, index: int, node: Node, env: dict):
        """Called before node ``index`` runs; a result other than None ends the walk with it."""
        return None

    def walk(self, env: dict, start: int = 0):
        """Run the nodes from ``start`` on; returns ``env``, or what :meth:`before` ended it with."""
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            self.deadline.check()
            done = self.before(i, node, env)
            if done is not None:
                return done
            try:  # naming_node, inlined: this loop is hot
                outs = self.run_node(node, env)
            except DualgraphError:
                raise
            except Exception as exc:
                raise node_failed(node, self.activity, exc) from exc
            self.store(node, outs, env)
            for v in self.frees[node]:
                env.pop(v, None)
        return env


class Interpreter(GraphWalk):
    """Evaluate ``graph`` on concrete inputs (any batch size, any device/dtype)."""

    def __init__(self, graph: Graph) -> None:
        _ensure_rules_loaded()
        missing = missing_eval_rules(graph)
        if missing:
            listing = ", ".join(f"{'.'.join(filter(None, n.op))} (node '{n.name}')" for n in missing)
            from .plugins import failed_plugins_note
            raise UnsupportedOpError(f"no evaluation rule for: {listing}; define the op with "
                                     "dualgraph.define_op(...).evaluate in a plugin package (README 'Writing a "
                                     f"dual layer'){failed_plugins_note()}")
        super().__init__(graph.nodes, keep=graph.outputs)
        self.graph = graph
        self.like: torch.Tensor | None = None  # constants are cast like the first input

    def run_node(self, node: Node, env: dict[Value, torch.Tensor], like: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
        if like is None:
            like = self.like if self.like is not None else next(iter(env.values()))
        out = EVAL_RULES[node.op](node, node_args(node, env, like))
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run on one tensor per graph input; returns one tensor per graph output."""
        if len(inputs) != len(self.graph.inputs):
            raise DualgraphError(f"model expects {len(self.graph.inputs)} input(s), got {len(inputs)}")
        env: dict[Value, torch.Tensor] = {}
        for v, x in zip(self.graph.inputs, inputs):
            if v.shape is not None and tuple(x.shape[1:]) != tuple(v.shape[1:]):
                raise DualgraphError(f"input '{v.name}' has shape {tuple(x.shape)} but the model expects "
                                     f"[batch, {', '.join(map(str, v.shape[1:]))}]")
            env[v] = x
        self.like = inputs[0] if inputs else None
        env = self.walk(env)
        return [env[v] for v in self.graph.outputs]

    __call__ = run


class ShapeProp(Interpreter):
    """Shape inference: the interpreter on ``meta`` tensors (batch 2), recording each
    value's shape and dtype. Batch 2 rather than 1 so that an op that wrongly mixes the
    batch dimension into other axes shows up as a shape that does not carry it."""

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph)
        self.frees = {n: [] for n in self.nodes}  # keep every value: all of them get shapes

    def run_node(self, node: Node, env: dict[Value, torch.Tensor], like: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
        """One node on meta tensors; an evaluation rule that fails there was given inputs whose
        shapes do not fit (a corrupt or inconsistent model): an error naming the node."""
        try:
            return super().run_node(node, env, like)
        except (RuntimeError, ValueError, IndexError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DualgraphError(f"node '{node.name}' ({node.op_type}): its inputs' shapes do not fit "
                                 f"({message}); check that the model file is complete and consistent") from None

    def store(self, node: Node, outs: list, env: dict) -> None:
        if len(outs) != len(node.outputs):
            raise DualgraphError(f"node '{node.name}' ({node.op_type}) produced {len(outs)} outputs, "
                                 f"expected {len(node.outputs)}")
        for v, t in zip(node.outputs, outs):
            if t.dim() == 0 or t.shape[0] != 2:
                raise DualgraphError(f"node '{node.name}' ({node.op_type}) does not keep the batch dimension "
                                     f"first (output shape {tuple(t.shape)} for batch 2); ops that mix "
                                     "examples of a batch are not supported")
            v.shape = (BATCH, *t.shape[1:])
            v.dtype = t.dtype
            env[v] = t

    def propagate(self, dtype: torch.dtype) -> Graph:
        env = {v: torch.empty((2, *v.shape[1:]), device="meta", dtype=dtype) for v in self.graph.inputs}
        self.like = next(iter(env.values()))
        self.walk(env)
        return self.graph


def run_graph(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Convenience: ``Interpreter(graph).run(*inputs)``."""
    return Interpreter(graph).run(*inputs)


def infer_shapes(graph: Graph, dtype: torch.dtype = torch.float32) -> Graph:
    """Fill ``shape`` (and ``dtype``) of every value by running the graph on ``meta`` tensors."""
    return ShapeProp(graph).propagate(dtype)
