"""Build the dual graph of a primal graph, as an explicit IR (Theorem 1).

The dual graph of a target value ``t`` (a pre-activation whose bounds are wanted, or the
network output) is the reverse of the primal sub-graph that ``t`` depends on, built the
way reverse-mode autodiff builds a backward graph:

* its input is ``lam:t``, the specification rows (``lam = -nu``, ``nu_k = -c``);
* one dual node ``("dualgraph.dual", "[domain.]op_type")`` per primal node, taking ``lam`` of the
  node's output and producing one ``lam`` per variable input (the dual layer ``g``; the
  objective term ``h`` is the rule's offset);
* where a primal value fans out to several consumers, their contributions are summed by
  a ``Sum`` node (cotangents are summed the same way);
* one ``InputSet`` node at the primal input, where the dual norm term is taken.

Dual values are named ``lam:<primal value>`` and have shape ``[N, M, *unit_shape]``
(``M`` specification rows). ``node.meta["primal"]`` links each dual node to its primal node.

Math: J = sum of the rules' offsets + min over the input set of lam_x . x, which is the
bound of Theorem 1 with h_i = -offset_i.
"""

from __future__ import annotations

from .dual_registry import dual_rule, missing_dual_rules, missing_rules_error
from .errors import DualgraphError, InternalError
from .ir import BATCH, Graph, Value

DUAL_DOMAIN = "dualgraph.dual"
"""Domain of the dual layer of a primal op (``(DUAL_DOMAIN, op_type)``)."""
STRUCTURE_DOMAIN = "dualgraph.dual.structure"
"""Domain of the dual graph's own nodes, which no primal op can be named like."""
FAN_OUT_SUM = (STRUCTURE_DOMAIN, "Sum")
"""Sums the contributions to a value read in several places (cotangents of a fan-out)."""
INPUT_SET = (STRUCTURE_DOMAIN, "InputSet")
"""The last node: the input set's support function, where ``J`` is completed."""
SPEC = "M"


def build_dual(graph: Graph, target: Value | None = None) -> Graph:
    """The dual graph of ``graph`` for bounds on ``target`` (default: the single output)."""
    if target is None:
        if len(graph.outputs) != 1:
            raise DualgraphError(f"graph '{graph.name}' has {len(graph.outputs)} outputs; name the target value")
        target = graph.outputs[0]
    if len(graph.inputs) != 1:
        raise DualgraphError(f"bounds need a model with exactly one input; '{graph.name}' has {len(graph.inputs)}")
    primal_nodes = graph.ancestors(target)
    missing = missing_dual_rules(_Sub(primal_nodes))
    if missing:
        raise missing_rules_error(missing)
    in_subgraph = set(primal_nodes)

    dual = Graph(f"dual[{graph.name}:{target.name}]")
    lam = dual.add_input(f"lam:{target.name}", ())
    lam.shape = (BATCH, SPEC, *target.unit_shape)
    lam.meta["primal_value"] = target  # every dual value names the primal value it multiplies
    dual.meta.update(primal=graph, target=target)

    # One dual contribution per input *slot* that reads a value inside the sub-graph: a
    # node reading ``v`` twice (``Add(v, v)``, ``Concat(v, v)``) adds two, exactly as
    # ``v.users`` lists it twice (the IR's definition of a use).
    expected = {v: _uses_in(v, in_subgraph) for n in primal_nodes for v in n.var_inputs}
    pending: dict[Value, list[Value]] = {}
    lam_of: dict[Value, Value] = {target: lam}

    def contribution(v: Value, produced: Value) -> None:
        parts = pending.setdefault(v, [])
        parts.append(produced)
        if len(parts) < expected[v]:
            return
        del pending[v]
        if len(parts) == 1:
            lam_of[v] = parts[0]
        else:
            node = dual.add_node(FAN_OUT_SUM, parts, name=f"sum:{v.name}",
                                 output_names=[f"lam:{v.name}"])
            node.output.shape = (BATCH, SPEC, *v.unit_shape)
            node.meta["primal_value"] = node.output.meta["primal_value"] = v
            lam_of[v] = node.output

    for node in reversed(primal_nodes):
        outs = [lam_of.get(v) for v in node.outputs]
        for v, out in zip(node.outputs, outs):
            if out is None and (v is target or _uses_in(v, in_subgraph)):
                raise InternalError(f"dual graph of '{target.name}': output '{v.name}' of node '{node.name}' "
                                    f"is used but received {len(pending.get(v, []))} of its "
                                    f"{expected.get(v, 1)} dual contributions")
        if all(o is None for o in outs):
            continue  # cannot happen for an ancestor of the target; kept for safety
        var_inputs = node.var_inputs
        names = [f"lam:{v.name}" if expected[v] == 1 else f"lam:{v.name}@{node.name}" for v in var_inputs]
        # the primal op's full name: a plugin's ``com.example.Relu`` is not the built-in Relu
        dnode = dual.add_node((DUAL_DOMAIN, ".".join(filter(None, node.op))), outs, {"primal": node.name},
                              name=f"dual:{node.name}", n_outputs=len(var_inputs), output_names=names)
        dnode.meta["primal"] = node
        dnode.meta["rule"] = dual_rule(node)
        for v, out in zip(var_inputs, dnode.outputs):
            out.shape = (BATCH, SPEC, *v.unit_shape)
            out.meta["primal_value"] = v
            contribution(v, out)
    if pending:
        v, parts = next(iter(pending.items()))
        raise InternalError(f"dual graph of '{target.name}': value '{v.name}' received {len(parts)} of its "
                            f"{expected[v]} dual contributions")

    x = graph.inputs[0]
    if x not in lam_of:
        raise DualgraphError(f"value '{target.name}' does not depend on the model input")
    final = dual.add_node(INPUT_SET, [lam_of[x]], {"primal": x.name},
                          name=f"input:{x.name}", output_names=[f"J:{target.name}"])
    final.output.shape = (BATCH, SPEC)
    dual.outputs = [final.output]
    return dual


def _uses_in(v: Value, nodes: set) -> int:
    """How many input slots of ``nodes`` read ``v`` (``v.users`` has one entry per slot)."""
    return sum(1 for u in v.users if u in nodes)


class _Sub:
    """A view of some nodes, enough for ``missing_dual_rules``."""

    def __init__(self, nodes):
        self.nodes = nodes
