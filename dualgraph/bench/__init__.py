"""Benchmarks, run as ``dualgraph bench NAME``.

Each benchmark is a module here with ``add_arguments(parser)`` and ``main(args) -> int``;
register it in :data:`BENCHES` (name -> module path, one-line help) and the CLI picks it up.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

BENCHES: dict[str, tuple[str, str]] = {
    "certify": ("dualgraph.bench.certify",
                "exact certification throughput of the paper's MNIST model vs the reference implementation"),
    "scaling": ("dualgraph.bench.scaling",
                "time and peak memory of one robust-loss step as the network grows: exact vs random projections"),
    "train": ("dualgraph.bench.train",
              "robust training of the paper's small MNIST model vs the reference implementation, same loop"),
    "trust": ("dualgraph.bench.trust",
              "the cost of checking a plugin's relaxation on its first use, as a share of a certify run"),
    "resnet": ("dualgraph.bench.resnet",
               "exact bounds on residual CNNs (paper ResNet, deeper ones, ResNet-18): seconds per example, "
               "phases, memory, vs the reference implementation"),
    "gpu": ("dualgraph.bench.gpu",
            "the device check: projected training steps (MNIST small, CIFAR ResNet) and exact certification, "
            "images/s"),
}


def add_parsers(sub) -> None:
    """Add ``bench`` with one sub-command per registered benchmark to the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(BENCHES) + ")")
    names = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (module, help_text) in BENCHES.items():
        q = names.add_parser(name, help=help_text, description=help_text)
        q.add_argument("--shared", metavar="DIR",
                       help="the project's shared folder (paper models, MNIST); default $DUALGRAPH_SHARED, "
                            "else ../shared beside the current directory")
        importlib.import_module(module).add_arguments(q)


def parse_list(text: str, convert, flag: str, example: str) -> list:
    """Comma-separated values of ``flag``, each through ``convert``; one-line errors."""
    from dualgraph.errors import DualgraphError
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(convert(item))
        except (ValueError, TypeError):
            raise DualgraphError(f"{flag}: cannot read '{item}'; give comma-separated values such as {example}") from None
    if not out:
        raise DualgraphError(f"{flag} names no values; give comma-separated values such as {example}")
    return out


def shared_dir(args: argparse.Namespace) -> Path:
    """The shared folder: ``--shared``, else ``$DUALGRAPH_SHARED``, else ``../shared``."""
    return Path(args.shared or os.environ.get("DUALGRAPH_SHARED") or Path("..") / "shared")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named by ``args.bench``."""
    return importlib.import_module(BENCHES[args.bench][0]).main(args)
