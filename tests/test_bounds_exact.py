"""The fast exact path equals an independent slow computation of Theorem 1.

The reference below shares no code with the library: it takes the dense matrix ``W_ij`` and
bias ``b_i`` of every affine piece of a generated network (``strategies.affine_pieces``: the
``torch.autograd.functional.jacobian`` of the module's own affine piece) and evaluates
the paper's formula

    J(c) = -sum_i nu_i^T b_i - nu_hat_1^T x - ||nu_hat_1||_* term + sum_i sum_{j in I_i} l_ij [nu_ij]_+

with ``nu_K = -c``, ``nu_hat_j = sum_{i child of j} W_ij^T nu_i`` (fan-out summed) and
``nu_j = D_j nu_hat_j`` (Corollary 2), by ONE reverse pass per specification row: per unit
``c = +-e_j`` for every intermediate bound, layer by layer, then per row of the final
specification. For CROWN the slope on a crossing unit is ``d_j = u/(u-l)`` where
``nu_hat_j > 0`` (the upper line is used) and ``a_j = [u > -l]`` elsewhere.

All intermediate bounds and final bounds must agree with :class:`BoundScheduler` to 1e-6
(float64), in every exact code path (backward, forward, auto; with and without conv patches;
chunked identity rows), on MLPs, residual and dense/concat DAGs and CNNs (strides, padding, dilation,
groups, average pooling, residual and channel-concat blocks), for L-inf, clipped L-inf
and L2 input sets. A hand-computed 2-layer example pins the formula itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dualgraph import alpha, dual_run, patches
from dualgraph.input_sets import L2Ball, linf_ball
from dualgraph.scheduler import BoundConfig, BoundScheduler

from strategies import DTYPE, DagNet, SetCase, affine_pieces, cnn_nets, conv_chain_nets, drawn_conv_transposes, input_sets, relu_nets, residual_cnn_nets, to_ir

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the independent reference ------------------------------------------------------------------

def input_term(nu_hat: torch.Tensor, case: SetCase, b: int) -> torch.Tensor:
    """``min_{x in B} -nu_hat^T x`` in the paper's closed forms."""
    x = case.center[b].reshape(-1)
    if case.kind == "l2":
        return -nu_hat @ x - case.eps * nu_hat.norm(p=2)
    if case.kind == "linf":
        return -nu_hat @ x - case.eps * nu_hat.abs().sum()
    lo = (x - case.eps).clamp(0.0, 1.0)
    hi = (x + case.eps).clamp(0.0, 1.0)
    return -nu_hat @ ((lo + hi) / 2) - (nu_hat * (hi - lo) / 2).abs().sum()


def slow_bound(pieces, target: int, c: torch.Tensor, case: SetCase, b: int,
               lu: dict[int, tuple[torch.Tensor, torch.Tensor]], relaxation: str) -> float:
    """Theorem 1 for ONE row ``c`` of node ``target``'s pre-activation, by one reverse pass."""
    nu_hat: dict[int, torch.Tensor] = {}   # dual of each feature (post-activation / input)
    J = torch.zeros((), dtype=DTYPE)
    for k in range(target, 0, -1):
        W, bias, act = pieces[k]
        if k == target:
            nu = -c
        elif k not in nu_hat:
            continue                      # node k does not reach the target
        elif act is None:
            nu = nu_hat.pop(k)
        else:                              # ReLU: nu = D nu_hat, Corollary 2
            nh = nu_hat.pop(k)
            l, u = lu[k]
            cross = (l < 0) & (u > 0)
            d = torch.where(cross, u / torch.where(cross, u - l, 1.0), (l >= 0).to(DTYPE))
            if relaxation == "paper":
                slope = d
            else:                          # CROWN: adaptive lower line where it is the one used
                slope = torch.where(cross & (nh <= 0), (u > -l).to(DTYPE), d)
            nu = slope * nh
            J = J + (l * nu.clamp(min=0))[cross].sum()
        J = J - nu @ bias
        for j, Wij in W.items():
            nu_hat[j] = nu_hat.get(j, 0) + Wij.t() @ nu
    return float(J + input_term(nu_hat[0], case, b))


