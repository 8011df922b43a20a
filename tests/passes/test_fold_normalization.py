"""passes.fold_normalization: constant affine chains merge and fold into Conv/Gemm/MatMul."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph
from dualgraph.frontends.fx import load_module
from dualgraph.passes import fold_normalization
from passes_testing import F64, Normalize, check_pass, ops


def lower(net: nn.Module, unit_shape: tuple[int, ...]) -> Graph:
    return load_module(net.double().eval(), torch.randn(2, *unit_shape, dtype=F64))


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), cin=st.integers(1, 2), cout=st.integers(1, 2), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_normalize_conv(groups, cin, cout, k, stride, padding, dilation, bias, seed):
    c = cin * groups
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, cout * groups, k, stride, padding, dilation, groups=groups, bias=bias)
    g = lower(nn.Sequential(Normalize((c, 1, 1), seed), conv, nn.ReLU()), (c, 7, 7))
    assert ops(g) == ["Sub", "Div", "Conv", "Relu"]
    g = check_pass(fold_normalization.run, g)
    # the scale always folds; the shift only without padding (zero padding is not shifted)
    assert ops(g) == (["Conv", "Relu"] if padding == 0 else ["Add", "Conv", "Relu"])


def test_scalar_normalization_1d_conv():
    g = lower(nn.Sequential(Normalize(()), nn.Conv1d(2, 3, 3)), (2, 9))
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Conv"]


def test_per_pixel_mean_is_not_folded_into_conv():
    # a shift that varies over space is not a bias; the chain is still merged
    g = lower(nn.Sequential(Normalize((2, 5, 5)), nn.Conv2d(2, 3, 3)), (2, 5, 5))
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Add", "Mul", "Conv"]


@pytest.mark.parametrize("stat_shape", [(), (1, 1, 1), (1, 4, 4)])
def test_normalize_flatten_linear(stat_shape):
    # MNIST-style: the affine op commutes past Flatten and folds into the Gemm
    g = lower(nn.Sequential(Normalize(stat_shape), nn.Flatten(), nn.Linear(16, 5), nn.ReLU()), (1, 4, 4))
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Flatten", "Gemm", "Relu"]


@pytest.mark.parametrize("bias", [True, False])
def test_normalize_linear_3d_input(bias):
    # Linear on [N, T, F] lowers to MatMul (+ Add): the scale folds into the MatMul, the
    # shift into the Add after it (and stays when there is none)
    g = lower(nn.Sequential(Normalize((3,)), nn.Linear(3, 4, bias=bias)), (2, 3))
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == (["MatMul", "Add"] if bias else ["Add", "MatMul"])


@pytest.mark.parametrize("attrs", [{}, {"transB": 1}, {"alpha": 0.5, "beta": 3.0}])
def test_gemm_and_matmul_2d(attrs):
    for op in ("Gemm", "MatMul"):
        g = Graph("g")
        x = g.add_input("x", (4,))
        sub = g.add_node("Sub", [g.add_const("m", torch.randn(4, dtype=F64)), x])  # m - x: scale -1 and shift
        mul = g.add_node("Mul", [sub.output, g.add_const("s", torch.rand(1, 4, dtype=F64) + 0.5)])
        w = torch.randn((3, 4) if attrs.get("transB") else (4, 3), dtype=F64)
        args = [mul.output, g.add_const("w", w)]
        if op == "Gemm":
            args.append(g.add_const("c", torch.randn(3, dtype=F64)))
        g.outputs = [g.add_node(op, args, attrs if op == "Gemm" else {}).output]
        if op == "MatMul" and attrs:
            continue
        infer_shapes(g)
        g = check_pass(fold_normalization.run, g)
        assert ops(g) == ["Gemm"]


def test_fan_out_blocks_folding():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.a, self.b = Normalize((2, 1, 1)), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            z = self.norm(x)
            return self.a(z) + self.b(z)

    g = lower(Two(), (2, 5, 5))
    g = check_pass(fold_normalization.run, g)  # the chain is merged, but folds into neither conv
    assert ops(g) == ["Add", "Mul", "Conv", "Conv", "Add"]


def _chain_graph(steps: list[tuple[str, torch.Tensor, bool]], unit: tuple[int, ...] = (3, 4)) -> Graph:
    g = Graph("chain")
    v = g.add_input("x", unit)
    for i, (op, c, const_first) in enumerate(steps):
        args = [v] if op == "Neg" else ([g.add_const(f"c{i}", c), v] if const_first else [v, g.add_const(f"c{i}", c)])
        v = g.add_node(op, args).output
    g.outputs = [g.add_node("Relu", [v], name="out").output]
    infer_shapes(g)
    return g


def test_chain_merges_to_add_mul():
    t = torch.tensor
    g = _chain_graph([("Mul", t(2.0, dtype=F64), True), ("Add", t([1.0, 2.0, 3.0, 4.0], dtype=F64), False),
                      ("Neg", None, False), ("Sub", t(3.0, dtype=F64), True), ("Div", t(4.0, dtype=F64), False)])
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Add", "Mul", "Relu"]


def test_chain_with_zero_scale_merges_to_mul_add():
    zero_one = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    g = _chain_graph([("Add", torch.tensor(1.0, dtype=F64), False), ("Mul", zero_one, False),
                      ("Sub", torch.tensor(0.5, dtype=F64), False)])
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Mul", "Add", "Relu"]


def test_chain_that_cancels_disappears():
    g = _chain_graph([("Mul", torch.tensor(2.0, dtype=F64), False), ("Div", torch.tensor(2.0, dtype=F64), False)])
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Relu"]


def test_constant_over_variable_is_not_affine():
    g = _chain_graph([("Div", torch.tensor(2.0, dtype=F64) + torch.zeros(4, dtype=F64), True),
                      ("Mul", torch.tensor(3.0, dtype=F64), False)])
    check_pass(fold_normalization.run, g, modified=False)


_STEP = st.tuples(st.sampled_from(["Add", "Sub", "Mul", "Div", "Neg"]),
                  st.sampled_from([(), (1,), (4,), (3, 1, 1), (4, 1), (3, 4, 4), (1, 3, 1, 1)]), st.booleans())


@settings(max_examples=50, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=6), st.sampled_from(["Relu", "Conv", "Conv_pad", "Flatten_Gemm"]),
       st.integers(0, 1000))
def test_random_chains_then_consumer(steps, consumer, seed):
    gen = torch.Generator().manual_seed(seed)
    g = Graph("h")
    v = g.add_input("x", (3, 4, 4))
    for i, (op, shape, const_first) in enumerate(steps):
        if op == "Neg":
            v = g.add_node("Neg", [v]).output
            continue
        c = g.add_const(f"c{i}", torch.rand(shape, generator=gen, dtype=F64) + 0.5)
        v = g.add_node(op, [c, v] if const_first and op != "Div" else [v, c]).output
    if consumer == "Relu":
        v = g.add_node("Relu", [v]).output
    elif consumer.startswith("Conv"):
        pads = [1, 1, 1, 1] if consumer == "Conv_pad" else [0, 0, 0, 0]
        v = g.add_node("Conv", [v, g.add_const("w", torch.randn(2, 3, 3, 3, generator=gen, dtype=F64))],
                       {"kernel_shape": [3, 3], "pads": pads}).output
    else:
        f = g.add_node("Flatten", [v], {"axis": 1}).output
        v = g.add_node("Gemm", [f, g.add_const("w", torch.randn(5, 48, generator=gen, dtype=F64))],
                       {"transB": 1}).output
    g.outputs = [v]
    infer_shapes(g)
    g = check_pass(fold_normalization.run, g, modified=None)
    affine = [op for op in ops(g) if op in ("Add", "Sub", "Mul", "Div", "Neg")]
    assert len(affine) <= max(2, len(steps) == 1)
    if consumer == "Flatten_Gemm":
        assert not affine  # anything elementwise folds through a Flatten into a Gemm


def test_lone_constant_minus_x_splits_and_folds():
    g = lower(nn.Sequential(_RSub(), nn.Flatten(), nn.Linear(6, 2)), (2, 3))
    assert ops(g) == ["Sub", "Flatten", "Gemm"]
    g = check_pass(fold_normalization.run, g)
    assert ops(g) == ["Flatten", "Gemm"]


class _RSub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.rand(2, 1) + 1)

    def forward(self, x):
        return self.c - x


def test_noop_as_graph_output_is_stable():
    g = Graph("noop")
    x = g.add_input("x", (3,))
    r = g.add_node("Relu", [x])
    g.outputs = [g.add_node("Mul", [r.output, g.add_const("one", torch.ones(3, dtype=F64))]).output]
    infer_shapes(g)
    check_pass(fold_normalization.run, g, modified=False)
