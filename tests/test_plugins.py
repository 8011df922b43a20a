"""Plugins as a user installs them: distributions with a ``dualgraph.plugins`` entry point.

Each test writes small distributions (a ``.dist-info`` folder and a module) into a temporary
folder on ``PYTHONPATH`` and runs the CLI in a subprocess, so the entry points are found the
way an installed package's are. Checked: ops are attributed to their distribution, loaded
before the torch.fx frontend traces, a broken plugin is reported by name while everything
else keeps working (traceback under ``--debug``), overriding a built-in needs the explicit
flag, a failed plugin's partial definitions are withdrawn, and ``DUALGRAPH_NO_PLUGINS=1``
turns loading off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CUBE = '''
import torch
from dualgraph import Relaxation, define_op, var

class Cube(torch.nn.Module):
    def forward(self, x):
        return x * x * x

cube = define_op("Cube", domain="org.fake")
cube.evaluate(lambda node, inputs: inputs[0] ** 3)

@cube.relaxation()
def _(node, bounds, config):
    # z^3 is increasing: l^3 <= z^3 <= u^3 on [l, u] (constant bounds: coarse but sound)
    l, u = bounds
    return Relaxation(torch.zeros_like(l), l ** 3, torch.zeros_like(l), u ** 3)

@cube.fx_lowering(Cube)
def _(lo, call):
    return lo.emit(cube.key, [lo.var(call.arg(0, "input"))])

cube.example(var(4))
'''

BROKEN = '''
raise ImportError("a dependency of this plugin is missing")
'''

CLAIMS_RELU = '''
import torch
from dualgraph import define_op
first = define_op("Half", domain="org.greedy")          # defined, then withdrawn when the load fails
first.evaluate(lambda node, inputs: inputs[0] / 2)
relu = define_op("Relu")                                  # no override=True: an error naming both
'''

REPLACES_THEN_FAILS = '''
import torch
from dualgraph import define_op
relu = define_op("Relu", override=True)                  # replaces the built-in ...
raise RuntimeError("... and then the plugin fails")      # ... which must come back
'''

EXITS = '''
import sys
sys.exit(3)
'''

OVERRIDES_RELU = '''
import torch
from dualgraph import define_op
relu = define_op("Relu", override=True)
relu.evaluate(lambda node, inputs: torch.relu(inputs[0]))
'''


def make_distribution(site: Path, name: str, modules: dict[str, str]) -> None:
    """A distribution ``name`` 1.0 whose entry points load the given modules (name -> source)."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"  # the folder name is the normalised one
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dualgraph.plugins]\n" + "".join(f"{m} = {m}\n" for m in modules))
    (info / "top_level.txt").write_text("".join(f"{m}\n" for m in modules))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def run(site: Path, *args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("DUALGRAPH_NO_PLUGINS", "DUALGRAPH_DEBUG")}
    environment.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), **(env or {}))
    cmd = [sys.executable, "-c", code] if code else [
        sys.executable, "-c", "import sys; from dualgraph.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environment, cwd=site)


@pytest.fixture
def site(tmp_path) -> Path:
    return tmp_path / "site"


def test_a_plugin_is_attributed_listed_and_lowered_by_torch_fx(site):
    make_distribution(site, "fake-cube", {"fake_cube": CUBE})
    done = run(site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    cube = next(o for o in listing["ops"] if o["op"] == "org.fake.Cube")
    assert cube["source"] == "fake-cube 1.0" and cube["provides"] == ["eval", "dual", "fx"]
    # the fx rule is found although nothing imported the plugin before tracing
    done = run(site, code=textwrap.dedent("""
        import torch
        from dualgraph.api import load_model
        import fake_cube
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), fake_cube.Cube(), torch.nn.Linear(4, 2))
        graph = load_model(net, torch.randn(2, 3))
        print([".".join(filter(None, n.op)) for n in graph.nodes])
    """))
    assert done.returncode == 0, done.stderr
    assert "org.fake.Cube" in done.stdout
    done = run(site, "check-op", "org.fake.Cube")
    assert done.returncode == 0 and "org.fake.Cube: ok" in done.stdout, done.stdout + done.stderr


def test_a_broken_plugin_is_named_and_everything_else_keeps_working(site):
    make_distribution(site, "fake-broken", {"fake_broken": BROKEN})
    done = run(site, "certify", "--limit", "20", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 20
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "'fake_broken' (fake-broken 1.0)" in warning[0]
    assert "a dependency of this plugin is missing" in warning[0] and "Traceback" not in done.stderr

    done = run(site, "--debug", "plugins")
    assert done.returncode == 0 and "Traceback" in done.stderr
    assert "fake_broken = fake_broken (fake-broken 1.0): failed to load: ImportError" in done.stdout

    done = run(site, "plugins", env={"DUALGRAPH_NO_PLUGINS": "1"})
    assert done.returncode == 0 and "warning" not in done.stderr and "DUALGRAPH_NO_PLUGINS" in done.stdout


def test_a_missing_op_error_names_the_plugin_that_failed(site, tmp_path):
    make_distribution(site, "fake-broken", {"fake_broken": BROKEN})
    import onnx
    from onnx import TensorProto, helper
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Cube", ["x"], ["y"], domain="org.fake", name="cube")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("org.fake", 1)])
    onnx.save(model, tmp_path / "cube.onnx")
    done = run(site, "dump", str(tmp_path / "cube.onnx"))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "org.fake.Cube" in line and "plugin 'fake_broken' (fake-broken 1.0) failed to load" in line, line


def test_overriding_a_builtin_needs_the_flag_and_a_failed_plugin_leaves_nothing_behind(site):
    make_distribution(site, "fake-greedy", {"fake_greedy": CLAIMS_RELU})
    done = run(site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    plugin = next(p for p in listing["plugins"] if p["name"] == "fake_greedy")
    assert "op Relu is already defined (built-in)" in plugin["error"] and "override=True" in plugin["error"]
    assert "fake-greedy 1.0" in plugin["error"]
    ops = {o["op"]: o for o in listing["ops"]}
    assert "org.greedy.Half" not in ops and ops["Relu"]["source"] == "built-in"


def test_an_explicit_override_replaces_the_builtin_and_says_so(site):
    make_distribution(site, "fake-override", {"fake_override": OVERRIDES_RELU})
    done = run(site, "plugins")
    assert done.returncode == 0, done.stderr
    relu = next(line for line in done.stdout.splitlines() if line.startswith("Relu "))
    assert "fake-override 1.0 (replaces built-in)" in relu


def test_a_failed_plugin_leaves_replaced_builtins_as_they_were(site):
    make_distribution(site, "fake-half", {"fake_half": REPLACES_THEN_FAILS, "fake_exit": EXITS})
    done = run(site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    relu = next(o for o in listing["ops"] if o["op"] == "Relu")
    assert relu["source"] == "built-in" and relu["provides"] == ["eval", "dual", "onnx", "fx"]
    errors = {p["name"]: p["error"] for p in listing["plugins"]}
    assert "then the plugin fails" in errors["fake_half"] and "SystemExit: 3" in errors["fake_exit"]
    done = run(site, "certify", "--limit", "10", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["n"] == 10, done.stderr
