"""`clipscale` command line: train, demo, shards, models, config.

User mistakes (bad config, missing shards, unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .errors import UserError

OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=3e-4 data.batch_size=256 checkpoint.resume=auto"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (see configs/); defaults apply to missing keys")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def cmd_config(args) -> int:
    import yaml

    from .config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_models(args) -> int:
    from .model import available_models

    for name in available_models():
        print(name)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(run_dir=args.run_dir, steps=args.steps, nproc=args.nproc, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipscale",
        description="Distributed large-batch CLIP pretraining on WebDataset shards.",
        epilog="Run `clipscale COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a CLIP model from a YAML config",
                       description="Train (or resume, with checkpoint.resume=auto) a CLIP model. Also runs "
                                   "under torchrun / srun: every process runs this same command.")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="build digit shards and train a small CLIP on CPU",
                       description="Build shards of scikit-learn's handwritten digits (no download) and train "
                                   "clip-tiny on them on the CPU; results go to the run directory.")
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from configs/demo-cpu.yaml)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun, gloo); default 1")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the resolved config (YAML + overrides + defaults)",
                       description="Load, validate and print a run config without training.")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list model names (open_clip's and configs/models/)",
                       description="List every model name accepted by model.name.")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        logging.shutdown()
        print(f"clipscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