def slow_all(net: DagNet, case: SetCase, spec: torch.Tensor, relaxation: str):
    """Every intermediate bound (one pass per unit and sign) and the final bounds, per example."""
    pieces = affine_pieces(net)
    B = case.center.shape[0]
    lus = [dict() for _ in range(B)]
    for b in range(B):
        for i in net.bounded:
            n = pieces[i][1].numel()
            eye = torch.eye(n, dtype=DTYPE)
            lo = torch.tensor([slow_bound(pieces, i, eye[j], case, b, lus[b], relaxation) for j in range(n)])
            up = torch.tensor([-slow_bound(pieces, i, -eye[j], case, b, lus[b], relaxation) for j in range(n)])
            lus[b][i] = (lo.to(DTYPE), up.to(DTYPE))
    K = len(net.dag)
    final = torch.tensor([[slow_bound(pieces, K, spec[b if spec.shape[0] > 1 else 0, r], case, b, lus[b],
                                      relaxation) for r in range(spec.shape[1])] for b in range(B)], dtype=DTYPE)
    return lus, final


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got - want).abs() <= 1e-6 * (1 + want.abs())).all())


# ---- the tests ------------------------------------------------------------------------------------

def scheduler_variants(relaxation: str) -> list[tuple[BoundConfig, float]]:
    """Every exact code path: backward / forward (Appendix F, linear dual layers only) / auto,
    with and without convolution patches, backward with tiny chunks of identity rows, and
    stable units pruned or not; pruned rows either picked one by one (open share 1) or all
    run (open share 0) or as the default decides."""
    directions = ("backward", "forward", "auto") if relaxation == "paper" else ("backward", "auto")
    default = dual_run.MAX_OPEN_SHARE
    out = [(BoundConfig(relu_relaxation=relaxation, direction=d, patches=p), default)
           for d in directions for p in (True, False)]
    out += [(BoundConfig(relu_relaxation=relaxation, direction="backward", patches=p), share)
            for p in (True, False) for share in (0.0, 1.0)]
    out += [(BoundConfig(relu_relaxation=relaxation, direction="backward", patches=p, prune_stable=False), default)
            for p in (True, False)]
    out.append((BoundConfig(relu_relaxation=relaxation, direction="backward", patches=False, max_elements=1), 1.0))
    out.append((BoundConfig(relu_relaxation=relaxation, direction="backward", patches=True, max_elements=97), 1.0))
    return out


def describe(cfg: BoundConfig) -> str:
    return (f"{cfg.relu_relaxation}/{cfg.direction}/patches={cfg.patches}/max_elements={cfg.max_elements}"
            f"/prune_stable={cfg.prune_stable}")


def check_unit_bounds(cfg: BoundConfig, name: str, got_lo, got_up, lo, up) -> None:
    """Exact bounds everywhere, or with ``prune_stable``: exact on every crossing unit; a
    stable unit may keep a looser bound, but one that leaves it stable."""
    exact = torch.ones_like(lo, dtype=torch.bool)
    if cfg.prune_stable:
        exact = (lo < 0) & (up > 0)
        looser = (got_lo <= lo + 1e-6 * (1 + lo.abs())) & (got_up >= up - 1e-6 * (1 + up.abs()))
        stable = (got_lo >= 0) | (got_up <= 0)
        assert (looser & stable)[~exact].all(), f"{describe(cfg)}: a pruned unit of {name} is not stable"
    for got, want, side in ((got_lo, lo, "lower"), (got_up, up, "upper")):
        assert close(got[exact], want[exact]), (
            f"{describe(cfg)}: {side} bounds of {name} differ by {(got - want)[exact].abs().max():.3g}")


