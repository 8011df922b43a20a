"""`dualgraph.allocator`: large tensors come in huge pages once the switch is on."""

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
