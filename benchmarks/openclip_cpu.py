"""Run OpenCLIP's own trainer (`open_clip_train.main`) on CPU processes, unchanged otherwise.

Two things stop `open_clip_train` 3.3.0 from training on CPU under torchrun, and this wrapper
fixes only those:
  - it wraps the model in `DistributedDataParallel(model, device_ids=[device])` with device
    "cpu", which torch rejects for CPU modules: we drop `device_ids` when the module is on CPU;
  - our small model configs (clip-tiny, ...) are not in its model_configs: we register
    clipscale's bundled config folder with `open_clip.add_model_config`.

    torchrun --standalone --nproc_per_node=2 benchmarks/openclip_cpu.py --train-data ... (its own flags)

Must run in an environment with webdataset 0.2.x (see vs_openclip.py, which builds one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import torch
from torch.nn.parallel import DistributedDataParallel

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "clipscale" / "configs" / "models"


class CpuFriendlyDDP(DistributedDataParallel):
    """DDP that ignores `device_ids` for a module whose parameters live on the CPU."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        first = next(module.parameters(), None)
        if first is not None and first.device.type == "cpu":
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def main() -> None:
    open_clip.add_model_config(MODEL_CONFIGS)
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP
    from open_clip_train.main import main as openclip_main

    openclip_main(sys.argv[1:])


if __name__ == "__main__":
    main()
