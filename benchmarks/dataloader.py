"""The clipscale data pipeline against its practical limit, and the data wait of a training run.

bare loop   one process: decode the shards' JPEG bytes (already in memory) with PIL and resize
            the whole image to the model's input size with PIL's bicubic filter, nothing else.
            With a full decode (what open_clip_train's `wds.decode("pilrgb")` does) and with the
            JPEG draft decode.
clipscale   `TrainData`, the loader training uses: read tars, deterministic shuffle, decode,
            the train transform's random crop, tokenize, batch, stream positions, up to the uint8
            batch a GPU run copies to the device (`--convert` also times the float conversion
            on the CPU); with 1 and 2 DataLoader workers (0 = in the measuring process), with
            data.fast_crop on (the default) and off (open_clip's PIL transform). Per-worker rate =
            rate / workers; with 2 workers on 2 cores the consuming process shares the cores.
pixels      how far fast_crop's pixels are from PIL's for the same crops (--pixels).
data wait   fraction of step time the training loop waits for data, from metrics.jsonl of a
            short `clipscale demo` run (the demo config: 2 processes, 1 worker each).

  python benchmarks/dataloader.py                               # 224 px (ViT-B-32), 320x256 and 512x384 JPEGs
  python benchmarks/dataloader.py --model clip-tiny --sizes 320x256 --workers 0,1,2 --demo-steps 100 --stages
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


def pipeline(
    pattern: str, model: str, workers: int, batch: int, n: int, draft: bool, convert: bool = True, fast: bool = True
) -> float:
    """samples/s of TrainData after its first batch (workers started, buffers primed), up to the
    uint8 batch (or, with `convert`, the model's float input on the CPU)."""
    import torch

    from clipscale.config import BatchLayout, load_config
    from clipscale.data.loader import TrainData
    from clipscale.job.distributed import init_distributed
    from clipscale.model import create_model

    cfg = load_config(
        None,
        [
            f"model.name={model}",
            f"data.train_shards={pattern}",
            f"data.workers={workers}",
            f"data.batch_size={batch}",
            "data.shuffle_buffer=1000",
            f"data.fast_crop={str(fast).lower()}",
        ],
    )
    bundle = create_model(cfg.model)
    env = init_distributed("cpu")
    layout = BatchLayout.of(cfg.data, cfg.optim, env.world_size)
    draft_size = bundle.image_size if draft else None
    data = TrainData(cfg.data, layout, env, cfg.seed, bundle.train_transform, bundle.tokenizer, draft_size)
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


def pixel_difference(jpegs: list[bytes], model: str) -> str:
    """fast_crop's pixels against torchvision's resized_crop on PIL (open_clip's transform) for the
    same crop boxes, decoded in full."""
    import random

    import numpy as np

    from clipscale.config import load_config
    from clipscale.data.crop import FastCrop, crop_box
    from clipscale.data.samples import split_to_tensor_tail
    from clipscale.model import create_model

    tf = create_model(load_config(None, [f"model.name={model}"]).model).train_transform
    crop = FastCrop.from_transform(split_to_tensor_tail(tf)[0], dct=False)
    diffs = []
    for seed, data in enumerate(jpegs[:200]):
        random.seed(seed)
        fast = crop(data, random).astype(int)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        random.seed(seed)
        top, left, h, w = crop_box(*img.size, crop.scale, crop.ratio, random)
        resample = Image.BICUBIC if crop.mode == "bicubic" else Image.BILINEAR
        pil = np.asarray(img.crop((left, top, left + w, top + h)).resize(crop.size[::-1], resample))  # resized_crop
        diffs.append(np.abs(fast - pil.astype(int)))
    d = np.stack(diffs)
    share, over_one = np.mean(d > 0), np.mean(d > 1)
    return f"max {d.max()} levels, mean {d.mean():.4f}, {share:.2%} of values differ, {over_one:.3%} by more than 1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048, help="samples timed per measurement")
    ap.add_argument("--model", default="ViT-B-32", help="its input size and tokenizer are used")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", default="320x256,512x384", help="JPEG sizes (WxH) of the shards, one table each")
    ap.add_argument("--workers", default="1,2", help="DataLoader workers to measure (0 = in process)")
    ap.add_argument("--convert", action="store_true", help="also time the float conversion on the CPU")
    ap.add_argument("--pixels", action="store_true", help="print fast_crop's difference to PIL's pixels")
    ap.add_argument("--demo-steps", type=int, default=0, help="> 0: also the data wait of a short demo run")
    ap.add_argument("--stages", action="store_true", help="also time each step of the pipeline per sample")
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "dataloader"))
    args = ap.parse_args()

    from clipscale.config import load_config
    from clipscale.model import create_model

    work = Path(args.workdir)
    size = create_model(load_config(None, [f"model.name={args.model}"]).model).image_size
    workers = [int(w) for w in args.workers.split(",")]
    for dims in args.sizes.split(","):
        width, height = (int(x) for x in dims.split("x"))
        n_images = max(args.samples * 2, 4096)
        table = make_images(work / f"images-{width}x{height}", n_images, (width, height), tinted=True)
        shards = build_shards(table, work / f"shards-{width}x{height}", 128)
        pattern = shard_pattern(shards)
        jpegs = read_jpegs(shards, args.samples)
        print(
            f"\n{len(shards)} shards of {width}x{height} JPEGs; model {args.model} (input {size}px), "
            f"batch {args.batch_size}, {args.samples} samples per figure"
        )
        bare_full = max(bare_loop(jpegs, size, draft=False) for _ in range(2))
        bare_draft = max(bare_loop(jpegs, size, draft=True) for _ in range(2))
        print(f"  bare PIL decode + bicubic resize, full decode : {bare_full:8.1f} samples/s (1 process)")
        print(f"  bare PIL decode + bicubic resize, draft decode: {bare_draft:8.1f} samples/s (1 process)")
        print(f"  {'clipscale TrainData':32s} {'samples/s':>10s} {'per worker':>10s} {'vs full-decode loop':>20s}")
        for n_workers in workers:
            for fast in (True, False):
                runs = [(False, "uint8 batches")] + ([(True, "float on CPU")] if args.convert else [])
                for convert, what in runs:
                    rate = pipeline(pattern, args.model, n_workers, args.batch_size, args.samples, True, convert, fast)
                    per = rate / max(1, n_workers)
                    label = f"{n_workers} worker(s), fast_crop={'on' if fast else 'off'}, {what}"
                    print(f"  {label:32s} {rate:10.1f} {per:10.1f} {per / bare_full:19.0%}", flush=True)
        if args.pixels:
            print(
                f"  fast_crop vs PIL pixels (same crops, {min(200, len(jpegs))} images): "
                + pixel_difference(jpegs, args.model)
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
