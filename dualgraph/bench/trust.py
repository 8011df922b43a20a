"""The cost of trust-but-verify (:mod:`dualgraph.trust`) on a certify run.

The shipped ``mnist-small-0.1`` model (conv 16-32, fc 100) with its ReLUs replaced by a
stand-in plugin op whose relaxation is ReLU's own (so the bounds are the same), certified
exactly on ``--images`` MNIST-shaped inputs (uniform in [0, 1], labelled with the model's
prediction; the cost of the bounds does not depend on the pixels) at eps 0.1. Each round
certifies once with the first-use check armed (as in a fresh process) and once with it
already passed; the report gives medians over ``--rounds`` and the check's own time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=1000, help="images per certify run (default 1000)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from .. import trust
    from ..api import Certifier, load_model
    from ..op_registry import OPS, define_op, loading_plugin, remove_op
    from ..commands import check_counts
    check_counts(args, images=1, rounds=1, threads=1)
    torch.set_num_threads(args.threads)

    relu = OPS[("", "Relu")].dual_rule
    with loading_plugin("dualgraph bench (a plugin stand-in)"):
        stand_in = define_op("Relu", domain="bench.trust")
        stand_in.evaluate(lambda node, inputs: torch.relu(inputs[0]))
        stand_in.relaxation(linear_if=lambda config: config.relu_relaxation == "paper", eval_roundings=0,
                            breakpoints=lambda node: (0.0,))(relu.relax)
    try:
        graph = load_model("mnist-small-0.1")
        for node in graph.nodes:
            if node.op == ("", "Relu"):
                node.op = stand_in.key
        certifier = Certifier(graph)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(args.images, 1, 28, 28, generator=gen)
        labels = certifier.forward(x).argmax(1)

        check_seconds: list[float] = []
        original = trust.verify_relaxation

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                check_seconds.append(time.perf_counter() - start)
        trust.verify_relaxation = timed  # the rule looks it up at each use
        armed, trusted, checks = [], [], []
        rule = stand_in.dual_rule
        plugin_nodes = [n for n in certifier.graph.nodes if n.op == stand_in.key]
        for _ in range(args.rounds):
            for node in plugin_nodes:  # as in a fresh process: each node checked at its first use
                node.meta.pop(("trust checked", id(rule)), None)
            check_seconds.clear()
            start = time.perf_counter()
            certifier.certify(x, labels, 0.1, clip=(0.0, 1.0))
            armed.append(time.perf_counter() - start)
            checks.append(sum(check_seconds))
            assert len(check_seconds) == len(plugin_nodes), "the first-use check did not run at every node"
            start = time.perf_counter()
            certifier.certify(x, labels, 0.1, clip=(0.0, 1.0))
            trusted.append(time.perf_counter() - start)
        trust.verify_relaxation = original
    finally:
        remove_op(stand_in.key)

    result = {"images": args.images, "checked_nodes": len(plugin_nodes), "threads": args.threads, "rounds": args.rounds,
              "certify_s_checked": statistics.median(armed), "certify_s_trusted": statistics.median(trusted),
              "check_s": statistics.median(checks)}
    result["check_share_of_certify"] = result["check_s"] / result["certify_s_trusted"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"certify {args.images} images (mnist-small-0.1, plugin stand-in for its {len(plugin_nodes)} ReLUs, "
              f"{args.threads} thread(s)), medians of {args.rounds}:")
        print(f"  first use checked   {result['certify_s_checked']:.3f} s")
        print(f"  already trusted     {result['certify_s_trusted']:.3f} s")
        print(f"  the check itself    {result['check_s'] * 1e3:.1f} ms "
              f"({100 * result['check_share_of_certify']:.2f}% of the certify run)")
    return 0
