"""clipscale shards: build, verify, inspect, index; embed, filter, dedup (curation)."""

from __future__ import annotations

from ..errors import DataError
from .checkpoints import CHECKPOINT_HELP


def cmd_shards_build(args) -> int:
    from ..shards.build import BuildOptions, build_shards

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
    from ..shards.verify import verify_shards

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
    from ..shards.inspect import inspect_shards

    print(inspect_shards(args.target, n=args.n, grid=args.grid, workers=args.workers))
    return 0


def cmd_shards_index(args) -> int:
    from ..shards.scan import index_shards

    path, scans = index_shards(args.target, workers=args.workers)
    print(f"wrote {path}: {len(scans)} shard(s), {sum(s.samples for s in scans)} samples")
    for s in scans:
        for p in s.problems:
            print(f"  warning: {p}")
    return 0


def cmd_shards_embed(args) -> int:
    from ..shards.embed import SampleFields, embed_shards

    fields = SampleFields(tuple(args.image_keys.split(",")), args.caption_key, args.caption_json_field)
    s = embed_shards(
        args.input, args.output, args.checkpoint, model=args.model, batch_size=args.batch_size,
        workers=args.workers, device=args.device, overwrite=args.overwrite, dtype=args.dtype,
        progress=not args.no_progress, fields=fields, config_dirs=args.config_dir, ema=args.ema,
    )  # fmt: skip
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(
        f"embedded {s['samples']} samples into {s['written']} of {s['shards']} shard(s) in {args.output} with "
        f"{s['model']} ({s['shards_done_before']} done before on this rank); skipped: {skipped}; "
        f"{s['samples_per_s']:.0f} samples/s on this rank"
    )
    if s["failed"]:
        url, error = s["failed"][0]
        more = f" (and {len(s['failed']) - 1} more)" if len(s["failed"]) > 1 else ""
        raise DataError(f"{len(s['failed'])} shard(s) could not be read, e.g. {url}: {error}{more}; run again to retry")
    return 0


def cmd_shards_filter(args) -> int:
    from ..shards.score_filter import filter_shards

    r = filter_shards(
        args.input, args.output, top=args.clip_score_top, min_score=args.clip_score_min,
        min_caption_words=args.min_caption_words, overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"kept {r['samples_out']} of {r['samples_in']} samples ({r['samples_out'] / r['samples_in']:.1%}) in "
        f"{r['shards_out']} shard(s): CLIP score >= {r['threshold']:.4f} (removed {r['removed']['clip_score']}), "
        f"caption words (removed {r['removed']['caption_words']}); report in {args.output}/filter_report.json"
    )
    return 0


def cmd_shards_dedup(args) -> int:
    from ..shards.dedup import dedup_shards

    r = dedup_shards(args.input, args.output, args.threshold, args.clusters, args.overwrite)
    print(
        f"kept {r['samples_out']} of {r['samples_in']} samples: {r['exact_duplicates']} exact and "
        f"{r['semantic_duplicates']} semantic duplicates (cosine > {r['threshold']}, {r['clusters']} clusters) "
        f"removed in {r['seconds']:.1f} s; report in {args.output}/dedup_report.json"
    )
    return 0


def add_shards(sub) -> None:
    """clipscale shards build | verify | inspect | index | embed | filter | dedup."""
    shards = sub.add_parser(
        "shards",
        help="build, verify, inspect and index WebDataset shards",
        description="Shard tooling: pack image-text collections into WebDataset shards "
        "and check shard sets made by any tool.",
    )
    ssub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)
    for add in (add_build, add_verify, add_inspect, add_index, add_embed, add_filter, add_dedup):
        add(ssub)


def add_build(ssub) -> None:
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


def add_verify(ssub) -> None:
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


def add_inspect(ssub) -> None:
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


def add_index(ssub) -> None:
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


def add_embed(ssub) -> None:
    p = ssub.add_parser(
        "embed",
        help="add every sample's image and text embedding and CLIP score, by a trained model",
        description="Copy the shards of INPUT (any shard list the trainer takes) into OUTPUT with each "
        "sample's image and text embedding and CLIP score by the model of --checkpoint, plus a sidecar "
        "NAME.emb.npz per shard and a manifest. Resumable: run it again to finish. Under torchrun "
        "(torchrun --nproc_per_node=N -m clipscale shards embed ...) every rank takes a share of the shards.",
    )
    p.add_argument("input", help="shard folder, brace pattern, glob, @list.txt or bucket URL")
    p.add_argument("output", help="output folder")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP + ", or an open_clip-format .pt (with --model)")
    p.add_argument("--model", help="model name (needed for open_clip-format files; clipscale's know theirs)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward (default 256)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers per process (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored embeddings")
    p.add_argument("--image-keys", default="jpg,jpeg,png,webp", help="image members, in order (as data.image_keys)")
    p.add_argument("--caption-key", default="txt", help="caption member, or json (as data.caption_key)")
    p.add_argument("--caption-json-field", default="caption", help="caption field of .json (data.caption_json_field)")
    p.add_argument("--config-dir", action="append", default=[], help="a folder of open_clip model JSON configs")
    p.add_argument("--ema", action="store_true", help="embed with the checkpoint's EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards_embed)


def add_filter(ssub) -> None:
    p = ssub.add_parser(
        "filter",
        help="keep the samples with the best CLIP scores (DataComp's CLIP-score filter)",
        description="Keep the samples of embedded shards (clipscale shards embed) whose CLIP score is in the "
        "top FRACTION of the whole input, or at least VALUE, and whose caption has enough words; writes "
        "shards, a manifest and filter_report.json / .png to OUTPUT.",
    )
    p.add_argument("input", help="embedded shard folder or pattern")
    p.add_argument("output", help="output folder")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--clip-score-top", type=float, metavar="FRACTION", help="keep this share, e.g. 0.3")
    rule.add_argument("--clip-score-min", type=float, metavar="VALUE", help="keep scores of at least VALUE")
    p.add_argument("--min-caption-words", type=int, metavar="N", help="also drop captions of fewer words")
    p.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds")
    p.set_defaults(func=cmd_shards_filter)


def add_dedup(ssub) -> None:
    p = ssub.add_parser(
        "dedup",
        help="remove exact and semantic duplicates (SemDeDup)",
        description="Remove exact duplicates (equal image bytes) and semantic ones (k-means on the image "
        "embeddings, pairs in a cluster above --threshold cosine; the higher CLIP score stays) from embedded "
        "shards; writes shards, a manifest and dedup_report.json to OUTPUT.",
    )
    p.add_argument("input", help="embedded shard folder or pattern")
    p.add_argument("output", help="output folder")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine above which two images are one (0.95)")
    p.add_argument("--clusters", type=int, help="k-means clusters (default sqrt of the samples)")
    p.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds")
    p.set_defaults(func=cmd_shards_dedup)
