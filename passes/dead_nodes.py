"""Dead node elimination: remove nodes that no graph output depends on.

Math: the graph computes only ``graph.outputs``; a node none of whose outputs is an
ancestor of (or equal to) a graph output contributes nothing to them, so removing it
leaves every output unchanged. Liveness is propagated backwards over the topological
order: a node is live iff one of its outputs is a graph output or an input of a live
node. Constants nobody reads any more are dropped with it. Graph inputs are kept even
when unused: they are the model's interface.
"""

from __future__ import annotations

from dualgraph.ir import Graph

from .base import PassResult


NEEDS_SHAPES = False  # works on the structure only


def run(graph: Graph) -> PassResult:
    """Remove every node whose outputs do not reach a graph output."""
    live = {id(v) for v in graph.outputs}
    dead = []
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs if v is not None)
        else:
            dead.append(node)
    # the users of a dead node are dead and come later in topological order, so walking
    # ``dead`` (reverse order) removes them first, as remove_node requires
    for node in dead:
        graph.remove_node(node)
    n_values = len(graph.values)
    graph.prune_values()
    return PassResult(graph, bool(dead) or len(graph.values) != n_values)
