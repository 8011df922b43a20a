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
from dualgraph.trust import needs_check
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
    """``0 <= f = z tanh(z/2) <= |z|``: the constant 0 below, the chord of the convex ``|z|``
    above (not linear). (The chord of ``f`` itself is not an upper line: ``f`` is convex only
    for ``|z|`` below about 2.4, and on ``[19.1, 21.3]`` ``f`` rises ``4e-8`` above its chord.)"""
    l, u = bounds
    a = (u.abs() - l.abs()) / (u - l).clamp(min=1e-12)
    return Relaxation(torch.zeros_like(l), 0.0, a, l.abs() - a * l + 1e-9)


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


def test_a_sound_plugin_relaxation_is_checked_once_per_node_and_then_trusted(swish_op):
    swish_op.relaxation()(sound)
    rule = DUAL_RULES[swish_op.key]
    assert rule.trust_source == f"module {__name__}, op {DOMAIN}.SymSwish"
    graph = scalar_net(swish_op.key)
    node = graph.nodes[0]
    assert needs_check(rule, node)
    lower = float(bound(graph))
    assert lower <= 1e-9 and not needs_check(rule, node)  # sound (f(0) = 0), and verified at this node
    assert needs_check(rule, scalar_net(swish_op.key).nodes[0])  # another node is checked on its own


def test_a_relaxation_wrong_only_on_wide_intervals_is_caught_at_the_node_that_sees_them(swish_op):
    """Two nodes of the op: the first sees narrow bounds (where the chord twice is within the
    tolerance), the second wide ones; the check runs at each node's first use."""
    def chord_twice_unless_narrow(node, bounds, config):
        l, u = bounds
        if bool(((u - l) < 1e-3).all()):
            return sound(node, bounds, config)
        return chord_twice(node, bounds, config)

    swish_op.relaxation()(chord_twice_unless_narrow)
    g = Graph("two")
    x = g.add_input("x", (1,), torch.float64)
    narrow = g.add_node("Mul", [x, g.add_const("tiny", torch.tensor([1e-5], dtype=torch.float64))]).output
    a = g.add_node(swish_op.key, [narrow], name="first").output
    wide = g.add_node("Add", [x, a]).output
    b = g.add_node(swish_op.key, [wide], name="second").output
    g.outputs = [g.add_node("Gemm", [b, g.add_const("w", torch.ones(1, 1, dtype=torch.float64))],
                            {"transB": 1}).output]
    infer_shapes(g, torch.float64)
    with pytest.raises(DualgraphError, match="unsound at node 'second'"):
        bound(g)


def test_a_plugin_cannot_change_a_builtin_definition_without_replacing_it():
    from dualgraph.op_registry import find_op
    relu = find_op("Relu")
    with pytest.raises(DualgraphError, match=r"op Relu is defined by built-in; module .* cannot change its rules "
                                             r"but can replace the op with define_op\('Relu', override=True\)"):
        relu.relaxation()(chord_twice)
    with pytest.raises(DualgraphError, match="defined by built-in"):
        relu.evaluate(lambda node, inputs: inputs[0])
    assert DUAL_RULES[("", "Relu")].trust_source is None


def test_a_relaxation_returning_something_else_is_a_one_line_error(swish_op):
    swish_op.relaxation()(lambda node, bounds, config: (bounds.lower, bounds.upper))
    with pytest.raises(DualgraphError, match="returned a tuple; it must return a dualgraph.Relaxation"):
        bound(scalar_net(swish_op.key))


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


