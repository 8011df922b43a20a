"""The CLI's commands (argument parsing lives in :mod:`dualgraph.cli`)."""

from __future__ import annotations

import argparse
import json

import torch

from .errors import DualgraphError


def _dtype(args) -> torch.dtype:
    return torch.float64 if getattr(args, "dtype", "float32") == "float64" else torch.float32


def _load(args, simplify: bool = True):
    from .api import add_input_normalization, load_model
    from .ir import Graph  # noqa: F401
    graph = load_model(args.model, simplify=False)
    if args.mean or args.std:
        graph = add_input_normalization(graph, args.mean, args.std)
    if simplify:
        from passes.pipeline import simplify as run_passes
        graph = run_passes(graph)
    return graph


def _certifier(args, graph):
    from .api import Certifier
    from .scheduler import BoundConfig
    return Certifier(graph, BoundConfig(relu_relaxation=args.relaxation), device=args.device, dtype=_dtype(args))


def cmd_certify(args: argparse.Namespace) -> int:
    from models import model_info
    from .certify import certify_dataset
    from .cli import DEFAULT_MODEL
    from .data import load_dataset
    info = model_info(args.model)
    dataset = args.dataset or (info or {}).get("dataset")
    if dataset is None:
        raise DualgraphError("--dataset is required for this model (mnist, cifar10 or digits)")
    eps = args.eps if args.eps is not None else (info or {}).get("eps")
    if eps is None:
        raise DualgraphError("--eps is required for this model")
    if info and args.model == DEFAULT_MODEL and args.mean is None:
        args.mean, args.std = info.get("mean"), info.get("std")
    data = load_dataset(dataset, args.data_dir, split=args.split, limit=args.limit)
    certifier = _certifier(args, _load(args))
    report = certify_dataset(certifier, data, eps, args.norm, None if args.no_clip else (0.0, 1.0),
                             args.batch_size)
    if args.json:
        print(json.dumps({"model": str(args.model), "dataset": dataset, **report.to_json()}))
    else:
        print(f"model    {args.model}\ndataset  {dataset} ({args.split})")
        print(report.table())
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from . import printer
    graph = _load(args, simplify=not args.no_simplify)
    shown = graph
    if args.dual:
        from passes.build_dual import build_dual
        from .api import strip_softmax
        shown = build_dual(strip_softmax(graph))
    if not args.bounds:
        print({"text": printer.format_text, "json": printer.format_json, "dot": printer.format_dot}[args.format](shown))
        return 0
    certifier = _certifier(args, graph)
    input_set = _bounds_input_set(args, certifier)
    with torch.no_grad():
        bounds = certifier.intermediate_bounds(input_set)
    if args.format == "json":
        print(json.dumps({"graph": graph.name, "bounds": printer.bounds_summary(graph, bounds)}, indent=1))
    else:
        print(printer.format_bounds(graph, bounds))
    return 0


def _bounds_input_set(args, certifier):
    from .input_sets import Box
    if args.vnnlib:
        from .vnnlib import read_vnnlib
        prop = read_vnnlib(args.vnnlib)[0]
        lo = torch.as_tensor(prop.input_lo, dtype=certifier.dtype).unsqueeze(0)
        hi = torch.as_tensor(prop.input_hi, dtype=certifier.dtype).unsqueeze(0)
        return Box(certifier._prepare(lo), certifier._prepare(hi))
    if args.eps is None:
        raise DualgraphError("dump --bounds needs --eps (and --dataset/--data-dir) or --vnnlib PROPERTY")
    if args.dataset:
        from .data import load_dataset
        x = load_dataset(args.dataset, args.data_dir, limit=args.limit).images
    else:
        raise DualgraphError("dump --bounds needs input points: give --dataset (with --data-dir) or --vnnlib")
    return certifier.input_set(x, args.eps, args.norm, (0.0, 1.0) if args.norm == "linf" else None)


def cmd_models(args: argparse.Namespace) -> int:
    from models import ZOO
    for name, info in ZOO.items():
        print(f"{name:<16} {info['description']}")
    return 0
