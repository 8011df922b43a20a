"""The default simplification pipeline: every graph -> graph pass, to a fixed point.

Order within one round, and why:

1. ``constant_fold`` first: all-constant nodes (weight transposes, shape arithmetic) would
   otherwise look like variable nodes to the other passes, and shape inference cannot
   give them the batch dimension;
2. ``identity`` removes Identity / Dropout, which would hide a Conv -> BN or
   Normalize -> Conv pattern behind an extra node;
3. ``fuse_layer_norm`` puts a layer norm written out as ops back into one node (bounded op by
   op, its square root could not be);
4. ``fold_batchnorm`` then ``fold_normalization`` fold affine ops into linear ones;
5. ``dead_nodes`` drops what the rewrites left unreachable.

Shapes are re-inferred before each pass that declares ``NEEDS_SHAPES`` once an earlier
pass changed the graph, and the round is repeated until no pass changes anything. Every
pass preserves the function the graph computes, so ``simplify`` does too; running it
twice is a no-op.
"""

from __future__ import annotations

from dualgraph.errors import DualgraphError, InternalError
from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph, check_graph

from . import constant_fold, dead_nodes, fold_batchnorm, fold_normalization, fuse_layer_norm, identity
from .base import Pass, PassResult

PASSES: list[Pass] = [Pass.of(m) for m in (constant_fold, identity, fuse_layer_norm, fold_batchnorm, fold_normalization,
                                           dead_nodes)]

MAX_ROUNDS = 50  # each round that changes something removes or rewrites a node; far above real needs


def simplify(graph: Graph, verify_each: bool = False) -> Graph:
    """Run all passes to a fixed point, then re-infer shapes and verify the graph.

    The graph is modified in place and returned. ``graph.meta["simplify"]`` records the
    names of the passes that changed it, in the order they did. A pass that fails is named
    in the error with the passes applied before it; ``verify_each`` checks the IR after
    every pass that changed it (for debugging a pass).
    """
    log: list[str] = []
    shapes_ok = False
    for _ in range(MAX_ROUNDS):
        changed = False
        for p in PASSES:
            if p.needs_shapes and not shapes_ok:
                infer_shapes(graph)
                shapes_ok = True
            graph, modified = _run_pass(p, graph, log, verify_each)
            if modified:
                log.append(p.name)
                changed, shapes_ok = True, False
        if not changed:
            break
    else:  # a pass that never settles is a bug, not a problem with the user's model
        raise InternalError(f"simplifying graph '{graph.name}' did not reach a fixed point after "
                            f"{MAX_ROUNDS} rounds; last passes applied: {', '.join(log[-10:])}")
    graph.toposort()
    infer_shapes(graph)
    check_graph(graph)
    graph.meta["simplify"] = log
    return graph


def _run_pass(p: Pass, graph: Graph, log: list[str], verify_each: bool) -> tuple[Graph, bool]:
    after = f" (after {', '.join(log[-5:])})" if log else ""
    try:
        result = p.run(graph)
    except DualgraphError as exc:  # the model's fault (e.g. a constant that cannot be folded)
        raise DualgraphError(f"pass {p.name} failed{after}: {exc}") from exc
    except Exception as exc:  # a bug in the pass: keep the traceback
        raise InternalError(f"pass {p.name} failed{after}: {type(exc).__name__}: {exc}") from exc
    if verify_each and result.modified:
        try:
            check_graph(result.graph)
        except DualgraphError as exc:  # a pass must leave a valid IR: a bug
            raise InternalError(f"pass {p.name} left an invalid graph{after}: {exc}") from exc
    return result.graph, result.modified


def run(graph: Graph) -> PassResult:
    """:func:`simplify` as a pass: ``modified`` tells whether any pass changed the graph."""
    graph = simplify(graph)
    return PassResult(graph, bool(graph.meta["simplify"]))
