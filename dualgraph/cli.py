"""``dualgraph`` command line: dump, certify, verify, run-instances, bench.

Every user error is one line on stderr (``dualgraph: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DualgraphError

DEFAULT_MODEL = "digits-small"


def _add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None, default=DEFAULT_MODEL if optional else None,
                   help="an .onnx file or a model name from the zoo (see 'dualgraph models')"
                        + (f"; default: {DEFAULT_MODEL}" if optional else ""))
    p.add_argument("--mean", type=float, nargs="+", help="input normalisation the model expects: per-channel mean")
    p.add_argument("--std", type=float, nargs="+", help="input normalisation the model expects: per-channel std")


def _add_bound_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relaxation", choices=["paper", "crown"], default="paper",
                   help="ReLU lower slope: paper = u/(u-l) as in Wong et al. (default), crown = adaptive (tighter)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualgraph", description="Provable robustness certificates for neural networks via dual networks "
                                      "(Wong et al., 'Scaling provable adversarial defenses', NeurIPS 2018).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("certify", help="certify a model on dataset points in an L-inf or L2 ball")
    _add_model_args(p, optional=True)
    p.add_argument("--dataset", choices=["mnist", "cifar10", "digits"], default=None,
                   help="dataset (default: digits for the default model, else required)")
    p.add_argument("--data-dir", help="folder with the dataset files (MNIST IDX or CIFAR-10 python batches)")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--eps", type=float, default=None, help="radius of the ball (pixel scale [0,1])")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--no-clip", action="store_true", help="do not intersect the L-inf ball with the [0,1] pixel box")
    p.add_argument("--limit", type=int, help="certify only the first N examples")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _add_bound_args(p)

    p = sub.add_parser("dump", help="print the primal IR, the dual graph or per-layer bounds")
    _add_model_args(p)
    p.add_argument("--format", choices=["text", "json", "dot"], default="text")
    p.add_argument("--dual", action="store_true", help="print the dual graph (of the output) instead")
    p.add_argument("--bounds", action="store_true", help="print per-layer bound statistics (needs --eps)")
    p.add_argument("--eps", type=float, help="radius for --bounds")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--dataset", choices=["mnist", "cifar10", "digits"], help="take --bounds inputs from a dataset")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=10, help="number of dataset examples for --bounds (default 10)")
    p.add_argument("--vnnlib", help="take the --bounds input box from a VNN-LIB property instead")
    p.add_argument("--no-simplify", action="store_true", help="show the graph as imported, before the passes")
    _add_bound_args(p)

    p = sub.add_parser("models", help="list the models shipped in the zoo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from . import commands
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
    except DualgraphError as exc:
        print(f"dualgraph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualgraph: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, dict) and len(obj) < 12 else 1))


if __name__ == "__main__":
    sys.exit(main())
