"""The clipscale data pipeline against its practical limit, and the data wait of a training run.

bare loop   one process: decode the shards' JPEG bytes (already in memory) with PIL and resize
            to the model's input size, nothing else. Measured with a full decode (what
            open_clip_train's `wds.decode("pilrgb")` does) and with the JPEG draft decode
            (what clipscale does when the shards are larger than the model input).
clipscale   `TrainData`, the loader training uses: read tars, deterministic shuffle, decode,
            open_clip's train transform, tokenize, batch, stream positions, and the uint8 ->
            normalised float conversion of `to_device` (on the CPU here); with 0 workers (in
            the measuring process), 1 and 2 DataLoader workers. Per-worker rate = rate / workers.
data wait   fraction of step time the training loop waits for data, from metrics.jsonl of a
            short `clipscale demo` run (the demo config: 2 processes, 1 worker each).

  python benchmarks/dataloader.py [--samples 2048] [--model clip-tiny] [--demo-steps 100] [--stages]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench_data import build_shards, make_images, shard_pattern
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def read_jpegs(shards: list[Path], n: int) -> list[bytes]:
    out: list[bytes] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) == n:
                        return out
    return out


def bare_loop(jpegs: list[bytes], size: int, draft: bool) -> float:
    """images/s: PIL decode (+ draft) and a bicubic resize to size x size, in this process."""
    t0 = time.perf_counter()
    for data in jpegs:
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft("RGB", (size, size))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        img.resize((size, size), Image.BICUBIC)
    return len(jpegs) / (time.perf_counter() - t0)


def pipeline(pattern: str, model: str, workers: int, batch: int, n: int, draft: bool, convert: bool = True) -> float:
    """samples/s of TrainData after its first batch (workers started, buffers primed), up to the
    model's float input on the CPU."""
    import torch

    from clipscale.config import load_config
    from clipscale.data.loader import TrainData
    from clipscale.distributed import init_distributed
    from clipscale.model import create_model

    cfg = load_config(
        None,
        [
            f"model.name={model}",
            f"data.train_shards={pattern}",
            f"data.workers={workers}",
            f"data.batch_size={batch}",
            "data.shuffle_buffer=1000",
        ],
    )
    bundle = create_model(cfg.model)
    data = TrainData(
        cfg,
        bundle.train_transform,
        bundle.tokenizer,
        init_distributed("cpu"),
        None,
        bundle.image_size if draft else None,
    )
    try:
        data.next()
        t0, seen = time.perf_counter(), 0
        while seen < n:
            batch_ = data.next()[0]
            if convert:
                batch_ = data.to_device(batch_, torch.device("cpu"))  # as training does (CPU here)
            seen += batch_["images"].shape[0]
        return seen / (time.perf_counter() - t0)
    finally:
        data.close()


def stages(shards: list[Path], model: str, n: int) -> None:
    """Microseconds per sample of each step of the pipeline, one after the other, in this process."""
    import torch
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from clipscale.config import load_config
    from clipscale.data.jpeg import decode_image, decode_image_pil
    from clipscale.model import create_model
    from clipscale.wds.tar import iter_raw_samples

    bundle = create_model(load_config(None, [f"model.name={model}"]).model)
    size = bundle.image_size

    def timed(label: str, fn, items):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        print(f"  {label:44s} {(time.perf_counter() - t0) / len(items) * 1e6:8.1f} us")

    print(f"per-sample cost of each step ({model}, input {size}px, 1 process):")
    t0 = time.perf_counter()
    samples = []
    for shard in shards:
        samples += list(iter_raw_samples(str(shard), lambda exn: None))
        if len(samples) >= n:
            break
    samples = samples[:n]
    per_sample_us = (time.perf_counter() - t0) / len(samples) * 1e6
    print(f"  {'tar reading, clipscale (3 members a sample)':44s} {per_sample_us:8.1f} us")
    t0, count = time.perf_counter(), 0
    for shard in shards:
        with open(shard, "rb") as stream:
            count += sum(1 for _ in group_by_keys(dict(m, __url__="") for m in tar_file_iterator(stream)))
        if count >= n:
            break
    print(f"  {'tar reading, tarfile (webdataset)':44s} {(time.perf_counter() - t0) / count * 1e6:8.1f} us")
    timed("JPEG decode, full, PIL", lambda s: decode_image_pil(s["jpg"]), samples)
    timed("JPEG decode, full, clipscale (simplejpeg)", lambda s: decode_image(s["jpg"]), samples)
    timed("JPEG decode, draft, PIL", lambda s: decode_image_pil(s["jpg"], size), samples)
    timed("JPEG decode, draft, clipscale (simplejpeg)", lambda s: decode_image(s["jpg"], size), samples)
    full = [decode_image(s["jpg"]) for s in samples[:256]]  # not all: holding them costs page faults
    drafted = [decode_image(s["jpg"], size) for s in samples[:256]]
    timed("train transform on the full image", bundle.train_transform, full)
    timed("train transform on the drafted image", bundle.train_transform, drafted)
    timed("torch.manual_seed", torch.manual_seed, range(len(samples)))
    timed("CPU generator seed (what clipscale does)", torch.random.default_generator.manual_seed, range(len(samples)))
    texts = [s["txt"].decode() for s in samples]
    t0 = time.perf_counter()
    for i in range(0, len(texts), 64):
        bundle.tokenizer(texts[i : i + 64])
    print(f"  {'tokenize (batches of 64)':44s} {(time.perf_counter() - t0) / len(texts) * 1e6:8.1f} us")


