"""The package's shape, enforced: one top-level name, layers that import only downwards,
and no module reaching for another module's private (``_``-prefixed) names.

Layers (docs/ARCHITECTURE.md): the **core** (IR, interpreter, rules, dual graph, bounds)
imports no frontend, no pass, no ONNX and no application module; **frontends** and
**passes** build on the core only; the **applications** (api, training, verification,
CLI, benchmarks) may import anything. Every import counts, including those inside
functions.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dualgraph": ROOT / "dualgraph", "dualgraph.frontends": ROOT / "frontends",
           "dualgraph.passes": ROOT / "passes", "dualgraph.models": ROOT / "models"}

APPLICATIONS = {f"dualgraph.{m}" for m in (
    "api", "attack", "cascade", "certify", "cli", "commands", "competition", "data", "distributed", "falsify",
    "train", "training", "verification", "vnnlib", "bench", "__main__")}


def is_core(name: str) -> bool:
    """Every module of the ``dualgraph`` package is core unless it is an application (so a new
    module is held to the core's rules until it is listed here)."""
    if not (name == "dualgraph" or name.startswith("dualgraph.")):
        return False
    top = ".".join(name.split(".")[:2])
    return top not in APPLICATIONS and top not in ("dualgraph.frontends", "dualgraph.passes", "dualgraph.models")


def modules() -> dict[str, Path]:
    """Every installed module name -> its source file (the folders as pyproject maps them)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "dualgraph" and parts and parts[0] in ("frontends", "passes", "models"):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [a.name for a in node.names]
            if module == "__future__":
                continue
            # `from package import submodule` imports the submodule
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules()]
            out += [(s, [], node.lineno) for s in subs]
            out.append((module, [n for n in names if f"{module}.{n}" not in subs], node.lineno))
    return out


def test_one_top_level_name_is_installed():
    dist = importlib.metadata.distribution("dualgraph")
    assert dist.read_text("top_level.txt").split() == ["dualgraph"]
    assert not {"frontends", "passes", "models"} & set(importlib.metadata.packages_distributions())


def test_a_script_beside_its_own_models_package_loads_the_shipped_model(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("MINE = True\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import models
        from dualgraph.api import load_model
        graph = load_model("digits-small")
        assert models.MINE
        print(len(graph.nodes))
    """))
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0


def test_the_core_imports_no_frontend_pass_onnx_or_application():
    bad = []
    for name, path in modules().items():
        if not is_core(name):
            continue
        for module, _, line in imports(name, path):
            top = module.split(".")[0]
            if (top == "dualgraph" and not is_core(module)) or top in ("onnx", "onnxruntime", "frontends",
                                                                        "passes", "models"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ["dualgraph.frontends", "dualgraph.passes"])
def test_frontends_and_passes_build_on_the_core_only(layer):
    bad = []
    for name, path in modules().items():
        if not name.startswith(layer):
            continue
        for module, _, line in imports(name, path):
            if module.startswith("dualgraph") and not is_core(module) and not module.startswith(layer):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in modules().items():
        for module, names, line in imports(name, path):
            if module.startswith("dualgraph") and module != name:
                bad += [f"{path.relative_to(ROOT)}:{line} imports {n} from {module}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_every_module():
    found = modules()
    assert {"dualgraph.scheduler", "dualgraph.frontends.onnx", "dualgraph.passes.pipeline",
            "dualgraph.models.architectures", "dualgraph.bench.train"} <= set(found)
    resolved = {m for m, _, _ in imports("dualgraph.scheduler", found["dualgraph.scheduler"])}
    assert {"dualgraph.dual_graph", "dualgraph.patches", "torch"} <= resolved  # relative and `from . import`
