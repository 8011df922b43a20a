"""passes.dead_nodes: nodes no output depends on are removed; numbers unchanged."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph
from dualgraph.passes import dead_nodes
from passes_testing import check_pass, ops


def test_dead_branch_and_its_constants_removed():
    g = Graph("d")
    x = g.add_input("x", (4,))
    unused_input = g.add_input("unused", (2,))
    r = g.add_node("Relu", [x], name="r")
    dead1 = g.add_node("Mul", [r.output, g.add_const("w_dead", torch.full((4,), 2.0))], name="dead1")
    g.add_node("Neg", [dead1.output], name="dead2")
    g.outputs = [g.add_node("Neg", [r.output], name="y").output]
    infer_shapes(g)
    g = check_pass(dead_nodes.run, g)
    assert ops(g) == ["Relu", "Neg"]
    assert "w_dead" not in g.values and "dead1" not in g.values
    assert g.inputs[1] is unused_input  # the interface stays


def test_nothing_dead():
    g = Graph("n")
    x = g.add_input("x", (3,))
    g.outputs = [g.add_node("Relu", [x]).output]
    infer_shapes(g)
    check_pass(dead_nodes.run, g, modified=False)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_dags_keep_exactly_the_ancestors_of_the_outputs(data):
    n = data.draw(st.integers(1, 12))
    g = Graph("h")
    values = [g.add_input("x", (3,))]
    for i in range(n):
        if data.draw(st.booleans(), label=f"binary{i}") and len(values) > 1:
            a, b = data.draw(st.lists(st.sampled_from(values), min_size=2, max_size=2), label=f"args{i}")
            values.append(g.add_node("Add", [a, b]).output)
        else:
            a = data.draw(st.sampled_from(values), label=f"arg{i}")
            values.append(g.add_node(data.draw(st.sampled_from(["Relu", "Neg", "Tanh"])), [a]).output)
    outs = data.draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3, unique=True), label="outs")
    g.outputs = outs
    infer_shapes(g)
    live = {node for v in outs for node in g.ancestors(v)}
    g = check_pass(dead_nodes.run, g, modified=len(live) < n)
    assert set(g.nodes) == live
