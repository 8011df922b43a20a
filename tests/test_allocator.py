"""`dualgraph.allocator`: large tensors come in huge pages once the switch is on, and freed ones are reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dualgraph.allocator import huge_pages_available

# in a fresh process (torch reads the switch at its first large buffer): the KB of huge pages
# behind a live 256 MB tensor, with or without use_huge_pages() first
PROBE = """
import contextlib, io, sys
if sys.argv[1] == "on":
    from dualgraph.allocator import use_huge_pages
    assert use_huge_pages()
elif sys.argv[1] == "cli":  # any command turns it on first
    from dualgraph.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["models"]) == 0
import torch
t = torch.ones(64 << 20)
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")))
"""


def _huge_kb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


def test_large_tensors_get_huge_pages():
    if not huge_pages_available():
        pytest.skip("this kernel grants no transparent huge pages (not Linux, or THP mode 'never')")
    assert _huge_kb("on") >= 128 << 10, "with use_huge_pages a 256 MB tensor should sit mostly on 2 MB pages"
    assert _huge_kb("cli") >= 128 << 10, "the command line should turn huge pages on"
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[madvise]" in f.read():  # in mode 'always' every large mapping gets them anyway
            assert _huge_kb("off") == 0, "without the switch torch should not ask for huge pages"


# in a fresh process: minor page faults of ten tensors of 16 MB made and freed, each 64 KB larger
# than the last (so that glibc's own threshold, which rises to the size of the last freed mapping,
# maps each afresh by default), after one
REUSE_PROBE = """
import contextlib, io, resource, sys
if sys.argv[1] == "keep":
    from dualgraph.allocator import keep_freed_memory
    assert keep_freed_memory()
elif sys.argv[1] == "cli":
    from dualgraph.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["models"]) == 0
import torch
torch.ones(4 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    torch.ones((4 << 20) + (i + 1) * (16 << 10)).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | {"THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True, check=True,
                         env=env)
    return int(out.stdout.strip())


def test_freed_buffers_are_reused():
    """Without the setting glibc maps each of the growing 16 MB tensors afresh and unmaps it on
    free, so each faults its 4,100 pages; with it, and after any command, the freed pages serve
    the next one (the heap grows by 64 KB a time)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's (Linux)")
    assert _faults("default") >= 8 * 4096, "fresh mappings were expected without the setting"
    # at most one tensor's pages: the heap may grow once more while it settles
    assert _faults("keep") <= 5000, "freed 16 MB buffers should be reused with keep_freed_memory()"
    assert _faults("cli") <= 5000, "the command line should keep freed buffers"
