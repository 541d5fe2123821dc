"""`clipscale` command line: train, demo, shards, data, export, eval, supervise, status, models, config.

User mistakes (bad config, missing shards, unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from .config import OVERRIDES_HELP, add_config_arguments
from .errors import UserError, run_command


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    return train(cfg)["exit_code"]


def cmd_config(args) -> int:
    import yaml

    from .config import load_config, to_dict

    if args.reference or args.write_docs:
        from pathlib import Path

        from .config_reference import page, update_files

        if args.write_docs:
            changed = update_files(Path.cwd())
            print(
                "updated " + ", ".join(map(str, changed)) if changed else "docs/config.md and README.md are up to date"
            )
        else:
            sys.stdout.write(page())
        return 0
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


def cmd_export(args) -> int:
    from .export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.output, ema=args.ema)
    name = info["model_name"] or "<model name>"
    print(f"wrote {args.output}: {info['tensors']} tensors from {info['source']} (step {info['step']})")
    extra = f", force_context_length={info['context_length']}" if info.get("context_length") else ""
    print(f"load it with: open_clip.create_model_and_transforms({name!r}, pretrained={str(args.output)!r}{extra})")
    return 0


def cmd_eval(args) -> int:
    import json

    import torch

    from .config import EvalConfig
    from .evaluate import Evaluator, iter_eval_rows, model_from_checkpoint

    if not args.zeroshot and not args.retrieval:
        raise UserError("eval needs --zeroshot and/or --retrieval")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle, info = model_from_checkpoint(args.checkpoint, args.model, device, ema=args.ema)
    spec = EvalConfig(
        zeroshot=args.zeroshot,
        zeroshot_classes=args.classes,
        zeroshot_templates=args.templates,
        retrieval=args.retrieval,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    results = Evaluator(spec, bundle.val_transform, bundle.tokenizer, device).run(bundle.model)
    record = {"checkpoint": info["source"], "model": info["model_name"], "step": info["step"], **results}
    print(f"{info['model_name']} from {info['source']}" + (f" (step {info['step']})" if info["step"] else ""))
    width = max(len(name) for name, _ in iter_eval_rows(results))
    for name, value in iter_eval_rows(results):
        print(f"  {name:<{width}}  {value:>8}")
    if args.output:
        from pathlib import Path

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


def cmd_data_plan(args) -> int:
    import json

    from .config import load_config
    from .data.report import format_report, plan_report

    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}")
    report = plan_report(load_config(args.config, args.overrides), args.world_size)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(format_report(report, args.max_repeats))
    return 0


def cmd_supervise(args) -> int:
    import os

    from .config import signal_name
    from .supervise import Supervisor, slurm_job_key

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError(
            "supervise needs the training command after '--', e.g. "
            "clipscale supervise --run-dir runs/x -- srun python -m clipscale.train ..."
        )
    signals = [signal_name(s, "--requeue-on") for s in args.requeue_on.split(",") if s.strip()]
    return Supervisor(
        command,
        args.run_dir,
        job_key=slurm_job_key(os.environ),
        requeue_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        requeue=not args.no_requeue,
        requeue_signals=signals,
        max_hang_requeues=args.max_hang_requeues,
    ).run()


def cmd_status(args) -> int:
    import json

    from .run_status import read_status

    status = read_status(args.run_dir)
    if status is None:
        raise UserError(f"{args.run_dir} has no readable status.json (has the run started?)")
    if args.field:
        print(status.get(args.field, ""))
    else:
        print(json.dumps(status, indent=1))
    return 0


def cmd_shards_build(args) -> int:
    from .shards.build import BuildOptions, build_shards

    opts = BuildOptions(
        samples_per_shard=args.samples_per_shard,
        quality=args.quality,
        max_size=args.max_size,
        resize_side=args.resize_side,
        reencode=not args.no_reencode,
    )
    s = build_shards(
        args.input,
        args.output,
        args.name,
        opts,
        workers=args.workers,
        image_col=args.image_col,
        caption_col=args.caption_col,
        caption_field=args.caption_field,
        progress=not args.no_progress,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(
        f"wrote {s['written']} of {s['read']} samples into {s['shards']} shard(s) in {args.output} "
        f"({s['shards_reused']} reused); skipped: {skipped}; {s['images_per_s']:.0f} images/s; "
        f"details in {args.output}/stats.json"
    )
    return 0


def cmd_shards_verify(args) -> int:
    from .shards.verify import verify_shards

    report = verify_shards(args.target, workers=args.workers)
    if report.ok:
        print(f"OK: {report.shards} shard(s), {report.samples} samples, manifest matches")
        return 0
    print(f"FAILED: {len(report.problems)} problem(s) in {report.shards} shard(s), {report.samples} samples:")
    for p in report.problems[: args.max_listed]:
        print(f"  {p}")
    if len(report.problems) > args.max_listed:
        print(f"  ... and {len(report.problems) - args.max_listed} more")
    return 1


def cmd_shards_inspect(args) -> int:
    from .shards.inspect import inspect_shards

    print(inspect_shards(args.target, n=args.n, grid=args.grid, workers=args.workers))
    return 0


def cmd_shards_index(args) -> int:
    from .shards.scan import index_shards

    path, scans = index_shards(args.target, workers=args.workers)
    print(f"wrote {path}: {len(scans)} shard(s), {sum(s.samples for s in scans)} samples")
    for s in scans:
        for p in s.problems:
            print(f"  warning: {p}")
    return 0


def _add_shards_parser(sub) -> None:
    shards = sub.add_parser(
        "shards",
        help="build, verify, inspect and index WebDataset shards",
        description="Shard tooling: pack image-text collections into WebDataset shards "
        "and check shard sets made by any tool.",
    )
    ssub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)

    p = ssub.add_parser(
        "build",
        help="pack a table or an image folder into shards",
        description="Pack a table (.csv/.tsv/.parquet/.jsonl with image paths and captions) or a "
        "folder of images with sidecar .txt/.json captions into WebDataset shards "
        "(+ manifest.json, stats.json). Re-running the same command resumes an "
        "interrupted build; the output is byte-identical for the same input and "
        "options. Bad rows are skipped and counted by reason.",
    )
    p.add_argument("--input", "-i", required=True, help="table file or folder of images")
    p.add_argument("--output", "-o", required=True, help="output folder, or an object-store URL (s3://bucket/prefix)")
    p.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar (default: shard)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="input rows per shard (default 1000)")
    p.add_argument("--image-col", help="table column with image paths (default filepath or image)")
    p.add_argument("--caption-col", help="table column with captions (default caption or text)")
    p.add_argument("--caption-field", help="field of sidecar .json files holding the caption (default caption/text)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--max-size", type=int, help="resize so that one side is at most this many px (keeps aspect)")
    p.add_argument(
        "--resize-side",
        choices=["shorter", "longer"],
        default="shorter",
        help="which side --max-size bounds (default shorter)",
    )
    p.add_argument("--no-reencode", action="store_true", help="keep JPEG/PNG/WebP bytes as they are")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, each writing whole shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards_build)

    p = ssub.add_parser(
        "verify",
        help="check every shard, sample and the manifest",
        description="Read every shard: tar structure, every sample's image decodes and has a "
        "caption, counts/sizes/hashes match manifest.json. Exits 1 on any problem.",
    )
    p.add_argument("target", help="shard folder or brace pattern")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--max-listed", type=int, default=50, help="problems listed at most (default 50)")
    p.set_defaults(func=cmd_shards_verify)

    p = ssub.add_parser(
        "inspect",
        help="counts, caption and image-size statistics, a contact sheet",
        description="Summarise a shard set for a person: counts, caption lengths, image sizes, "
        "the first samples, and optionally a contact-sheet PNG.",
    )
    p.add_argument("target", help="shard folder or brace pattern")
    p.add_argument("--n", type=int, default=5, help="samples listed / drawn (default 5)")
    p.add_argument("--grid", help="write a contact sheet of the first --n samples to this PNG")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.set_defaults(func=cmd_shards_inspect)

    p = ssub.add_parser(
        "index",
        help="write manifest.json for an existing shard set",
        description="Count the samples of every shard (any writer: img2dataset, webdataset, ...) "
        "and write manifest.json next to them, so training starts instantly and "
        "resumes exactly.",
    )
    p.add_argument("target", help="shard folder or brace pattern")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.set_defaults(func=cmd_shards_index)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipscale",
        description="Distributed large-batch CLIP pretraining on WebDataset shards.",
        epilog="Run `clipscale COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a CLIP model from a YAML config",
        description="Train (or resume, with checkpoint.resume=auto) a CLIP model. Also runs "
        "under torchrun / srun: every process runs this same command.",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

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

    _add_shards_parser(sub)

    data = sub.add_parser(
        "data",
        help="inspect a run's data mixture without training",
        description="Data tools for a run config (no training).",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser(
        "plan",
        help="per source: shards, samples, share, samples per step, epochs covered",
        description="Resolve every data source of a run config and print, for each: shards, "
        "samples, its share of every batch, samples per optimizer step and how many of "
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
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_data_plan)

    p = sub.add_parser(
        "export",
        help="write a checkpoint's weights as one open_clip state_dict",
        description="Consolidate a DDP, FSDP2 or DeepSpeed (ZeRO 0-3) checkpoint into a single fp32 "
        "state_dict that open_clip loads with pretrained=PATH.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint file or folder, a run's checkpoints/ folder, or a run directory (latest)",
    )
    p.add_argument("--output", required=True, help="output file, e.g. model.pt")
    p.add_argument("--ema", action="store_true", help="write the EMA weights (a run with ema.decay) instead")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval",
        help="zero-shot classification and retrieval of a checkpoint",
        description="Evaluate a clipscale checkpoint (file, FSDP2 or DeepSpeed folder, or run directory) or an "
        "open_clip-format state_dict (with --model): zero-shot top-1/top-5 and "
        "image<->text Recall@1/5/10; prints a table and writes JSON.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file/folder, run directory, or open_clip .pt")
    p.add_argument("--model", help="model name (needed for open_clip-format files; clipscale's know theirs)")
    p.add_argument("--zeroshot", help="image-folder tree root/<class>/*.jpg or labelled shards (cls)")
    p.add_argument("--classes", help="imagenet | digits | a .txt/.yaml/.json of class names (default: folder names)")
    p.add_argument("--templates", help="openai | simple | digits | a file of templates with {} (default: openai)")
    p.add_argument("--retrieval", help="shards of image-caption pairs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (a run with ema.decay)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "supervise",
        help="run a training step inside a SLURM batch script; requeue on preemption",
        description="Run COMMAND (srun/torchrun ... clipscale.train), pass SIGUSR1/SIGUSR2/SIGTERM "
        "on to it, and when the run was preempted by a requeue signal, or stopped by the hang "
        "watchdog, requeue the SLURM job with scontrol (see slurm/README.md).",
    )
    p.add_argument("--run-dir", required=True, help="the run directory (its status.json says how the run ended)")
    p.add_argument(
        "--requeue-on",
        default="SIGUSR1,SIGUSR2",
        help="signals that mean 'checkpoint and requeue' (default SIGUSR1,SIGUSR2; SIGTERM never "
        "requeues: it is scancel, or SLURM preemption that requeues by itself)",
    )
    p.add_argument("--no-requeue", action="store_true", help="checkpoint and stop, but do not requeue")
    p.add_argument(
        "--max-hang-requeues",
        type=int,
        default=3,
        help="requeue a run the hang watchdog stopped (status hung) at most this many times in a row "
        "without progress past the step of the previous hang; then the job fails (default 3)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=cmd_supervise)

    p = sub.add_parser(
        "status",
        help="print a run's status.json (state, step, restarts)",
        description="Print RUN_DIR/status.json: running | finished | preempted | failed, the step, "
        "the signal and the restart/requeue counts.",
    )
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--field", help="print only this field (e.g. state, step)")
    p.set_defaults(func=cmd_status)

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
        help="rewrite docs/config.md and the README's config table in the current directory",
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "models",
        help="list model names (open_clip's and configs/models/)",
        description="List every model name accepted by model.name.",
    )
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
