"""`clipscale demo`: build the digit shards (once) and train a small CLIP on them on the CPU."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import load_config, save_config
from .shards.manifest import MANIFEST_NAME
from .demo_data import build_demo_shards
from .metrics import METRICS_FILE, read_jsonl

log = logging.getLogger("clipscale")

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo-cpu.yaml"


def prepare_data(data_dir: Path) -> dict:
    train_dir, test_dir = data_dir / "train", data_dir / "test"
    if (train_dir / MANIFEST_NAME).is_file() and (test_dir / MANIFEST_NAME).is_file():
        count = lambda d: len(list(d.glob("*.tar")))  # noqa: E731
        return {
            "train": str(train_dir / f"digits-train-{{000000..{count(train_dir) - 1:06d}}}.tar"),
            "test": str(test_dir / f"digits-test-{{000000..{count(test_dir) - 1:06d}}}.tar"),
        }
    print(f"building digit shards in {data_dir} ...", file=sys.stderr)
    return build_demo_shards(data_dir)


def launch(config_path: Path, nproc: int) -> None:
    """Run training in this process (nproc 1) or under torchrun with gloo on the CPU."""
    if nproc <= 1:
        from .config import load_config as _load
        from .train import train

        train(_load(str(config_path)))
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "clipscale.train", "--config", str(config_path)]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def run_demo(run_dir: str = "runs/demo", steps: Optional[int] = None, nproc: int = 1,
             overrides: Optional[list[str]] = None) -> dict:
    run = Path(run_dir)
    data = prepare_data(run / "data")
    items = [f"run.dir={run}", f"data.train_shards={data['train']}"]
    if steps is not None:
        items.append(f"train.steps={steps}")
    cfg = load_config(str(DEMO_CONFIG), items + list(overrides or []))
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "demo-config.yaml"
    save_config(cfg, config_path)
    launch(config_path, nproc)
    records = [r for r in read_jsonl(run / METRICS_FILE) if "loss" in r]
    summary = {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "steps": records[-1]["step"]}
    print(f"demo finished: loss {summary['first_loss']:.3f} (step {records[0]['step']}) -> "
          f"{summary['last_loss']:.3f} (step {summary['steps']}); run directory: {run}", file=sys.stderr)
    return summary