@settings(max_examples=40, **SETTINGS)
@given(net=relu_nets(), data=st.data())
def test_scheduler_equals_one_pass_per_unit(net, data):
    graph = to_ir(net, via=data.draw(st.sampled_from(["fx", "fx+simplify"]), label="frontend"))
    case = data.draw(input_sets(net.input_shape), label="input set")
    relaxation = data.draw(st.sampled_from(["paper", "crown"]), label="relaxation")
    B = case.center.shape[0]
    spec = torch.randn(data.draw(st.sampled_from([1, B])), 3, net.n_out, dtype=DTYPE,
                       generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000))))
    relu_inputs = [n.inputs[0] for n in graph.nodes if n.op_type == "Relu"]
    assert len(relu_inputs) == len(net.bounded), "the IR should have one Relu per activation of the net"
    lus, final = slow_all(net, case, spec, relaxation)
    transposes = drawn_conv_transposes(data)

    for cfg, open_share in scheduler_variants(relaxation):
        sched = BoundScheduler(graph, cfg)
        with mock.patch.object(dual_run, "MAX_OPEN_SHARE", open_share), transposes():
            bounds = sched.intermediate_bounds(case.make())
            J = sched.bound_output(case.make(), spec, bounds)
        assert set(bounds) == set(relu_inputs), describe(cfg)
        for i, v in zip(net.bounded, relu_inputs):
            for b in range(B):
                lo, up = lus[b][i]
                got = bounds[v]
                assert got.lower[b].numel() == lo.numel(), (v, net.pre_shapes[i])
                check_unit_bounds(cfg, f"{v.name} (node {i}, example {b})", got.lower[b].reshape(-1),
                                  got.upper[b].reshape(-1), lo, up)
        assert close(J, final), (describe(cfg), J, final)


