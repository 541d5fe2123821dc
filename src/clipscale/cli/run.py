"""Commands about a run: train, demo, config, models, data plan."""

from __future__ import annotations

import sys

from ..config import OVERRIDES_HELP, add_config_arguments
from ..errors import UserError


def cmd_train(args) -> int:
    from ..config import load_config
    from ..train import train

    cfg = load_config(args.config, args.overrides)
    return train(cfg)["exit_code"]


def add_train(sub) -> None:
    """clipscale train --config X.yaml [key=value ...]"""
    p = sub.add_parser(
        "train",
        help="train a CLIP model from a YAML config",
        description="Train (or resume, with checkpoint.resume=auto) a CLIP model. Also runs "
        "under torchrun / srun: every process runs this same command.",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(run_dir=args.run_dir, steps=args.steps, nproc=args.nproc, overrides=args.overrides)
    return 0


def add_demo(sub) -> None:
    """clipscale demo [--steps N --nproc N key=value ...]"""
    p = sub.add_parser(
        "demo",
        help="build digit shards and train a small CLIP on CPU",
        description="Build shards of scikit-learn's handwritten digits (no download) and train "
        "clip-tiny on them on the CPU; results go to the run directory.",
    )
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from configs/demo-cpu.yaml)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, gloo); default 2")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_demo)


def cmd_config(args) -> int:
    import yaml

    from ..config import load_config, to_dict

    if args.reference or args.write_docs:
        from pathlib import Path

        from ..config.reference import page, update_files

        if args.write_docs:
            changed = update_files(Path.cwd())
            print("updated " + ", ".join(map(str, changed)) if changed else "docs/config.md is up to date")
        else:
            sys.stdout.write(page())
        return 0
    cfg = load_config(args.config, args.overrides, machine=False)  # (a login node may lack the job's files)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def add_config(sub) -> None:
    """clipscale config [--config X.yaml key=value ...] [--reference | --write-docs]"""
    p = sub.add_parser(
        "config",
        help="print the resolved config (YAML + overrides + defaults), or the reference",
        description="Load, validate and print a run config without training; with --reference, "
        "print every config key with its type, default and meaning.",
    )
    add_config_arguments(p)
    p.add_argument("--reference", action="store_true", help="print the config reference (markdown) and exit")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite docs/config.md (the config reference) in the current directory",
    )
    p.set_defaults(func=cmd_config)


def cmd_models(args) -> int:
    from ..model import available_models

    for name in available_models():
        print(name)
    return 0


def add_models(sub) -> None:
    """clipscale models"""
    p = sub.add_parser(
        "models",
        help="list model names (open_clip's and configs/models/)",
        description="List every model name accepted by model.name.",
    )
    p.set_defaults(func=cmd_models)


def cmd_data_plan(args) -> int:
    import json

    from ..config import load_config
    from ..data.report import format_report, plan_report

    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}")
    if args.count_budget is not None and args.count_budget < 0:
        raise UserError(f"--count-budget must be >= 0 seconds, got {args.count_budget}")
    report = plan_report(load_config(args.config, args.overrides, machine=False), args.world_size, args.count_budget)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(format_report(report, args.max_repeats))
    return 0


def add_data(sub) -> None:
    """clipscale data plan --config X.yaml [--world-size N]"""
    data = sub.add_parser(
        "data",
        help="inspect a run's data mixture without training",
        description="Data tools for a run config (no training).",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser(
        "plan",
        help="per source: shards, missing, counts, samples, share, streams, epochs covered",
        description="Resolve every data source of a run config and print, for each: shards found and "
        "missing, where their counts came from, samples, its share of every batch, streams, samples per "
        "optimizer step and how many of "
        "its epochs train.steps covers; warn about sources that would repeat too often "
        "or never finish an epoch.",
    )
    add_config_arguments(p)
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will have (default 1)")
    p.add_argument(
        "--max-repeats",
        type=float,
        default=10.0,
        help="warn when a source would repeat more than this many times (default 10)",
    )
    p.add_argument(
        "--count-budget",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="count shards no index or cache knows for at most this long, then estimate the rest (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_data_plan)