def test_one_value_in_two_slots_is_sampled_once():
    """A sound rule for x * x (tangent-free: x^2 >= 0 and the chord) must pass: both slots hold
    the same point (drawing them independently would wrongly report a violation)."""
    class SquareOfOne(DualRule):
        needs_bounds = True

        def backward(self, node, lam, bounds, config):
            l, u = bounds[0]
            chord, offset = (l + u).unsqueeze(1), (-l * u).unsqueeze(1)   # x^2 <= (l + u) x - l u
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            # lam x^2 >= neg * chord-line (pos part: x^2 >= 0); split the slope over the two slots
            half = neg * chord / 2
            return DualStep([half, half], (neg * offset).flatten(2).sum(-1), None)

        def abs_linear(self, node, xs, bounds, config):
            m = torch.maximum(bounds[0].lower.abs(), bounds[0].upper.abs())
            return [xs[0] * m, xs[1] * m]

        def eval_length(self, node, bounds, config):
            return 1

        def dual_length(self, node, bounds, config):
            return 2

    op = define_op("Prod", domain=DOMAIN)
    op.evaluate(lambda node, inputs: inputs[0] * inputs[1])
    op.dual(SquareOfOne)
    try:
        g = Graph("square")
        x = g.add_input("x", (1,), torch.float64)
        y = g.add_node(op.key, [x, x], name="sq").output
        g.outputs = [g.add_node("Gemm", [y, g.add_const("w", -torch.ones(1, 1, dtype=torch.float64))],
                                {"transB": 1}).output]
        infer_shapes(g, torch.float64)
        lower = float(bound(g))          # -x^2 on [-4, 4]: at least -16
        assert lower == pytest.approx(-16.0, abs=1e-6) and lower <= -16.0 + 1e-9
    finally:
        remove_op(op.key)


def free_slopes_too_wide(node, bounds, config) -> Relaxation:
    """The sound relaxation above, its lower line offered as free with slopes in [-1, 1]:
    ``a z`` is below ``z tanh(z/2)`` only for ``a`` near 0 on [-4, 4], so the ends are not."""
    r = sound(node, bounds, config)
    units = torch.ones_like(bounds.lower, dtype=torch.bool)
    return Relaxation(r.a_lo, r.b_lo, r.a_up, r.b_up, (units, -1.0, 1.0))


def test_free_slopes_are_checked_at_both_ends_of_their_range(swish_op):
    """Optimised slopes trust the range a relaxation declares: its first use checks the
    lower line at both ends (the valid slopes of a line with a fixed offset form an interval),
    and so does ``dualgraph check-op``."""
    from dualgraph.testing import OpCheckFailure, check_op
    swish_op.relaxation()(free_slopes_too_wide)
    with pytest.raises(DualgraphError, match="free lower"):
        bound(scalar_net(swish_op.key), BoundConfig(relu_relaxation="alpha"))
    with pytest.raises(OpCheckFailure, match="free lower"):
        check_op(swish_op)


def test_a_relaxation_exact_at_an_end_of_its_interval_is_trusted():
    """A cube bounded by the constants ``l^3`` and ``u^3`` is exact at ``z = u``; the check's
    point ``l + 1 (u - l)`` rounds past ``u`` on these bounds (found by ``dualgraph check-op``
    on a test plugin), where ``z^3`` exceeds the line by more than the check's tolerance: a
    sound plugin was refused. The check's points stay in ``[l, u]``."""
    from dualgraph.dual_registry import Bounds
    from dualgraph.trust import verify_relaxation
    op = define_op("Cube", domain=DOMAIN)
    op.evaluate(lambda node, inputs: inputs[0] ** 3)
    op.example(var(1))
    try:
        op.relaxation()(lambda node, bounds, config: Relaxation(torch.zeros_like(bounds.lower), bounds.lower ** 3,
                                                                 torch.zeros_like(bounds.lower), bounds.upper ** 3))
        rule = DUAL_RULES[op.key]
        l = torch.tensor([[-1.9330556463065995]], dtype=torch.float64)
        u = torch.tensor([[0.10454332960381407]], dtype=torch.float64)
        assert float(l + (u - l)) > float(u)  # the rounding this test is about
        g = Graph("cube")
        x = g.add_input("x", (1,), torch.float64)
        g.outputs = [g.add_node(op.key, [x], name="cube").output]
        infer_shapes(g, torch.float64)
        b = Bounds(l, u)
        verify_relaxation(rule, g.nodes[0], b, rule.relaxation(g.nodes[0], b, BoundConfig()))
    finally:
        remove_op(op.key)


# ---- a fifth review's cases (plugin trust) -------------------------------------------------------

