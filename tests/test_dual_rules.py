"""Every defined op, built-in or plugin, passes the shipped checker (:mod:`dualgraph.testing`),
and the checker catches wrong rules.

The checker (``dualgraph.testing.check_op``, also ``dualgraph check-op``) builds the example
nodes each op definition declares, draws bounds mixing crossing, stable, degenerate, wide and
thin intervals, rows shared by the batch or per example, and checks the relaxation on dense
grids, the dual-layer contract at random points, box vertices and special points, affine
rules' exactness, and every bound path with the node inside a network.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph import define_op, var
from dualgraph.dual_registry import DUAL_RULES, Bounds, DualRule, DualStep, Relaxation, dual_rule
from dualgraph.errors import UnsupportedOpError
from dualgraph.ir import Graph
from dualgraph.op_registry import OPS, definitions, remove_op
from dualgraph.scheduler import BoundConfig, BoundScheduler
from dualgraph.dual_graph import build_dual
from dualgraph.testing import B, CONFIGS, DTYPE, M, OpCheckFailure, check_contract, check_op, example_node, random_bounds

# dualgraph's own ops: an installed plugin's ops are its own tests' business (its package
# runs the same checker), so no plugin can make this suite fail
BUILT_IN_OPS = [d.key for d in definitions() if d.built_in]


@pytest.mark.parametrize("op", BUILT_IN_OPS, ids=lambda op: ".".join(filter(None, op)))
def test_built_in_op_passes_the_checker(op):
    check_op(op)


def test_every_op_with_a_dual_layer_has_examples():
    """A dual layer without examples would go unchecked: the checker refuses it (see below)."""
    bare = [d.name for d in definitions() if d.built_in and d.dual_rule is not None and not d.examples]
    assert not bare, f"ops with a dual layer but no example node: {bare}"


# ---- the checker itself catches wrong rules, and plugins are held to it ------------------------

PLUGIN = "tests.dualgraph_plugin"


def _square_relaxation(n, b: Bounds, config) -> Relaxation:
    # convex: tangent at the midpoint below, chord above (different slopes: not linear)
    l, u = b
    m = (l + u) / 2
    return Relaxation(2 * m, -m * m, u + l, -u * l)


@pytest.fixture
def plugin_square():
    """A plugin-style op ``Square`` (evaluation + relaxation) defined for the duration of a test."""
    square = define_op("Square", domain=PLUGIN)
    square.evaluate(lambda n, inputs: inputs[0] * inputs[0])
    square.relaxation()(_square_relaxation)
    try:
        yield square
    finally:
        remove_op(square.key)


def test_plugin_rule_without_example_fails_the_checker(plugin_square):
    assert plugin_square.key in DUAL_RULES and plugin_square.source == f"module {__name__}"
    with pytest.raises(OpCheckFailure, match="no example node"):
        check_op(plugin_square)


def test_plugin_rule_is_checked(plugin_square):
    plugin_square.example(var(4))
    report = check_op(f"{PLUGIN}.Square")
    assert report.examples == 1 and report.relaxation_points > 0 and report.paths > 0


@pytest.mark.parametrize("break_it", ["swapped", "chord_both"])
def test_checker_catches_a_wrong_plugin_rule(plugin_square, break_it):
    def swapped(n, b, config):  # upper and lower lines exchanged
        r = _square_relaxation(n, b, config)
        return Relaxation(r.a_up, r.b_up, r.a_lo, r.b_lo)

    def chord_both(n, b, config):  # the audit's bug: the chord used as both lines, declared linear
        r = _square_relaxation(n, b, config)
        return Relaxation(r.a_up, r.b_up, r.a_up, r.b_up)

    plugin_square.relaxation(linear_if=lambda cfg: break_it == "chord_both")(locals()[break_it])
    plugin_square.dual_rule.trust_source = None  # the checker, not the first-use check, must catch it
    plugin_square.example(var(4))
    with pytest.raises(OpCheckFailure, match="wrong side of f"):
        check_op(plugin_square)


def test_checker_catches_a_false_monotone_claim(plugin_square):
    """``monotone=True`` lets the scheduler bound the output by ``[f(l), f(u)]`` without a pass:
    on ``z^2`` (valid lines, not monotone) that would be unsound, and the checker refuses it."""
    plugin_square.relaxation(eval_roundings=0, monotone=True)(_square_relaxation)
    plugin_square.dual_rule.trust_source = None
    plugin_square.example(var(4))
    with pytest.raises(OpCheckFailure, match="declared monotone|outside its image_bounds"):
        check_op(plugin_square)


def test_defining_an_op_twice_is_an_error_naming_both(plugin_square):
    from dualgraph.errors import DualgraphError
    with pytest.raises(DualgraphError, match=r"already defined \(module .*override=True"):
        define_op("Square", domain=PLUGIN)
    with pytest.raises(DualgraphError, match="already defined \\(built-in\\)"):
        define_op("Relu")
    replaced = define_op("Square", domain=PLUGIN, override=True)
    assert OPS[replaced.key] is replaced and replaced.replaced == plugin_square.source
    assert replaced.key not in DUAL_RULES  # the old definition's rules went with it


def test_the_dual_graphs_own_domain_is_reserved():
    from dualgraph.errors import DualgraphError
    with pytest.raises(DualgraphError, match="reserved"):
        define_op("Sum", domain="dualgraph.dual.structure")


def test_checker_catches_a_wrong_core_style_rule():
    """A ReLU rule that treats relu(z) as z (lam_in = lam, no offsets) breaks (1) on negative inputs."""
    class IdentityRelu(DualRule):
        needs_bounds = True

        def backward(self, n, lam, bounds, config):
            return DualStep([lam], 0.0, 0.0)

    relu = OPS[("", "Relu")]
    n = example_node(relu, relu.examples[0])
    with pytest.raises(OpCheckFailure, match="inequality \\(1\\) violated"):
        for b_rows in (1, B):
            check_contract(IdentityRelu(), n, CONFIGS[0], torch.Generator().manual_seed(0), "negative", b_rows, (0.0,))


def test_unsupported_maxpool_forms_raise():
    rule = DUAL_RULES[("", "MaxPool")]
    max_pool = OPS[("", "MaxPool")]
    for attrs, shape in (({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (1, 5, 5)),
                         ({"kernel_shape": [2], "strides": [2]}, (2, 6))):
        n = example_node(max_pool, _example(var(*shape), attrs=attrs))
        b = random_bounds(n.inputs[0].unit_shape, torch.Generator().manual_seed(0), "mixed")
        lam = torch.ones(1, M, *n.output.unit_shape, dtype=DTYPE)
        with pytest.raises(UnsupportedOpError, match="MaxPool"):
            rule.backward(n, lam, [b], CONFIGS[0])


# ---- specific regressions ------------------------------------------------------------------------

def test_leaky_relu_slopes_are_float64():
    """On stable units the LeakyRelu dual layer must be exact: lam_in = alpha * lam (negative side)
    and lam (positive side), to float64 precision, or wide float64 bounds become unsound."""
    n = example_node(OPS[("", "LeakyRelu")], _example(var(4), attrs={"alpha": 0.01}))
    l = torch.tensor([[-40.0, -3.0, 1.0, 2.0]], dtype=DTYPE)
    u = torch.tensor([[-30.0, -1.0, 5.0, 3.0]], dtype=DTYPE)
    lam = torch.ones(1, 1, 4, dtype=DTYPE)
    step = DUAL_RULES[("", "LeakyRelu")].backward(n, lam, [Bounds(l, u)], CONFIGS[0])
    want = torch.tensor([[[0.01, 0.01, 1.0, 1.0]]], dtype=DTYPE)
    assert torch.equal(step.lam_in[0], want), step.lam_in[0].tolist()


def test_clip_attribute_form_is_clipped():
    """``Clip`` with ``min``/``max`` attributes (the opset < 11 form that EVAL_RULES evaluates) must be
    dualised as a clip, not as the identity."""
    check_op(("", "Clip"), examples=[_example(var(5), attrs={"min": -0.5, "max": 1.0}, special_points=(-0.5, 1.0))])


# ---- ops without a rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", [("", "NoSuchOp"), ("my.plugin", "Swish")])
def test_op_without_rule_raises_naming_op_node_and_plugins(op):
    g = Graph("missing")
    x = g.add_input("x", (3,), DTYPE)
    h = g.add_node("Relu", [x], name="first")
    n = g.add_node(op, [h.output], name="the_unknown_node")
    g.outputs = [n.output]
    for call in (lambda: dual_rule(n), lambda: build_dual(g), lambda: BoundScheduler(g)):
        with pytest.raises(UnsupportedOpError) as info:
            call()
        msg = str(info.value)
        assert op[1] in msg and "the_unknown_node" in msg and "plugin" in msg.lower(), msg


@pytest.mark.parametrize("stride,pad,dil,k,in_hw", [((2, 2), (1, 1), (1, 1), 4, (10, 12)), ((1, 1), (0, 0), (1, 1), 3, (7, 7)),
                                                     ((2, 1), (1, 2), (2, 1), 3, (9, 8)), ((3, 3), (0, 0), (1, 1), 2, (9, 9))])
def test_conv_transpose_by_taps_equals_the_library_and_differentiates(stride, pad, dil, k, in_hw):
    """The first-layer transpose (one strided add per filter tap, its own backward) equals
    ``conv_transpose2d`` and passes a finite-difference gradient check in both inputs."""
    from dualgraph.linalg import conv_transpose_by_taps as _conv_transpose_by_taps
    g = torch.Generator().manual_seed(sum(in_hw))
    w = torch.randn(3, 2, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    out_hw = [(in_hw[i] + 2 * pad[i] - dil[i] * (k - 1) - 1) // stride[i] + 1 for i in range(2)]
    lam = torch.randn(4, 3, *out_hw, dtype=torch.float64, generator=g, requires_grad=True)
    extra = [in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (k - 1) + 1) for i in range(2)]
    want = torch.nn.functional.conv_transpose2d(lam, w, stride=stride, padding=pad, output_padding=extra, dilation=dil)
    got = _conv_transpose_by_taps(lam, w, stride, pad, dil, in_hw)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _conv_transpose_by_taps(a, b, stride, pad, dil, in_hw), (lam, w))


def _example(*inputs, attrs=None, special_points=()):
    from dualgraph.op_registry import OpExample
    return OpExample(tuple(inputs), dict(attrs or {}), 1, tuple(special_points))


# ---- MaxPool's upper line ------------------------------------------------------------------------

def _windows(draw_values, dtype):
    """``[1, 1, K, 1]`` lower and upper bounds of one window from drawn pairs."""
    l = torch.tensor([min(p) for p in draw_values], dtype=dtype).view(1, 1, -1, 1)
    u = torch.tensor([max(p) for p in draw_values], dtype=dtype).view(1, 1, -1, 1)
    return l, u


_ENDS = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([0.0, 1.0, -1.0, 1e-7, 3.0000002, 2.9999998]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pairs=st.lists(st.tuples(_ENDS, _ENDS), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_max_upper_line_holds_exactly_at_every_vertex(pairs, dtype):
    """``max_k z_k - (a z_k* + b)`` is convex in ``z``, so the line is valid on the box iff it
    holds at every vertex: checked in exact rational arithmetic on the line as computed (float32
    too, where the chord's slope and offset round), with near-ties among the upper bounds drawn
    on purpose. The line is also never above the constant ``max_k u_k`` it replaces (up to its
    rounding pad)."""
    from itertools import product
    from fractions import Fraction
    from dualgraph.ops.pooling import max_upper_line
    l, u = _windows(pairs, dtype)
    k, a, b = max_upper_line(l, u)
    k, a, b = int(k.flatten()), Fraction(float(a.flatten())), Fraction(float(b.flatten()))
    assert 0 <= a <= 1
    ends = [(Fraction(float(lo)), Fraction(float(hi))) for lo, hi in zip(l.flatten(), u.flatten())]
    for z in product(*ends):
        assert max(z) <= a * z[k] + b, (pairs, z, k, a, b)
    top = max(hi for _, hi in ends)
    pad = Fraction(8 * torch.finfo(dtype).eps) * (2 * top.__abs__() + max(abs(lo) for lo, _ in ends))
    for end in ends[k]:
        assert a * end + b <= top + pad


def test_max_pool_upper_line_is_the_chord():
    """``f(x) = max(x0, x1) - x0 / 2`` on ``x0 in [-1, 1]``, ``x1 in [0, 0.5]``: its largest value
    is 1 (at ``x0 = -1``). The chord ``max <= x0 / 4 + 3 / 4`` gives exactly 1; the constant upper
    line ``max <= 1`` of earlier versions gave 1.5."""
    from dualgraph.input_sets import Box
    from dualgraph.frontends.fx import load_module

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.max_pool2d(x, (1, 2)).flatten(1) - 0.5 * x[:, 0, 0, :1]

    graph = load_module(Net(), torch.zeros(1, 1, 1, 2, dtype=torch.float64))
    box = Box(torch.tensor([[[[-1.0, 0.0]]]], dtype=torch.float64), torch.tensor([[[[1.0, 0.5]]]], dtype=torch.float64))
    for relaxation in ("paper", "crown", "alpha"):
        J = BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation)).bound_output(
            box, -torch.ones(1, 1, 1, dtype=torch.float64))
        assert -float(J) == pytest.approx(1.0, abs=1e-9), relaxation


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2 ** 31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       kind=st.sampled_from(["random", "zero", "tiny", "one-hot"]), mode=st.sampled_from(["mixed", "negative"]))
def test_max_pool_free_weights_give_sound_steps(seed, dtype, kind, mode):
    """Any weights of the lower line (``relu_relaxation="alpha"``) give a step that satisfies
    inequality (1) at every sampled point and box corner of each window, checked in float64 on
    the step as computed: random weights, all zero (the line is then 0, paid for by the
    offsets' ``|s - 1| r``), tiny ones (their normalised sum rounds) and one-hot. One row per
    output unit, so that no unit's slack hides another's violation."""
    from dualgraph.dual_registry import FreeSlopes
    from dualgraph.ops.pooling import free_lower_weights
    gen = torch.Generator().manual_seed(seed)
    n = example_node(OPS[("", "MaxPool")], _example(var(2, 5, 5), attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                                                       "pads": [1, 1, 1, 1]}))
    b = random_bounds(n.inputs[0].unit_shape, gen, mode)
    b = Bounds(b.lower.to(dtype), b.upper.to(dtype))
    start = free_lower_weights(n, b)
    if start is None:
        return
    values = {"random": torch.rand(start.values.shape, generator=gen, dtype=torch.float64),
              "zero": torch.zeros(start.values.shape, dtype=torch.float64),
              "tiny": torch.rand(start.values.shape, generator=gen, dtype=torch.float64) * 1e-30,
              "one-hot": start.values.detach().double()}[kind].to(dtype)
    weights = FreeSlopes(start.index, values, start.free, 0.0, 1.0)
    B, units = b.lower.shape[0], n.output.numel
    signs = torch.randn(B, units, generator=gen, dtype=torch.float64)
    lam = torch.diag_embed(signs).view(B, units, *n.output.unit_shape).to(dtype)    # row j: unit j only
    step = DUAL_RULES[("", "MaxPool")].backward_with_slopes(n, lam, b, CONFIGS[0], weights)
    l, u = b.lower.double(), b.upper.double()
    t = torch.rand((64, *l.shape), generator=gen, dtype=torch.float64)
    corners = (torch.rand((64, *l.shape), generator=gen) < 0.5).double()
    z = torch.cat([l + t * (u - l), l + corners * (u - l)])                          # [128, B, C, H, W]
    with torch.no_grad():
        y = torch.nn.functional.max_pool2d(z.flatten(0, 1), 3, stride=2, padding=1).view(z.shape[0], B, -1)
    lhs = signs * y                                                                   # [128, B, units]
    rhs = (step.lam_in[0].double().unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1) + step.lower.double()
    scale = (signs.abs() * y.abs()) + 1
    assert (rhs <= lhs + 4 * torch.finfo(dtype).eps * scale).all(), float((rhs - lhs).max())


def test_max_pool_free_weights_reach_a_mixture():
    """``max(x, -x)`` over ``x in [-1, 1]`` is ``|x| >= 0``. Any one entry as the lower line gives
    ``-1``; the weights ``(1/2, 1/2)`` give ``0``, the true minimum, which ``alpha`` finds."""
    from dualgraph.input_sets import Box
    from dualgraph.frontends.fx import load_module

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.max_pool2d(torch.cat([x, -x], 3), (1, 2)).flatten(1)

    graph = load_module(Net(), torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    box = Box(-torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64))
    spec = torch.ones(1, 1, 1, dtype=torch.float64)
    crown = BoundScheduler(graph, BoundConfig(relu_relaxation="crown")).bound_output(box, spec)
    alpha = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=40)).bound_output(box, spec)
    assert float(crown) == pytest.approx(-1.0, abs=1e-9)
    assert -0.05 <= float(alpha) <= 1e-9, float(alpha)


S_SHAPED = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf}
FREE_LINES = {**S_SHAPED, "Softplus": torch.nn.functional.softplus, "Exp": torch.exp, "Abs": torch.abs,
              "Clip": lambda z: z.clamp(-0.5, 1.0)}
"""Ops whose both lines are free with ``alpha``, each line's offset the tightest for its slope."""
DOMAINS = {"Exp": (-float("inf"), 30.0)}


def _s_shaped_relaxation(op_type: str, gen: torch.Generator, mode: str, dtype: torch.dtype):
    limits = (torch.tensor(-0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    n = example_node(OPS[("", op_type)], _example(var(7), *(limits if op_type == "Clip" else ())))
    b = random_bounds(n.inputs[0].unit_shape, gen, mode, domain=DOMAINS.get(op_type))
    b = Bounds(b.lower.to(dtype), b.upper.to(dtype))
    return n, b, dual_rule(n).relaxation(n, b, CONFIGS[2])  # relu_relaxation="alpha"


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2 ** 31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       op_type=st.sampled_from(sorted(FREE_LINES)), mode=st.sampled_from(["mixed", "negative", "wide"]),
       where=st.sampled_from(["inside", "outside", "ends"]))
def test_free_lines_give_sound_steps(seed, dtype, op_type, mode, where):
    """Any slopes of the free lower and upper lines of Sigmoid, Tanh, Erf, Softplus, Exp, Abs
    and Clip (``relu_relaxation="alpha"``,
    :class:`~dualgraph.dual_registry.FreeLines`: each line's offset the tightest for its slope)
    give a step that satisfies inequality (1) at every sampled point, checked in float64 on the
    step as computed: slopes inside their range, outside it (clamped) and at its ends. One row
    per unit, so that no unit's slack hides another's violation."""
    from dualgraph.dual_registry import FreeSlopes
    gen = torch.Generator().manual_seed(seed)
    n, b, r = _s_shaped_relaxation(op_type, gen, mode, dtype)
    assert r.free is not None and r.free.offsets is not None and r.free.upper is not None
    B, units = b.lower.shape[0], n.output.numel
    index = torch.arange(units)

    def variables(lo, hi):
        lo, hi = (torch.as_tensor(t, dtype=dtype).expand(B, units).unsqueeze(1) for t in (lo, hi))
        t = torch.rand(lo.shape, generator=gen, dtype=torch.float64).to(dtype)
        t = {"inside": t, "outside": 3 * t - 1, "ends": (t > 0.5).to(dtype)}[where]
        return FreeSlopes(index, lo + t * (hi - lo), r.free.units.view(B, 1, units), lo, hi)
    signs = torch.randn(B, units, generator=gen, dtype=torch.float64)
    lam = torch.diag_embed(signs).view(B, units, units).to(dtype)                     # row j: unit j only
    lower_slopes, upper_slopes = variables(r.free.lo, r.free.hi), variables(*r.free.upper)
    rule = dual_rule(n)
    step = rule.backward_with_slopes(n, lam, b, CONFIGS[2], lower_slopes, None, upper_slopes)
    l, u = b.lower.double(), b.upper.double()
    t = torch.cat([torch.rand((96, *l.shape), generator=gen, dtype=torch.float64),
                   torch.zeros(1, *l.shape, dtype=torch.float64), torch.ones(1, *l.shape, dtype=torch.float64)])
    z = l + t * (u - l)                                                                # [98, B, units]
    lhs = signs * FREE_LINES[op_type](z)
    rhs = step.lam_in[0].double().diagonal(dim1=1, dim2=2) * z + step.lower.double()
    # the rounding allowance moves the offsets out by a few units of roundoff of |a| m + 2 |b|
    # at the chosen slope (dualgraph.rounding); a step on its own relaxation may be off by that
    # much. |b(a)| <= max |f| + |a| m <= |a_chord| m + max |b_chord| + |a| m
    a_mag, b_mag = (t.double() for t in r.magnitudes())
    m = torch.maximum(l.abs(), u.abs())
    steepest = torch.maximum(torch.as_tensor(r.free.lo).abs(), torch.as_tensor(r.free.hi).abs()).double()
    widest = torch.maximum(a_mag, steepest)
    scale = signs.abs() * (1 + widest * m + 2 * (a_mag * m + b_mag + widest * m)) + step.lower.double().abs()
    assert (rhs <= lhs + 4 * torch.finfo(dtype).eps * scale).all(), float((rhs - lhs).max())


@pytest.mark.parametrize("config", [1, 2], ids=["crown", "alpha"])
def test_softplus_lines_hold_across_torchs_switch_at_20(config):
    """torch's ``softplus`` returns ``z`` itself above 20, ``2e-9`` below ``log(1 + e^z)`` (a
    step down at 20, so not convex), and onnxruntime computes the exact value: the lines of
    Softplus must bound both, in float64, at every slope. Intervals that straddle 20, the
    points next to it sampled; the lower line failed by ``9e-10`` before it took the step's
    foot as a candidate extreme (found by a fresh-seed run of the test above)."""
    from dualgraph.dual_registry import FreeSlopes
    gen = torch.Generator().manual_seed(0)
    n = example_node(OPS[("", "Softplus")], _example(var(7)))
    units = n.output.numel
    l = 20 - 3 * torch.rand(B, units, generator=gen, dtype=torch.float64)
    u = 20 + 3 * torch.rand(B, units, generator=gen, dtype=torch.float64)
    b = Bounds(l, u)
    rule = dual_rule(n)
    r = rule.relaxation(n, b, CONFIGS[config])
    twenty = torch.tensor(20.0, dtype=torch.float64)
    z = torch.cat([l + torch.rand((200, *l.shape), generator=gen, dtype=torch.float64) * (u - l),
                   torch.stack([l, u, twenty.expand_as(l), torch.nextafter(twenty, 2 * twenty).expand_as(l),
                                torch.nextafter(twenty, 0 * twenty).expand_as(l)])])
    lines = [(r.a_lo, r.b_lo, r.a_up, r.b_up)]
    if r.free is not None:  # the free lines at slopes across their range
        for t in torch.linspace(0, 1, 5, dtype=torch.float64):
            lo_a = r.free.lo + t * (r.free.hi - r.free.lo)
            up_a = r.free.upper[0] + t * (r.free.upper[1] - r.free.upper[0])
            lines.append((lo_a, r.free.offset(lo_a, lambda x: x, -1), up_a, r.free.offset(up_a, lambda x: x, 1)))
    for a_lo, b_lo, a_up, b_up in lines:
        # torch's values, and log(1 + e^z) without its switch (onnxruntime's; no overflow below 23)
        for f in (torch.nn.functional.softplus, lambda z: torch.log1p(torch.exp(z))):
            assert (a_lo * z + b_lo <= f(z)).all(), float((a_lo * z + b_lo - f(z)).max())
            assert (a_up * z + b_up >= f(z)).all(), float((f(z) - a_up * z - b_up).max())


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2 ** 31 - 1), op_type=st.sampled_from(sorted(FREE_LINES)),
       mode=st.sampled_from(["mixed", "negative", "wide"]))
def test_free_lines_touch_f(seed, op_type, mode):
    """The free lines' offsets are the tightest for their slopes: each line at any slope of
    its range lies on the right side of ``f`` on a dense grid of ``[l, u]`` and touches it
    (a tangent where the extreme of ``f - a z`` is inside the interval, else at an end)."""
    gen = torch.Generator().manual_seed(seed)
    n, b, r = _s_shaped_relaxation(op_type, gen, mode, torch.float64)
    l, u = b
    grid = l + torch.linspace(0, 1, 20001, dtype=torch.float64).view(-1, 1, 1) * (u - l)
    f = FREE_LINES[op_type](grid)
    f_slope = (f.diff(dim=0).abs() / ((u - l) / 20000).clamp(min=1e-300)).amax(0)  # |f'| on the grid
    for side, a, offset in r.free.lines(r, at=(0.0, 0.1, 0.37, 0.5, 0.9, 1.0)):
        gap = side * (a * grid + offset - f)  # >= 0: the line on its side of f
        units = r.free.units
        assert (gap[:, units] >= -1e-12).all()
        # the grid's spacing bounds how far its closest point is from the touching point
        # and the offsets' float64 slack is relative to the largest |f - a z| on the interval
        spacing = ((u - l) / 20000)[units]
        slack = 1e-9 * (1 + f.abs().amax(0) + a.abs() * torch.maximum(l.abs(), u.abs()))[units]
        allowed = (a[units].abs() + f_slope[units]) * spacing + slack
        assert (gap[:, units].amin(0) <= allowed).all(), float((gap[:, units].amin(0) - allowed).max())


def test_free_lines_given_as_a_tuple_are_lower_slopes():
    """A relaxation may still give ``free`` as ``(units, lo, hi)``: free lower slopes with one offset."""
    units = torch.tensor([[True, False]])
    r = Relaxation(torch.zeros(1, 2), 0.0, torch.ones(1, 2), 0.0, (units, 0.0, 1.0))
    assert r.free.units is units and r.free.upper is None and r.free.offsets is None


@pytest.mark.parametrize("op_type", sorted(S_SHAPED))
def test_optimised_s_shaped_line_reaches_the_minimum(op_type):
    """``f(z)`` over ``z in [-2, 3]`` for an increasing S-shaped ``f`` is ``f(-2)``. The chord's
    parallel lines (CROWN) fall short of it; a lower line of slope at most ``f'(-2)`` through
    ``(-2, f(-2))`` reaches it, and so does ``alpha``. Likewise the maximum ``f(3)``."""
    from dualgraph.frontends.fx import load_module
    from dualgraph.input_sets import Box
    from strategies import Elementwise
    f = S_SHAPED[op_type]
    module = {"Sigmoid": torch.nn.Sigmoid(), "Tanh": torch.nn.Tanh(), "Erf": Elementwise(torch.erf)}[op_type]
    graph = load_module(module, torch.zeros(1, 1, dtype=torch.float64))
    box = Box(torch.full((1, 1), -2.0, dtype=torch.float64), torch.full((1, 1), 3.0, dtype=torch.float64))
    spec = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    exact = torch.tensor([float(f(torch.tensor(-2.0, dtype=torch.float64))),
                          -float(f(torch.tensor(3.0, dtype=torch.float64)))], dtype=torch.float64)
    crown = BoundScheduler(graph, BoundConfig(relu_relaxation="crown")).bound_output(box, spec)[0]
    alpha = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=40)).bound_output(box, spec)[0]
    assert (crown < exact - 0.01).all(), (crown, exact)
    assert (alpha <= exact + 1e-12).all() and (alpha >= exact - 1e-6).all(), (alpha, exact)


