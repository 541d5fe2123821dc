"""`clipscale shards build`: rows → verified, deterministic, resumable WebDataset shards.

Shard i holds rows [i*N, (i+1)*N) of the input (N = --samples-per-shard), minus the rows that
were skipped (as img2dataset does): every shard depends on its own rows only, so shards are
built in parallel (one whole shard per worker task), in any order, and a re-run after an
interruption rebuilds exactly the incomplete ones. Each shard's stats record its input rows
(count and hash): a re-run after rows were appended to (or changed in) the input rebuilds the
shards whose rows differ, and writes the new ones. Keys are `{shard:06d}{row-in-shard}`, unique
across the set. Output per shard: `NAME-000000.tar` (written to a temp name, then renamed) and
`NAME-000000_stats.json`; at the end `manifest.json` and `stats.json` for the whole set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import DataError
from ..fsutil import atomic_write_bytes, remove_temporaries
from ..job import workers as worker_processes
from ..wds.census import read_json
from ..wds.manifest import MANIFEST_NAME, ShardRecord, write_manifest
from ..wds.schema import Skip, clean_caption
from .sources import Row, load_rows
from .writer import shard_filename, write_shard

EXAMPLES_KEPT = 5
log = logging.getLogger("clipscale")
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class BuildOptions:
    samples_per_shard: int = 1000
    quality: int = 95
    max_size: int | None = None
    resize_side: str = "shorter"  # the side that --max-size bounds: shorter | longer
    reencode: bool = True

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- one sample


def read_image_bytes(path: str) -> bytes:
    if not path:
        raise Skip("missing_file", "no image path")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Skip("missing_file", path) from None
    except OSError as exn:
        raise Skip("unreadable_file", f"{path}: {exn.strerror or exn}") from None
    if not data:
        raise Skip("empty_file", path)
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


def _target_size(w: int, h: int, opts: BuildOptions) -> tuple[int, int]:
    if not opts.max_size:
        return w, h
    side = min(w, h) if opts.resize_side == "shorter" else max(w, h)
    if side <= opts.max_size:
        return w, h
    scale = opts.max_size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode_image(data: bytes, opts: BuildOptions) -> tuple[str, bytes, dict]:
    """(extension, bytes, size info) of the stored image; Skip('corrupt_image') if it does not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            orig_w, orig_h = img.size
            if not opts.reencode:
                img.load()
                if fmt in FORMAT_EXT:
                    return FORMAT_EXT[fmt], data, {"width": orig_w, "height": orig_h}
            # EXIF rotation swaps the sides; bound the draft by the larger target side to stay safe
            tw, th = _target_size(orig_w, orig_h, opts)
            if fmt == "JPEG" and (tw, th) != (orig_w, orig_h):
                img.draft("RGB", (max(tw, th), max(tw, th)))  # libjpeg DCT downscale while decoding
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            tw, th = _target_size(*img.size, opts)
            if (tw, th) != img.size:
                img = img.resize((tw, th), Image.BICUBIC, reducing_gap=None)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=opts.quality)
    except Skip:
        raise
    except Exception as exn:
        raise Skip("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    return (
        "jpg",
        buf.getvalue(),
        {"width": img.size[0], "height": img.size[1], "original_width": orig_w, "original_height": orig_h},
    )


def make_sample(row: Row, key: str, opts: BuildOptions) -> dict:
    caption = clean_caption(row.caption)
    ext, image, size = encode_image(read_image_bytes(row.image), opts)
    meta = {**row.extra, "source": row.source, "key": key, "caption": caption, **size}
    return {"__key__": key, ext: image, "txt": caption, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False)}


# --------------------------------------------------------------------------- one shard