def wide_net(op_key, units: int, dtype=torch.float64, w: float = 1.0) -> Graph:
    """``w * sum_i op(x)_i`` over ``units`` inputs."""
    g = Graph("wide")
    x = g.add_input("x", (units,), dtype)
    y = g.add_node(op_key, [x], name="the_plugin_node").output
    g.outputs = [g.add_node("Gemm", [y, g.add_const("w", torch.full((1, units), w, dtype=dtype))], {"transB": 1},
                            name="out").output]
    infer_shapes(g, dtype)
    return g


class _Described(DualRule):
    """What the rounding allowance needs of a DualRule with slopes in [0, 2] at most."""

    def abs_linear(self, node, xs, bounds, config):
        return [2 * xs[0]]

    def constant_magnitude(self, node, m_in, bounds, config):
        return [torch.maximum(*(b.abs() for b in bounds[0])) if bounds else 0.0]

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return 2


def test_a_dual_layer_offset_too_high_is_caught_whatever_the_scale_of_lam():
    """``lam . z + 1e-4`` as a lower bound of ``lam . z``: an absolute floor of about 1.2e-4 in
    float32 let it through where lam is 1e-5, and certify printed a bound above a reachable value."""
    class IdentityPlusSlack(_Described):
        def backward(self, node, lam, bounds, config):
            return DualStep([lam], torch.full(lam.shape[:2], 1e-4, dtype=lam.dtype), None)

    op = define_op("Slack", domain=DOMAIN)
    op.evaluate(lambda node, inputs: inputs[0].clone())
    op.dual(IdentityPlusSlack)
    try:
        graph = wide_net(op.key, 1, torch.float32, w=1e-5)
        box = Box(torch.full((1, 1), -1.0), torch.full((1, 1), 1.0))
        with pytest.raises(DualgraphError, match="Slack is unsound"):
            BoundScheduler(graph, BoundConfig()).bound_output(box, torch.ones(1, 1, 1))
    finally:
        remove_op(op.key)


def test_a_dual_layer_s_free_slopes_are_checked_over_their_whole_range():
    """A ReLU-like DualRule declaring its lower slopes in [0, 2]: checked only at the starting
    slopes, ``alpha`` bounded ``relu(x) - 2x`` on [-1, 1] at -0.87 (the minimum is -1), and
    ``check-op`` said ok."""
    from dualgraph.dual_registry import FreeSlopes
    from dualgraph.testing import OpCheckFailure, check_op

    def lines(bounds):
        l, u = bounds
        cross = (l < 0) & (u > 0)
        a_up = torch.where(cross, u / (u - l).clamp(min=1e-12), (l >= 0).to(l.dtype))
        return cross, (l >= 0).to(l.dtype), a_up, torch.where(cross, -a_up * l, torch.zeros_like(l))

    class WideSlopes(_Described):
        needs_bounds = True

        def backward(self, node, lam, bounds, config):
            return self.backward_with_slopes(node, lam, bounds[0], config, None)

        def free_variables(self, node, bounds, config):
            cross, a_lo, _, _ = lines(bounds[0])
            values = a_lo.view(len(a_lo), 1, -1).clone()
            return {"slopes": FreeSlopes(torch.arange(values.shape[-1]), values, cross.view(len(a_lo), 1, -1),
                                         0.0, 2.0, width=values.shape[-1])}

        def backward_with_slopes(self, node, lam, bounds, config, slopes, splits=None, upper=None):
            cross, a_lo, a_up, b_up = lines(bounds)
            a = a_lo.unsqueeze(1)
            if slopes is not None:
                a = torch.where(cross.unsqueeze(1), slopes.slopes().reshape(lam.shape[0], 1, *a_lo.shape[1:]), a)
            lam_in = lam.clamp(min=0) * a + lam.clamp(max=0) * a_up.unsqueeze(1)
            return DualStep([lam_in], (lam.clamp(max=0) * b_up.unsqueeze(1)).flatten(2).sum(-1), None)

    op = define_op("WideSlopes", domain=DOMAIN)
    op.evaluate(lambda node, inputs: torch.relu(inputs[0]))
    op.dual(WideSlopes)
    op.example(var(3))
    try:
        g = Graph("net")
        x = g.add_input("x", (1,), torch.float64)
        y = g.add_node(op.key, [x], name="the_plugin_node").output
        both = g.add_node("Concat", [y, x], {"axis": 1}).output
        g.outputs = [g.add_node("Gemm", [both, g.add_const("w", torch.tensor([[1.0, -2.0]], dtype=torch.float64))],
                                {"transB": 1}).output]
        infer_shapes(g, torch.float64)
        box = Box(torch.full((1, 1), -1.0, dtype=torch.float64), torch.full((1, 1), 1.0, dtype=torch.float64))
        spec = torch.ones(1, 1, 1, dtype=torch.float64)
        assert float(BoundScheduler(g, BoundConfig(relu_relaxation="crown")).bound_output(box, spec)) <= -1
        with pytest.raises(DualgraphError, match="WideSlopes is unsound"):
            BoundScheduler(g, BoundConfig(relu_relaxation="alpha")).bound_output(box, spec)
        with pytest.raises(OpCheckFailure, match="WideSlopes is unsound"):
            check_op(op.key)
    finally:
        remove_op(op.key)