def two_layer_net() -> nn.Module:
    """f(x) = W2 relu(W1 x + b1) + b2 with W1 = [[1, 1], [1, -1]], b1 = [.5, -.5], W2 = [[1, -1]], b2 = .25."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).to(DTYPE)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.copy_(torch.tensor([0.25]))
    return net


def test_two_layer_by_hand():
    """Theorem 1 / Corollary 2 worked by hand for x in the L-inf ball of radius 1 around 0.

    z = W1 x + b1 lies in [-1.5, 2.5] x [-2.5, 1.5]: both units cross, D = diag(5/8, 3/8).
    Paper, c = 1: nu_3 = -1, nu_hat_2 = W2^T nu_3 = (-1, 1), nu_2 = D nu_hat_2 = (-5/8, 3/8),
    nu_hat_1 = W1^T nu_2 = (-1/4, -1). J = -nu_3 b2 - nu_2^T b1 - 0 - ||nu_hat_1||_1
    + l_2 [nu_22]_+ = 0.25 + 0.5 - 1.25 - 2.5 * 3/8 = -1.4375.
    CROWN: unit 1 takes lower slope 1 (u > -l), unit 2 the upper line (nu_hat > 0):
    nu_2 = (-1, 3/8), nu_hat_1 = (-5/8, -11/8): J = 0.25 + 0.6875 - 2 - 0.9375 = -2.
    """
    graph = to_ir_sequential(two_layer_net())
    box = linf_ball(torch.zeros(1, 2, dtype=DTYPE), 1.0)
    for relaxation, want in (("paper", -1.4375), ("crown", -2.0)):
        sched = BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation))
        bounds = sched.intermediate_bounds(box)
        (b,) = bounds.values()
        assert torch.allclose(b.lower, torch.tensor([[-1.5, -2.5]], dtype=DTYPE), atol=1e-12)
        assert torch.allclose(b.upper, torch.tensor([[2.5, 1.5]], dtype=DTYPE), atol=1e-12)
        J = sched.bound_output(box, torch.ones(1, 1, 1, dtype=DTYPE), bounds)
        assert abs(float(J) - want) < 1e-12, (relaxation, float(J), want)
    # and the bound is below the true minimum (-0.75, e.g. at x = (1, -1)) found on a grid
    g = torch.linspace(-1, 1, 201, dtype=DTYPE)
    xs = torch.cartesian_prod(g, g)
    with torch.no_grad():
        true_min = float(two_layer_net()(xs).min())
    assert abs(true_min + 0.75) < 1e-12
    # L2 ball: z_j = w_j x + b_j with ||w_j||_2 = sqrt(2): l, u = b_j -+ sqrt(2)
    ball = L2Ball(torch.zeros(1, 2, dtype=DTYPE), 1.0)
    sched = BoundScheduler(graph, BoundConfig())
    (b,) = sched.intermediate_bounds(ball).values()
    r2 = 2 ** 0.5
    assert torch.allclose(b.lower, torch.tensor([[0.5 - r2, -0.5 - r2]], dtype=DTYPE), atol=1e-12)
    assert torch.allclose(b.upper, torch.tensor([[0.5 + r2, -0.5 + r2]], dtype=DTYPE), atol=1e-12)
    # paper with D = diag(d1, d2), d_j = u_j / (u_j - l_j): nu_2 = (-d1, d2), nu_hat_1 = (d2 - d1, -d1 - d2)
    d1, d2 = (0.5 + r2) / (2 * r2), (-0.5 + r2) / (2 * r2)
    want = 0.25 - (-d1 * 0.5 + d2 * -0.5) - ((d2 - d1) ** 2 + (d1 + d2) ** 2) ** 0.5 + (-0.5 - r2) * d2
    J = sched.bound_output(ball, torch.ones(1, 1, 1, dtype=DTYPE))
    assert abs(float(J) - want) < 1e-12, (float(J), want)


def to_ir_sequential(module: nn.Module):
    from dualgraph.frontends.fx import load_module
    return load_module(module, torch.zeros(2, 2, dtype=DTYPE))


@settings(max_examples=25, **SETTINGS)
@given(net=residual_cnn_nets(), data=st.data())
def test_patches_through_residual_blocks(net, data):
    """Residual CNNs (identity and strided convolutional shortcuts): the patch path, which
    starts at block outputs and carries windows through both branches of each block, gives
    the one-pass-per-unit bounds in every configuration, whichever way a convolution's
    transpose runs on windows (matrix product, ``conv_transpose2d``, or the strided ones
    phase by phase: :func:`dualgraph.linalg.conv_transpose2d`)."""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    relaxation = data.draw(st.sampled_from(["paper", "crown"]), label="relaxation")
    by_matrix = data.draw(st.booleans(), label="conv transpose by matrix")
    spec = torch.randn(1, 3, net.n_out, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    lus, final = slow_all(net, case, spec, relaxation)
    relu_inputs = [n.inputs[0] for n in graph.nodes if n.op_type == "Relu"]
    transposes = drawn_conv_transposes(data)
    for cfg, open_share in scheduler_variants(relaxation):
        sched = BoundScheduler(graph, cfg)
        with mock.patch.object(dual_run, "MAX_OPEN_SHARE", open_share), transposes(), \
                mock.patch.object(patches, "by_matrix", lambda *_: by_matrix):
            bounds = sched.intermediate_bounds(case.make())
            J = sched.bound_output(case.make(), spec, bounds)
        for i, v in zip(net.bounded, relu_inputs):
            for b in range(case.center.shape[0]):
                lo, up = lus[b][i]
                check_unit_bounds(cfg, f"{v.name} (node {i}, example {b})", bounds[v].lower[b].reshape(-1),
                                  bounds[v].upper[b].reshape(-1), lo, up)
        assert close(J, final), (describe(cfg), J, final)


@contextlib.contextmanager
def recording(module, name: str, what):
    """``module.name`` wrapped so that each call appends ``what(*args)`` to the list yielded."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kw):
        calls.append(what(*args))
        return real(*args, **kw)

    with mock.patch.object(module, name, wrapper):
        yield calls


def test_patches_stay_on_windows_across_skips():
    """A block output's bounds run on patches through both branches and the fan-out sum
    where they meet (identity skip: windows 5 and 1 wide; strided shortcut: windows of
    different padding), and equal the dense rows' bounds."""
    torch.manual_seed(0)
    net = DagNet((2, 12, 12), "resnet")
    a = net.add([0], [nn.Conv2d(2, 3, 3, padding=1)], act="relu")
    inner = net.add([a], [nn.Conv2d(3, 3, 3, padding=1)], act="relu")
    b = net.add([a, inner], [nn.Identity(), nn.Conv2d(3, 3, 3, padding=1)], skips=[True, False], act="relu")
    inner = net.add([b], [nn.Conv2d(3, 4, 3, stride=2, padding=1)], act="relu")
    c = net.add([b, inner], [nn.Conv2d(3, 4, 1, stride=2), nn.Conv2d(4, 4, 3, padding=1)], act="relu")
    net.add([c], [nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))])
    net = net.to(DTYPE).eval()
    graph = to_ir(net)
    x = torch.rand(2, 2, 12, 12, dtype=DTYPE)
    def bounds(cfg):
        return BoundScheduler(graph, cfg).intermediate_bounds(linf_ball(x, 0.05))

    with recording(patches, "aligned_sum", lambda parts: {(p.kernel, p.padding, p.stride) for p in parts}) as sums:
        got = bounds(BoundConfig(direction="backward", prune_stable=False))
    want = bounds(BoundConfig(direction="backward", patches=False, prune_stable=False))
    assert {(5, 2, 1), (1, 0, 1)} in sums, sums          # the identity skip: (kernel, padding, stride)
    assert {(1, 0, 2), (7, 3, 2)} in sums, sums          # the strided block's 1x1 shortcut and main branch
    for v in want:
        assert close(got[v].lower, want[v].lower) and close(got[v].upper, want[v].upper), v.name


