"""The example plugin, end to end: installed through its entry point, it is listed, passes the
shipped checker, and a model using its op certifies, verifies (sat, confirmed by the IR
interpreter because onnxruntime cannot run the op; and unsat) and dumps. An unsound copy of
its relaxation is stopped by dualgraph's first-use check. Without the plugin the same model
fails with an error that names the op and points to the plugin mechanism.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dualgraph
from dualgraph import Relaxation, define_op, var
from dualgraph.api import Certifier, load_model
from dualgraph.errors import DualgraphError
from dualgraph.op_registry import OPS, remove_op
from dualgraph.testing import check_op
from dualgraph_example_ops import DOMAIN, Softplus

MODELS = Path(__file__).resolve().parents[1] / "dualgraph_example_ops" / "models"
MODEL = MODELS / "softplus_mlp.onnx"
OP = f"{DOMAIN}.Softplus"


def dualgraph_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from dualgraph.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_the_plugin_is_loaded_through_its_entry_point_and_listed():
    done = dualgraph_cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    op = next(o for o in listing["ops"] if o["op"] == OP)
    assert op["source"] == "dualgraph-example-ops 0.1.0"
    assert op["provides"] == ["eval", "dual", "fx"] and op["nonlinear"]
    assert {"name": "example_ops", "module": "dualgraph_example_ops.softplus", "source": "dualgraph-example-ops 0.1.0",
            "error": None} in listing["plugins"]


def test_the_op_passes_the_shipped_checker():
    report = check_op(OP)
    assert report.examples == 2 and report.relaxation_points > 0 and report.paths >= 8


def test_check_op_on_the_command_line():
    done = dualgraph_cli("check-op", OP)
    assert done.returncode == 0 and done.stdout.startswith(f"{OP}: ok"), done.stdout + done.stderr


def test_a_model_using_the_op_certifies_soundly():
    graph = load_model(MODEL)
    assert any(n.op == (DOMAIN, "Softplus") for n in graph.nodes)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=gen)
    cert = Certifier(graph)
    labels = cert.forward(x).argmax(1)
    res = cert.certify(x, labels, eps=0.01, clip=(0.0, 1.0))
    assert res.sound and res.certified.any()
    # no sampled point of a certified example changes class
    for i in torch.nonzero(res.certified).flatten().tolist():
        pts = (x[i] + 0.01 * (2 * torch.rand(200, 1, 8, 8, generator=gen) - 1)).clamp(0, 1)
        assert (cert.forward(pts).argmax(1) == labels[i]).all()


def test_certify_verify_and_dump_from_the_command_line(tmp_path):
    done = dualgraph_cli("certify", str(MODEL), "--dataset", "digits", "--eps", "0.01", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["certified"] > 0

    done = dualgraph_cli("verify", str(MODEL), str(MODELS / "robust.vnnlib"), "--timeout", "60")
    assert done.returncode == 0 and done.stdout.strip() == "unsat", done.stdout + done.stderr

    result = tmp_path / "result.txt"
    done = dualgraph_cli("verify", str(MODEL), str(MODELS / "attackable.vnnlib"), "--timeout", "60",
                         "--results", str(result))
    assert done.returncode == 0 and done.stdout.startswith("sat"), done.stdout + done.stderr
    assert "confirmed by the dualgraph IR interpreter" in done.stderr and OP in done.stderr
    assert result.read_text().startswith("sat")

    done = dualgraph_cli("dump", str(MODEL))
    assert done.returncode == 0 and OP in done.stdout, done.stderr


def test_the_sat_counterexample_is_real():
    """The reported point lies in the box and the plugin's own function misclassifies it."""
    from dualgraph.verification import verify_instance
    result = verify_instance(MODEL, MODELS / "attackable.vnnlib", 60.0)
    assert result.answer == "sat" and "interpreter" in result.details["confirmed_by"]
    graph = load_model(MODEL, simplify=False)
    x = torch.tensor(result.x, dtype=torch.float32).reshape(1, 1, 8, 8)
    y = dualgraph.run_graph(graph, x)[0]
    text = (MODELS / "attackable.vnnlib").read_text()
    label = int(text.split("class ")[1].split()[0])
    assert int(y.argmax()) != label or (y[0] >= y[0, label]).sum() > 1


def test_torch_fx_lowers_the_plugin_module():
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), Softplus(), torch.nn.Linear(5, 2))
    graph = load_model(net, torch.randn(3, 4))
    assert [n.op for n in graph.nodes][1] == (DOMAIN, "Softplus")
    x = torch.randn(6, 4)
    torch.testing.assert_close(dualgraph.run_graph(graph, x)[0], net(x))


@pytest.fixture
def unsound_copy():
    """The audit's bug in a plugin: the chord used as both lines, declared linear."""
    copy = define_op("Softplus", domain="com.example.unsound")
    copy.evaluate(lambda node, inputs: F.softplus(inputs[0]))

    @copy.relaxation(linear_if=lambda config: True)
    def chord_twice(node, bounds, config):
        l, u = bounds
        a = (F.softplus(u) - F.softplus(l)) / (u - l).clamp(min=1e-9)
        b = F.softplus(l) - a * l
        return Relaxation(a, b, a, b)
    try:
        yield copy
    finally:
        remove_op(copy.key)


def test_an_unsound_copy_is_stopped_on_first_use(unsound_copy):
    graph = load_model(MODEL)
    node = next(n for n in graph.nodes if n.op == (DOMAIN, "Softplus"))
    node.op = unsound_copy.key
    cert = Certifier(graph)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(DualgraphError) as info:
        cert.certify(x, torch.zeros(4, dtype=torch.long), eps=0.1)
    message = str(info.value)
    assert "com.example.unsound.Softplus" in message and "'softplus'" in message and "at z =" in message
    assert f"module {__name__}" in message  # who to blame


def test_without_the_plugin_the_model_is_refused_with_a_pointer_to_plugins():
    done = dualgraph_cli("certify", str(MODEL), "--dataset", "digits", "--eps", "0.01",
                         env={"DUALGRAPH_NO_PLUGINS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert OP in line and "plugin" in line and "DUALGRAPH_NO_PLUGINS" in line, line


def test_the_plugin_does_not_replace_builtins():
    assert OPS[("", "Relu")].built_in and OPS[(DOMAIN, "Softplus")].source == "dualgraph-example-ops 0.1.0"
