"""Back large CPU tensors with transparent huge pages, and keep freed ones for reuse.

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

Huge pages make each fault cheaper, not rarer: glibc still serves buffers of 128 KB or more
(its dynamic threshold rises to at most 32 MB) from fresh pages and gives many back on
``free``. :func:`keep_freed_memory` sets that threshold to its maximum, 32 MB, and keeps up
to ``TRIM_THRESHOLD`` of freed memory in the process, so that the next buffer of a pass
reuses the pages of the last one; buffers above 32 MB are still mapped afresh. Measured here
(this project's 2-core VM, one thread, huge pages on; per example, median of 5-11 runs in
each of three processes per setting, interleaved): ``resnet4b`` at eps 1/255 with CROWN
1.72-2.05 s (14,000-26,000 page faults, 0.43-0.57 s of system time) against 1.35-1.54 s
(3,000 faults, 0.02-0.04 s), peak resident size 728-768 MB against 786-809 MB; with the
paper's relaxation, and ``resnet2b``, the same times within the noise. glibc's ``M_MMAP_MAX
= 0`` (every buffer from the heap) was about as fast, but fragments in long runs.
"""

from __future__ import annotations

import ctypes
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
"""Buffers up to this size come from the heap and are reused there: glibc's largest
threshold on 64-bit systems (``HEAP_MAX_SIZE / 2``)."""
TRIM_THRESHOLD = 1 << 30
"""Freed memory at the top of the heap is given back to the kernel above this amount."""


def keep_freed_memory() -> bool:
    """Have the C library keep freed buffers of up to :data:`MMAP_THRESHOLD` for the next
    allocation (see the module docstring); True if it took the settings (glibc), False
    elsewhere (another C library, or no ``mallopt``), where nothing changes. The settings
    are the process's: the command line and the benchmarks' workers call this at start."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tune_allocator() -> None:
    """Both settings of this module, as the command line makes them at start: huge pages
    for torch's large buffers (:func:`use_huge_pages`) and freed buffers kept for reuse
    (:func:`keep_freed_memory`)."""
    use_huge_pages()
    keep_freed_memory()