def test_conv_transpose_rule_and_float32_agreement():
    """The documented rule for a Conv transpose on windows (:func:`patches.by_matrix`), and
    float32 bounds through a residual CNN that agree whichever way each transpose runs (the
    same sums in another order; both carry their own rounding allowance)."""
    f32, f64 = torch.float32, torch.float64
    assert patches.by_matrix(1, 3, 3, 64, 10_000, f32)           # one-pixel windows: no extra work
    assert patches.by_matrix(3, 5, 3, 16, 57_600, f32)           # 2.8x the work, 16 channels: matrix
    assert not patches.by_matrix(3, 5, 3, 32, 230_400, f32)      # ... 32 channels: conv_transpose2d
    assert not patches.by_matrix(5, 7, 3, 16, 313_600, f32)      # 5.4x the work
    assert patches.by_matrix(7, 16, 4, 3, 500_000, f32)          # a stem to 3 channels: 16x the work
    assert patches.by_matrix(9, 11, 3, 64, 3_000_000, f64)       # float64: always the matrix ...
    assert not patches.by_matrix(9, 11, 3, 64, patches.MAX_DENSE_TRANSPOSE + 1, f64)  # ... up to its size
    torch.manual_seed(0)
    net = DagNet((3, 10, 10), "resnet")
    a = net.add([0], [nn.Conv2d(3, 8, 3, padding=1)], act="relu")
    inner = net.add([a], [nn.Conv2d(8, 8, 3, padding=1)], act="relu")
    b = net.add([a, inner], [nn.Identity(), nn.Conv2d(8, 8, 3, padding=1)], skips=[True, False], act="relu")
    net.add([b], [nn.Sequential(nn.Flatten(), nn.Linear(8 * 10 * 10, 4))])
    from dualgraph.frontends.fx import load_module
    graph = load_module(net.to(f32).eval(), torch.zeros(2, 3, 10, 10))
    x = torch.rand(2, 3, 10, 10)
    spec = torch.randn(1, 3, 4)
    out = {}
    for by_matrix in (True, False):
        with mock.patch.object(patches, "by_matrix", lambda *_: by_matrix):
            sched = BoundScheduler(graph, BoundConfig(direction="backward", prune_stable=False))
            bounds = sched.intermediate_bounds(linf_ball(x, 0.02))
            out[by_matrix] = [t for b_ in bounds.values() for t in (b_.lower, b_.upper)]
            out[by_matrix].append(sched.bound_output(linf_ball(x, 0.02), spec, bounds))
    for m, c in zip(out[True], out[False]):
        torch.testing.assert_close(m, c, rtol=1e-4, atol=1e-4)


def _noisy_padding(real):
    """``through_conv`` with every entry outside the map (the padding a transpose leaves
    dirty, ``Patches.clean``) set to huge noise."""
    def through_conv(p, node, cache=None):
        q, offset = real(p, node, cache)
        inside = q.windows(q.data.new_ones(1, 1, *node.inputs[0].unit_shape[1:]))
        noise = 1e6 * torch.randn(q.data.shape, generator=torch.Generator().manual_seed(0), dtype=q.data.dtype)
        return replace(q, data=q.data * inside + (1 - inside) * noise), offset
    return through_conv


