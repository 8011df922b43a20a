"""One definition of a Conv/pool window (``dualgraph.ops.common.window``) for evaluation, dual layers
and the patch path: ONNX defaults (strides and dilations 1) and ``auto_pad`` read the same
way everywhere. Before it, a MaxPool without a ``strides`` attribute was evaluated with
stride 1 but dualised with stride = kernel, an unsound bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualgraph.ops.common import window
from dualgraph.input_sets import linf_ball
from dualgraph.interpreter import infer_shapes, run_graph
from dualgraph.ir import Graph
from dualgraph.scheduler import BoundConfig, BoundScheduler

F64 = torch.float64


def conv_pool_net(pool_attrs: dict, conv_attrs: dict) -> Graph:
    g = Graph("net")
    x = g.add_input("x", (1, 6, 6), F64)
    gen = torch.Generator().manual_seed(0)
    w = g.add_const("w", torch.randn(3, 1, 3, 3, generator=gen, dtype=F64))
    h = g.add_node("Conv", [x, w], conv_attrs, name="conv").output
    r = g.add_node("Relu", [h], name="relu").output
    p = g.add_node("MaxPool", [r], {"kernel_shape": [2, 2], **pool_attrs}, name="pool").output
    f = g.add_node("Flatten", [p], {"axis": 1}, name="flat").output
    n = 3 * p_side(conv_attrs, pool_attrs) ** 2
    w2 = g.add_const("w2", torch.randn(2, n, generator=gen, dtype=F64))
    g.outputs = [g.add_node("Gemm", [f, w2], {"transB": 1}, name="fc").output]
    return infer_shapes(g, F64)


def p_side(conv_attrs: dict, pool_attrs: dict) -> int:
    conv = 6 if conv_attrs.get("auto_pad") == "SAME_UPPER" else 6 - 2 + sum(conv_attrs.get("pads", [0] * 4)) // 2
    stride = pool_attrs.get("strides", [1, 1])[0]
    pads = pool_attrs.get("pads", [0, 0, 0, 0])
    return (conv + pads[0] + pads[2] - 2) // stride + 1


def test_window_defaults_and_auto_pad():
    g = conv_pool_net({}, {"auto_pad": "SAME_UPPER"})
    pool, conv = g.nodes[2], g.nodes[0]
    assert window(pool, (6, 6)) == window(pool, (6, 6), (2, 2))
    assert window(pool, (6, 6)).strides == (1, 1) and window(pool, (6, 6)).dilations == (1, 1)
    same = window(conv, (6, 6), (3, 3))
    assert same.begins == (1, 1) and same.ends == (1, 1) and same.symmetric
    even = window(conv, (6, 6), (2, 2))  # an even kernel: SAME_UPPER pads the end
    assert even.begins == (0, 0) and even.ends == (1, 1) and not even.symmetric


def test_maxpool_without_strides_evaluates_with_stride_one():
    g = Graph("pool")
    x = g.add_input("x", (2, 5, 5), F64)
    g.outputs = [g.add_node("MaxPool", [x], {"kernel_shape": [2, 2]}, name="pool").output]
    infer_shapes(g, F64)
    t = torch.randn(3, 2, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_graph(g, t)[0], F.max_pool2d(t, 2, stride=1))


@pytest.mark.parametrize("pool_attrs", [{}, {"strides": [2, 2]}, {"strides": [1, 1], "pads": [0, 0, 1, 1]}])
@pytest.mark.parametrize("conv_attrs", [{}, {"auto_pad": "SAME_UPPER"}, {"pads": [1, 1, 1, 1]}])
@pytest.mark.parametrize("use_patches", [True, False])
def test_bounds_hold_on_samples_whatever_the_attributes(pool_attrs, conv_attrs, use_patches):
    g = conv_pool_net(pool_attrs, conv_attrs)
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    box = linf_ball(x, 0.1)
    spec = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], dtype=F64)
    cfg = BoundConfig(direction="backward", patches=use_patches, rounding_allowance=False)
    J = BoundScheduler(g, cfg).bound_output(box, spec)
    pts = box.sample(400, torch.Generator().manual_seed(2))
    ys = run_graph(g, pts.reshape(-1, 1, 6, 6))[0].reshape(400, 3, 2)
    vals = torch.einsum("mk,nbk->nbm", spec[0], ys)
    assert (vals >= J.unsqueeze(0) - 1e-9).all(), float((J.unsqueeze(0) - vals).max())
