"""Per-rank peak memory of the same model under DDP, FSDP2 and DeepSpeed ZeRO 0/1/2/3.

Each engine runs a few real training steps (forward, gathered loss, backward, AdamW step) in a
fresh `torchrun` job of --nproc processes on random images and captions; every rank reports
its peak. On CUDA the figure is torch.cuda.max_memory_allocated during the steps. On CPU it is
the highest RSS sampled (every 5 ms) during the steps, minus the RSS just before the model was
built (weights + gradients + optimizer state + activations), after freed start-up buffers have
been returned to the OS (malloc_trim); the start-up peak (ru_maxrss) is shown next to it.

    python benchmarks/zero_memory.py                          # ViT-B-32, 2 processes, CPU
    python benchmarks/zero_memory.py --model ViT-L-14 --batch 8 --device cuda --nproc 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1024**3
ENGINES = ["ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3"]


def release_freed_memory() -> None:
    """Give memory freed during start-up back to the OS, so RSS reflects what training holds."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssSampler:
    """Highest RSS of this process, sampled in a thread until stop()."""

    def __init__(self, interval: float = 0.005):
        import threading

        import psutil

        self.proc, self.peak, self.interval = psutil.Process(), 0, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.proc.memory_info().rss)


def child(args) -> None:
    """One rank of one engine: train --steps steps, write {rank: peak} to --out."""
    import psutil
    import torch

    from clipscale.config import load_config
    from clipscale.engine import build_engine
    from clipscale.job.distributed import init_distributed
    from clipscale.loss import build_loss
    from clipscale.model import create_model
    from clipscale.train.grad_cache import forward_backward

    engine_name = args.engine
    overrides = [
        f"model.name={args.model}",
        f"data.batch_size={args.batch}",
        f"train.device={args.device}",
        "data.train_shards=unused.tar",
        f"train.steps={args.steps}",
        f"model.precision={args.precision}",
        f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}",
    ]
    if engine_name == "fsdp2":
        overrides.append("engine.name=fsdp2")
    elif engine_name != "ddp":
        stage = engine_name[-1]
        overrides += ["engine.name=deepspeed", f"engine.zero_stage={stage}"]
        if args.bundled_ds_configs and stage != "0":
            overrides.append(f"engine.deepspeed_config=configs/deepspeed/zero{stage}.yaml")
    cfg = load_config(None, overrides)
    env = init_distributed(args.device)
    torch.manual_seed(0)
    base_rss = psutil.Process().memory_info().rss
    bundle = create_model(cfg.model, cfg.loss.name, env.device)
    engine = build_engine(cfg, bundle.model, env)
    loss_fn = build_loss(cfg.loss)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    texts = bundle.tokenizer([f"a photo of thing number {i}" for i in range(args.batch)])
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    release_freed_memory()
    sampler = RssSampler()
    times = []
    for _ in range(args.steps):
        images = torch.rand(args.batch, 3, size, size)
        t0 = time.perf_counter()
        forward_backward(engine, loss_fn, [{"images": images, "texts": texts}])
        engine.optimizer_step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    train_peak = sampler.stop()
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = train_peak - base_rss
    startup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    record = {"rank": env.rank, "peak_bytes": peak, "startup_bytes": startup, "step_s": sorted(times)[len(times) // 2]}
    with open(f"{args.out}.{env.rank}", "w") as f:
        json.dump(record, f)


def run_engine(engine: str, args, workdir: str) -> list[dict]:
    out = os.path.join(workdir, engine)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        __file__,
        "--child",
        "--engine",
        engine,
        "--out",
        out,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    if args.bundled_ds_configs:
        cmd.append("--bundled-ds-configs")
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if "Error" in line][-1:] or ["(see stderr)"]
        print(f"{engine}: failed: {tail[0][:200]}", file=sys.stderr)
        return []
    return [json.load(open(f"{out}.{r}")) for r in range(args.nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="per-rank micro-batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--bundled-ds-configs",
        action="store_true",
        help="ZeRO 1-3 with configs/deepspeed/zero{1,2,3}.yaml (bucket sizes etc.) instead of DeepSpeed's defaults",
    )
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"# {args.model}, {args.nproc} processes on {args.device}, micro-batch {args.batch}, {args.precision}, "
        f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}; median step of {args.steps}; "
        f"ZeRO settings: {'configs/deepspeed/' if args.bundled_ds_configs else 'DeepSpeed defaults'}"
    )
    print(f"{'engine':8s} {'training peak GiB/rank':>23s} {'vs DDP':>8s} {'start-up peak GiB':>18s} {'step s':>8s}")
    baseline = None
    with tempfile.TemporaryDirectory() as workdir:
        for engine in args.engines.split(","):
            records = run_engine(engine, args, workdir)
            if not records:
                continue
            peak = max(r["peak_bytes"] for r in records) / GIB
            baseline = peak if engine == "ddp" else baseline
            ratio = f"{peak / baseline:.2f}x" if baseline else "-"
            step = max(r["step_s"] for r in records)
            startup = max(r["startup_bytes"] for r in records) / GIB
            print(f"{engine:8s} {peak:23.2f} {ratio:>8s} {startup:18.2f} {step:8.2f}", flush=True)


if __name__ == "__main__":
    main()
