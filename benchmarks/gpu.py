"""Single-GPU training throughput, MFU and peak memory of CLIP models, and GPU loss memory.

For each model and variant: synthetic images and token ids already on the device (this
measures the model step, not the data path), clipscale's model factory, its AdamW (fused on
CUDA) and its CLIP loss, `--steps` timed steps after `--warmup`.
  variants   base            bf16 autocast (or --precision), fused AdamW
             channels_last   + channels_last images and weights
             compile         + torch.compile of the model
             ckpt            + gradient checkpointing of every block (open_clip's set_grad_checkpointing)
             ckpt-half       + selective checkpointing of half the blocks (model.grad_checkpointing=0.5)
MFU = model FLOPs per step (forward + backward counted by torch's FlopCounterMode on a meta-device
copy, without recomputation: clipscale.train.flops, what training runs report) x steps / (seconds x
peak dense TFLOPS of the device, --peak-tflops). `--json PATH` also writes the figures there.
`--loss-memory` adds the loss issue's figures on the device: peak memory of the CLIP loss for
one rank of a simulated world (full / local / chunked); on CPU it gives the time only (peak memory
from RSS: benchmarks/loss_memory.py).

`--exact-loss B` times the exact chunked CLIP loss of one process over a batch of B (d = 512),
forward + backward, against its matmul limit (the four B x B x d products alone, same tiles).

    python benchmarks/gpu.py [--models ViT-B-32,ViT-B-16] [--batch-size 256] [--variants base,compile,ckpt]
    python benchmarks/gpu.py --models '' --exact-loss 1048576      # the loss alone, B = 1,048,576
    python benchmarks/gpu.py --device cpu --models clip-tiny --batch-size 8 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    from clipscale.train.flops import device_peak_tflops

    return device_peak_tflops(device, override)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model_name: str, device: torch.device, variant: str):
    from clipscale.config import load_config
    from clipscale.loss import ClipLoss
    from clipscale.model import create_model
    from clipscale.optim import Optimization

    share = {"ckpt": 1.0, "ckpt-half": 0.5}.get(variant, 0.0)
    cfg = load_config(None, [f"model.name={model_name}", f"model.grad_checkpointing={share}", "optim.fused=true"])
    bundle = create_model(cfg.model, device=device)
    model = bundle.model
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer = Optimization(cfg.optim, cfg.schedule, cfg.train.steps).optimizer(model, device)
    runner = torch.compile(model) if variant == "compile" else model
    context = getattr(bundle.model, "context_length", None) or bundle.model.text.context_length
    return model, runner, optimizer, ClipLoss("full"), bundle.image_size, context


def inputs(batch: int, size: int, context: int, device: torch.device, channels_last: bool):
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    texts = torch.randint(1, 49000, (batch, context), device=device)
    return images, texts


def train_step(runner, optimizer, loss_fn, images, texts, autocast) -> torch.Tensor:
    with autocast():
        out = runner(image=images, text=texts)
    loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def model_flops(model_name: str, batch: int) -> float:
    """Forward + backward FLOPs of one step, without activation recomputation (clipscale's own count, the
    one its training metrics report: train/flops.py)."""
    from clipscale.config import load_config
    from clipscale.train.flops import flops_per_sample

    return flops_per_sample(load_config(None, [f"model.name={model_name}"]).model) * batch


def measure(model_name: str, variant: str, args, device: torch.device, autocast) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, runner, optimizer, loss_fn, size, context = build(model_name, device, variant)
    model.train()
    images, texts = inputs(args.batch_size, size, context, device, variant == "channels_last")
    for _ in range(args.warmup):
        train_step(runner, optimizer, loss_fn, images, texts, autocast)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(runner, optimizer, loss_fn, images, texts, autocast)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    if not torch.isfinite(loss):
        raise SystemExit(f"{model_name}/{variant}: non-finite loss")
    del model, runner, optimizer
    return {
        "samples_per_s": args.batch_size * args.steps / seconds,
        "step_s": seconds / args.steps,
        "peak_gib": peak / 2**30,
    }


def loss_memory(device: torch.device, world: int, dim: int, chunk: int, batches: list[int]) -> None:
    """Peak device memory of the CLIP loss (forward + backward) on one rank of a simulated world."""
    from loss_memory import simulated_rank0

    from clipscale.loss import ClipLoss

    print(f"\nCLIP loss memory on {device} (rank 0 of a simulated world of {world}, d={dim}, chunk {chunk}):")
    print(f"{'global B':>9} | {'impl':8} | {'peak GiB':>9} | {'ms':>8}")
    for batch in batches:
        for impl in ("full", "local", "chunked"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            try:
                img, txt, scale, gather = simulated_rank0(batch, dim, world, device)
                sync(device)
                t0 = time.perf_counter()
                ClipLoss(impl, chunk_size=chunk, gather=gather)(img, txt, scale).backward()
                sync(device)
                ms = (time.perf_counter() - t0) * 1000
                peak = (
                    (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
                )  # RSS-based CPU figures: benchmarks/loss_memory.py
                print(f"{batch:9d} | {impl:8} | {peak:9.2f} | {ms:8.1f}")
            except torch.OutOfMemoryError:
                print(f"{batch:9d} | {impl:8} | {'OOM':>9} | {'-':>8}")
            finally:
                img = txt = scale = gather = None


def exact_loss(device: torch.device, batch: int, dim: int, chunk: int) -> dict:
    """One process, world size 1: the chunked loss over the whole batch, and its matmul floor (timed on a
    sixteenth of the row tiles against every column tile, scaled), in plain float32 (TF32 off, as training
    runs the loss: TF32's 10-bit mantissa is not exact)."""
    import torch.nn.functional as F
    from loss_memory import tile_products

    from clipscale.loss import ClipLoss, _tile_size

    img = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # main() turns it on for the model figures
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    sync(device)
    t0 = time.perf_counter()
    ClipLoss("chunked", chunk_size=chunk)(img, txt, scale).backward()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    tile = _tile_size(chunk, device)
    rows = min(batch, tile * max(1, (batch // tile) // 16))  # 1/16 of the row tiles, scaled: the same kernels
    sync(device)
    t0 = time.perf_counter()
    tile_products(img.detach()[:rows], txt.detach(), tile)
    sync(device)
    floor = (time.perf_counter() - t0) * batch / rows
    print(
        f"exact chunked loss, B={batch:,}, d={dim}, tile {tile}: {seconds:.1f} s forward + backward, "
        f"peak {peak:.2f} GiB; matmul limit {floor:.1f} s ({floor / seconds:.2f} of it)"
    )
    return {"batch": batch, "dim": dim, "seconds": seconds, "peak_gib": peak, "matmul_limit_s": floor,
            "times_limit": seconds / floor}  # fmt: skip


def decode(device: torch.device, count: int, batch: int) -> dict:
    """Training-crop throughput of data.gpu_decode on `device` (one batched decode, boxes cut and resized
    there) against the CPU path of one loader worker (crop.FastCrop), on the same 320x256 JPEGs and boxes."""
    import random

    from bench_data import make_images

    from clipscale.config import load_config
    from clipscale.data.samples import SampleDecoder
    from clipscale.model import create_model

    table = make_images(ROOT / ".bench" / "decode-320x256", count, (320, 256))
    jpegs = [p.read_bytes() for p in sorted(table.parent.glob("*.jpg"))[:count]]
    transform = create_model(load_config(None, ["model.name=ViT-B-32"]).model).train_transform
    cpu = SampleDecoder(transform, ["jpg"], draft_size=224, fast_crop=True)
    dev = SampleDecoder(transform, ["jpg"], draft_size=224, fast_crop=True, gpu_decode=True)
    random.seed(0)
    t0 = time.perf_counter()
    for i, data in enumerate(jpegs):
        cpu({"jpg": data, "txt": b"x"}, i)
    cpu_rate = len(jpegs) / (time.perf_counter() - t0)
    batches = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
    encoded = [dev.collate([dev({"jpg": d, "txt": b"x"}, i)[0] for i, d in enumerate(b)]) for b in batches]
    dev.to_model_input(encoded[0], device)  # warm-up (nvJPEG handles, kernels)
    sync(device)
    t0 = time.perf_counter()
    for e in encoded:
        dev.to_model_input(e, device)
    sync(device)
    dev_rate = len(jpegs) / (time.perf_counter() - t0)
    print(
        f"training crops of {len(jpegs)} 320x256 JPEGs to 224 px: one CPU worker {cpu_rate:,.0f}/s, "
        f"{device} decode (batches of {batch}) {dev_rate:,.0f}/s = {dev_rate / cpu_rate:.1f} CPU workers"
    )
    return {"images": len(jpegs), "cpu_worker_per_s": cpu_rate, "device_per_s": dev_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B-32,ViT-B-16")
    ap.add_argument("--variants", default="base,channels_last,compile,ckpt")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known bf16 dense peaks)")
    ap.add_argument("--loss-memory", action="store_true")
    ap.add_argument("--loss-world", type=int, default=8)
    ap.add_argument("--loss-batches", default="16384,65536,262144", help="global batches for --loss-memory")
    ap.add_argument("--exact-loss", type=int, help="B: time the exact single-process chunked loss (d = 512)")
    ap.add_argument("--exact-loss-chunk", type=int, default=8192)
    ap.add_argument("--decode", type=int, help="N: data.gpu_decode vs one CPU worker on N JPEGs")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    figures = {"rows": []}

    def save() -> None:  # after every figure: a step stopped at its deadline keeps what it measured
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(figures, indent=1))

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; run this through a GPU machine (or --device cpu for a smoke test)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, {args.precision}, batch {args.batch_size}, "
        f"{args.steps} steps after {args.warmup} warm-up; peak {peak or '?'} TFLOPS"
    )
    print(f"{'model':10} | {'variant':13} | {'samples/s':>9} | {'step ms':>8} | {'MFU':>6} | {'peak GiB':>8}")
    for model_name in filter(None, args.models.split(",")):
        flops = model_flops(model_name, args.batch_size)
        for variant in args.variants.split(","):
            try:
                r = measure(model_name, variant, args, device, autocast)
            except torch.OutOfMemoryError:
                print(f"{model_name:10} | {variant:13} | out of memory")
                figures["rows"].append({"model": model_name, "variant": variant, "batch": args.batch_size, "oom": True})
                continue
            mfu = flops / r["step_s"] / (peak * 1e12) if peak else float("nan")
            figures["rows"].append({"model": model_name, "variant": variant, "batch": args.batch_size, "mfu": mfu,
                                    "gflop_per_step": flops / 1e9, **r})  # fmt: skip
            save()
            print(
                f"{model_name:10} | {variant:13} | {r['samples_per_s']:9.1f} | {r['step_s'] * 1000:8.1f} | "
                f"{mfu:6.1%} | {r['peak_gib']:8.2f}",
                flush=True,
            )
        print(f"{model_name}: {flops / 1e9:,.1f} GFLOP per step of {args.batch_size} (forward + backward)")
    if args.loss_memory:
        loss_memory(device, args.loss_world, 512, 4096, [int(b) for b in args.loss_batches.split(",")])
    figures.update(device=name, torch=torch.__version__, precision=args.precision, peak_tflops=peak)
    if args.decode:
        figures["decode"] = decode(device, args.decode, args.batch_size)
        save()
    if args.exact_loss:
        figures["exact_loss"] = exact_loss(device, args.exact_loss, 512, args.exact_loss_chunk)
    save()


if __name__ == "__main__":
    main()
