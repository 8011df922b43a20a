"""The fused chain bound (:mod:`dualgraph.chain`) against the scheduler it stands in for.

Branch and bound searches with the fused passes and proves only with the float64 scheduler,
so the fused bound need not be sound to keep the answers right -- but it must be the same
bound, or the search goes astray. On random ReLU MLPs (hypothesis; float64; the scheduler
without its rounding allowance, which is the one difference the module docstring admits):

* the chain's dense maps reproduce the network, and only chains are taken for chains;
* one pass at given slopes, multipliers and splits equals the scheduler's pass at them;
* the hand-written gradient equals autograd's;
* a whole ascent (20 steps, goals, rows stopping) follows the scheduler's ascent;

and branch and bound answers the same with and without the fused passes (the MILP agreement
in ``tests/test_bab.py`` runs with them on its chain networks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dualgraph.bab import ACTIVE, INACTIVE, BranchAndBound
from dualgraph.chain import AffineChain, FusedChain, _Relaxed
from dualgraph.dual_registry import Bounds
from dualgraph.interpreter import Interpreter
from dualgraph.scheduler import BoundConfig, BoundScheduler

from strategies import DTYPE, cnn_nets, mlp_nets, residual_nets, to_ir

CHAIN_NETS = st.one_of(mlp_nets(max_width=8), cnn_nets(kinds=("conv", "avgconv", "convchain"), layers=(1, 3)))
"""MLPs (some with a value used twice: not chains) and CNNs of convolutions, average pooling
and convolutions back to back (chains whose dense maps come from convolutions)."""

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXACT = BoundConfig(relu_relaxation="alpha", rounding_allowance=False)


@settings(max_examples=40, **SETTINGS)
@given(net=mlp_nets(max_width=8), via=st.sampled_from(["fx", "onnx"]))
def test_the_dense_maps_reproduce_the_network_and_only_chains_are_taken(net, via):
    graph = to_ir(net, via)
    chain = AffineChain.of(graph, EXACT)
    used_twice = any(len(v.users) > 1 for v in [*graph.inputs, *(v for node in graph.nodes for v in node.outputs)])
    if chain is None:  # an MLP of these is a chain unless one value feeds two nodes (multi_use edges)
        assert used_twice, graph
        return
    assert not used_twice
    x = torch.randn(16, *graph.inputs[0].unit_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = Interpreter(graph).run(x)[0].reshape(16, -1)
    assert torch.allclose(chain(x), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=10, **SETTINGS)
@given(net=residual_nets(max_width=6))
def test_a_skip_connection_is_not_a_chain(net):
    assert AffineChain.of(to_ir(net), EXACT) is None


def test_another_activation_is_not_a_chain():
    from torch import nn
    from dualgraph.frontends.fx import load_module
    for act in (nn.LeakyReLU(0.1), nn.Sigmoid()):
        net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double().eval()
        assert AffineChain.of(load_module(net, torch.zeros(2, 3, dtype=torch.float64)), EXACT) is None


class _Case:
    """A chain network, a box, the scheduler's root bounds, ``D`` domains with random splits on
    the root's crossing units, their float64 bound map (as branch and bound builds it) and the
    same bounds and signs as the fused chain takes them."""

    def __init__(self, net, seed: int, D: int = 3, config: BoundConfig = EXACT, fast: bool = False) -> None:
        graph = to_ir(net)
        self.chain = AffineChain.of(graph, config)
        if self.chain is None:  # (assume() outside a hypothesis test is deprecated)
            assume(False)
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        shape, n_out = graph.inputs[0].unit_shape, graph.outputs[0].numel
        centre = torch.randn(1, *shape, dtype=DTYPE, generator=gen)
        radius = 0.1 + torch.rand(1, *shape, dtype=DTYPE, generator=gen)
        self.sched = BoundScheduler(graph, config)
        owner = np.zeros(1, dtype=np.int64)
        self.bab = BranchAndBound(self.sched, centre - radius, centre + radius, torch.zeros(1, n_out, dtype=DTYPE),
                                  torch.zeros(1, dtype=DTYPE), owner, lambda xs: None,
                                  fast=BoundScheduler(graph, config) if fast else None)
        self.bab.prepare()
        self.signs = {}
        for n in self.bab.relus:
            b = self.bab.root[n.inputs[0]]
            crossing = ((b.lower < 0) & (b.upper > 0)).flatten(1).expand(D, -1)
            pick = torch.randint(0, 3, crossing.shape, generator=gen) - 1
            self.signs[n.name] = torch.where(crossing, pick, 0).to(torch.int8)
        self.bounds = self.bab._domain_bounds(self.signs, D)
        self.D, self.n_out = D, n_out
        self.flat = [Bounds(self.bounds[n.inputs[0]].lower.flatten(1), self.bounds[n.inputs[0]].upper.flatten(1))
                     for n in self.bab.relus]
        self.sign_list = [self.signs[n.name] for n in self.bab.relus]
        self.fused = FusedChain(self.chain, torch.float64)

    def random_warm(self) -> dict:
        warm = {}
        for n in self.bab.relus:
            width = n.inputs[0].numel
            warm[(n.name, "slopes")] = torch.rand(self.D, width, dtype=DTYPE, generator=self.gen)
            warm[(n.name, "multipliers")] = torch.rand(self.D, width, dtype=DTYPE, generator=self.gen) * 2
        return warm

    def spec(self, m: int) -> torch.Tensor:
        """``m`` random rows, one of them (one case in three) in the last layer's left null space
        (``c W_L = 0``: a zero row, or two equal output units compared): the top layer's row is
        then 0 while the multipliers keep the rows below it alive."""
        C = torch.randn(m, self.n_out, dtype=DTYPE, generator=self.gen)
        if int(torch.randint(0, 3, (), generator=self.gen)) == 0:
            C[-1] = 0
        return C

    def scheduler_bound(self, spec, **kw) -> torch.Tensor:
        return self.sched.bound_output(self.bounds.batch.input_set, spec[None], self.bounds, **kw)

    def fused_bound(self, spec, goal, **kw) -> torch.Tensor:
        box = self.bab.box
        return self.fused.bound(box.lo.flatten(), box.hi.flatten(), self.flat, self.sign_list, spec, goal,
                                lr=EXACT.alpha_lr, **kw)


@settings(max_examples=30, **SETTINGS)
@given(net=CHAIN_NETS, seed=st.integers(0, 2 ** 16))
def test_one_pass_equals_the_schedulers_pass(net, seed):
    """At the same slopes, multipliers and splits (and at CROWN's slopes, multipliers 0)."""
    case = _Case(net, seed)
    spec = case.spec(2)
    no_goal = torch.full((2,), torch.inf, dtype=DTYPE)
    assert torch.allclose(case.fused_bound(spec, no_goal, steps=0), case.scheduler_bound(spec, steps=0),
                          rtol=1e-10, atol=1e-10)
    warm = case.random_warm()
    fused = case.fused_bound(spec, no_goal, steps=0, warm=warm)
    assert torch.allclose(fused, case.scheduler_bound(spec, steps=0, warm=warm), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, **SETTINGS)
@given(net=CHAIN_NETS, seed=st.integers(0, 2 ** 16))
def test_the_written_out_gradient_is_autograds(net, seed):
    case = _Case(net, seed)
    rows = case.D
    C = case.spec(rows)
    layers = [_Relaxed.of(b, s) for b, s in zip(case.flat, case.sign_list)]
    warm = case.random_warm()
    slopes = [warm[(n.name, "slopes")].clone().requires_grad_(True) for n in case.bab.relus]
    multipliers = [warm[(n.name, "multipliers")].clone().requires_grad_(True) for n in case.bab.relus]
    box = case.bab.box
    mid, rad = (box.lo.flatten() + box.hi.flatten()) / 2, (box.hi.flatten() - box.lo.flatten()) / 2
    for leave_dead_rows in (False, True):
        case.fused.leave_dead_rows = leave_dead_rows
        record = {}
        J, d_slopes, d_multipliers = case.fused.run(C, layers, mid, rad, slopes, multipliers, record, gradient=True)
        auto = torch.autograd.grad(J.sum(), slopes + multipliers)
        live = ~_dead_rows(record) if leave_dead_rows else slice(None)  # (the dead ones: the test below)
        for mine, theirs in zip(d_slopes + d_multipliers, auto):
            assert torch.allclose(mine[live], theirs[live], rtol=1e-10, atol=1e-12)


def _dead_rows(record: dict) -> torch.Tensor:
    """The rows ``[R]`` that are an exact 0 at some layer, in a ``record`` of :meth:`FusedChain.run`."""
    return torch.stack([a.flatten(1).abs().sum(1) == 0 for a in record.values()]).any(0)


@settings(max_examples=30, **SETTINGS)
@given(net=mlp_nets(max_width=8), seed=st.integers(0, 2 ** 16), warm_start=st.booleans())
def test_an_ascent_follows_the_schedulers_ascent(net, seed, warm_start):
    """20 steps from CROWN's slopes (or a warm start), goals halfway up so that rows stop
    early: the same best bounds, the same rows left open, the same last and proving variables.
    On MLPs: on convolutional chains a row's input coefficients can be exactly 0 (pixels no
    unit it reads sees), where the bound is not differentiable and the two passes' gradients
    take different subgradients, so the ascents part after a few steps (each a valid ascent).
    Likewise behind a layer that passes on nothing, unless the fused pass takes the
    scheduler's subgradient there (``leave_dead_rows = False``; the tests below)."""
    case = _Case(net, seed)
    spec = case.spec(2)
    warm = case.random_warm() if warm_start else None
    start = case.scheduler_bound(spec, steps=0)
    full = case.scheduler_bound(spec, warm=warm)
    # [m]: some rows pass it, some do not; kept off every row's first bound, which the two
    # compute in a different order (a tie would be decided by the last bit)
    goal = ((start + full) / 2).amin(0) - 1e-7 * (1 + start.abs().amax(0))
    theirs, mine = {}, {}
    expected = case.scheduler_bound(spec, goal=goal[None], warm=warm, record=theirs)
    case.fused.leave_dead_rows = False  # (where a row is dead the two take other supergradients)
    got = case.fused_bound(spec, goal, steps=EXACT.alpha_steps, warm=warm, record=mine)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9), (got, expected)
    for key in ("examples", "rows", "proving_examples", "proving_rows"):
        assert torch.equal(mine[key], theirs[key]), key
    for group in ("variables", "proving"):
        for key, t in theirs.get(group, {}).items():
            known = ~t.isnan()
            if not bool(known.any()):  # no row left open (the scheduler keeps empty tensors)
                continue
            assert torch.allclose(mine[group][key][known], t[known], rtol=1e-6, atol=1e-8), (group, key)
    for n in case.bab.relus:
        if n.name in theirs:
            assert torch.allclose(mine[n.name], theirs[n.name].flatten(1), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("net_seed, case_seed", [(14, 1), (59, 2), (100, 3)])
def test_an_ascent_follows_the_schedulers_where_a_layer_passes_on_nothing(net_seed, case_seed):
    """Networks and domains (found by fresh-seed runs of the test above) where every unit of a
    layer passes on an exact 0 for some rows (their units inactive, split or not, at multiplier
    0), so the rows behind it are exact zeros: with the scheduler's subgradient there, the same
    ascent. (The fused step once wrote the layer as ``a d + a^+ (alpha - d)``, a rounding away
    from 0, so the input term took a sign and its ascent parted from the scheduler's by 0.1 on
    one of these; it computes ``a^- d + a^+ s`` as the scheduler does.)"""
    from milp_oracle import relu_net_of_seed
    case = _Case(relu_net_of_seed(net_seed), case_seed)
    spec = case.spec(2)
    no_goal = torch.full((2,), torch.inf, dtype=DTYPE)
    expected = case.scheduler_bound(spec)
    case.fused.leave_dead_rows = False
    got = case.fused_bound(spec, no_goal, steps=EXACT.alpha_steps)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (got, expected)


def _dead_behind_the_top_layer(case: _Case, rows: int):
    """Rows ``C`` ``[rows, n_out]`` and a relaxation (made-up bounds: a bound is a number here,
    not a claim) under which the top ReLU layer passes on nothing: its units with ``a > 0``
    crossing at lower slope 0, those with ``a <= 0`` inactive; the layers below crossing
    everywhere at random slopes. Also the ray: the top layer's crossing units, 1.0."""
    gen, W = case.gen, case.fused.weights
    C = torch.randn(rows, case.n_out, dtype=DTYPE, generator=gen)
    top = C @ W[-1]
    layers, slopes = [], []
    for i, w in enumerate(W[:-1]):
        shape = (rows, w.shape[0])
        lower = -0.1 - torch.rand(shape, dtype=DTYPE, generator=gen)
        upper = 0.1 + torch.rand(shape, dtype=DTYPE, generator=gen)
        slope = torch.rand(shape, dtype=DTYPE, generator=gen)
        if i == len(W) - 2:
            upper = torch.where(top > 0, upper, lower / 2)
            slope = torch.zeros(shape, dtype=DTYPE)
        layers.append(_Relaxed.of(Bounds(lower, upper), torch.zeros(shape, dtype=torch.int8)))
        slopes.append(slope)
    ray = [torch.zeros_like(s) for s in slopes[:-1]] + [layers[-1].crossing.clone()]
    return C, layers, slopes, [torch.zeros_like(s) for s in slopes], ray


@settings(max_examples=30, **SETTINGS)
@given(net=mlp_nets(max_width=8), seed=st.integers(0, 2 ** 16))
def test_a_dead_layers_slopes_get_the_derivative_along_the_ray_where_they_fall(net, seed):
    """At a row dead behind layer ``k`` the bound is at a kink, and the fused gradient of layer
    ``k``'s slopes is the supergradient most in favour of their rising: summed over the layer's
    crossing units (at slope 0), it is the derivative of ``J`` along the ray where those slopes
    fall below 0, measured here from two passes (``J`` is linear along it: every row behind
    the layer is a multiple of the distance). The rows that are not dead keep autograd's
    gradient (the test above)."""
    case = _Case(net, seed)
    assume(len(case.fused.names) >= 2)
    C, layers, slopes, multipliers, ray = _dead_behind_the_top_layer(case, rows=4)
    box = case.bab.box
    mid, rad = (box.lo.flatten() + box.hi.flatten()) / 2, (box.hi.flatten() - box.lo.flatten()) / 2
    record = {}
    J, d_slopes, _ = case.fused.run(C, layers, mid, rad, slopes, multipliers, record, gradient=True)
    assert bool(_dead_rows(record).all())
    moving = ray[-1].sum(1) > 0
    assume(bool(moving.any()))
    t = 1e-3
    J_t = case.fused.run(C, layers, mid, rad, [s - t * v for s, v in zip(slopes, ray)], multipliers)
    along = (J_t - J) / -t
    predicted = sum((g * v).sum(1) for g, v in zip(d_slopes, ray))
    assert torch.allclose(predicted[moving], along[moving], rtol=1e-8, atol=1e-10), (predicted, along)


def test_the_scheduler_takes_another_supergradient_at_a_dead_row():
    """(So that the test above tells the two apart: from the centre of the relaxation, the
    derivative along that ray is another number.)"""
    from milp_oracle import relu_net_of_seed
    case = _Case(relu_net_of_seed(14), 1)
    C, layers, slopes, multipliers, ray = _dead_behind_the_top_layer(case, rows=4)
    box = case.bab.box
    mid, rad = (box.lo.flatten() + box.hi.flatten()) / 2, (box.hi.flatten() - box.lo.flatten()) / 2
    found = {}
    for leave_dead_rows in (True, False):
        case.fused.leave_dead_rows = leave_dead_rows
        _, d_slopes, _ = case.fused.run(C, layers, mid, rad, slopes, multipliers, gradient=True)
        found[leave_dead_rows] = sum((g * v).sum(1) for g, v in zip(d_slopes, ray))
    moving = ray[-1].sum(1) > 0
    assert bool(moving.any())
    assert not torch.allclose(found[True][moving], found[False][moving], rtol=1e-3)


@settings(max_examples=15, **SETTINGS)
@given(net=mlp_nets(max_width=8), seed=st.integers(0, 2 ** 16))
def test_an_ascent_in_chunks_of_rows_proves_and_leaves_open_the_same_rows(net, seed):
    """Rows climb on their own, so chunks of 2 rows give the open rows the same bounds and
    record; a row that passed its goal may go on a step more or less (it stops when half of
    its chunk has), so its bound only has to pass the goal in both."""
    from unittest import mock

    import dualgraph.chain
    case = _Case(net, seed)
    spec = case.spec(2)
    start, full = case.scheduler_bound(spec, steps=0), case.scheduler_bound(spec)
    goal = ((start + full) / 2).amin(0) - 1e-7 * (1 + start.abs().amax(0))
    whole, chunked = {}, {}
    expected = case.fused_bound(spec, goal, steps=EXACT.alpha_steps, record=whole)
    with mock.patch.object(dualgraph.chain, "CHUNK_ROWS", 2):
        got = case.fused_bound(spec, goal, steps=EXACT.alpha_steps, record=chunked)
    assert torch.equal(got > goal, expected > goal)
    still_open = expected <= goal
    assert torch.allclose(got[still_open], expected[still_open], rtol=1e-12, atol=0)
    for key in ("examples", "rows", "proving_examples", "proving_rows"):
        assert torch.equal(chunked[key], whole[key]), key
    assert ("input" in chunked) == ("input" in whole)
    if "input" in whole:
        assert torch.allclose(chunked["input"], whole["input"], rtol=1e-12, atol=0)
    for key, t in whole.get("variables", {}).items():
        assert torch.allclose(chunked["variables"][key], t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_branch_and_bound_proves_the_same_with_and_without_fused_passes(tmp_path, fused):
    """``tests/test_bab.py``'s float32 test property, proved by splits either way."""
    from test_bab import near_minimum_instance
    from dualgraph.verification import VerifyConfig, VerifyModel, verify_property
    from dualgraph.vnnlib import read_vnnlib
    path, vnnlib = near_minimum_instance(tmp_path)
    config = VerifyConfig(split_max_inputs=0, attack_rounds=0, relaxations=("crown",), bab_fused=fused)
    result = verify_property(VerifyModel(path), read_vnnlib(vnnlib), 30, config)
    assert result.answer == "unsat" and result.details["method"] == "branch and bound", result.details


def test_a_reshape_to_a_fixed_batch_is_taken_only_if_the_maps_reproduce_the_network(tmp_path):
    """ONNX exports often reshape to ``[1, n]``: evaluated on the batch of unit vectors such a
    segment fails or mixes examples; the chain is then refused (or, where the frontend made the
    batch free, its maps reproduce the network)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from dualgraph.frontends.onnx import load_onnx
    rng = np.random.default_rng(0)
    inits = {"shape": np.array([1, 6], dtype=np.int64), "W0": rng.standard_normal((5, 6)).astype(np.float32),
             "W1": rng.standard_normal((2, 5)).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["X", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W0"], ["z"], transB=1), helper.make_node("Relu", ["z"], ["h"]),
             helper.make_node("Gemm", ["h", "W1"], ["Y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(t, k) for k, t in inits.items()])
    ir = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    chain = AffineChain.of(ir, EXACT)
    if chain is not None:
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        assert torch.allclose(chain(x), Interpreter(ir).run(x)[0].reshape(4, -1), rtol=1e-10, atol=1e-10)
        chain.weights[0][0, 0] += 1e-3  # maps that do not reproduce the network are refused
        assert not chain._reproduces(Interpreter(ir))


@settings(max_examples=30, **SETTINGS)
@given(net=CHAIN_NETS, seed=st.integers(0, 2 ** 16))
def test_with_the_rounding_allowance_the_float32_filter_is_below_the_float64_proof(net, seed):
    """Branch and bound's fused float32 passes take off the scheduler's rounding allowance
    (:class:`dualgraph.chain.ChainAllowance`), so a row they pass is one the float64
    confirmation passes too: at the same slopes, multipliers and splits the float32 bound is
    below the float64 scheduler's (which carries its own allowance)."""
    from dualgraph.input_sets import outward
    case = _Case(net, seed, config=BoundConfig(relu_relaxation="alpha"), fast=True)
    fused = case.bab.fused
    assert fused is not None and fused.allowance is not None
    spec = case.spec(2)
    warm = case.random_warm()
    proof = case.scheduler_bound(spec, steps=0, warm=warm)
    box = case.bab.fast_box
    flat = [Bounds(*outward(b.lower, b.upper, torch.float32)) for b in case.flat]
    filtered = fused.bound(box.lo.flatten(), box.hi.flatten(), flat, case.sign_list, spec.float(),
                           torch.full((2,), torch.inf), steps=0, lr=0.1, warm={k: t.float() for k, t in warm.items()})
    assert bool((filtered.double() <= proof).all()), (filtered, proof)
