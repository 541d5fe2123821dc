"""`clipscale demo`: build the digit shards (once), train a small CLIP on them on the CPU with two
processes, evaluate it on held-out digits, and leave a report with pictures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..config import BatchLayout, load_config, save_config
from ..errors import UserError
from ..job.distributed import child_env
from ..metrics import METRICS_FILE, read_jsonl
from ..wds.manifest import MANIFEST_NAME
from ..wds.shardlist import resolve_shards
from .data import build_demo_shards

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-cpu.yaml"


class DemoError(UserError):
    """The demo's training did not produce what the report needs."""


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
        from ..train import train

        train(load_config(str(config_path)))
        return
    cmd = [
        sys.executable,
        "-m",
        "clipscale.launch",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "clipscale.train",
        "--config",
        str(config_path),
    ]
    print("running:", " ".join(cmd), file=sys.stderr)
    code = subprocess.run(cmd, env=child_env({"OMP_NUM_THREADS": "1"})).returncode
    if code != 0:
        raise DemoError(f"training exited with code {code} (its log is above)")


def run_demo(
    run_dir: str = "runs/demo", steps: int | None = None, nproc: int = 2, overrides: list[str] | None = None
) -> dict:
    """Build the digit shards (once), train with evaluation on the held-out digits, then write
    report.md, loss.png and samples.png into the run directory."""
    started = time.time()
    run = Path(run_dir)
    data = prepare_data(run / "data")
    items = [
        f"run.dir={run}",
        f"data.train_shards={data['train']}",
        f"eval.zeroshot={data['test']}",
        f"eval.retrieval={data['test']}",
    ]
    if steps is not None:
        items.append(f"train.steps={steps}")
    cfg = load_config(str(DEMO_CONFIG), items + list(overrides or []))
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "demo-config.yaml"
    save_config(cfg, config_path)
    train_started = time.time()
    launch(config_path, nproc)
    train_seconds = time.time() - train_started

    records = read_jsonl(run / METRICS_FILE)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/zeroshot_top1" in r]
    if not losses or not evals:
        raise DemoError(f"no training or evaluation records in {run / METRICS_FILE}")
    final = evals[-1]
    report = make_report(run, cfg, data, records, final, nproc, losses, started, train_seconds)
    print(
        f"demo finished in {report['seconds'] / 60:.1f} min: loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}; "
        f"held-out zero-shot top-1 {100 * final['eval/zeroshot_top1']:.1f}% (chance 10%), "
        f"image->text R@1 {100 * final['eval/i2t_r1']:.1f}% (chance {100 / final['eval/retrieval_images']:.2f}%)",
        file=sys.stderr,
    )
    print(f"look at {run / 'report.md'}, {run / 'loss.png'}, {run / 'samples.png'}", file=sys.stderr)
    return {
        "first_loss": losses[0]["loss"],
        "last_loss": losses[-1]["loss"],
        "steps": losses[-1]["step"],
        "train_seconds": train_seconds,
        **{k: v for k, v in final.items() if k.startswith("eval/")},
    }


def make_report(
    run: Path,
    cfg,
    data: dict,
    records: list[dict],
    final: dict,
    nproc: int,
    losses: list[dict],
    started: float,
    train_seconds: float,
) -> dict:
    import torch

    from ..checkpoint.weights import model_from_checkpoint
    from ..evaluate import load_classes_and_templates
    from .report import plot_curves, plot_predictions, write_report

    plot_curves(records, run / "loss.png")
    bundle, _ = model_from_checkpoint(str(run), None, torch.device("cpu"))
    classnames, templates = load_classes_and_templates(cfg.eval.zeroshot_classes, cfg.eval.zeroshot_templates)
    grid = 24
    grid_accuracy = plot_predictions(bundle, data["test"], classnames, templates, run / "samples.png", n=grid)
    count = lambda pattern: sum(s.samples for s in resolve_shards(pattern))  # noqa: E731
    info = {
        "model": cfg.model.name,
        "nproc": nproc,
        "steps": losses[-1]["step"],
        "global_batch": BatchLayout.of(cfg.data, cfg.optim, nproc).global_batch,
        "train_samples": count(data["train"]),
        "test_samples": count(data["test"]),
        "seconds": time.time() - started,
        "train_seconds": train_seconds,
        "first_loss": losses[0]["loss"],
        "first_step": losses[0]["step"],
        "last_loss": losses[-1]["loss"],
        "grid": grid,
        "grid_accuracy": grid_accuracy,
        "templates": templates,
        "run_dir": str(run),
    }
    write_report(run / "report.md", info, final, records)
    return info
