"""Identity elimination: drop ``Identity``, inference-mode ``Dropout`` and ``Relu`` of a ReLU output.

Math: ``y = Identity(x)``, ``y = Dropout(x)`` at inference (``training_mode`` omitted or
constant false) and ``y = Relu(x)`` with ``x = Relu(w) >= 0`` (or a rearrangement of it) (bit for bit: ``max(x, 0)``
of a non-negative float is the float) satisfy ``y = x``, so every use of ``y`` can read
``x`` directly. The last one matters for bounds: the second ReLU's input would otherwise
be bounded like any activation input (a whole dual pass per unit, for nothing).
A Dropout whose ``mask`` output is used is kept (the mask is a second, different value).

When ``y`` is a graph output, ``x`` takes over the name ``y`` so the model's output
names survive; the node is kept when ``x`` is itself a graph input, constant or output
(the graph would otherwise lose a distinct output value).
"""

from __future__ import annotations

from dualgraph.ir import Graph, Node

from .base import PassResult


NEEDS_SHAPES = False  # works on the structure only


def run(graph: Graph) -> PassResult:
    """Rewire the users of every identity node to its input and remove the node."""
    modified = False
    for node in list(graph.nodes):
        if not _is_identity(node) or any(m in graph.outputs for m in node.outputs[1:]):
            continue
        x, y = node.inputs[0], node.outputs[0]
        is_output = y in graph.outputs
        if is_output and (x.producer is None or x in graph.outputs):
            continue
        graph.replace_all_uses(y, x)
        graph.remove_node(node)
        if is_output:
            graph.rename(x, y.name)
        modified = True
    return PassResult(graph, modified)


REARRANGING = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity"}
"""Ops that only move entries around (a value of non-negative entries stays non-negative)."""


def _non_negative(v) -> bool:
    """Whether every entry of ``v`` is a ReLU output (possibly rearranged)."""
    node = v.producer
    while node is not None and node.op[0] == "" and node.op_type in REARRANGING:
        node = node.inputs[0].producer
    return node is not None and node.op == ("", "Relu")


def _is_identity(node: Node) -> bool:
    if node.op == ("", "Identity"):
        return True
    if node.op == ("", "Relu"):
        return _non_negative(node.inputs[0])
    if node.op != ("", "Dropout"):
        return False
    mask_used = any(m.users for m in node.outputs[1:])
    training = node.inputs[2] if len(node.inputs) > 2 else None
    inference = training is None or (training.is_const and not bool(training.const.item()))
    return inference and not mask_used and not node.attrs.get("training_mode", 0)
