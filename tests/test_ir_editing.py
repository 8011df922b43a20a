"""Graph editing belongs to the IR: set_input, replace_all_uses, rename, move_node keep
``Value.users`` (one entry per input slot) and ``Graph.values`` consistent."""

from __future__ import annotations

import pytest
import torch

from dualgraph.errors import DualgraphError
from dualgraph.ir import Graph, check_graph


def graph_with_a_value_used_twice():
    g = Graph("g")
    x = g.add_input("x", (4,), torch.float64)
    r = g.add_node("Relu", [x], name="r").output
    s = g.add_node("Add", [r, r], name="s").output  # r in two slots of one node
    g.outputs = [s]
    return g, x, r, s


def test_replace_all_uses_moves_every_slot():
    g, x, r, s = graph_with_a_value_used_twice()
    add = s.producer
    g.replace_all_uses(r, x)
    assert add.inputs == [x, x] and x.users.count(add) == 2 and r.users == []
    g.remove_node(r.producer)
    check_graph(g)


def test_set_input_keeps_one_user_entry_per_slot():
    g, x, r, s = graph_with_a_value_used_twice()
    add = s.producer
    g.set_input(add, 1, x)
    assert r.users == [add] and x.users.count(add) == 1 and add.inputs == [r, x]
    g.set_input(add, 3, x)  # past the end: omitted inputs in between
    assert add.inputs == [r, x, None, x] and x.users.count(add) == 2


def test_rename_refuses_a_taken_name_and_keeps_values_keyed():
    g, x, r, s = graph_with_a_value_used_twice()
    with pytest.raises(DualgraphError, match="taken"):
        g.rename(r, "x")
    g.rename(r, "relu_out")
    assert g.values["relu_out"] is r and r.name == "relu_out" and "r" not in g.values


def test_move_node_before_and_after():
    g, x, r, s = graph_with_a_value_used_twice()
    relu, add = r.producer, s.producer
    g.move_node(relu, after=add)
    assert g.nodes == [add, relu]
    with pytest.raises(DualgraphError):
        check_graph(g)
    g.move_node(relu, before=add)
    check_graph(g)
    with pytest.raises(DualgraphError, match="exactly one"):
        g.move_node(relu)
