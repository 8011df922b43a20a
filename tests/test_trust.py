"""Trust, but verify (:mod:`dualgraph.trust`): the first use of a dual layer from outside
dualgraph is checked on points inside the bounds it was given.

The audit's case: y = swish(x) + swish(-x) = x tanh(x / 2) on [-4, 4], relaxed by the chord
used as both lines, was "bounded" to [3.856, 3.856] while it reaches 0 at x = 0.
"""

from __future__ import annotations

import pytest
import torch

from dualgraph import DualRule, DualStep, Relaxation, define_op, var
from dualgraph.dual_registry import DUAL_RULES
from dualgraph.errors import DualgraphError
from dualgraph.input_sets import Box
from dualgraph.ir import Graph
from dualgraph.interpreter import infer_shapes
from dualgraph.op_registry import remove_op
from dualgraph.scheduler import BoundConfig, BoundScheduler

DOMAIN = "tests.trust"


def sym_swish(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(z) + (-z) * torch.sigmoid(-z)


def chord_twice(node, bounds, config) -> Relaxation:
    l, u = bounds
    a = (sym_swish(u) - sym_swish(l)) / (u - l).clamp(min=1e-12)
    b = sym_swish(l) - a * l
    return Relaxation(a, b, a, b)


def sound(node, bounds, config) -> Relaxation:
    """f = z tanh(z/2) is convex and >= 0: the constant 0 below, the chord above (not linear)."""
    l, u = bounds
    a = (sym_swish(u) - sym_swish(l)) / (u - l).clamp(min=1e-12)
    return Relaxation(torch.zeros_like(l), 0.0, a, sym_swish(l) - a * l + 1e-9)


@pytest.fixture
def swish_op():
    op = define_op("SymSwish", domain=DOMAIN)
    op.evaluate(lambda node, inputs: sym_swish(inputs[0]))
    op.example(var(3))
    try:
        yield op
    finally:
        remove_op(op.key)


def scalar_net(op_key) -> Graph:
    g = Graph("audit")
    x = g.add_input("x", (1,), torch.float64)
    y = g.add_node(op_key, [x], name="the_plugin_node").output
    w = g.add_const("w", torch.ones(1, 1, dtype=torch.float64))
    g.outputs = [g.add_node("Gemm", [y, w], {"transB": 1}, name="out").output]
    infer_shapes(g, torch.float64)
    return g


def bound(graph: Graph, config: BoundConfig = BoundConfig()) -> torch.Tensor:
    box = Box(torch.full((1, 1), -4.0, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64))
    spec = torch.ones(1, 1, 1, dtype=torch.float64)
    return BoundScheduler(graph, config).bound_output(box, spec)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_the_audits_false_certificate_is_stopped_on_first_use(swish_op, direction):
    swish_op.relaxation(linear_if=lambda config: True)(chord_twice)
    graph = scalar_net(swish_op.key)
    with pytest.raises(DualgraphError) as info:
        bound(graph, BoundConfig(direction=direction))
    message = str(info.value)
    assert f"module {__name__}, op {DOMAIN}.SymSwish" in message and "'the_plugin_node'" in message
    assert "at z = " in message and "[l, u] = [-4, 4]" in message and "lower line gives 3.856" in message


def test_without_the_check_the_bound_would_be_false(swish_op):
    """What the check prevents: the raw chord-twice bound is above f(0) = 0, a reachable value."""
    swish_op.relaxation(linear_if=lambda config: True)(chord_twice)
    DUAL_RULES[swish_op.key].trust_source = None  # as if the check had been skipped
    lower = float(bound(scalar_net(swish_op.key), BoundConfig(rounding_allowance=False)))
    assert lower == pytest.approx(4 * torch.tanh(torch.tensor(2.0)).item(), rel=1e-6) and lower > 0.0


def test_a_sound_plugin_relaxation_is_checked_once_and_then_trusted(swish_op):
    swish_op.relaxation()(sound)
    rule = DUAL_RULES[swish_op.key]
    assert rule.trust_source == f"module {__name__}, op {DOMAIN}.SymSwish"
    lower = float(bound(scalar_net(swish_op.key)))
    assert lower <= 0.0 and rule.trust_source is None  # sound (f(0) = 0), and verified


def test_builtin_rules_are_not_rechecked():
    assert all(rule.trust_source is None for key, rule in DUAL_RULES.items() if key[0] == "")


def test_an_unsound_plugin_dual_layer_is_stopped_on_its_first_backward_step():
    """A DualRule subclass (not a relaxation) claiming lam relu(z) >= -lam z, false for z < 0."""
    class ReluAsIdentity(DualRule):
        needs_bounds = True

        def backward(self, node, lam, bounds, config):
            return DualStep([-lam], 0.0, None)

        def abs_linear(self, node, xs, bounds, config):  # what the rounding allowance needs
            return [xs[0]]

        def eval_length(self, node, bounds, config):
            return 0

        def dual_length(self, node, bounds, config):
            return 1

    op = define_op("BadRelu", domain=DOMAIN)
    op.evaluate(lambda node, inputs: torch.relu(inputs[0]))
    op.dual(ReluAsIdentity)
    try:
        graph = scalar_net(op.key)
        with pytest.raises(DualgraphError, match=r"dual layer of module .*BadRelu is unsound at node "
                                                 r"'the_plugin_node': inequality \(1\)"):
            bound(graph)
    finally:
        remove_op(op.key)