def rows_digest(rows: list[Row]) -> str:
    """A hash of a shard's input rows (what the input says, not the image bytes)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(repr((row.source, row.caption, sorted(row.extra.items()))).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def stats_path(out: Path, name: str, index: int) -> Path:
    return out / shard_filename(name, index).replace(".tar", "_stats.json")


def build_one_shard(task) -> dict:
    """Worker task: write shard `index` from its rows; returns the shard's stats record."""
    out, name, index, rows, opts = task
    t0 = time.perf_counter()
    width = len(str(max(opts.samples_per_shard - 1, 1)))
    skipped: Counter = Counter()
    examples: dict[str, list] = {}

    def samples():
        for pos, row in enumerate(rows):
            key = f"{index:06d}{pos:0{width}d}"
            try:
                yield make_sample(row, key, opts)
            except Skip as skip:
                skipped[skip.reason] += 1
                if len(examples.setdefault(skip.reason, [])) < EXAMPLES_KEPT:
                    examples[skip.reason].append({"source": row.source, "detail": skip.detail or skip.reason})

    record = write_shard(Path(out) / shard_filename(name, index), samples())
    stats = {
        **asdict(record),
        "count": len(rows),
        "rows_sha256": rows_digest(rows),
        "successes": record.samples,
        "skipped": dict(sorted(skipped.items())),
        "examples": examples,
        "options": opts.fingerprint(),
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_bytes(stats_path(Path(out), name, index), (json.dumps(stats, indent=1) + "\n").encode())
    return stats


def completed_shard(out: Path, name: str, index: int, opts: BuildOptions, rows: list[Row]) -> dict | None:
    """The stats of shard `index` if it was fully written with these options from these rows, else None."""
    tar, sp = out / shard_filename(name, index), stats_path(out, name, index)
    if not (tar.is_file() and sp.is_file()):
        return None
    try:
        stats = json.loads(sp.read_text())
    except ValueError:
        return None
    return stats_if_complete(stats, tar.stat().st_size, str(tar), opts, rows)


def stats_if_complete(stats: dict, tar_bytes: int | None, tar: str, opts: BuildOptions, rows: list[Row]) -> dict | None:
    """`stats` when they describe a complete shard of `tar_bytes` bytes built with `opts` from `rows`."""
    if stats.get("options") != opts.fingerprint():
        raise DataError(f"{tar} was built with other options; use a new --output folder or delete the old shards")
    if stats.get("bytes") != tar_bytes:
        return None
    digest = stats.get("rows_sha256")  # (shards built before it was recorded: by count only)
    if stats.get("count") != len(rows) or (digest is not None and digest != rows_digest(rows)):
        log.info(
            "%s: its input rows changed since it was built (%s -> %d rows); rebuilding",
            tar.rsplit("/", 1)[-1],
            stats.get("count"),
            len(rows),
        )
        return None
    return stats


# --------------------------------------------------------------------------- the whole set


def _shard_index(filename: str, name: str) -> int:
    digits = filename[len(name) + 1 : -len(".tar")]
    return int(digits) if digits.isdigit() else -1


class BucketOutput:
    """`--output s3://bucket/prefix` (any fsspec URL): shards are written to a local staging folder,
    uploaded (multipart for large ones: fsspec's put_file), the tar before its stats file, so a shard
    whose stats are in the bucket is complete; the manifest and stats.json come last."""

    def __init__(self, url: str):
        from ..wds import remote

        self.url, self.remote = url.rstrip("/"), remote
        self.fs, self.root = remote.filesystem(self.url)
        self.staging = Path(tempfile.mkdtemp(prefix="clipscale-build-"))
        self.sizes = {}
        if self.fs.exists(self.root):
            self.sizes = {
                e["name"].rsplit("/", 1)[-1]: e.get("size") for e in self.fs.ls(self.root, detail=True, refresh=True)
            }

    def completed(self, name: str, index: int, opts: BuildOptions, rows: list[Row]) -> dict | None:
        tar, sp = shard_filename(name, index), stats_path(Path("."), name, index).name
        if tar not in self.sizes or sp not in self.sizes:
            return None
        stats = read_json(f"{self.url}/{sp}")
        return stats_if_complete(stats or {}, self.sizes[tar], f"{self.url}/{tar}", opts, rows)

    def stale(self, name: str, n_shards: int) -> list[str]:
        return sorted(
            k
            for k in self.sizes
            if k.startswith(f"{name}-") and k.endswith(".tar") and _shard_index(k, name) >= n_shards
        )

    def publish(self, *names: str) -> None:
        """Upload these staged files in order, then drop the local copies."""
        for file in names:
            local = self.staging / file
            self.remote.with_retries(
                f"uploading {file}", lambda p=local, f=file: self.fs.put_file(str(p), f"{self.root}/{f}")
            )
            local.unlink()

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def build_shards(
    src: str,
    out_dir: str,
    name: str = "shard",
    opts: BuildOptions = BuildOptions(),
    workers: int = 1,
    image_col: str | None = None,
    caption_col: str | None = None,
    caption_field: str | None = None,
    progress: bool = True,
) -> dict:
    t0 = time.perf_counter()
    rows = load_rows(src, image_col, caption_col, caption_field)
    from ..wds.remote import is_remote

    bucket = BucketOutput(out_dir) if is_remote(out_dir) else None
    try:
        return _build(src, rows, bucket.staging if bucket else Path(out_dir), bucket, name, opts, workers, progress, t0)
    finally:
        if bucket is not None:
            bucket.close()


def _build(src, rows, out: Path, bucket, name, opts, workers, progress, t0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # a killed build leaves its temporary files (shards, per-shard stats, manifest) behind
    remove_temporaries(out, f"{name}-*", MANIFEST_NAME, "stats.json")
    n = opts.samples_per_shard
    n_shards = math.ceil(len(rows) / n)
    shard_rows = [rows[i * n : (i + 1) * n] for i in range(n_shards)]
    complete = bucket.completed if bucket else lambda *a: completed_shard(out, *a)
    done = {i: s for i in range(n_shards) if (s := complete(name, i, opts, shard_rows[i])) is not None}
    if bucket:
        stale = bucket.stale(name, n_shards)
    else:
        stale = sorted(p.name for p in out.glob(f"{name}-*.tar") if _shard_index(p.name, name) >= n_shards)
    if stale:
        log.warning(
            "%s holds %d shard(s) past the %d this input makes (%s...): an earlier build of a longer input; "
            "they are not in the manifest",
            bucket.url if bucket else out,
            len(stale),
            n_shards,
            stale[0],
        )
    todo = [(str(out), name, i, shard_rows[i], opts) for i in range(n_shards) if i not in done]
    rows_todo = sum(len(t[3]) for t in todo)

    results = dict(done)
    _write_shards(todo, rows_todo, workers, progress, bucket, name, results)
    seconds = time.perf_counter() - t0
    ordered = [results[i] for i in range(n_shards)]
    write_manifest(out, [ShardRecord(s["file"], s["samples"], s["bytes"], s["sha256"]) for s in ordered])
    summary = {
        "input": str(src),
        "read": len(rows),
        "written": sum(s["samples"] for s in ordered),
        **_skips(ordered),
        "shards": n_shards,
        "shards_reused": len(done),
        "seconds": seconds,
        "images_per_s": rows_todo / seconds if seconds > 0 else 0.0,
        "workers": workers,
        "options": asdict(opts),
    }
    atomic_write_bytes(out / "stats.json", (json.dumps(summary, indent=1) + "\n").encode())
    if bucket:
        bucket.publish(MANIFEST_NAME, "stats.json")
    return summary


def _write_shards(todo: list, rows_todo: int, workers: int, progress: bool, bucket, name: str, results: dict) -> None:
    """Build the shards of `todo` (in `workers` processes), recording each one's stats in `results`."""
    from tqdm import tqdm

    if workers > 1 and len(todo) > 1:
        worker_processes.start_early()  # before the bar's monitor thread: the server forks from one thread
    bar = tqdm(total=rows_todo, unit="img", desc="shards", disable=not progress, dynamic_ncols=True)

    def finished(stats: dict) -> None:
        index = int(stats["file"][-10:-4])
        results[index] = stats
        if bucket:  # the tar first: a shard whose stats are in the bucket is complete
            bucket.publish(stats["file"], stats_path(Path("."), name, index).name)
        bar.update(stats["count"])

    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                finished(build_one_shard(task))
        else:
            with worker_processes.pool(workers) as pool:
                for stats in pool.imap_unordered(build_one_shard, todo):
                    finished(stats)
    finally:
        bar.close()


def _skips(ordered: list[dict]) -> dict:
    """{"skipped": counts by reason, "examples": the first few of each} over every shard's stats."""
    skipped: Counter = Counter()
    examples: dict[str, list] = {}
    for s in ordered:
        skipped.update(s["skipped"])
        for reason, ex in s["examples"].items():
            examples.setdefault(reason, []).extend(ex[: EXAMPLES_KEPT - len(examples.get(reason, []))])
    return {"skipped": dict(sorted(skipped.items())), "examples": examples}
