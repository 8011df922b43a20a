"""passes.identity: Identity / inference Dropout nodes disappear; numbers unchanged."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph
from dualgraph.frontends.fx import load_module
from dualgraph.passes import identity
from passes_testing import check_pass, ops


def test_fx_dropout_and_identity_removed():
    net = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.3), nn.ReLU(), nn.Identity(), nn.Linear(6, 2)).double()
    g = load_module(net, torch.randn(3, 5, dtype=torch.float64))
    assert "Identity" in ops(g)
    g = check_pass(identity.run, g)
    assert ops(g) == ["Gemm", "Relu", "Gemm"]


def _chain(op: str, *, as_output: bool, extra_inputs=(), n_outputs: int = 1, attrs=None) -> Graph:
    g = Graph("id")
    x = g.add_input("x", (4,))
    r = g.add_node("Relu", [x], name="r")
    node = g.add_node(op, [r.output, *extra_inputs(g)] if callable(extra_inputs) else [r.output],
                      attrs, name="ident", n_outputs=n_outputs)
    y = node.outputs[0]
    g.outputs = [y] if as_output else [g.add_node("Neg", [y], name="out").output]
    infer_shapes(g)
    return g


def test_identity_as_graph_output_keeps_output_name():
    g = check_pass(identity.run, _chain("Identity", as_output=True))
    assert ops(g) == ["Relu"] and g.outputs[0].name == "ident"


def test_identity_of_graph_input_as_output_is_kept():
    g = Graph("io")
    x = g.add_input("x", (3,))
    g.outputs = [g.add_node("Identity", [x]).output]
    infer_shapes(g)
    check_pass(identity.run, g, modified=False)


def test_dropout_mask_used_is_kept():
    g = _chain("Dropout", as_output=False, n_outputs=2)
    mask = g.nodes[1].outputs[1]
    g.outputs.append(mask)
    check_pass(identity.run, g, modified=False)


def test_dropout_in_training_mode_is_kept():
    def ratio_and_training(g: Graph) -> list:
        return [g.add_const("ratio", torch.tensor(0.5)), g.add_const("train", torch.tensor(True))]

    g = _chain("Dropout", as_output=False, extra_inputs=ratio_and_training)
    assert identity.run(g).modified is False


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["Identity", "Dropout", "Relu", "Neg"]), min_size=1, max_size=8),
       st.booleans())
def test_random_chains(chain, fan_out):
    g = Graph("h")
    v = g.add_input("x", (3,))
    outs = []
    for op in chain:
        v = g.add_node(op, [v]).output
        if fan_out:
            outs.append(v)
    g.outputs = outs or [v]
    infer_shapes(g)
    g = check_pass(identity.run, g, modified=None)
    left = [op for op in ops(g) if op in ("Identity", "Dropout")]
    if fan_out:  # every value is an output: an identity is kept so the outputs stay distinct
        assert len(g.nodes) == len(chain)
    elif all(op in ("Identity", "Dropout") for op in chain):
        assert len(left) == 1  # output = input: one node must remain to produce the output
    else:  # Relu right after Relu (once the identities are gone) is an identity too
        kept = [op for op in chain if op in ("Relu", "Neg")]
        kept = [op for i, op in enumerate(kept) if not (op == "Relu" and i and kept[i - 1] == "Relu")]
        assert not left and len(g.nodes) == len(kept)


def test_relu_of_a_relu_output_is_identity():
    """relu(relu(x)) = relu(x): the paper's CIFAR ResNet flattens a block output (a ReLU
    output) and applies ReLU again; its input needs no bounds."""
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Flatten(), nn.ReLU(), nn.Linear(6, 2)).double()
    g = load_module(net, torch.randn(3, 5, dtype=torch.float64))
    assert ops(g).count("Relu") == 2
    g = check_pass(identity.run, g)
    assert ops(g).count("Relu") == 1
