"""Whether a dual layer is linear is decided in one place (``DualRule.linear``), the safe
answer is the default, and every bound path (backward, forward, pruned, patches, random
projections) goes through that decision and names the node when rule code fails.

The audit's case: a plugin relaxation written as the README suggests (a tangent below, the
chord above: different slopes) with linearity left undeclared got an unsound forward bound
(1.20 where the function reaches 1.31) and a raw TypeError backward.
"""

from __future__ import annotations

import pytest
import torch

from dualgraph import define_op
from dualgraph.dual_registry import Bounds, Relaxation
from dualgraph.errors import DualgraphError
from dualgraph.input_sets import Box
from dualgraph.interpreter import Interpreter, infer_shapes
from dualgraph.op_registry import remove_op
from dualgraph.ir import Graph
from dualgraph.scheduler import BoundConfig, BoundScheduler

DOMAIN = "tests.linearity"


def tangent_and_chord(node, b: Bounds, config) -> Relaxation:
    """exp on [l, u]: the tangent at the midpoint below, the chord above (convex)."""
    l, u = b
    m = (l + u) / 2
    width = (u - l).clamp(min=1e-12)
    chord = (torch.exp(u) - torch.exp(l)) / width
    return Relaxation(torch.exp(m), torch.exp(m) * (1 - m), chord, torch.exp(l) - chord * l)


@pytest.fixture
def exp_op():
    """A plugin ``Exp`` in a test domain; yields a function (re)registering its relaxation."""
    exp = define_op("Exp", domain=DOMAIN)
    exp.evaluate(lambda node, inputs: torch.exp(inputs[0]))

    def register(relax=tangent_and_chord, **kw):
        exp.relaxation(**kw)(relax)
    register()
    try:
        yield register
    finally:
        remove_op(exp.key)


def exp_net() -> Graph:
    """``y = W3 relu(W2 exp(W1 x + b1))``, x in R^3, 4 and 3 hidden units, 2 outputs (float64):
    the ReLU's bounds are computed through the plugin's dual layer."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("exp_net")
    x = g.add_input("x", (3,), torch.float64)
    w1 = g.add_const("w1", torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.7)
    b1 = g.add_const("b1", torch.randn(4, generator=gen, dtype=torch.float64) * 0.3)
    w2 = g.add_const("w2", torch.randn(3, 4, generator=gen, dtype=torch.float64))
    b2 = g.add_const("b2", torch.tensor([-2.0, 1.0, 0.0], dtype=torch.float64))
    w3 = g.add_const("w3", torch.randn(2, 3, generator=gen, dtype=torch.float64))
    h = g.add_node("Gemm", [x, w1, b1], {"transB": 1}, name="fc1").output
    e = g.add_node((DOMAIN, "Exp"), [h], name="exp").output
    z = g.add_node("Gemm", [e, w2, b2], {"transB": 1}, name="fc2").output
    r = g.add_node("Relu", [z], name="relu").output
    y = g.add_node("Gemm", [r, w3], {"transB": 1}, name="fc3").output
    g.outputs = [y]
    infer_shapes(g)
    return g


def box() -> Box:
    c = torch.tensor([[0.2, -0.1, 0.4]], dtype=torch.float64)
    return Box(c - 0.5, c + 0.5)


def sampled_minimum(graph: Graph, spec: torch.Tensor) -> torch.Tensor:
    pts = box().sample(4000, torch.Generator().manual_seed(1))[:, 0]
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 3)
    pts = torch.cat([pts, box().lo + corners * (box().hi - box().lo)])
    y = Interpreter(graph).run(pts)[0]
    return (y @ spec[0].T).amin(0)


@pytest.mark.parametrize("direction", ["auto", "backward"])
def test_undeclared_linearity_is_the_safe_default(exp_op, direction):
    graph = exp_net()
    spec = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
    sched = BoundScheduler(graph, BoundConfig(direction=direction))
    assert not sched.uses_forward  # the relaxation is not linear: the forward direction is not taken
    J = sched.bound_output(box(), spec)
    assert (J[0] <= sampled_minimum(graph, spec) + 1e-9).all()


def test_forward_direction_refuses_a_non_linear_rule(exp_op):
    sched = BoundScheduler(exp_net(), BoundConfig(direction="forward"))
    with pytest.raises(DualgraphError, match="needs linear dual layers"):
        sched.intermediate_bounds(box())


def test_projections_refuse_a_non_linear_rule(exp_op):
    sched = BoundScheduler(exp_net(), BoundConfig(proj=5, proj_seed=0))
    with pytest.raises(DualgraphError, match=r"'exp' \(Exp\)"):
        sched.intermediate_bounds(box())


@pytest.mark.parametrize("config", [BoundConfig(direction="backward"), BoundConfig(direction="forward"),
                                    BoundConfig(direction="backward", prune_stable=False),
                                    BoundConfig(proj=5, proj_seed=0)], ids=["backward", "forward", "unpruned", "proj"])
def test_a_false_linearity_claim_is_an_error_naming_op_and_node(exp_op, config):
    exp_op(linear_if=lambda cfg: True)
    sched = BoundScheduler(exp_net(), config)
    spec = torch.eye(2, dtype=torch.float64)[None]
    with pytest.raises(DualgraphError, match=r"node 'exp' \(tests\.linearity\.Exp\) is declared linear"):
        sched.bound_output(box(), spec)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_a_failing_relaxation_names_the_node_on_every_path(exp_op, direction):
    def broken(node, b, config):
        raise ZeroDivisionError("boom")

    exp_op(broken, linear_if=lambda cfg: True)
    sched = BoundScheduler(exp_net(), BoundConfig(direction=direction))
    with pytest.raises(DualgraphError, match=r"relaxation of node 'exp' \(tests\.linearity\.Exp\) failed: "
                                             r"ZeroDivisionError: boom"):
        sched.bound_output(box(), torch.eye(2, dtype=torch.float64)[None])


def test_equal_slopes_need_not_be_the_same_tensor(exp_op):
    """A linear rule may return two equal tensors (not only ``a_up is a_lo``)."""
    def chord_pair(node, b, config):
        r = tangent_and_chord(node, b, config)
        l, u = b
        lo = torch.minimum(torch.exp(l) - r.a_up * l, torch.exp(u) - r.a_up * u)  # chord through the lower end...
        m = torch.log(r.a_up.clamp(min=1e-300))                                     # ...and the tangent point
        lo = torch.minimum(lo, torch.exp(m.clamp(l, u)) - r.a_up * m.clamp(l, u))
        return Relaxation(r.a_up.clone(), lo, r.a_up.clone(), r.b_up)

    exp_op(chord_pair, linear_if=lambda cfg: True)
    graph = exp_net()
    spec = torch.eye(2, dtype=torch.float64)[None]
    for direction in ("backward", "forward"):
        J = BoundScheduler(graph, BoundConfig(direction=direction)).bound_output(box(), spec)
        assert (J[0] <= sampled_minimum(graph, spec) + 1e-9).all()
