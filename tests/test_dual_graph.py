"""The dual-graph pass: structure (reversed edges, one dual node per primal node, Sum at
fan-outs, an InputSet node) and numbers (at eps = 0 every ReLU is stable, so running the
dual graph gives exactly ``c^T f(x)``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dualgraph.api import load_model
from dualgraph.input_sets import linf_ball
from dualgraph.scheduler import BoundConfig, BoundScheduler
from dualgraph.dual_graph import DUAL_DOMAIN, STRUCTURE_DOMAIN, build_dual


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.out = nn.Linear(2 * width, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        r = h + self.b(torch.relu(self.a(h)))        # h fans out to the residual Add and to self.a
        return self.out(torch.cat([r, h], dim=1))    # ... and to the concatenation


def _graph(width: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = Residual(width).double()
    return model, load_model(model, torch.randn(2, 4, dtype=torch.float64), simplify=False)


def test_structure_reverses_edges_and_sums_fan_out():
    _, graph = _graph()
    dual = build_dual(graph)
    primal_nodes = graph.ancestors(graph.outputs[0])
    duals = [n for n in dual.nodes if n.op_type not in ("Sum", "InputSet")]
    assert {n.meta["primal"].name for n in duals} == {n.name for n in primal_nodes}
    assert all(n.op[0] == (STRUCTURE_DOMAIN if n.op_type in ("Sum", "InputSet") else DUAL_DOMAIN)
               for n in dual.nodes)
    # reversed order: a dual node runs after the duals of all consumers of its outputs
    position = {n.meta["primal"]: i for i, n in enumerate(duals)}
    for n in primal_nodes:
        for v in n.outputs:
            for user in v.users:
                if user in position:
                    assert position[user] < position[n]
    # every primal value used more than once gets exactly one Sum node
    fan_out = {v.name for n in primal_nodes for v in n.var_inputs
               if sum(1 for u in v.users for w in u.inputs if w is v) > 1}
    sums = {n.name.removeprefix("sum:") for n in dual.nodes if n.op_type == "Sum"}
    assert fan_out and sums == fan_out
    assert dual.nodes[-1].op_type == "InputSet" and dual.outputs == [dual.nodes[-1].output]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(width=st.integers(1, 6), seed=st.integers(0, 1000))
def test_zero_radius_gives_the_network_value(width, seed):
    model, graph = _graph(width, seed)
    x = torch.randn(3, 4, dtype=torch.float64)
    spec = torch.randn(1, 4, 3, dtype=torch.float64)
    sched = BoundScheduler(graph, BoundConfig())
    lower = sched.bound_output(linf_ball(x, 0.0), spec)
    expected = torch.einsum("mk,bk->bm", spec[0], model(x))
    assert torch.allclose(lower, expected, atol=1e-10)


@pytest.fixture
def ops_named_like_structure():
    """Plugin ops called ``Sum`` and ``InputSet`` (y = a + b, an affine map with the generic adjoint)."""
    from dualgraph import AffineRule, define_op
    from dualgraph.op_registry import remove_op
    domain = "test.structure_names"
    for op in ("Sum", "InputSet"):
        definition = define_op(op, domain=domain)
        definition.evaluate(lambda node, inputs: inputs[0] + inputs[1])
        definition.dual(AffineRule)
    yield domain
    for op in ("Sum", "InputSet"):
        remove_op((domain, op))


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_a_primal_op_named_like_a_structural_node_is_its_own_dual_layer(ops_named_like_structure, direction):
    """A plugin op called Sum or InputSet is dualised by its own rule: structural nodes have
    their own domain (it was a bare KeyError, or a fan-out sum in its place)."""
    from dualgraph.input_sets import linf_ball
    from dualgraph.interpreter import infer_shapes, run_graph
    from dualgraph.ir import Graph
    from dualgraph.scheduler import BoundConfig, BoundScheduler
    g = Graph("g")
    x = g.add_input("x", (3,), torch.float64)
    r = g.add_node("Relu", [x]).output
    s = g.add_node((ops_named_like_structure, "Sum"), [x, r]).output
    t = g.add_node((ops_named_like_structure, "InputSet"), [s, s]).output
    w = g.add_const("w", torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 1.0]], dtype=torch.float64))
    g.outputs = [g.add_node("Gemm", [t, w], {"transB": 1}).output]
    infer_shapes(g, torch.float64)
    xs = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0]], dtype=torch.float64)
    box = linf_ball(xs, 0.3)
    spec = torch.eye(2, dtype=torch.float64)[None]
    J = BoundScheduler(g, BoundConfig(direction=direction, rounding_allowance=False)).bound_output(box, spec)
    pts = box.sample(2000, torch.Generator().manual_seed(0))
    ys = run_graph(g, pts.reshape(-1, 3))[0].reshape(2000, 2, 2)
    assert (ys >= J.unsqueeze(0) - 1e-12).all()
    assert (ys.amin(0) - J).max() < 2.0  # a bound, not a vacuous one
