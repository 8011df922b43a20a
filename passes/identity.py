"""Identity elimination: drop ``Identity`` and inference-mode ``Dropout`` nodes.

Math: ``y = Identity(x)`` and ``y = Dropout(x)`` at inference (``training_mode`` omitted
or constant false) satisfy ``y = x``, so every use of ``y`` can read ``x`` directly.
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


def _is_identity(node: Node) -> bool:
    if node.op == ("", "Identity"):
        return True
    if node.op != ("", "Dropout"):
        return False
    mask_used = any(m.users for m in node.outputs[1:])
    training = node.inputs[2] if len(node.inputs) > 2 else None
    inference = training is None or (training.is_const and not bool(training.const.item()))
    return inference and not mask_used and not node.attrs.get("training_mode", 0)
