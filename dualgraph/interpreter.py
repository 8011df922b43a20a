"""Reference interpreter: runs the IR on concrete batches with torch.

Like ``torch.fx.Interpreter``: an environment keyed by value, one ``run_node`` per node,
values freed after their last use, and errors that name the node. Per-op semantics live
in the :data:`EVAL_RULES` registry (ONNX semantics for the default domain), filled by
``@register_eval`` next to each rule in :mod:`dualgraph.eval_rules`; plugins add rules
for their own ops the same way.

Shape inference reuses the interpreter on torch's ``meta`` device, so an op needs only
its evaluation rule to get shapes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import DualgraphError, UnsupportedOpError
from .ir import BATCH, Graph, Node, OpKey, Value

EvalRule = Callable[[Node, list], Sequence[torch.Tensor] | torch.Tensor]
EVAL_RULES: dict[OpKey, EvalRule] = {}


def register_eval(op_type: str, domain: str = "") -> Callable[[EvalRule], EvalRule]:
    """Register ``rule(node, inputs) -> output tensor(s)`` for op ``(domain, op_type)``.

    ``inputs`` holds one tensor per node input (constants included, ``None`` for omitted
    optional inputs); variable tensors carry the batch dimension first.
    """
    def deco(rule: EvalRule) -> EvalRule:
        EVAL_RULES[(domain, op_type)] = rule
        return rule
    return deco


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
    key = (dtype, like.device, id(c), c._version)
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
    from . import eval_rules  # noqa: F401  (importing fills EVAL_RULES)
    from .plugins import load_plugins
    load_plugins()


def missing_eval_rules(graph: Graph) -> list[Node]:
    _ensure_rules_loaded()
    return [n for n in graph.nodes if n.op not in EVAL_RULES]


class Interpreter:
    """Evaluate ``graph`` on concrete inputs (any batch size, any device/dtype)."""

    def __init__(self, graph: Graph) -> None:
        _ensure_rules_loaded()
        missing = missing_eval_rules(graph)
        if missing:
            listing = ", ".join(f"{'.'.join(filter(None, n.op))} (node '{n.name}')" for n in missing)
            raise UnsupportedOpError(f"no evaluation rule for: {listing}; register one with "
                                     "@dualgraph.register_eval or install a dualgraph plugin")
        self.graph = graph
        self._frees = graph.last_uses()

    def run_node(self, node: Node, env: dict[Value, torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
        args = node_args(node, env, like)
        try:
            out = EVAL_RULES[node.op](node, args)
        except DualgraphError:
            raise
        except Exception as exc:  # a rule failing on real data is the user's model or input
            raise DualgraphError(f"evaluating node '{node.name}' ({node.op_type}) failed: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
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
        for node in self.graph.nodes:
            for v, t in zip(node.outputs, self.run_node(node, env, inputs[0])):
                env[v] = t
            for v in self._frees[node]:
                env.pop(v, None)
        return [env[v] for v in self.graph.outputs]

    __call__ = run


def run_graph(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Convenience: ``Interpreter(graph).run(*inputs)``."""
    return Interpreter(graph).run(*inputs)


def infer_shapes(graph: Graph, dtype: torch.dtype = torch.float32) -> Graph:
    """Fill ``shape`` of every value by running the graph on ``meta`` tensors (batch 2).

    Batch 2 rather than 1 so that an op that wrongly mixes the batch dimension into
    other axes shows up as a shape that does not carry it.
    """
    interp = Interpreter(graph)
    env: dict[Value, torch.Tensor] = {}
    for v in graph.inputs:
        env[v] = torch.empty((2, *v.shape[1:]), device="meta", dtype=dtype)
    like = next(iter(env.values()))
    for node in graph.nodes:
        outs = interp.run_node(node, env, like)
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
    return graph