class _AbsWithFreeSlope(DualRule):
    """``|z|`` as a plugin's own dual layer (not a relaxation): lower line ``a z`` with any
    ``a`` in ``[-1, 1]`` (below ``|z|`` everywhere), the chord above; the free slope is
    declared through :meth:`DualRule.free_variables`."""

    needs_bounds = True

    def free_variables(self, node, bounds, config):
        from dualgraph.dual_registry import FreeSlopes
        l, u = bounds[0]
        n = l[0].numel()
        start = self._chord(l, u)[0].reshape(l.shape[0], 1, n)
        return {"slopes": FreeSlopes(torch.arange(n), start.clone().requires_grad_(True),
                                     torch.ones_like(start, dtype=torch.bool), -1.0, 1.0, width=n)}

    @staticmethod
    def _chord(l, u):
        a = (u.abs() - l.abs()) / (u - l).clamp(min=1e-12)
        return a, u.abs() - a * u

    def backward(self, node, lam, bounds, config):
        return self.backward_with_slopes(node, lam, bounds[0], config, None)

    def backward_with_slopes(self, node, lam, bounds, config, slopes, splits=None, upper=None):
        a_up, b_up = self._chord(*bounds)
        a_lo = a_up.flatten(1).unsqueeze(1) if slopes is None else slopes.slopes()
        flat = lam.flatten(2)
        lam_in = flat.clamp(min=0) * a_lo + flat.clamp(max=0) * a_up.flatten(1).unsqueeze(1)
        return DualStep([lam_in.view_as(lam)], (flat.clamp(max=0) * b_up.flatten(1).unsqueeze(1)).sum(-1), None)

    def abs_linear(self, node, xs, bounds, config):
        return [xs[0]]

    def constant_magnitude(self, node, m_in, bounds, config):
        l, u = bounds[0]
        return [2 * torch.maximum(l.abs(), u.abs())]

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        return node.output.numel + 2