def demo_data_wait(steps: int, run_dir: Path) -> tuple[float, float]:
    """(median data-wait fraction over the logged windows after the first, samples/s) of a demo run."""
    cmd = [sys.executable, "-m", "clipscale", "demo", "--steps", str(steps), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data_wait" in r][1:]
    return statistics.median(r["data_wait"] for r in rows), statistics.median(r["samples_per_s"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048, help="samples timed per measurement")
    ap.add_argument("--model", default="clip-tiny", help="its input size and tokenizer are used")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--demo-steps", type=int, default=100, help="0 = skip the data-wait run")
    ap.add_argument("--stages", action="store_true", help="also time each step of the pipeline per sample")
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "dataloader"))
    args = ap.parse_args()

    from clipscale.config import load_config
    from clipscale.model import create_model

    work = Path(args.workdir)
    n_images = max(args.samples * 2, 2048)
    table = make_images(work / f"images-{args.width}x{args.height}", n_images, (args.width, args.height), tinted=True)
    shards = build_shards(table, work / f"shards-{args.width}x{args.height}", 128)
    pattern = shard_pattern(shards)
    size = create_model(load_config(None, [f"model.name={args.model}"]).model).image_size
    jpegs = read_jpegs(shards, args.samples)
    print(
        f"{len(shards)} shards of {args.width}x{args.height} JPEGs; model {args.model} (input {size}px), "
        f"batch {args.batch_size}, {args.samples} samples per figure"
    )

    bare_full = max(bare_loop(jpegs, size, draft=False) for _ in range(2))
    bare_draft = max(bare_loop(jpegs, size, draft=True) for _ in range(2))
    print(f"bare PIL decode + resize, full decode   : {bare_full:8.1f} samples/s (1 process; OpenCLIP's decode)")
    print(
        f"bare PIL decode + resize, draft decode  : {bare_draft:8.1f} samples/s "
        "(1 process; the scale clipscale decodes at)"
    )
    for workers in (0, 1, 2):
        rate = pipeline(pattern, args.model, workers, args.batch_size, args.samples, draft=True)
        per = rate / max(1, workers)
        where = "in process" if workers == 0 else f"{workers} worker(s)"
        print(
            f"clipscale TrainData, {where:12s}   : {rate:8.1f} samples/s = {per:7.1f} per worker "
            f"= {per / bare_full:5.0%} of the full-decode loop, {per / bare_draft:5.0%} of the draft loop"
        )
    rate = pipeline(pattern, args.model, 1, args.batch_size, args.samples, draft=True, convert=False)
    print(
        f"clipscale TrainData, 1 worker, uint8 batches as sent (float conversion on the GPU): {rate:8.1f} "
        f"samples/s = {rate / bare_full:5.0%} of the full-decode loop, {rate / bare_draft:5.0%} of the draft loop"
    )
    rate = pipeline(pattern, args.model, 1, args.batch_size, args.samples, draft=False)
    print(
        f"clipscale TrainData, 1 worker, data.jpeg_draft=false: {rate:8.1f} samples/s "
        f"= {rate / bare_full:5.0%} of the full-decode loop"
    )

    if args.stages:
        stages(shards, args.model, args.samples)
    if args.demo_steps:
        wait, sps = demo_data_wait(args.demo_steps, work / "demo")
        print(
            f"demo config ({args.demo_steps} steps, 2 processes x 1 worker): data wait {wait:.1%} of step time "
            f"(median over logging windows), {sps:.0f} samples/s"
        )


if __name__ == "__main__":
    main()