def test_every_example_of_a_batch_is_sampled(swish_op):
    """4,096 units: the check sampled the first example only, and a relaxation wrong only for
    the second one's bounds ([3, 3.5], where ``z tanh(z/2)`` is not convex) gave a bound above a
    reachable value."""
    def convex_everywhere(node, bounds, config) -> Relaxation:  # a tangent below, a chord above
        l, u = bounds
        m = ((l + u) / 2).requires_grad_(True)
        (slope,) = torch.autograd.grad(sym_swish(m).sum(), m)
        m, slope = m.detach(), slope.detach()
        a_up = (sym_swish(u) - sym_swish(l)) / (u - l).clamp(min=1e-12)
        return Relaxation(slope, sym_swish(m) - slope * m, a_up, sym_swish(l) - a_up * l + 1e-9)

    swish_op.relaxation()(convex_everywhere)
    n = 4096
    lo = torch.stack([torch.full((n,), -1.0), torch.full((n,), 3.0)]).double()
    hi = torch.stack([torch.full((n,), 1.0), torch.full((n,), 3.5)]).double()
    with pytest.raises(DualgraphError, match="unsound at node 'the_plugin_node'"):
        BoundScheduler(wide_net(swish_op.key, n), BoundConfig()).bound_output(Box(lo, hi),
                                                                              torch.ones(2, 1, 1, dtype=torch.float64))


def test_a_redefined_op_is_checked_again_at_a_node_that_trusted_the_old_rule(swish_op):
    """The mark was the rule's id, which a new rule may reuse once the old one is freed (a review
    redefined an op eleven times, as a notebook does): the mark is the rule itself now."""
    from dualgraph.trust import CHECKED
    swish_op.relaxation()(sound)
    graph = scalar_net(swish_op.key)
    bound(graph)
    node = next(n for n in graph.nodes if n.name == "the_plugin_node")
    assert any(r is DUAL_RULES[swish_op.key] for r in node.meta[CHECKED])
    replacement = define_op("SymSwish", domain=DOMAIN, override=True)
    replacement.evaluate(lambda node, inputs: sym_swish(inputs[0]))
    replacement.relaxation()(chord_twice)
    assert needs_check(DUAL_RULES[swish_op.key], node)


def test_a_dual_layer_is_checked_on_examples_spread_over_the_batch():
    """The first-use check of a DualRule took the batch's first 8 examples: a dual layer wrong
    only where its bounds lie above 5 (the tenth example here) passed (a review of 9bd3852)."""
    class WrongFarOut(_Described):
        needs_bounds = True

        def backward(self, node, lam, bounds, config):
            far = (bounds[0].lower.flatten(1).min(1).values > 5).to(lam.dtype)  # [B]
            return DualStep([lam], far[:, None].expand(lam.shape[:2]).clone(), None)

    op = define_op("FarOut", domain=DOMAIN)
    op.evaluate(lambda node, inputs: inputs[0].clone())
    op.dual(WrongFarOut)
    try:
        lo = torch.zeros(10, 1, dtype=torch.float64)
        lo[9] = 10.0
        with pytest.raises(DualgraphError, match="FarOut is unsound"):
            BoundScheduler(wide_net(op.key, 1), BoundConfig()).bound_output(
                Box(lo, lo + 1.0), torch.ones(10, 1, 1, dtype=torch.float64))
    finally:
        remove_op(op.key)
