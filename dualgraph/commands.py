"""The CLI's commands (argument parsing lives in :mod:`dualgraph.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .errors import DualgraphError
from .printer import json_text


def check_device(name: str) -> None:
    """``--device``: ``cpu``, or ``cuda`` / ``cuda:N`` where a CUDA GPU is present."""
    import re
    if name == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise DualgraphError(f"--device {name}: unknown device; use cpu or cuda (cuda:N for GPU N)")
    if not torch.cuda.is_available():
        raise DualgraphError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise DualgraphError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (0..)")


def check_counts(args, **least: int) -> None:
    """One-line errors naming the flag: each ``--name`` (``name`` with ``_``) at least its bound."""
    for name, bound in least.items():
        value = getattr(args, name, None)
        if value is not None and value < bound:
            raise DualgraphError(f"--{name.replace('_', '-')} must be at least {bound}, got {value}")


def _dtype(args) -> torch.dtype:
    return torch.float64 if getattr(args, "dtype", "float32") == "float64" else torch.float32


def _load(args, simplify: bool = True):
    from .api import add_input_normalization, load_model
    graph = load_model(args.model, simplify=False)
    if args.mean or args.std:
        graph = add_input_normalization(graph, args.mean, args.std)
    if simplify:
        from dualgraph.passes.pipeline import simplify as run_passes
        graph = run_passes(graph)
    return graph


def _bound_config(args, **options):
    from .scheduler import BoundConfig
    proj = getattr(args, "proj", None)
    extra = {}
    if proj is not None or getattr(args, "delta", None) is not None or getattr(args, "proj_seed", None) is not None:
        if proj is None:
            raise DualgraphError("--delta and --proj-seed need --proj R (random projections)")
        extra = dict(proj=proj, proj_seed=args.proj_seed, delta=args.delta,
                     proj_estimator="geometric" if args.delta is not None else "median")
    steps, lr = getattr(args, "alpha_steps", 20), getattr(args, "alpha_lr", 0.1)
    if (steps != 20 or lr != 0.1) and args.relaxation != "alpha":
        raise DualgraphError("--alpha-steps and --alpha-lr apply to --relaxation alpha only")
    check_counts(args, alpha_steps=0)
    if not lr > 0 or lr == float("inf"):
        raise DualgraphError(f"--alpha-lr must be a positive number, got {lr}")
    return BoundConfig(relu_relaxation=args.relaxation, alpha_steps=steps, alpha_lr=lr, max_memory=max_memory(args),
                       **extra, **options)


def max_memory(args) -> int:
    """``--max-memory`` in bytes (``4G``, ``500M``, ``123456``), default half of the memory
    available now (``MemAvailable`` on Linux; 4 GB where it cannot be read)."""
    text = getattr(args, "max_memory", None)
    if text is None:
        try:
            with open("/proc/meminfo") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
            return max(kb * 1024 // 2, 1 << 26)
        except (OSError, StopIteration, ValueError):
            return 4 << 30
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise DualgraphError(f"--max-memory: cannot read '{text}'; give a size such as 4G, 500M or 1073741824")
    size = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")
    if size < (1 << 20):
        raise DualgraphError(f"--max-memory must be at least 1M, got '{text}'")
    return int(size)


def _certifier(args, graph, **options):
    from .api import Certifier
    return Certifier(graph, _bound_config(args, **options), device=args.device, dtype=_dtype(args))


def _estimate_labels(config, n_bounds: int) -> dict:
    """JSON fields that mark results computed with random projections as estimates."""
    out = {"sound": False, "proj": config.proj, "proj_estimator": config.proj_estimator}
    if config.delta is not None:
        out.update(probabilistic=True, delta=config.delta, bounded_units=n_bounds,
                   delta_union=min(1.0, n_bounds * config.delta))
    return out


def _estimate_report(report, config, n_bounds: int) -> tuple[dict, str]:
    """(JSON, table) of a certify run with projected bounds: estimates, never "certified"."""
    from .certify import key_value_table
    data = report.to_json()
    robust = data.pop("robust_error")
    passed = data.pop("certified")
    data.update(estimated_robust_error=robust, estimated_robust=passed, **_estimate_labels(config, n_bounds))
    kind = (f"probabilistic: each intermediate bound holds with probability >= {1 - config.delta:g}"
            f" ({n_bounds} bounded units per example; union bound {min(1.0, n_bounds * config.delta):.3g})"
            if config.delta is not None else "estimate, not sound")
    rows = [("examples", f"{report.n}"), ("eps", f"{report.eps:g} ({report.norm})"),
            ("clean error", f"{100 * report.clean_error:.2f}%"),
            ("estimated robust error", f"{100 * report.robust_error:.2f}%"),
            ("robust by estimate", f"{passed} / {report.n}"),
            ("bounds", f"random projections, r = {config.proj} ({kind})"),
            ("time", f"{report.seconds:.2f} s ({report.images_per_second:.1f} images/s)")]
    return data, key_value_table(rows)


def cmd_certify(args: argparse.Namespace) -> int:
    if str(args.model).endswith(".json"):
        return _certify_cascade(args)
    from dualgraph.models import model_info, resolve_model
    from .certify import certify_dataset
    from .cli import DEFAULT_MODEL
    from .data import load_dataset
    info = model_info(args.model)
    if info is None and not Path(args.model).exists():
        resolve_model(str(args.model))  # a mistyped path: say so before asking for --dataset and --eps
    dataset = args.dataset or (info or {}).get("dataset")
    if dataset is None:
        raise DualgraphError("--dataset is required for this model (mnist, cifar10 or digits)")
    eps = args.eps if args.eps is not None else (info or {}).get("eps")
    if eps is None:
        raise DualgraphError("--eps is required for this model")
    if info and args.model == DEFAULT_MODEL and args.mean is None and args.std is None:
        args.mean, args.std = info.get("mean"), info.get("std")
    from .input_sets import check_eps
    eps = check_eps(eps)
    check_counts(args, batch_size=1, limit=1)  # --alpha-*: _bound_config
    certifier = _certifier(args, _load(args))  # the model first: its errors matter more than the data's
    data = load_dataset(dataset, args.data_dir, split=args.split, limit=args.limit)
    from .deadline import Deadline
    if args.timeout is not None and not (args.timeout > 0 and args.timeout < float("inf")):
        raise DualgraphError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    report = certify_dataset(certifier, data, eps, args.norm, None if args.no_clip else (0.0, 1.0),
                             args.batch_size, progress=certifier.config.sound and not args.no_progress,  # bar: "certified"
                             deadline=Deadline(args.timeout))
    from .distributed import world
    if not world(args.device).is_main:
        return 0  # rank 0 reports for all (torchrun)
    data, table = report.to_json(), None
    if not certifier.config.sound:
        n_bounds = sum(v.numel for v in certifier.scheduler.bound_targets)
        data, table = _estimate_report(report, certifier.config, n_bounds)
    if args.json:
        print(json_text({"model": str(args.model), "dataset": dataset, **data}))
    else:
        print(f"model    {args.model}\ndataset  {dataset} ({args.split})")
        print(table or report.table())
    return 0


def _shown(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` where it is inside it (a manifest's stages), else as it is."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _certify_cascade(args: argparse.Namespace) -> int:
    from .cascade import certify_cascade, load_stages, read_manifest
    from .data import load_dataset
    from .input_sets import check_eps
    files, manifest_eps, manifest_norm = read_manifest(args.model)
    if manifest_norm is not None and manifest_norm != args.norm:
        raise DualgraphError(f"the cascade {args.model} was trained for the {manifest_norm} norm; pass --norm {manifest_norm}")
    if args.dataset is None:
        raise DualgraphError("--dataset is required to certify a cascade (mnist, cifar10 or digits)")
    eps = args.eps if args.eps is not None else manifest_eps
    if eps is None:
        raise DualgraphError(f"--eps is required: the manifest {args.model} names no eps")
    eps = check_eps(eps)
    if args.proj is not None:
        raise DualgraphError("a cascade is certified with exact bounds; drop --proj")
    if args.mean is not None or args.std is not None:
        raise DualgraphError("--mean/--std are not applied to a cascade's stages; export each stage with its "
                             "input normalisation inside, and drop --mean/--std")
    if args.timeout is not None:
        raise DualgraphError("--timeout is not supported for a cascade (every example is routed through the "
                             "stages); drop it, or certify fewer examples with --limit")
    certs = load_stages(files, _bound_config(args), device=args.device, dtype=_dtype(args))
    data = load_dataset(args.dataset, args.data_dir, split=args.split, limit=args.limit)
    names = [_shown(f, Path(args.model).parent) for f in files]
    report = certify_cascade(certs, names, data, eps, args.norm,
                             None if args.no_clip else (0.0, 1.0), args.batch_size, progress=not args.no_progress)
    if args.json:
        print(json_text({"model": str(args.model), "dataset": args.dataset, **report.to_json()}))
    else:
        print(f"cascade  {args.model}\ndataset  {args.dataset} ({args.split})")
        print(report.table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .train import TrainConfig, recipe_for, save_config, train  # --threads: applied by cli.main
    from dualgraph.models.architectures import ARCHITECTURES
    if args.model not in ARCHITECTURES:
        raise DualgraphError(f"unknown architecture '{args.model}' for train; choose one of {', '.join(ARCHITECTURES)}")
    config = TrainConfig(model=args.model, eps=args.eps, norm=args.norm,
                         clip=None if args.no_clip or args.norm == "l2" else (0.0, 1.0), epochs=args.epochs,
                         ramp_epochs=args.ramp_epochs, lr_halve_every=args.lr_halve_every,
                         batch_size=args.batch_size, recipe=args.recipe or recipe_for(args.dataset),
                         optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         eps_start=args.eps_start, proj=args.proj, proj_estimator=args.proj_estimator,
                         seed=args.seed, device=args.device,
                         eval_limit=args.eval_limit or None)
    if args.cascade is not None and args.cascade < 1:
        raise DualgraphError(f"--cascade needs at least 1 stage, got {args.cascade}")
    train_set = load_dataset(args.dataset, args.data_dir, split="train")
    test_set = load_dataset(args.dataset, args.data_dir, split="test")
    if args.limit is not None:
        if args.limit < 1:
            raise DualgraphError(f"--limit must be a positive number of examples, got {args.limit}")
        pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[:args.limit]
        train_set = type(train_set)(train_set.images[pick], train_set.labels[pick], train_set.name,
                                    train_set.num_classes)
    out = Path(args.out)
    if not args.resume and any((out / f).exists() for f in ("checkpoint.pt", "cascade.json", "stage0/checkpoint.pt")):
        raise DualgraphError(f"{out} already holds a training run; pass --resume to continue it or choose "
                             "another --out")
    from .distributed import world
    main_rank = world(args.device).is_main
    progress = not args.no_progress and main_rank
    if args.cascade:
        from .cascade import certify_cascade, load_stages, read_manifest, train_cascade
        path = train_cascade(config, args.cascade, train_set, test_set, out, resume=args.resume, progress=progress)
        files, eps, _ = read_manifest(path)
        from .scheduler import BoundConfig
        report = certify_cascade(load_stages(files, BoundConfig()),
                                 [str(f.relative_to(out)) for f in files],
                                 test_set, eps, config.norm, config.clip, config.batch_size, progress=progress)
        if main_rank:
            print(report.table())
            print(f"wrote {path}")
    else:
        train(config, train_set, test_set, out, resume=args.resume, progress=progress)
        if main_rank:
            print(f"wrote {out / 'model.onnx'}, {out / 'metrics.csv'}, {out / 'metrics.png'}")
    if main_rank:
        save_config(out, config, {"dataset": args.dataset, "limit": args.limit, "cascade": args.cascade})
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from . import printer
    if args.bounds and args.dual:
        raise DualgraphError("--bounds prints the bounds of the primal graph's values; it does not combine with "
                             "--dual (drop one of them)")
    if not args.bounds:
        given = [flag for flag, value in (("--eps", args.eps), ("--dataset", args.dataset), ("--vnnlib", args.vnnlib),
                                          ("--data-dir", args.data_dir)) if value is not None]
        if given:
            raise DualgraphError(f"{', '.join(given)} only take effect with --bounds; add --bounds or drop them")
    elif args.vnnlib and (args.dataset or args.eps is not None):
        raise DualgraphError("--bounds takes its inputs from --vnnlib or from --dataset and --eps, not both; "
                             "drop one of them")
    check_counts(args, limit=1)
    graph = _load(args, simplify=not args.no_simplify)
    shown = graph
    if args.dual:
        from dualgraph.dual_graph import build_dual
        from .api import strip_readout
        shown = build_dual(strip_readout(graph))
    if not args.bounds:
        print({"text": printer.format_text, "json": printer.format_json, "dot": printer.format_dot}[args.format](shown))
        return 0
    certifier = _certifier(args, graph, prune_stable=False)  # every unit's exact bound, for its width
    input_set, x, labels = _bounds_input_set(args, certifier)
    with torch.no_grad():
        bounds = certifier.intermediate_bounds(input_set)
        certificates = None
        if labels is not None:  # dataset points: explain each example's certificate
            from .api import margin_spec
            predictions = certifier.forward(x).argmax(1)
            margins = certifier.lower_bounds(input_set, margin_spec(labels, certifier.num_outputs))
            certificates = printer.certificate_rows(certifier.graph, bounds, labels, predictions, margins,
                                                    certifier.margin_needed)
    estimate = not certifier.config.sound
    if args.format == "dot":
        shown = certifier.graph  # the graph the bounds are about (a final readout left out)
        title = (f"bounds ESTIMATED with random projections (r = {certifier.config.proj}); not sound"
                 if estimate else None)
        print(printer.format_dot(shown, printer.bound_notes(shown, bounds), title), end="")
    elif args.format == "json":
        extra = _estimate_labels(certifier.config, sum(v.numel for v in certifier.scheduler.bound_targets)) \
            if estimate else {}
        if certificates is not None:
            extra["certificates"] = certificates
        print(json_text({"graph": graph.name, "bounds": printer.bounds_summary(graph, bounds), **extra}, indent=1))
    else:
        if estimate:
            print(f"# bounds ESTIMATED with random projections (r = {certifier.config.proj}); not sound")
        print(printer.format_bounds(graph, bounds))
        if certificates is not None:
            print(printer.format_certificates(certificates))
    return 0


def _bounds_input_set(args, certifier):
    from .input_sets import Box
    if args.vnnlib:
        from .vnnlib import read_vnnlib
        from .input_sets import outward
        prop = read_vnnlib(args.vnnlib)[0]
        # the box verify bounds: its inputs as the model is fed them, rounded outward
        fed = prop.fed_bounds(torch.empty(0, dtype=certifier.graph.inputs[0].dtype).numpy().dtype)
        lo, hi = outward(*(torch.tensor(a, dtype=torch.float64).unsqueeze(0) for a in fed), certifier.dtype)
        return Box(certifier._prepare(lo), certifier._prepare(hi)), None, None
    if args.eps is None:
        raise DualgraphError("dump --bounds needs --eps (and --dataset/--data-dir) or --vnnlib PROPERTY")
    if args.dataset:
        from .data import load_dataset
        data = load_dataset(args.dataset, args.data_dir, limit=args.limit)
    else:
        raise DualgraphError("dump --bounds needs input points: give --dataset (with --data-dir) or --vnnlib")
    clip = (0.0, 1.0) if args.norm == "linf" else None
    return certifier.input_set(data.images, args.eps, args.norm, clip), data.images, data.labels


def cmd_models(args: argparse.Namespace) -> int:
    from dualgraph.models import ZOO
    from dualgraph.models.architectures import ARCHITECTURES
    print("trained models (certify MODEL):")
    for name, info in ZOO.items():
        print(f"  {name:<16} {info['description']}")
    print("architectures (train --model NAME; shaped by the dataset):")
    for name, (description, _) in ARCHITECTURES.items():
        print(f"  {name:<16} {description}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .op_registry import definitions
    from .plugins import load_plugins, plugins_disabled
    ops = definitions()
    loaded = load_plugins()
    if args.json:
        print(json_text({
            "ops": [{"op": d.name, "source": d.source, "provides": [k for k, v in d.provides().items() if v],
                     "nonlinear": d.nonlinear, "examples": len(d.examples), "replaces": d.replaced} for d in ops],
            "plugins": [{"name": p.name, "module": p.value, "source": p.source, "error": p.error} for p in loaded],
            "plugins_disabled": plugins_disabled()}, indent=2))
        return 0
    from .printer import text_table
    rows = [[d.name, d.source + (f" (replaces {d.replaced})" if d.replaced else ""),
             *("yes" if v else "-" for v in d.provides().values())] for d in ops]
    print("\n".join(text_table(["op", "source", "eval", "dual", "onnx", "fx"], rows, indent="")))
    if plugins_disabled():
        print("plugins: not loaded (DUALGRAPH_NO_PLUGINS is set)")
    elif not loaded:
        print("plugins: none installed (entry point group 'dualgraph.plugins')")
    for p in loaded:
        state = f"failed to load: {p.error}" if p.error else "loaded"
        print(f"plugin {p.name} = {p.value} ({p.source}): {state}")
    return 0


def cmd_check_op(args: argparse.Namespace) -> int:
    from .op_registry import definitions, find_op
    from .testing import OpCheckFailure, check_op
    if not args.ops and not args.all:
        raise DualgraphError("name the ops to check (e.g. `dualgraph check-op Relu com.example.Softplus`) or pass --all")
    targets = definitions() if args.all else [find_op(name) for name in args.ops]
    failed = 0
    for definition in targets:
        try:
            print(check_op(definition, seed=args.seed).summary(), flush=True)
        except OpCheckFailure as exc:
            failed += 1
            print(f"{definition.name}: FAILED ({definition.source}): {exc}", flush=True)
    if failed:
        print(f"{failed} of {len(targets)} op(s) failed the check")
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run
    return run(args)


def _verify_config(args):
    from .verification import VerifyConfig  # --threads is applied by cli.main for every command
    check_counts(args, alpha_steps=0, attack_steps=0, attack_rounds=0, attack_restarts=1)
    order = ("paper", "crown", "alpha")
    return VerifyConfig(relaxations=order[:order.index(args.relaxation) + 1], alpha_steps=args.alpha_steps,
                        branch_and_bound=not args.no_bab, attack_steps=args.attack_steps,
                        attack_restarts=args.attack_restarts, attack_rounds=args.attack_rounds,
                        split_max_inputs=0 if args.no_split else 16, seed=args.seed, device=args.device,
                        max_memory=max_memory(args))


def cmd_verify(args: argparse.Namespace) -> int:
    import math
    import sys
    from .competition import write_result
    from .verification import verify_instance
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise DualgraphError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    config = _verify_config(args)
    if args.results:  # before the run: an answer must not be lost for want of a folder
        from .files import check_writable
        check_writable(args.results, "results file")
    try:
        result = verify_instance(args.model, args.property, args.timeout, config)
    except Exception:
        if args.results:  # the harness reads the file: say "error" there too
            write_result(args.results, "error\n")
        raise
    text = result.result_text()
    print(text, end="", flush=True)
    if args.results:
        write_result(args.results, text)
    how = result.details.get("method")
    if how and result.answer == "sat":
        how += f"; confirmed by {result.details['confirmed_by']}"
    if result.answer in ("timeout", "unknown") and "bab_open_domains" in result.details:
        empty = result.details.get("bab_empty_domains", 0)
        how = (f"branch and bound: {result.details['bab_domains']:,} domains bounded"
               + (f" and {empty:,} found empty" if empty else "") + ", "
               f"{result.details['bab_open_domains']:,} open, the worst at margin "
               f"{result.details['bab_worst_open_margin']:.4g}")
    print(f"dualgraph: {result.answer} in {result.seconds:.2f} s" + (f" ({how})" if how else ""), file=sys.stderr)
    return 0


def cmd_run_instances(args: argparse.Namespace) -> int:
    from .competition import run_instances
    summary = run_instances(args.instances, args.root, args.out, _verify_config(args), results_dir=args.results_dir,
                            max_timeout=args.max_timeout, limit=args.limit, progress=not args.no_progress)
    print(summary.text())
    if args.out:
        print(f"results written to {args.out}")
    return 0
