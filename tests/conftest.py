"""Shared pytest fixtures: the ``shared/`` folder beside the repository and zoo exports."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from dualgraph.allocator import use_huge_pages

# before any tensor of 2 MB: large buffers in huge pages, as the command line runs (each fresh
# 4 KB page of a freed and reallocated buffer faults; the MNIST model card's certification
# of 10,000 images spends a third of its time in the kernel without them)
use_huge_pages()

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


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
