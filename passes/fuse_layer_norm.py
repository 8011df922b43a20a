"""Layer normalisation written out as ops, fused back into one LayerNormalization node.

ONNX exports before opset 17 write ``nn.LayerNorm`` as::

    m = ReduceMean(x, axes), d = x - m, v = ReduceMean(d ^ 2, axes), y = d / sqrt(v + eps)

(the importer writes ``d / s`` as ``d * Reciprocal(s)``). Bounded op by op, ``sqrt(v + eps)``
would need a lower bound of the variance above ``-eps``, which bounds propagated through the
squares need not give (the Sqrt then refuses its bounds); the fused node's dual layer knows
``v >= 0`` by construction (:mod:`dualgraph.ops.normalization`). The math is unchanged:
``y = LayerNormalization(x, axis = axes[0], epsilon = eps)``, the same function. A following
scale and bias stay the Mul and Add they are. Nodes left without users are removed by
``dead_nodes``.
"""

from __future__ import annotations

from dualgraph.ir import Graph, Node, Value

from .base import PassResult

NEEDS_SHAPES = True  # the reduced axes are checked against the rank


def run(graph: Graph) -> PassResult:
    modified = False
    for node in list(graph.nodes):
        match = _match(node) if node.op == ("", "Sqrt") else None
        if match is None:
            continue
        x, axis, eps, out = match
        fused = graph.add_node("LayerNormalization", [x], {"axis": axis, "epsilon": eps},
                               name=graph.fresh_name(f"{node.name}_layer_norm"))
        graph.move_node(fused, before=out.producer)
        graph.replace_all_uses(out, fused.output)
        modified = True
    return PassResult(graph, modified)


def _only_user(v: Value) -> Node | None:
    return v.users[0] if len(v.users) == 1 else None


def _axes(node: Node, rank: int) -> list[int] | None:
    axes = node.attrs.get("axes")
    if axes is None or not node.attrs.get("keepdims", 1) or len(node.inputs) > 1:
        return None
    return sorted(int(a) % rank for a in axes)


def _match(sqrt: Node) -> tuple[Value, int, float, Value] | None:
    """``(x, axis, eps, y)`` when ``sqrt`` is the square root of a layer norm's variance + eps."""
    add = sqrt.inputs[0].producer
    if add is None or add.op != ("", "Add") or len(add.var_inputs) != 1:
        return None
    eps_value = next((v for v in add.inputs if v.is_const), None)
    if eps_value is None or eps_value.const.numel() != 1:
        return None
    var_mean = add.var_inputs[0].producer
    square = var_mean.inputs[0].producer if var_mean is not None and var_mean.op == ("", "ReduceMean") else None
    if square is None or square.op != ("", "Pow") or not square.inputs[1].is_const \
            or square.inputs[1].const.numel() != 1 or float(square.inputs[1].const.reshape(-1)[0]) != 2.0:
        return None
    d = square.inputs[0]
    sub = d.producer
    if sub is None or sub.op != ("", "Sub") or len(sub.var_inputs) != 2:
        return None
    x, mean = sub.inputs
    mean_node = mean.producer
    if mean_node is None or mean_node.op != ("", "ReduceMean") or mean_node.inputs[0] is not x:
        return None
    rank = len(x.shape)
    axes = _axes(mean_node, rank)
    if axes is None or axes != _axes(var_mean, rank) or axes != list(range(axes[0], rank)) or axes[0] == 0:
        return None
    reciprocal = _only_user(sqrt.output)
    product = _only_user(reciprocal.output) if reciprocal is not None and reciprocal.op == ("", "Reciprocal") else None
    if product is None or product.op != ("", "Mul") or set(map(id, product.inputs)) != {id(d), id(reciprocal.output)}:
        return None
    return x, axes[0], float(eps_value.const.reshape(-1)[0]), product.output
