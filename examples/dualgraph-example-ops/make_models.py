"""Writes the example's ONNX model and VNN-LIB properties (the committed files in
dualgraph_example_ops/models were made by running this once: ``python make_models.py``).

The model classifies scikit-learn's 8x8 digits: Flatten -> Gemm(64, 32) -> Softplus
(domain com.example.dualgraph) -> Gemm(32, 10), trained for a few seconds with plain cross
entropy. The properties ask whether the class of the first test digit can change within an
L-inf box: eps 0.005 (provably not: unsat) and eps 0.3 (it can: sat).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from dualgraph.data import split_digits
from dualgraph_example_ops import DOMAIN

OUT = Path(__file__).parent / "dualgraph_example_ops" / "models"


def train() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    train_set, _ = split_digits()
    fc1, fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
    opt = torch.optim.Adam([*fc1.parameters(), *fc2.parameters()], lr=1e-2)
    x = train_set.images.reshape(len(train_set), -1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(fc2(F.softplus(fc1(x))), train_set.labels).backward()
        opt.step()
    return fc1, fc2


def onnx_model(fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)
             for name, t in (("W1", fc1.weight), ("B1", fc1.bias), ("W2", fc2.weight), ("B2", fc2.bias))]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "W1", "B1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Softplus", ["h"], ["a"], domain=DOMAIN, name="softplus"),
             helper.make_node("Gemm", ["a", "W2", "B2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "softplus_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model


def vnnlib(x: np.ndarray, label: int, eps: float) -> str:
    lines = [f"; class {label} of the first test digit within an L-inf box of radius {eps}"]
    lines += [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(10)]
    for i, v in enumerate(x.ravel()):
        lines += [f"(assert (>= X_{i} {max(0.0, v - eps):.8f}))", f"(assert (<= X_{i} {min(1.0, v + eps):.8f}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(10) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fc1, fc2 = train()
    onnx.save(onnx_model(fc1, fc2), OUT / "softplus_mlp.onnx")
    _, test_set = split_digits()
    x, label = test_set.images[0].numpy(), int(test_set.labels[0])
    (OUT / "robust.vnnlib").write_text(vnnlib(x, label, 0.005))
    (OUT / "attackable.vnnlib").write_text(vnnlib(x, label, 0.3))


if __name__ == "__main__":
    main()
