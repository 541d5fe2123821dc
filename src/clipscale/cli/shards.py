"""clipscale shards: build, verify, inspect, index."""

from __future__ import annotations


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


def add_shards(sub) -> None:
    """clipscale shards build | verify | inspect | index."""
    shards = sub.add_parser(
        "shards",
        help="build, verify, inspect and index WebDataset shards",
        description="Shard tooling: pack image-text collections into WebDataset shards "
        "and check shard sets made by any tool.",
    )
    ssub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)
    for add in (add_build, add_verify, add_inspect, add_index):
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
