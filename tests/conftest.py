"""Shared pytest fixtures: the ``shared/`` folder beside the repository and zoo exports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import settings

from dualgraph.allocator import tune_allocator

# hypothesis's "ci" profile (derandomized examples, no deadline, no example database) on every
# machine, not only where $CI is set: a user's run of the README's test command then draws
# exactly the examples CI passed, instead of fresh ones that CI never saw (fresh draws are
# asked for with DUALGRAPH_FRESH_SEEDS, below)
settings.load_profile("ci")

# before any tensor of 2 MB: large buffers in huge pages and freed ones kept for reuse, as the
# command line runs (each fresh 4 KB page of a freed and reallocated buffer faults; the MNIST
# model card's certification of 10,000 images spends a third of its time in the kernel without them)
tune_allocator()

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

FRESH_SEEDS = "DUALGRAPH_FRESH_SEEDS"
"""``DUALGRAPH_FRESH_SEEDS=K``: every hypothesis test draws fresh random examples, K times as
many as its settings say. CI runs the fixed (derandomized) ones; a fresh run with K = 3 found
four bugs they had missed (``bench/vnncomp_report.md``, twelfth session)."""


def pytest_collection_modifyitems(config, items):
    factor = os.environ.get(FRESH_SEEDS)
    if not factor:
        return
    from hypothesis import settings
    done = set()
    for item in items:
        test = getattr(item, "obj", None)
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is None or not hasattr(test, "hypothesis") or id(test) in done:
            continue
        done.add(id(test))  # once per function, however many parameters it runs with
        test._hypothesis_internal_use_settings = settings(
            own, derandomize=False, database=None, max_examples=max(1, round(own.max_examples * float(factor))))


def find_shared_dir() -> Path | None:
    """``/work/shared`` (real models and data) when it exists beside the repository, else None."""
    return SHARED_DIR if SHARED_DIR.is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """The shared folder (VNN-COMP instances, the paper's models, MNIST), or None when absent."""
    return find_shared_dir()


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory) -> Callable[..., Path]:
    """``zoo_onnx(name, dynamic=True, opset=None)``: the zoo model exported once per session."""
    from models_zoo import ZOO, export_onnx

    folder = tmp_path_factory.mktemp("zoo_onnx")
    cache: dict[tuple, Path] = {}

    def get(name: str, dynamic: bool = True, opset: int | None = None) -> Path:
        key = (name, dynamic, opset)
        if key not in cache:
            path = folder / f"{name}_{'dyn' if dynamic else 'b1'}_{opset or 'default'}.onnx"
            cache[key] = export_onnx(ZOO[name], path, dynamic=dynamic, opset=opset)
        return cache[key]
    return get


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The tests use small tensors, where intra-op threads only add overhead (and on a busy
    2-core machine make the suite several times slower); benchmarks set their own count."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
