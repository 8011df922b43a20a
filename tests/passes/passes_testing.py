"""Shared helpers for the pass tests: run a pass and check that the function is unchanged."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from dualgraph.interpreter import infer_shapes, run_graph
from dualgraph.ir import Graph, check_graph
from dualgraph.passes.base import PassResult

F64 = torch.float64


def ops(graph: Graph) -> list[str]:
    """Op types of ``graph``'s nodes, in order."""
    return [n.op_type for n in graph.nodes]


def batch(graph: Graph, n: int = 7, seed: int = 0) -> list[torch.Tensor]:
    """A random float64 batch for every graph input (shapes must be inferred)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *v.shape[1:]), generator=gen, dtype=F64) * 2 for v in graph.inputs]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to float64 rounding: 1e-10 relative to the largest entry."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if not w.is_floating_point():
            assert torch.equal(g, w)
            continue
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * scale)


def check_pass(run: Callable[[Graph], PassResult], graph: Graph, *, modified: bool | None = True,
               n_batches: int = 2) -> Graph:
    """Run ``run`` on ``graph``; check the outputs on random batches are unchanged, that the
    result verifies, that ``modified`` is as expected and that a second run changes nothing."""
    xs = [batch(graph, seed=s) for s in range(n_batches)]
    want = [run_graph(graph, *x) for x in xs]
    result = run(graph)
    if modified is not None:
        assert result.modified is modified
    out = result.graph
    infer_shapes(out)
    check_graph(out)
    for x, w in zip(xs, want):
        assert_close(run_graph(out, *x), w)
    assert run(out).modified is False, "the pass is not idempotent"
    return out


def randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.1, 3), (m.weight, -2, 2), (m.bias, -1, 1)):
                t.data.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)
    return net.eval()


class Normalize(nn.Module):
    """``(x - mean) / std`` with buffers of shape ``stat_shape``."""

    def __init__(self, stat_shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", torch.rand(stat_shape, generator=gen))
        self.register_buffer("std", torch.rand(stat_shape, generator=gen) + 0.2)

    def forward(self, x):
        return (x - self.mean) / self.std
