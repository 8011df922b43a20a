"""``dualgraph`` command line: dump, certify, verify, run-instances, bench.

Every user error is one line on stderr (``dualgraph: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .allocator import tune_allocator
from .errors import DualgraphError

DEFAULT_MODEL = "digits-small"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line, ``dualgraph: error: ...`` and a
    pointer to the command's help (argparse prints the whole usage block first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"dualgraph: error: {message} (see '{self.prog} --help')\n")


def _radius(text: str) -> float:
    """``--eps`` and friends: a number or a fraction such as ``2/255``, at least 0."""
    from .input_sets import parse_radius
    try:
        return parse_radius(text)
    except DualgraphError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None, default=DEFAULT_MODEL if optional else None,
                   help="an .onnx file or a model name from the zoo (see 'dualgraph models')"
                        + (f"; default: {DEFAULT_MODEL}" if optional else ""))
    p.add_argument("--mean", type=float, nargs="+", help="input normalisation the model expects: per-channel mean")
    p.add_argument("--std", type=float, nargs="+", help="input normalisation the model expects: per-channel std")


def _add_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget of the bound computations, e.g. 4G or 500M (default: half of the memory "
                        "available now): chunks are sized to it and a direction that cannot fit is not chosen")


def _add_bound_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relaxation", choices=["paper", "crown", "alpha"], default="paper",
                   help="ReLU lower slope: paper = u/(u-l) as in Wong et al. (default), crown = adaptive (tighter), "
                        "alpha = optimised per specification row from crown's, with max-pool lower lines and "
                        "the free lines of Sigmoid, Tanh and other smooth activations (tightest, slower)")
    p.add_argument("--alpha-steps", type=int, default=20, metavar="N",
                   help="with --relaxation alpha: gradient steps of the slope optimisation (default 20)")
    p.add_argument("--alpha-lr", type=float, default=0.1, metavar="LR",
                   help="with --relaxation alpha: step size of the slope optimisation (default 0.1; "
                        "--alpha-steps 5 --alpha-lr 0.5 is about 3x faster for the same certificates on MNIST)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="precision of the bound arithmetic (default float32; float64 for transformers)")
    _add_memory_arg(p)
    _add_run_args(p)


def _add_run_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """--threads (and --no-progress) on every command that computes."""
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_projection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proj", type=int, metavar="R",
                   help="estimate intermediate bounds with R random projections (Section 3.2; linear cost). "
                        "The results are ESTIMATES, not certificates; default: exact bounds")
    p.add_argument("--proj-seed", type=int, help="seed of the random projections (default: random)")
    p.add_argument("--delta", type=float,
                   help="with --proj: high-probability bounds (geometric-mean estimator), each intermediate "
                        "bound valid with probability >= 1 - DELTA; still not a certificate")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack-restarts", type=int, default=16, help="PGD restarts per round (default 16)")
    p.add_argument("--attack-steps", type=int, default=100, help="PGD steps per round (default 100)")
    p.add_argument("--attack-rounds", type=int, default=3,
                   help="PGD rounds (seeds): one before the bounds, the rest (thorough: 4x the restarts per "
                        "unsafe conjunction, 3x the steps, shrinking) if they prove nothing, before any "
                        "splitting (default 3)")
    p.add_argument("--no-split", action="store_true", help="never split the input box (default: split when the "
                                                           "property has at most 16 inputs)")
    p.add_argument("--relaxation", choices=["paper", "crown", "alpha"], default="alpha",
                   help="the tightest ReLU relaxation tried, in the order paper, crown, alpha (each on what the "
                        "previous left open; default alpha: optimised slopes)")
    p.add_argument("--alpha-steps", type=int, default=20, metavar="N",
                   help="gradient steps of the slope optimisation on the whole box (default 20)")
    p.add_argument("--no-bab", action="store_true",
                   help="never split ReLUs (default: branch and bound on what the relaxations leave open, for "
                        "properties with more inputs than input splitting takes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); 1 is much "
                                               "faster for small networks on a busy machine")
    _add_memory_arg(p)


def _add_verify_parsers(sub) -> None:
    p = sub.add_parser("verify", help="answer a VNN-LIB property: sat (with a counterexample), unsat, unknown "
                                      "or timeout, as in VNN-COMP")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("property", help="the .vnnlib file (VNN-LIB 1.0)")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit in seconds (default 60)")
    p.add_argument("--results", metavar="FILE", help="write the competition result file here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (verify draws none; accepted so that "
                                                              "scripts can pass it to every command)")
    _add_verify_args(p)

    p = sub.add_parser("run-instances", help="answer every instance (onnx,vnnlib,timeout) of a VNN-COMP CSV")
    p.add_argument("instances", help="the instances CSV")
    p.add_argument("--root", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    p.add_argument("--out", default="results.csv", help="results CSV to write (default results.csv)")
    p.add_argument("--results-dir", help="also write one competition result file per instance here (ONNX__VNNLIB.txt by the files' stems; a name that repeats gets __2, __3, ...)")
    p.add_argument("--max-timeout", type=float, help="cap every instance's timeout at this many seconds")
    p.add_argument("--limit", type=int, help="run only the first N instances")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_verify_args(p)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a provably robust network (robust loss on the dual bound, epsilon "
                                     "schedule, optional random projections, cascades) and export it to ONNX")
    p.add_argument("--dataset", choices=["mnist", "cifar10", "digits"], default="digits",
                   help="training data (default: scikit-learn's bundled 8x8 digits, no download)")
    p.add_argument("--data-dir", help="folder with the dataset files (MNIST IDX or CIFAR-10 python batches)")
    p.add_argument("--model", default="small", help="architecture (see 'dualgraph models'; default small)")
    p.add_argument("--eps", type=_radius, default=0.1,
                   help="target radius of the ball (pixel scale [0,1]; a number or a fraction such as 2/255; "
                        "default 0.1)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="norm of the ball (default linf)")
    p.add_argument("--no-clip", action="store_true", help="do not intersect the L-inf ball with the [0,1] pixel box")
    p.add_argument("--epochs", type=int, default=60, help="epochs (default 60, the paper's)")
    p.add_argument("--ramp-epochs", type=int, default=20,
                   help="epochs over which eps ramps linearly from --eps-start to --eps (default 20)")
    p.add_argument("--eps-start", type=_radius, help="first eps of the ramp (default: 0.01 MNIST/digits, 0.001 CIFAR)")
    p.add_argument("--lr-halve-every", type=int, default=10,
                   help="halve the learning rate every N epochs after the ramp (0: never; default 10)")
    p.add_argument("--batch-size", type=int, default=50, help="training batch size (default 50, the paper's)")
    p.add_argument("--recipe", choices=["mnist", "cifar"],
                   help="optimiser recipe: mnist = Adam 1e-3, cifar = SGD 0.05, momentum 0.9, weight decay 5e-4 "
                        "(default: by dataset)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="override the recipe's optimiser")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--momentum", type=float, help="override the recipe's momentum (SGD)")
    p.add_argument("--weight-decay", type=float, help="override the recipe's weight decay")
    p.add_argument("--proj", type=int, metavar="R",
                   help="random projections of dimension R for the intermediate bounds during training "
                        "(Section 3.2); evaluation is always exact. Default: exact")
    p.add_argument("--proj-estimator", choices=["lower-median", "median", "geometric"], default="lower-median",
                   help="estimator of the projected L1 terms (default lower-median, the paper code's: "
                        "closest training loss to the exact one at small R; see dualgraph/projections.py)")
    p.add_argument("--cascade", type=int, metavar="K", help="train a K-stage cascade (Section 3.3): stage m+1 on the "
                                                            "training examples stages 1..m do not certify")
    p.add_argument("--limit", type=int, help="train on a seeded random subset of N training examples")
    p.add_argument("--eval-limit", type=int, default=1000,
                   help="test examples certified after each epoch (default 1000; 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and projections")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", default="runs/train", help="output folder (default runs/train): checkpoint.pt, "
                                                       "metrics.csv, metrics.png, model.onnx (cascade.json)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dualgraph", description="Provable robustness certificates for neural networks via dual networks "
                                      "(Wong et al., 'Scaling provable adversarial defenses', NeurIPS 2018).")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dualgraph {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks (of errors, and of plugins that fail to load)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("certify", help="certify a model (or a cascade manifest, .json) on dataset points in an "
                                       "L-inf or L2 ball")
    _add_model_args(p, optional=True)
    p.add_argument("--dataset", choices=["mnist", "cifar10", "digits"], default=None,
                   help="dataset (default: digits for the default model, else required)")
    p.add_argument("--data-dir", help="folder with the dataset files (MNIST IDX or CIFAR-10 python batches)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="dataset split (default test)")
    p.add_argument("--eps", type=_radius, default=None,
                   help="radius of the ball (pixel scale [0,1]; a number or a fraction such as 2/255)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="norm of the ball (default linf)")
    p.add_argument("--no-clip", action="store_true", help="do not intersect the L-inf ball with the [0,1] pixel box")
    p.add_argument("--limit", type=int, help="certify only the first N examples")
    p.add_argument("--batch-size", type=int, default=50, help="examples bounded together (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--timeout", type=float, help="stop after this many seconds and report the examples finished")
    _add_bound_args(p)
    _add_projection_args(p)

    p = sub.add_parser("dump", help="print the primal IR, the dual graph or per-layer bounds")
    _add_model_args(p)
    p.add_argument("--format", choices=["text", "json", "dot"], default="text",
                   help="text (default), json, or Graphviz dot (graphs only)")
    p.add_argument("--dual", action="store_true", help="print the dual graph (of the output) instead")
    p.add_argument("--bounds", action="store_true", help="print per-layer bound statistics (needs --eps)")
    p.add_argument("--eps", type=_radius, help="radius for --bounds (a number or a fraction such as 2/255)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="norm of the ball for --bounds")
    p.add_argument("--dataset", choices=["mnist", "cifar10", "digits"], help="take --bounds inputs from a dataset")
    p.add_argument("--data-dir", help="folder with the dataset files (MNIST IDX or CIFAR-10 python batches)")
    p.add_argument("--limit", type=int, default=10, help="number of dataset examples for --bounds (default 10)")
    p.add_argument("--vnnlib", help="take the --bounds input box from a VNN-LIB property instead")
    p.add_argument("--no-simplify", action="store_true", help="show the graph as imported, before the passes")
    _add_bound_args(p)
    _add_projection_args(p)

    p = sub.add_parser("models", help="list the models shipped in the zoo and the architectures 'train' builds")

    p = sub.add_parser("plugins", help="list every defined op: its source (built-in, or a plugin's distribution and "
                                       "version) and which of eval / dual / ONNX / fx it provides")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    p = sub.add_parser("check-op", help="test ops' rules on random inputs and bounds (relaxation on dense grids, the "
                                        "dual-layer contract, every bound path): what a plugin must pass")
    p.add_argument("ops", nargs="*", metavar="OP", help="op names: Relu, or domain.Op for a plugin's op")
    p.add_argument("--all", action="store_true", help="check every defined op")
    p.add_argument("--seed", type=int, help="seed of the random bounds, rows and points (default: per op)")
    _add_run_args(p, progress=False)

    _add_train_parser(sub)

    _add_verify_parsers(sub)

    from .bench import add_parsers as add_bench_parsers
    add_bench_parsers(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"dualgraph: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.formatwarning = _one_line_warning  # a warning is one line in normal CLI use, like an error
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    if args.debug:
        os.environ["DUALGRAPH_DEBUG"] = "1"  # read by the plugin loader
    tune_allocator()  # before torch's first large buffer: huge pages, and freed buffers kept for the next
    threads = getattr(args, "threads", None)
    if threads is not None and args.command not in ("bench",):  # the benchmarks set theirs themselves
        if threads < 1:
            print(f"dualgraph: error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        import torch
        torch.set_num_threads(threads)
    try:
        from . import commands
        if getattr(args, "device", None) is not None:
            commands.check_device(args.device)
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
    except DualgraphError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dualgraph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualgraph: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
