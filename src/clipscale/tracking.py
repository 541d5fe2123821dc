"""logging.wandb: the same scalars as metrics.jsonl in a Weights & Biases run (rank 0 only).

The W&B run id is part of the checkpoint (state.RunMeta), so a resumed or requeued job continues
the same W&B run (`resume="allow"`); `mode: offline` writes RUN_DIR/wandb/ with no network
(`wandb sync` uploads it later)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


class WandbLogger:
    def __init__(self, spec, run_dir: Path, run_id: str, config: dict):
        try:
            import wandb
        except ImportError:
            from .errors import ConfigError

            raise ConfigError("logging.wandb is set but wandb is not installed: pip install wandb") from None
        self.wandb = wandb
        self.run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            name=spec.name,
            tags=list(spec.tags) or None,
            mode=spec.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        # the training step is a metric of its own: steps replayed after a resume are logged again (W&B
        # drops rows whose own step is not above its last one)
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        log.info("W&B run %s (%s) in %s", run_id, spec.mode, run_dir / "wandb")

    def log(self, step: int, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log({**scalars, "train/step": step})

    def close(self) -> None:
        self.run.finish()