@settings(max_examples=40, **SETTINGS)
@given(net=st.one_of(conv_chain_nets(), residual_cnn_nets(), cnn_nets()), data=st.data())
def test_padding_entries_never_reach_a_bound(net, data):
    """A Conv transpose on windows leaves its padding entries unmasked until the next
    transpose (:meth:`patches.Patches.masked`): filling them with noise after every transpose
    must change no bound and no final objective (optimised slopes included)."""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    relaxation = data.draw(st.sampled_from(["paper", "crown", "alpha"]), label="relaxation")
    prune = data.draw(st.booleans(), label="prune stable units")
    spec = torch.randn(1, 3, net.n_out, dtype=DTYPE, generator=torch.Generator().manual_seed(0))

    def run():
        sched = BoundScheduler(graph, BoundConfig(relu_relaxation=relaxation, alpha_steps=3, prune_stable=prune))
        input_set = case.make()
        bounds = sched.intermediate_bounds(input_set)
        J = sched.bound_output(input_set, spec, bounds)
        return [t.detach() for b in bounds.values() for t in (b.lower, b.upper)] + [J.detach()]

    plain = run()
    with mock.patch.object(patches, "through_conv", _noisy_padding(patches.through_conv)):
        noisy = run()
    for a, b in zip(plain, noisy):
        assert torch.equal(a, b), (relaxation, prune, (a - b).abs().max())


FREE_LINE_ACTS = ("relu", "tanh", "sigmoid", "hardtanh", "softplus", "abs")
"""Activations with free lines under alpha: ReLU's lower slopes, and both lines with their own
offsets (dualgraph.dual_registry.FreeLines)."""


@settings(max_examples=16, **SETTINGS)
@given(net=st.one_of(residual_cnn_nets(), cnn_nets(), cnn_nets(FREE_LINE_ACTS)), data=st.data())
def test_optimised_slopes_on_windows_equal_dense_rows(net, data):
    """Optimised slopes (alpha) of a feature map's units run on the rows' windows when the
    whole pass stays on patches, with each row's slopes on its own window: the same ascent as
    on dense rows (a slope outside a row's window has no gradient and never moves), so the
    intermediate bounds and ``J`` agree in float64, for lines with offsets of their own too."""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    spec = torch.randn(1, 3, net.n_out, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    got = []
    for on_windows in (True, False):
        sched = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=4, alpha_lr=0.3,
                                                  direction="backward", patches=on_windows))
        bounds = sched.intermediate_bounds(case.make())
        got.append((bounds, sched.bound_output(case.make(), spec, bounds)))
    (windows, J_windows), (dense, J_dense) = got
    for v in dense:
        assert close(windows[v].lower, dense[v].lower) and close(windows[v].upper, dense[v].upper), v.name
    assert close(J_windows, J_dense), (J_windows, J_dense)


def test_optimised_slopes_on_windows_survive_rows_that_vanish_in_an_l2_ball():
    """A row can vanish before the input: the lower bound row of a crossing unit whose window
    meets only crossing ReLUs that CROWN gives the lower slope 0 (their inputs reach further
    below 0 than above). Its L2 input term ``eps ||lam||_2`` is then the norm of zero, whose
    subgradient must be 0 (the dense rows' ``norm`` gives 0): a ``sqrt`` of the squares gave
    NaN, the ascent's slopes became NaN, and so did the bound (a max pool after it failed).
    On windows the ascent gives the dense rows' bounds, all finite."""
    net = DagNet((1, 6, 6), "cnn")
    a = net.add([0], [nn.Conv2d(1, 1, 3, padding=1)], act="relu")
    b = net.add([a], [nn.Conv2d(1, 1, 3, padding=1)], act="relu")
    net.add([b], [nn.Sequential(nn.Flatten(), nn.Linear(36, 2))])
    net = net.to(DTYPE).eval()
    first, second = net.dag[a - 1].edges[0], net.dag[b - 1].edges[0]
    with torch.no_grad():  # every first-layer unit crosses, reaching further down than up
        first.weight.fill_(1.0), first.bias.fill_(-1.5)
        second.weight.fill_(1.0), second.bias.fill_(-0.2)
    graph = to_ir(net)
    x = torch.full((1, 1, 6, 6), 0.1, dtype=DTYPE)
    got = []
    for on_windows in (True, False):
        sched = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=4, direction="backward",
                                                  patches=on_windows))
        got.append(sched.intermediate_bounds(L2Ball(x, 0.5)))
    windows, dense = got
    for v in dense:
        assert torch.isfinite(windows[v].lower).all() and torch.isfinite(windows[v].upper).all(), v.name
        assert close(windows[v].lower, dense[v].lower) and close(windows[v].upper, dense[v].upper), v.name


