"""Soundness of the bounds: every certified bound holds at every point we can find.

For hypothesis-generated float64 networks (MLPs, residual and dense/concat DAGs, CNNs with
strides, padding, pooling and every supported activation), every ReLU relaxation (paper,
CROWN, optimised slopes: intermediate and final), and three kinds of input sets (L-inf ball, L-inf ball intersected with [0, 1], L2 ball):

(a) the intermediate bounds contain the actual value of every bounded unit at many points
    of the set (random points, box vertices / sphere points, the centre);
(b) the final lower bound ``J`` of random specification rows is <= ``spec @ f(x')`` at those
    points and at points found by a PGD attack that minimises ``spec @ f(x')``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dualgraph.input_sets import Box, InputSet
from dualgraph.interpreter import Interpreter
from dualgraph.scheduler import BoundConfig, BoundScheduler

from strategies import (DTYPE, DagNet, any_nets, cnn_nets, drawn_conv_transposes, input_sets, relu_nets, sample_points,
                        to_ir)

RELAXATIONS = ("paper", "crown", "alpha")
PATHS = {  # every bound path: default (auto, patches, pruned), dense unpruned rows, forward
    "auto": {}, "dense": dict(direction="backward", patches=False, prune_stable=False),
    "forward": dict(direction="forward")}
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tol(*scales: torch.Tensor) -> torch.Tensor:
    """Float64 slack: relative to the magnitudes involved (bounds of big nets are big)."""
    s = 1.0
    for t in scales:
        s = s + t.abs()
    return 1e-9 * s


def ir_values(graph, x: torch.Tensor) -> dict:
    """Every value of ``graph`` at inputs ``x`` (the interpreter, keeping all intermediates)."""
    interp = Interpreter(graph)
    env = {graph.inputs[0]: x}
    for node in graph.nodes:
        for v, t in zip(node.outputs, interp.run_node(node, env, x)):
            env[v] = t
    return env


def pgd_minimise(f, input_set: InputSet, spec: torch.Tensor, steps: int = 20,
                 restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """Smallest ``spec[b, r] @ f(x')`` found by projected gradient descent per example and row: ``[B, m]``."""
    gen = torch.Generator().manual_seed(seed)
    center = input_set.center
    B, shape = center.shape[0], tuple(center.shape[1:])
    m = spec.shape[1]
    spec = spec.expand(B, m, spec.shape[2])
    box = isinstance(input_set, Box)
    lo, hi = (t.unsqueeze(1) for t in input_set.bounding_box())
    c = center.unsqueeze(1)
    size = (input_set.radius if box else torch.full_like(center, input_set.eps)).unsqueeze(1)
    best = torch.full((B, m), float("inf"), dtype=DTYPE)

    def project(x):
        if box:
            return torch.max(torch.min(x, hi), lo)
        d = (x - c).flatten(2)
        n = d.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        d = d * torch.clamp(input_set.eps / n, max=1.0)
        return c + d.view_as(x)

    for _ in range(restarts):
        start = input_set.sample(m, gen).transpose(0, 1)  # [B, m, *shape]
        x = start.clone().requires_grad_(True)
        for t in range(steps + 1):
            y = f(x.reshape(B * m, *shape)).reshape(B, m, -1)
            obj = (y * spec).sum(-1)
            best = torch.min(best, obj.detach())
            if t == steps:
                break
            (g,) = torch.autograd.grad(obj.sum(), x)
            step = size * 0.3 * (1 - t / steps) + size * 0.01
            with torch.no_grad():
                if box:
                    x = x - step * g.sign()
                else:
                    gn = g.flatten(2).norm(dim=-1).clamp(min=1e-30).view(B, m, *[1] * len(shape))
                    x = x - step * g / gn
                x = project(x)
            x.requires_grad_(True)
    return best


def spec_rows(data, net: DagNet, batch: int) -> torch.Tensor:
    shared = data.draw(st.booleans(), label="shared rows")
    m = data.draw(st.integers(1, 4), label="rows")
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="spec seed")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 if shared else batch, m, net.n_out, generator=g, dtype=DTYPE)


