"""Constant folding: evaluate every node whose inputs are all constants.

Math: a node ``y = f(c_1, ..., c_k)`` whose inputs are all constant values computes the
same tensor for every network input, so ``y`` can be replaced by the constant ``f(c)``
(computed once, with the op's own evaluation rule from ``EVAL_RULES``). Floating-point
inputs are promoted to float64 first and the result is kept in float64, so folding never
rounds more than running the graph in float64 would (the interpreter and the dual layers
cast constants to the dtype they run in anyway).

The result is by construction what the interpreter computes for the node at run time
(same rule), so the graph's function is unchanged. Note that the rules follow the IR's
batch-first conventions (a Reshape target's entry 0, a Transpose that must keep axis 0),
which is why the frontends fold their constant subgraphs with the source semantics
first; this pass catches what passes and hand-built graphs leave behind.

Nodes are visited in topological order, so a chain of constant nodes folds in one run.
Not folded: random ops (folding would freeze one sample), nodes without an evaluation
rule, and nodes that produce a graph output (a graph output must be produced by a node).
"""

from __future__ import annotations

import torch

from dualgraph.interpreter import EVAL_RULES, missing_eval_rules, naming_node
from dualgraph.ir import Graph, Node

from .base import PassResult

NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Bernoulli", "Multinomial"})


NEEDS_SHAPES = False  # works on the structure only


def run(graph: Graph) -> PassResult:
    """Replace the outputs of all-constant nodes by constant values and drop those nodes."""
    no_rule = set(missing_eval_rules(graph))  # also loads the rules and plugins
    modified = False
    for node in list(graph.nodes):
        if node in no_rule or not _foldable(graph, node):
            continue
        args = [None if v is None else _promote(v.const) for v in node.inputs]
        with naming_node(node, "constant folding"):  # the failure the interpreter would report
            out = EVAL_RULES[node.op](node, args)
        tensors = [out] if isinstance(out, torch.Tensor) else list(out)
        consts = []
        for old, t in zip(node.outputs, tensors):
            c = graph.add_const(graph.fresh_name(f"{old.name}_const"), t.detach())
            graph.replace_all_uses(old, c)
            consts.append((c, old.name))
        graph.remove_node(node)
        for c, name in consts:  # keep the readable name the frontend gave (now free again)
            graph.rename(c, name)
        modified = True
    if modified:
        graph.prune_values()
    return PassResult(graph, modified)


def _foldable(graph: Graph, node: Node) -> bool:
    return (node.op_type not in NONDETERMINISTIC
            and all(v is None or v.is_const for v in node.inputs)
            and not any(v in graph.outputs for v in node.outputs))


def _promote(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t