@pytest.mark.parametrize("allowance", [True, False])
def test_optimised_slopes_run_on_windows(allowance):
    """The alpha ascent of a convolution's units behind a ReLU runs on patches (the slopes'
    windows are used), and its bounds equal the dense rows' ascent; with or without the
    rounding allowance (without it a relaxation's offsets stay plain numbers)."""
    torch.manual_seed(3)
    net = DagNet((1, 10, 10), "cnn")
    a = net.add([0], [nn.Conv2d(1, 3, 3, padding=1)], act="relu")
    b = net.add([a], [nn.Conv2d(3, 4, 3, stride=2, padding=1)], act="relu")
    net.add([b], [nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))])
    net = net.to(DTYPE).eval()
    graph = to_ir(net)
    x = torch.rand(2, 1, 10, 10, dtype=DTYPE)
    def bounds(on_windows):
        cfg = BoundConfig(relu_relaxation="alpha", alpha_steps=3, direction="backward", patches=on_windows,
                          rounding_allowance=allowance)
        return BoundScheduler(graph, cfg).intermediate_bounds(linf_ball(x, 0.1))

    with recording(patches, "through_elementwise_with_slopes", lambda p, *rest: p.data.shape) as calls:
        got = bounds(True)
    assert calls and all(shape[-1] < 10 for shape in calls), calls  # windows, not whole maps
    want = bounds(False)
    for v in want:
        assert close(got[v].lower, want[v].lower) and close(got[v].upper, want[v].upper), v.name


POOLED = dict(maxpool=True, layers=(2, 4), sizes=(8, 12), pool_chance=0.8)


@settings(max_examples=30, **{**SETTINGS, "suppress_health_check": [*SETTINGS["suppress_health_check"],
                                                                  HealthCheck.filter_too_much]})
@given(net=st.one_of(cnn_nets(**POOLED), cnn_nets(("relu", "hardtanh"), **POOLED)), data=st.data())
def test_max_pool_on_windows_equals_dense_rows(net, data):
    """Passes carry their windows through max pools (:func:`dualgraph.patches.through_max_pool`):
    each bounded value's bounds, computed from the same earlier bounds, equal the dense rows'
    in float64, with every relaxation, pruned or not (open rows run alone or with all rows),
    with tiny chunks, and whichever way convolution transposes run. (Comparing two whole runs
    would not do: where two entries of a pool window have bounds equal up to rounding, which
    one the lines pick may differ between two runs, and both are sound.)"""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    relaxation = data.draw(st.sampled_from(["paper", "crown", "alpha"]), label="relaxation")
    prune = data.draw(st.booleans(), label="prune stable units")
    chunk = data.draw(st.sampled_from([1 << 24, 97]), label="max_elements")
    # whether a chunk's rows left open by the pruning cut run alone or with all the others
    # (the others then get exact bounds, else they keep the cut's) depends on where the chunks
    # end, which differs between windows and dense rows: the same rule for both. "With all the
    # others" (share 0) only in one chunk: a chunk of tiny ones may have no open row at all, and
    # then keeps the cut's bounds where the dense rows' one chunk runs them all
    shares = [0.0, 1.0] if chunk > 97 else [1.0]
    open_share = data.draw(st.sampled_from(shares), label="open share") if prune else dual_run.MAX_OPEN_SHARE
    config = dict(relu_relaxation=relaxation, alpha_steps=3, direction="backward", prune_stable=prune)
    on_windows = BoundScheduler(graph, BoundConfig(patches=True, max_elements=chunk, **config))
    dense = BoundScheduler(graph, BoundConfig(patches=False, **config))
    input_set = case.make()
    transposes = drawn_conv_transposes(data)
    with recording(patches, "through_max_pool", lambda p, *rest: p.data.shape) as calls, transposes(), \
            mock.patch.object(dual_run, "MAX_OPEN_SHARE", open_share):
        bounds = on_windows.intermediate_bounds(input_set)
        for v in on_windows.bound_targets:
            if v in on_windows.by_image:
                continue
            earlier = {k: b for k, b in bounds.items() if k is not v}
            got = on_windows.value_bounds(v, replace(on_windows.batch(input_set, earlier), per_row=True))
            want = dense.value_bounds(v, replace(dense.batch(input_set, earlier), per_row=True))
            assert close(got.lower, want.lower) and close(got.upper, want.upper), (v.name, describe(on_windows.config))
    assume(calls)  # some pass reached a max pool on its windows