def check_soundness(net: DagNet, graph, data, relaxations=RELAXATIONS, rtol: float = 1e-9) -> None:
    """(a) and (b) for one network; ``rtol``: how closely the IR must match the module (ONNX
    stores attributes such as LeakyRelu's alpha in float32). The attack runs on the IR itself."""
    case = data.draw(input_sets(net.input_shape), label="input set")
    input_set = case.make()
    B = input_set.center.shape[0]
    gen = torch.Generator().manual_seed(1)
    pts = sample_points(input_set, 48, gen)
    n = pts.shape[0]
    with torch.no_grad():
        env = ir_values(graph, pts.reshape(n * B, *net.input_shape))
    spec = spec_rows(data, net, B)
    with torch.no_grad():
        y = env[graph.outputs[0]].reshape(n, B, 1, -1)
        sampled = (y * spec.unsqueeze(0)).sum(-1).amin(0)     # [B, m]
        ref = net(pts.reshape(n * B, *net.input_shape)).reshape(n, B, 1, -1)
        assert torch.allclose((ref * spec.unsqueeze(0)).sum(-1).amin(0), sampled, rtol=rtol, atol=rtol)
    interp = Interpreter(graph)
    attacked = pgd_minimise(lambda x: interp.run(x)[0], input_set, spec)
    with drawn_conv_transposes(data)():
        check_paths(graph, case, input_set, env, n, spec, sampled, attacked, relaxations)


def check_paths(graph, case, input_set, env, n: int, spec, sampled, attacked, relaxations) -> None:
    """(a) and (b) on every bound path of :data:`PATHS` and relaxation (``env``: the IR's
    values at ``n`` sampled points of each example)."""
    from dualgraph.forward import forward_supported
    B = input_set.center.shape[0]
    for relaxation, path in ((r, p) for r in relaxations for p in PATHS):
        config = BoundConfig(relu_relaxation=relaxation, **PATHS[path])
        if path == "forward" and not forward_supported(graph, graph.nodes, config):
            continue
        sched = BoundScheduler(graph, config)
        bounds = sched.intermediate_bounds(input_set)
        # (a) intermediate bounds contain the values at sampled points
        for v, b in bounds.items():
            assert b.lower.shape == (B, *v.unit_shape) and b.upper.shape == b.lower.shape, v
            assert torch.isfinite(b.lower).all() and torch.isfinite(b.upper).all(), v
            val = env[v].reshape(n, B, *v.unit_shape)
            below = (b.lower - val - tol(b.lower, val)).amax()
            above = (val - b.upper - tol(b.upper, val)).amax()
            assert below <= 0 and above <= 0, (
                f"value '{v.name}' ({relaxation}, {path}, {case.kind}): sampled value outside its bounds by "
                f"{max(float(below), float(above)):.3g}")
        # (b) the final bound is below spec @ f at sampled and attacked points
        J = sched.bound_output(input_set, spec, bounds)
        assert J.shape == (B, spec.shape[1]) and torch.isfinite(J).all()
        gap = (J - sampled - tol(J, sampled)).amax()
        assert gap <= 0, f"bound {relaxation}/{path} above a sampled value by {float(gap):.3g}"
        gap = (J - attacked - tol(J, attacked)).amax()
        assert gap <= 0, f"bound {relaxation}/{path} above a PGD value by {float(gap):.3g}"


@settings(max_examples=150, **SETTINGS)
@given(net=any_nets(), data=st.data())
def test_bounds_sound_fx(net, data):
    simplify = data.draw(st.booleans(), label="simplification passes")
    check_soundness(net, to_ir(net, via="fx+simplify" if simplify else "fx"), data)


@settings(max_examples=25, **SETTINGS)
@given(net=st.one_of(relu_nets(cnn=False), any_nets()), data=st.data())
def test_bounds_sound_onnx(net, data):
    pytest.importorskip("dualgraph.frontends.onnx")
    check_soundness(net, to_ir(net, via="onnx"), data, rtol=1e-6)


