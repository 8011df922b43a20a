"""What a pass is: a function ``run(graph) -> PassResult`` and what it needs.

Each pass module declares ``NEEDS_SHAPES``: whether ``run`` reads ``Value.shape`` (the
pipeline re-infers shapes before such a pass whenever an earlier pass changed the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from dualgraph.ir import Graph


@dataclass(frozen=True)
class PassResult:
    """The (possibly new) graph and whether the pass changed anything."""

    graph: Graph
    modified: bool


@dataclass(frozen=True)
class Pass:
    """A registered pass: its name (the module's), its function and its needs."""

    name: str
    run: Callable[[Graph], PassResult]
    needs_shapes: bool

    @classmethod
    def of(cls, module: ModuleType) -> Pass:
        return cls(module.__name__.rsplit(".", 1)[-1], module.run, bool(module.NEEDS_SHAPES))