@pytest.mark.parametrize("prune", [True, False])
def test_optimised_slopes_reach_values_whose_relu_feeds_a_pool(prune):
    """A ReLU output feeding a max pool takes the image of its input's bounds; those input
    bounds, computed unpruned, still get their crossing units optimised with ``alpha``, and
    so do they with pruning switched off everywhere (``dump --bounds`` does)."""
    torch.manual_seed(5)
    net = DagNet((1, 8, 8), "cnn")
    a = net.add([0], [nn.Conv2d(1, 3, 3, padding=1)], act="relu")
    net.dag[a - 1].post = nn.MaxPool2d(2)
    net.feat_shapes[a] = (3, 4, 4)
    b = net.add([a], [nn.Conv2d(3, 3, 3, padding=1)], act="relu")
    net.dag[b - 1].post = nn.MaxPool2d(2)
    net.feat_shapes[b] = (3, 2, 2)
    net.add([b], [nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 3))])
    net = net.to(DTYPE).eval()
    graph = to_ir(net)
    sched = BoundScheduler(graph, BoundConfig(relu_relaxation="alpha", alpha_steps=5, prune_stable=prune))
    conv = [n.outputs[0] for n in graph.nodes if n.op_type == "Conv"][1]  # behind a ReLU and a pool
    input_set = linf_ball(torch.rand(1, 1, 8, 8, dtype=DTYPE), 0.2)
    crown = sched.intermediate_bounds(input_set, optimise_slopes=False)
    with recording(alpha, "optimise_rows", lambda runner, dual, rows, *rest: dual.meta["target"]) as targets:
        optimised = sched.intermediate_bounds(input_set, optimise_slopes=True)
    assert conv in targets and any(v in sched.by_image for v in optimised)
    assert (optimised[conv].upper - optimised[conv].lower).sum() < (crown[conv].upper - crown[conv].lower).sum()


@settings(max_examples=24, **{**SETTINGS, "suppress_health_check": [*SETTINGS["suppress_health_check"],
                                                                  HealthCheck.filter_too_much]})
@given(net=cnn_nets(**POOLED), data=st.data())
def test_forward_direction_equals_backward_before_a_pool(net, data):
    """The forward direction (Appendix F) gives the backward direction's bounds and ``J`` in
    exact arithmetic on networks whose ReLU outputs feed max pools: a value whose bounds are
    the image of its producer's input bounds (``BoundScheduler.by_image``, a ReLU before a
    pool) takes that image in both directions, not the forward pass's looser relaxed range
    (found by a review: forward lower bounds 0.07-0.1 below backward's, ``J`` moved either way)."""
    graph = to_ir(net)
    case = data.draw(input_sets(net.input_shape), label="input set")
    spec = torch.randn(1, 3, net.n_out, dtype=DTYPE, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    runs = {}
    for direction in ("backward", "forward"):
        sched = BoundScheduler(graph, BoundConfig(direction=direction, rounding_allowance=False, prune_stable=False))
        assume(direction == "backward" or sched.direction.forward_ok)  # no MaxPool before the last bounded value
        bounds = sched.intermediate_bounds(case.make())
        runs[direction] = (bounds, sched.bound_output(case.make(), spec, bounds), sched.by_image)
    (back, J_back, images), (fwd, J_fwd, _) = runs["backward"], runs["forward"]
    assume(images)  # some bounded value feeds a pool
    for v in back:
        assert close(fwd[v].lower, back[v].lower) and close(fwd[v].upper, back[v].upper), v.name
    assert close(J_fwd, J_back)
