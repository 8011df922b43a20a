"""What every pass returns."""

from __future__ import annotations

from dataclasses import dataclass

from dualgraph.ir import Graph


@dataclass(frozen=True)
class PassResult:
    """The (possibly new) graph and whether the pass changed anything."""

    graph: Graph
    modified: bool
