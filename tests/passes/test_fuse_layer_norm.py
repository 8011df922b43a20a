"""A layer norm exported as ops (opset < 17) is fused into one LayerNormalization node: the same
function, and bounds that no longer stop at the Sqrt of a variance bound below zero."""

from __future__ import annotations

import onnx
import torch
import torch.nn as nn

from dualgraph.api import Certifier, load_model
from dualgraph.frontends.onnx import load_onnx
from dualgraph.interpreter import Interpreter


def _export(tmp_path, opset: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.uniform_(-0.5, 0.5)
    path = tmp_path / f"ln{opset}.onnx"
    torch.onnx.export(net, (torch.randn(1, 4),), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return net, path


def test_the_written_out_layer_norm_is_fused_and_computes_the_same(tmp_path):
    net, path = _export(tmp_path, 13)
    assert {"ReduceMean", "Pow", "Sqrt"} <= {n.op_type for n in onnx.load(path).graph.node}
    raw, fused = load_onnx(path), load_model(path)
    assert "LayerNormalization" in [n.op_type for n in fused.nodes]
    assert not {"Sqrt", "Pow", "ReduceMean"} & {n.op_type for n in fused.nodes}
    x = torch.randn(9, 4)
    torch.testing.assert_close(Interpreter(fused).run(x)[0], Interpreter(raw).run(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Interpreter(fused).run(x)[0], net(x), rtol=1e-5, atol=1e-5)


def test_fused_bounds_are_sound_where_the_ops_alone_would_refuse(tmp_path):
    net, path = _export(tmp_path, 13)
    cert = Certifier(load_model(path))
    x = torch.randn(3, 4)
    eps = 2.0
    bound = cert.lower_bounds(cert.input_set(x, eps), torch.eye(3)[None])          # [3, 3]
    gen = torch.Generator().manual_seed(0)
    pts = x + eps * (2 * torch.rand(2000, 3, 4, generator=gen) - 1)
    with torch.no_grad():
        values = net(pts.reshape(-1, 4)).reshape(2000, 3, 3).amin(0)
    assert (bound <= values + 1e-5).all()
