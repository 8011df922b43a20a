"""The default simplification pipeline: every graph -> graph pass, to a fixed point.

Order within one round, and why:

1. ``constant_fold`` first: all-constant nodes (weight transposes, shape arithmetic) would
   otherwise look like variable nodes to the other passes, and shape inference cannot
   give them the batch dimension;
2. ``identity`` removes Identity / Dropout, which would hide a Conv -> BN or
   Normalize -> Conv pattern behind an extra node;
3. ``fold_batchnorm`` then ``fold_normalization`` fold affine ops into linear ones;
4. ``dead_nodes`` drops what the rewrites left unreachable.

Shapes are re-inferred after each pass that changed the graph (the folding passes read
them), and the round is repeated until no pass changes anything. Every pass preserves
the function the graph computes, so ``simplify`` does too; running it twice is a no-op.
"""

from __future__ import annotations

from typing import Callable

from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph, verify

from . import constant_fold, dead_nodes, fold_batchnorm, fold_normalization, identity
from .base import PassResult

PASSES: list[tuple[str, Callable[[Graph], PassResult]]] = [
    ("constant_fold", constant_fold.run),
    ("identity", identity.run),
    ("fold_batchnorm", fold_batchnorm.run),
    ("fold_normalization", fold_normalization.run),
    ("dead_nodes", dead_nodes.run),
]

MAX_ROUNDS = 50  # each round that changes something removes or rewrites a node; far above real needs


def simplify(graph: Graph) -> Graph:
    """Run all passes to a fixed point, then re-infer shapes and verify the graph.

    The graph is modified in place and returned. ``graph.meta["simplify"]`` records the
    names of the passes that changed it, in the order they did.
    """
    log: list[str] = []
    shapes_ok = False  # the folding passes read shapes; constant_fold does not
    for _ in range(MAX_ROUNDS):
        changed = False
        for name, pass_fn in PASSES:
            if not shapes_ok and name != "constant_fold":
                infer_shapes(graph)
                shapes_ok = True
            result = pass_fn(graph)
            graph = result.graph
            if result.modified:
                log.append(name)
                changed, shapes_ok = True, False
        if not changed:
            break
    else:  # a pass that never settles is a bug, not a problem with the user's model
        raise RuntimeError(f"simplifying graph '{graph.name}' did not reach a fixed point after "
                           f"{MAX_ROUNDS} rounds; last passes applied: {', '.join(log[-10:])}")
    graph.toposort()
    infer_shapes(graph)
    verify(graph)
    graph.meta["simplify"] = log
    return graph


def run(graph: Graph) -> PassResult:
    """:func:`simplify` as a pass: ``modified`` tells whether any pass changed the graph."""
    graph = simplify(graph)
    return PassResult(graph, bool(graph.meta["simplify"]))