def test_alpha_optimises_what_any_rule_declares():
    """``alpha`` asks every dual layer for its free parameters (``DualRule.free_variables``),
    not only the built-in relaxations: a plugin's own rule for ``|z|`` on ``[-1, 3]`` starts
    from the chord's slope ``1/2`` (bound ``-1/2``) and its free lower slope reaches the true
    minimum 0 (slope 0)."""
    from dualgraph import infer_shapes
    from dualgraph.input_sets import Box
    op = define_op("AbsFree", domain=PLUGIN)
    op.evaluate(lambda n, inputs: inputs[0].abs())
    op.dual(_AbsWithFreeSlope)
    try:
        g = Graph()
        x = g.add_input("x", (1, 1))
        g.outputs = [g.add_node(op.key, [x]).output]
        infer_shapes(g)
        box = Box(torch.full((1, 1), -1.0, dtype=torch.float64), torch.full((1, 1), 3.0, dtype=torch.float64))
        spec = torch.ones(1, 1, 1, dtype=torch.float64)
        crown = BoundScheduler(g, BoundConfig(relu_relaxation="crown")).bound_output(box, spec)
        alpha = BoundScheduler(g, BoundConfig(relu_relaxation="alpha", alpha_steps=30)).bound_output(box, spec)
        assert float(crown) == pytest.approx(-0.5, abs=1e-9)
        assert -0.01 <= float(alpha) <= 1e-9, float(alpha)  # Adam circles the kink at slope 0
    finally:
        remove_op(op.key)
