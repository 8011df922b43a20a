"""passes.fold_batchnorm: Conv/Gemm/MatMul -> BN becomes one op; numbers unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.interpreter import infer_shapes
from dualgraph.ir import Graph
from dualgraph.frontends.fx import load_module
from dualgraph.passes import fold_batchnorm
from passes_testing import F64, check_pass, ops, randomize_bn


def lower(net: nn.Module, unit_shape: tuple[int, ...]) -> Graph:
    net = randomize_bn(net.double())
    return load_module(net, torch.randn(2, *unit_shape, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(dims=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), cin=st.integers(1, 3), cout=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 1000))
def test_conv_bn_folds(dims, groups, cin, cout, k, stride, padding, bias, eps, seed):
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin * groups, cout * groups, k, stride, padding,
                                                    groups=groups, bias=bias)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(cout * groups, eps=eps)
    torch.manual_seed(seed)
    g = lower(nn.Sequential(conv, bn, nn.ReLU()), (cin * groups, *[6] * dims))
    assert ops(g) == ["Conv", "BatchNormalization", "Relu"]
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Conv", "Relu"]
    assert g.nodes[0].inputs[2] is not None  # the BN shift became the conv's bias


@settings(max_examples=15, deadline=None)
@given(bias=st.booleans(), seed=st.integers(0, 1000))
def test_linear_bn1d_folds(bias, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    g = lower(net, (5,))
    out_name = g.outputs[0].name
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Gemm", "Relu", "Gemm"]
    assert g.outputs[0].name == out_name  # the BN was the output: its name survives


def _bn(g: Graph, y, c: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.rand(c, generator=gen, dtype=F64) * 2 - 1, torch.rand(c, generator=gen, dtype=F64),
              torch.randn(c, generator=gen, dtype=F64), torch.rand(c, generator=gen, dtype=F64) + 0.1]
    return g.add_node("BatchNormalization", [y, *(g.add_const(g.fresh_name(n), p) for n, p in
                                                  zip(["gamma", "beta", "mean", "var"], params))],
                      {"epsilon": 1e-3})


@pytest.mark.parametrize("attrs, c_shape", [({}, None), ({"transB": 1}, (3,)), ({"alpha": 0.5, "beta": 2.0}, ()),
                                            ({"transB": 1, "beta": -1.0}, (1, 3))])
def test_gemm_variants(attrs, c_shape):
    g = Graph("gemm")
    x = g.add_input("x", (4,))
    w = torch.randn((3, 4) if attrs.get("transB") else (4, 3), dtype=F64)
    c = None if c_shape is None else g.add_const("c", torch.randn(c_shape, dtype=F64))
    gemm = g.add_node("Gemm", [x, g.add_const("w", w), c], attrs)
    g.outputs = [_bn(g, gemm.output, 3).output]
    infer_shapes(g)
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Gemm"]


def test_matmul_2d_becomes_gemm():
    g = Graph("mm")
    x = g.add_input("x", (4,))
    mm = g.add_node("MatMul", [x, g.add_const("w", torch.randn(4, 3, dtype=F64))])
    g.outputs = [g.add_node("Relu", [_bn(g, mm.output, 3).output]).output]
    infer_shapes(g)
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Gemm", "Relu"]


def test_shared_weight_is_not_edited():
    g = Graph("shared")
    x = g.add_input("x", (2, 5, 5))
    w = g.add_const("w", torch.randn(2, 2, 3, 3, dtype=F64))
    a = g.add_node("Conv", [x, w], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
    b = g.add_node("Conv", [_bn(g, a.output, 2).output, w], {"kernel_shape": [3, 3]})
    g.outputs = [b.output]
    infer_shapes(g)
    w0 = w.const.clone()
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Conv", "Conv"] and torch.equal(w.const, w0) and g.nodes[1].inputs[1] is w


def test_two_bns_in_a_row_fold():
    g = lower(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)), (2, 5, 5))
    g = check_pass(fold_batchnorm.run, g)
    assert ops(g) == ["Conv"]


class Residual(nn.Module):
    """``bn(conv(x)) + conv(x)``: the conv output fans out, so the BN must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BnAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.conv, self.bn = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        x = self.bn0(x)  # first layer: nothing to fold into
        return self.bn(self.conv(x) + x)


@pytest.mark.parametrize("net", [Residual, BnAfterAdd])
def test_not_folded(net):
    g = lower(net(), (2, 4, 4))
    n_bn = ops(g).count("BatchNormalization")
    g = check_pass(fold_batchnorm.run, g, modified=False)
    assert ops(g).count("BatchNormalization") == n_bn


def test_conv_output_also_graph_output_not_folded():
    g = Graph("o")
    x = g.add_input("x", (1, 4, 4))
    conv = g.add_node("Conv", [x, g.add_const("w", torch.randn(2, 1, 3, 3, dtype=F64))], {"kernel_shape": [3, 3]})
    g.outputs = [conv.output, _bn(g, conv.output, 2).output]
    infer_shapes(g)
    check_pass(fold_batchnorm.run, g, modified=False)
