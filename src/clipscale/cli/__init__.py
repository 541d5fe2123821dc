"""`clipscale` command line: train, demo, shards, data, export, eval, supervise, status, models, config.

Each command is a parser builder (`add_NAME`) and a handler (`cmd_NAME`) in the module of its topic;
a handler imports what it needs when it runs, so `clipscale --help` and the batch-shell commands
start without torch. User mistakes (bad config, missing shards, unusable checkpoint) print one line
and exit 2.
"""

from __future__ import annotations

import argparse

from ..errors import run_command
from . import checkpoints, job, run, shards

COMMANDS = [  # in the order `clipscale --help` lists them
    run.add_train,
    run.add_demo,
    shards.add_shards,
    run.add_data,
    checkpoints.add_export,
    checkpoints.add_eval,
    job.add_supervise,
    job.add_status,
    run.add_config,
    run.add_models,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipscale",
        description="Distributed large-batch CLIP pretraining on WebDataset shards.",
        epilog="Run `clipscale COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(lambda: args.func(args))