@settings(max_examples=40, **SETTINGS)
@given(net=any_nets(), data=st.data())
def test_zero_radius_is_tight(net, data):
    """With eps = 0 the set is one point: no ReLU is crossing, so for ReLU networks both
    relaxations are exact and J = spec @ f(x); the other relaxations (chords with a 1e-7
    rounding margin, MaxPool) must be tight up to that margin. Catches bounds that are
    sound only because they are hopelessly loose."""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="centre")
    case.eps = 0.0
    spec = spec_rows(data, net, case.center.shape[0])
    with torch.no_grad():
        want = (net(case.center).unsqueeze(1) * spec).sum(-1)
    tight = 1e-8 if net.relu_only else 1e-5
    for relaxation in RELAXATIONS:
        sched = BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation))
        J = sched.bound_output(case.make(), spec)
        assert (J <= want + tol(J, want)).all(), (relaxation, J, want)
        assert torch.allclose(J, want, rtol=tight, atol=tight), (relaxation, J, want)


@settings(max_examples=20, **SETTINGS)
@given(net=st.one_of(cnn_nets(maxpool=True), cnn_nets(("relu", "hardtanh"), maxpool=True)), data=st.data())
def test_image_bounds_are_never_looser_than_a_pass(net, data):
    """The outputs of ReLU, Clip and MaxPool are bounded from their inputs' bounds
    (``DualRule.image_bounds``) instead of by passes: on CNNs whose activations feed max pools,
    each such bound lies inside the bound a pass of one-unit rows gives on the same earlier
    bounds (float64). That they contain every sampled value is ``check_soundness``'s (a)."""
    from dataclasses import replace
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    relaxation = data.draw(st.sampled_from(["paper", "crown"]), label="relaxation")
    sched = BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation))
    input_set = case.make()
    bounds = sched.intermediate_bounds(input_set)
    imaged = [v for v in sched.bound_targets if v in sched.by_image]
    assume(imaged)  # an activation before a max pool
    batch = sched.batch(input_set, dict(bounds))
    for v in imaged:
        by_pass = sched.value_bounds(v, replace(batch, per_row=True))
        tol = 1e-9 * (1 + by_pass.upper.abs() + by_pass.lower.abs())
        assert (bounds[v].lower >= by_pass.lower - tol).all(), v.name
        assert (bounds[v].upper <= by_pass.upper + tol).all(), v.name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_optimised_s_shaped_lines_are_sound_and_tighter(dtype):
    """Sigmoid and Tanh with ``alpha``: both lines of every unit free (tangent lines
    parametrised by their slopes, intermediate bounds optimised too). The bounds hold at
    sampled and PGD points, evaluated in float64 and as the network runs in its own precision,
    are never looser than CROWN's and, at this radius, clearly tighter."""
    from dualgraph.frontends.fx import load_module
    from dualgraph.input_sets import linf_ball
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Sigmoid(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                              torch.nn.Linear(40, 5)).to(dtype)
    graph = load_module(net, torch.zeros(2, 20, dtype=dtype))
    x = torch.randn(3, 20, dtype=dtype)
    box = linf_ball(x, 1.0)
    spec = torch.randn(3, 4, 5, dtype=dtype)
    J = {r: BoundScheduler(graph, BoundConfig(relu_relaxation=r)).bound_output(box, spec).double()
         for r in ("crown", "alpha")}
    # the fixed lines keep CROWN's rounding allowance (free lines with their own offsets pay
    # their own): with no ascent, alpha is CROWN up to the order in which the (non-linear
    # under alpha) dual layers sum, in float32 too
    at_start = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=0)).bound_output(box, spec)
    assert (at_start.double() >= J["crown"] - 1e-6 * (1 + J["crown"].abs())).all()
    assert (J["alpha"] >= J["crown"] - 1e-6 * (1 + J["crown"].abs())).all()
    assert float((J["alpha"] - J["crown"]).mean()) > 0.02, (J["alpha"] - J["crown"]).tolist()
    wide = copy.deepcopy(net).double()
    pts = x.double() + (2 * torch.rand(4000, 3, 20, dtype=torch.float64) - 1)
    with torch.no_grad():
        ys = wide(pts.reshape(-1, 20)).reshape(4000, 3, 1, 5)
        ys32 = net(pts.to(dtype).reshape(-1, 20)).double().reshape(4000, 3, 1, 5)
    for values in (ys, ys32):
        assert (J["alpha"] <= (values * spec.double().unsqueeze(0)).sum(-1).amin(0)).all()
    attacked = pgd_minimise(wide, linf_ball(x.double(), 1.0), spec.double(), steps=40, restarts=2)
    assert (J["alpha"] <= attacked).all()
