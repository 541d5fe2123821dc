"""Shared test helpers: small real shard sets and configs."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

from clipscale.config import load_config
from clipscale.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "stripe")


def color_image(color: tuple, shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randrange(90, 160) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    c = size / 2
    for y in range(size):
        for x in range(size):
            if shape == "square":
                inside = abs(x - c) < size * 0.32 and abs(y - c) < size * 0.32
            elif shape == "circle":
                inside = (x - c) ** 2 + (y - c) ** 2 < (size * 0.35) ** 2
            else:
                inside = (x // max(1, size // 8)) % 2 == 0
            if inside:
                px[x, y] = color
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def color_samples(n: int, size: int = 32, seed: int = 0, prefix: str = "s"):
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        shape = SHAPES[(i // len(names)) % len(SHAPES)]
        yield {
            "__key__": f"{prefix}{i:06d}",
            "jpg": jpeg(color_image(COLORS[color], shape, size, rng)),
            "txt": f"a {color} {shape}",
            "json": json.dumps({"color": color, "shape": shape}),
        }


def with_wrong_colour(sample: dict) -> dict:
    """`sample` with a caption naming another colour than its image's (poison: spikes a trained model's loss)."""
    names = list(COLORS)
    meta = json.loads(sample["json"])
    return {**sample, "txt": f"a {names[(names.index(meta['color']) + 3) % len(names)]} {meta['shape']}"}


def make_shards(
    out_dir: Path, n_shards: int = 4, per_shard: int = 16, size: int = 32, seed: int = 0, name: str = "toy"
) -> str:
    """`n_shards` x `per_shard` colour/shape pairs under out_dir; returns the brace pattern."""
    write_shards(color_samples(n_shards * per_shard, size, seed), out_dir, name, per_shard)
    return str(Path(out_dir) / f"{name}-{{000000..{n_shards - 1:06d}}}.tar")


def tiny_config(run_dir: Path, shards: str, **overrides):
    items = [
        f"run.dir={run_dir}",
        f"data.train_shards={shards}",
        "model.name=clip-tiny",
        "model.precision=fp32",
        "data.batch_size=16",
        "data.workers=0",
        "train.steps=10",
        "train.device=cpu",
        "logging.every_n_steps=1",
        "logging.progress=false",
        "checkpoint.every_n_steps=1000",
        "schedule.warmup_steps=2",
        "optim.lr=1e-3",
        "data.shuffle_buffer=64",
    ]
    items += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, items)


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "clipscale", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"clipscale {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def make_train_data(cfg, transform, tokenizer, env, draft_size=None):
    """TrainData as the Trainer builds it: the data section, the batch layout, the seed, the signals."""
    from clipscale.config import BatchLayout
    from clipscale.data.loader import TrainData

    layout = BatchLayout.of(cfg.data, cfg.optim, env.world_size)
    return TrainData(
        cfg.data, layout, env, cfg.seed, transform, tokenizer, draft_size, tuple(cfg.train.preempt_signals)
    )


def optimizer_of(model, cfg, device="cpu"):
    """The AdamW an engine builds for `model` under `cfg`."""
    import torch

    from clipscale.optim import Optimization

    return Optimization(cfg.optim, cfg.schedule, cfg.train.steps).optimizer(model, torch.device(device))


def cli_here(*args, check=True) -> subprocess.CompletedProcess:
    """`clipscale ARGS` in this process (what run_cli does, without a new interpreter's imports: ~4 CPU
    seconds each); for tests about what a command does, not about the process it runs in."""
    import contextlib
    import io

    from clipscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    proc = subprocess.CompletedProcess(["clipscale", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"clipscale {' '.join(args)} failed ({code}):\n{proc.stderr[-4000:]}")
    return proc
