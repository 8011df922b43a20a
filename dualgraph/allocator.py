"""Back large CPU tensors with transparent huge pages.

A dual pass allocates and frees tensors of tens of MB at every step (a residual CNN's rows
on their windows: ``[1, 64, 64, 16, 15, 15]`` float32 is 59 MB). The C library serves each
from fresh pages and returns them on ``free``, so every new tensor faults once per 4 KB page
on its first write: on this project's VM a product of two such tensors took 38 ms, of which
34 ms were page faults (a tensor of zeros of that size alone: 34 ms). With 2 MB pages the
same product takes 9 ms, and the memory is still returned on ``free`` (keeping freed blocks
in the process instead, glibc's ``M_MMAP_MAX = 0``, was 1.2x faster again but raised the
peak resident size by 60-160% through fragmentation; not used).

torch's CPU allocator has the switch (``THP_MEM_ALLOC_ENABLE=1``: ``madvise(MADV_HUGEPAGE)``
on every buffer of 2 MB or more); it reads it once, at its first buffer of that size, so
:func:`use_huge_pages` must run before any. The command line calls it first (``cli.main``,
the benchmarks' worker processes); a program using the API calls it itself, or sets the
variable, before its first large tensor. An explicit ``THP_MEM_ALLOC_ENABLE`` is respected.
"""

from __future__ import annotations

import os
import sys

SWITCH = "THP_MEM_ALLOC_ENABLE"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
    """Whether the kernel grants transparent huge pages on request (Linux, mode ``always``
    or ``madvise``; ``never`` or no THP support: False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(THP_MODE) as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def use_huge_pages() -> bool:
    """Ask torch's CPU allocator for huge pages on buffers of 2 MB and more (see the module
    docstring) unless the variable is set already; True if the switch is on."""
    if huge_pages_available():
        os.environ.setdefault(SWITCH, "1")
    return os.environ.get(SWITCH) == "1"
