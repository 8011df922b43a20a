"""passes.pipeline.simplify: all passes to a fixed point; numbers unchanged; idempotent."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dualgraph.interpreter import run_graph
from dualgraph.ir import Graph
from dualgraph.frontends.fx import load_module
from dualgraph.passes import pipeline
from passes_testing import F64, Normalize, assert_close, batch, ops, randomize_bn


def check_simplify(g: Graph, module: nn.Module | None = None) -> tuple[Graph, list[str]]:
    """simplify keeps the outputs (and agrees with ``module``), and a second run is a no-op.
    Returns the graph and the passes that changed it."""
    xs = [batch(g, seed=s) for s in range(2)]
    want = [run_graph(g, *x) for x in xs]
    g = pipeline.simplify(g)
    applied = g.meta["simplify"]
    for x, w in zip(xs, want):
        got = run_graph(g, *x)
        assert_close(got, w)
        if module is not None:
            with torch.no_grad():
                assert_close(got, [module(*x)])
    assert pipeline.run(g).modified is False
    return g, applied


class Block(nn.Module):
    """A residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``; ``x`` fans out."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


def small_resnet(pad: int) -> nn.Module:
    return nn.Sequential(Normalize((3, 1, 1)), nn.Conv2d(3, 4, 3, padding=pad), nn.BatchNorm2d(4), nn.ReLU(),
                         Block(4), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * (4 + 2 * pad) ** 2, 6),
                         nn.BatchNorm1d(6), nn.Dropout(), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("pad", [0, 1])
def test_small_resnet_from_fx(pad):
    net = randomize_bn(small_resnet(pad).double())
    g = load_module(net, torch.randn(2, 3, 6, 6, dtype=F64))
    g, applied = check_simplify(g, net)
    assert ops(g) == ([] if pad == 0 else ["Add"]) + [
        "Conv", "Relu", "Conv", "Relu", "Conv", "Add", "Relu",
        "BatchNormalization",  # after the residual Add: nothing to fold into
        "Flatten", "Gemm", "Relu", "Gemm"]
    assert "fold_batchnorm" in applied and "fold_normalization" in applied


def test_onnx_export():
    load_onnx = pytest.importorskip("dualgraph.frontends.onnx").load_onnx
    onnx = pytest.importorskip("onnx")
    net = randomize_bn(small_resnet(1))
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no constant folding at export: it would fold the BNs itself
        torch.onnx.export(net, (torch.randn(1, 3, 6, 6),), f, dynamo=False, do_constant_folding=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})
    g = load_onnx(onnx.load_from_string(f.getvalue()))
    assert ops(g).count("BatchNormalization") == 5
    g, _ = check_simplify(g)
    assert ops(g).count("BatchNormalization") == 1 and "Identity" not in ops(g)
    assert [v.name for v in g.outputs] == ["logits"]


def test_dead_branch_and_constant_subgraph():
    g = Graph("misc")
    x = g.add_input("x", (4,))
    w = g.add_node("Neg", [g.add_const("w0", torch.randn(4, 3, dtype=F64))])  # constant: folded
    y = g.add_node("MatMul", [g.add_node("Identity", [x]).output, w.output])
    g.add_node("Relu", [y.output])  # dead
    g.outputs = [g.add_node("Sigmoid", [y.output]).output]
    g, applied = check_simplify(g)
    assert applied[0] == "constant_fold" and ops(g) == ["MatMul", "Sigmoid"]


_LAYERS = ["conv", "conv_pad", "bn", "relu", "normalize", "dropout", "identity", "scale"]


class _Scale(nn.Module):
    def forward(self, x):
        return x * 0.5 + 1.0


def _layer(kind: str, c: int) -> nn.Module:
    return {"conv": lambda: nn.Conv2d(c, c, 3, padding=0), "conv_pad": lambda: nn.Conv2d(c, c, 3, padding=1),
            "bn": lambda: nn.BatchNorm2d(c), "relu": nn.ReLU, "normalize": lambda: Normalize((c, 1, 1)),
            "dropout": nn.Dropout, "identity": nn.Identity, "scale": _Scale}[kind]()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(_LAYERS), min_size=1, max_size=6), st.integers(0, 1000))
@example(["conv"] * 6, 0)  # the smallest map the generator can reach (a fresh-seed run drew it)
def test_random_sequential_nets(kinds, seed):
    torch.manual_seed(seed)
    layers = [_layer(k, 2) for k in kinds] + [nn.Flatten(), nn.LazyLinear(3)]
    net = nn.Sequential(*layers).double()
    # 14 pixels: six unpadded 3x3 convolutions (the most drawn) leave 2 (at 12 they left none)
    net(torch.randn(1, 2, 14, 14, dtype=F64))  # materialise the lazy Linear
    net = randomize_bn(net, seed)
    g = load_module(net, torch.randn(2, 2, 14, 14, dtype=F64))
    g, _ = check_simplify(g, net)
    assert not {"Identity", "Dropout", "Sub", "Div"} & set(ops(g))


def _small_graph() -> Graph:
    g = Graph("g")
    x = g.add_input("x", (3,), torch.float64)
    y = g.add_node("Identity", [x]).output
    g.outputs = [g.add_node("Relu", [y]).output]
    return g


def test_a_failing_pass_is_named_with_the_passes_before_it(monkeypatch):
    from dualgraph.errors import DualgraphError, InternalError
    from dualgraph.passes.base import Pass

    def model_fault(graph):
        raise DualgraphError("constant 'w' cannot be folded")

    def bug(graph):
        raise KeyError("oops")

    for fn, error in ((model_fault, DualgraphError), (bug, InternalError)):
        broken = [p if p.name != "dead_nodes" else Pass("dead_nodes", fn, False) for p in pipeline.PASSES]
        monkeypatch.setattr(pipeline, "PASSES", broken)
        with pytest.raises(error) as info:
            pipeline.simplify(_small_graph())
        assert str(info.value).startswith("pass dead_nodes failed (after identity)"), str(info.value)


def test_verify_each_catches_a_pass_that_breaks_the_ir(monkeypatch):
    from dualgraph.errors import InternalError
    from dualgraph.passes.base import Pass, PassResult
    done: list[bool] = []

    def breaks_order(graph):  # once: consumers before producers
        if done:
            return PassResult(graph, False)
        done.append(True)
        graph.nodes.reverse()
        return PassResult(graph, True)

    monkeypatch.setattr(pipeline, "PASSES", [Pass("reverse", breaks_order, False)])
    pipeline.simplify(_small_graph())  # the final toposort hides it ...
    done.clear()
    with pytest.raises(InternalError, match="pass reverse left an invalid graph"):  # ... verify_each does not
        pipeline.simplify(_small_graph(), verify_each=True)


def test_every_pass_declares_what_it_needs():
    assert [p.name for p in pipeline.PASSES] == ["constant_fold", "identity", "fuse_layer_norm", "fold_batchnorm",
                                                 "fold_normalization", "dead_nodes"]
    assert {p.name for p in pipeline.PASSES if p.needs_shapes} == {"fuse_layer_norm", "fold_batchnorm",
                                                                   "fold_normalization"}
