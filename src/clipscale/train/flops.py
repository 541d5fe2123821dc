"""How well a run uses its devices: model FLOPs per sample (counted once, by torch's FLOP counter on
a meta-device copy of the network), achieved TFLOP/s per device, MFU against the device's peak, and
peak memory.

Model FLOPs are those of the towers' forward and backward as the run trains them (patch dropout
applied, locked towers without their gradient work), without activation recomputation: gradient
checkpointing costs time but adds no model FLOPs, as in PaLM's MFU. The loss's B x B logits and a
distillation teacher are not counted (the logits are < 0.5 % of a ViT-B step at a global batch of 64k).
"""

from __future__ import annotations

import logging
import re
import resource

import torch

from ..config import ModelConfig
from ..model import meta_model

log = logging.getLogger("clipscale")

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per device: the first entry whose every word is a word
# of the device's name wins (words split at spaces and dashes: "A100" is not "A1000", "L4" not "L40")
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H800 PCIe", 756.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("MI300X", 1307.4),
)


def known_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by its name (torch.cuda.get_device_name), None if unknown."""
    words = set(re.split(r"[\s\-_]+", device_name.upper()))
    return next((peak for name, peak in PEAK_BF16_TFLOPS if set(name.upper().split()) <= words), None)


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """train.peak_tflops if set, else the known peak of this GPU; None (no MFU) on a CPU or an unknown GPU."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    return known_peak_tflops(torch.cuda.get_device_name(device))


def _input_size(model) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def flops_per_sample(mcfg: ModelConfig, loss_name: str = "clip", batch: int = 2, image_size: int | None = None):
    """Training FLOPs of one sample (forward + backward of both towers), counted on a meta-device copy:
    no memory, no effect on the run's model, random streams or BatchNorm statistics. `image_size`: a training
    stage's (None: the model's)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model(mcfg, loss_name, image_size).train()
    context = getattr(model, "context_length", None) or model.text.context_length
    images = torch.zeros(batch, 3, *_input_size(model), device="meta")
    texts = torch.zeros(batch, context, dtype=torch.long, device="meta")
    # open_clip's patch dropout draws its masks on the CPU even for meta tensors: the run's random stream
    # must not notice the count (a stage's count comes after a resume restored it)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        out = model(image=images, text=texts)
        features = [f for f in (out["image_features"], out["text_features"]) if f.requires_grad]
        if features:
            sum(f.sum() for f in features).backward()
    return counter.get_total_flops() / batch


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: the GPU's allocated peak (torch's allocator), on a CPU the
    process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def utilisation(flops_per_sample: float, samples_per_s: float, world_size: int, peak_tflops: float | None) -> dict:
    """{tflops: model TFLOP/s per device, mfu: its share of the device's peak (None without a peak)}
    from the run's global samples per second."""
    tflops = flops_per_sample * samples_per_s / world_size / 1e12
    return {"tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


class Utilisation:
    """The run's utilisation figures for its metrics records (main rank): counted once at start-up."""

    def __init__(self, per_sample: float | None, peak_tflops: float | None, world_size: int, device: torch.device):
        self.per_sample, self.peak, self.world_size, self.device = per_sample, peak_tflops, world_size, device
        self.model_cfg, self.loss_name, self._counted = None, "clip", {}

    @classmethod
    def of(cls, cfg, env) -> Utilisation:
        """From the config's model and loss, train.peak_tflops and the process's device. A network the meta
        device cannot run (a custom tower) reports no TFLOP/s and says why once, instead of stopping the run."""
        out = cls(None, device_peak_tflops(env.device, cfg.train.peak_tflops), env.world_size, env.device)
        out.model_cfg, out.loss_name = cfg.model, cfg.loss.name
        out.per_sample = out.count(cfg.model.patch_dropout)
        return out

    def count(self, patch_dropout: float, image_size: int | None = None, context_length: int | None = None):
        """FLOPs per sample at this patch dropout and input size (a training stage's; None: the model's), counted
        once per setting; None when the meta device cannot run the network."""
        key = (patch_dropout, image_size, context_length)
        if key not in self._counted:
            from dataclasses import replace

            mcfg = replace(self.model_cfg, patch_dropout=patch_dropout)
            if context_length is not None:
                mcfg = replace(mcfg, context_length=context_length)
            try:
                self._counted[key] = flops_per_sample(mcfg, self.loss_name, image_size=image_size)
            except Exception as exn:  # noqa: BLE001 - a measurement, never worth a failed run
                log.warning("cannot count the model's FLOPs on the meta device (%s: %s): no tflops/mfu in the "
                            "metrics", type(exn).__name__, str(exn).splitlines()[0][:200])  # fmt: skip
                self._counted[key] = None
        return self._counted[key]

    def at_stage(self, patch_dropout: float, image_size: int | None = None, context_length: int | None = None) -> None:
        """A new training stage: its FLOPs per sample from now on."""
        self.per_sample = self.count(patch_dropout, image_size, context_length)

    def record(self, samples_per_s: float) -> dict:
        """tflops (model TFLOP/s per device), mfu (when the device's peak is known), peak_mem_gib."""
        out = {}
        if self.per_sample is not None:
            figures = utilisation(self.per_sample, samples_per_s, self.world_size, self.peak)
            out["tflops"] = figures["tflops"]
            if figures["mfu"] is not None:
                out["mfu"] = figures["mfu"]
        out["peak_mem_gib"] = peak_memory_gib(self.device)
        return out

    def describe(self) -> str:
        flops = f"{self.per_sample / 1e9:.3g} GFLOP per sample" if self.per_sample is not None else "FLOPs unknown"
        peak = f"peak {self.peak:g} TFLOP/s per device" if self.peak else "no device peak (no MFU; train.peak_tflops)"
        return f"{flops} (forward + backward), {peak}"
