"""Commands about checkpoints: export (one open_clip state_dict) and eval (zero-shot, retrieval)."""

from __future__ import annotations

from ..errors import UserError

CHECKPOINT_HELP = (
    "a step file or folder (RUN/checkpoints/step_N[.pt]), the pointer RUN/checkpoints/latest, a checkpoints "
    "folder or a run folder; the same in a bucket (s3://bucket/run/...)"
)


def cmd_export(args) -> int:
    from ..checkpoint.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.output, ema=args.ema)
    name = info["model_name"] or "<model name>"
    print(f"wrote {args.output}: {info['tensors']} tensors from {info['source']} (step {info['step']})")
    extra = f", force_context_length={info['context_length']}" if info.get("context_length") else ""
    print(f"load it with: open_clip.create_model_and_transforms({name!r}, pretrained={str(args.output)!r}{extra})")
    return 0


def add_export(sub) -> None:
    """clipscale export --checkpoint CK --output model.pt [--ema]"""
    p = sub.add_parser(
        "export",
        help="write a checkpoint's weights as one open_clip state_dict",
        description="Consolidate a DDP, FSDP2 or DeepSpeed (ZeRO 0-3) checkpoint into a single fp32 "
        "state_dict that open_clip loads with pretrained=PATH.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help=CHECKPOINT_HELP,
    )
    p.add_argument("--output", required=True, help="output file, e.g. model.pt")
    p.add_argument("--ema", action="store_true", help="write the EMA weights (a run with ema.decay) instead")
    p.set_defaults(func=cmd_export)


def cmd_eval(args) -> int:
    import json

    import torch

    from ..checkpoint.weights import model_from_checkpoint
    from ..config import EvalConfig
    from ..evaluate import Evaluator, iter_eval_rows

    if not args.zeroshot and not args.retrieval:
        raise UserError("eval needs --zeroshot and/or --retrieval")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle, info = model_from_checkpoint(args.checkpoint, args.model, device, ema=args.ema, config_dirs=args.config_dir)
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


def add_eval(sub) -> None:
    """clipscale eval --checkpoint CK (--zeroshot SET | --retrieval SET) ..."""
    p = sub.add_parser(
        "eval",
        help="zero-shot classification and retrieval of a checkpoint",
        description="Evaluate a clipscale checkpoint (any path form, DDP, FSDP2 or DeepSpeed) or an "
        "open_clip-format state_dict (with --model): zero-shot top-1/top-5 and "
        "image<->text Recall@1/5/10; prints a table and writes JSON.",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP + ", or an open_clip-format .pt (with --model)")
    p.add_argument("--model", help="model name (needed for open_clip-format files; clipscale's know theirs)")
    p.add_argument(
        "--config-dir",
        action="append",
        default=[],
        help="a folder of open_clip model JSON configs (as model.config_dirs; the checkpoint's own are tried too)",
    )
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
