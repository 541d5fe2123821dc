"""The feature cache: one optimizer step's forward/backward over the WHOLE global batch.

With `accum_steps` K > 1 the loss must be the loss of the WHOLE K x world x micro-batch
batch, not an average of micro-batch losses (contrastive losses do not decompose). We use the
GradCache scheme:
  1. encode all K micro-batches without grad and keep their features;
  2. compute the loss once over all cached features (gathered across ranks) and back-propagate
     to the features (and to the temperature / bias) only;
  3. re-encode each micro-batch with grad (replaying its RNG, so dropout draws the masks of step 1)
     and back-propagate the cached feature gradients
     through the towers (DDP no_sync on all but the last, which also carries the temperature's
     gradient so every parameter takes part in the synchronised backward).
Gradients equal those of one process computing the whole batch at once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..engine.base import Engine
from ..job.distributed import world_size
from ..loss.distill import TEACHER_KEYS

FEATURES = ("image_features", "text_features")
SCALARS = ("logit_scale", "logit_bias")


def loss_inputs(loss_fn, out: dict) -> list[torch.Tensor]:
    """Positional arguments of the loss from a model output dict (fp32 features)."""
    args = [out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()]
    if getattr(loss_fn, "uses_bias", False):
        if out.get("logit_bias") is None:
            raise ValueError("the SigLIP loss needs a model with a logit_bias")
        args.append(out["logit_bias"].float())
    if getattr(loss_fn, "uses_teacher", False):
        args.extend(out[k] for k in TEACHER_KEYS)
    return args


def forward_backward(engine: Engine, loss_fn, micro_batches: list[dict], teacher=None) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step (the caller then calls
    engine.optimizer_step()); returns this rank's loss, detached (the mean over ranks is the
    loss of the global batch). `teacher(images, texts, micro_batch)`: a distillation teacher's features (run
    live, or stored in the micro-batch)."""
    device = engine.device
    if len(micro_batches) == 1:
        mb = micro_batches[0]
        images, texts = mb["images"].to(device, non_blocking=True), mb["texts"].to(device, non_blocking=True)
        out = engine.forward(images, texts)
        if teacher is not None:
            out = {**out, **teacher(images, texts, mb)}
        loss = loss_fn(*loss_inputs(loss_fn, out))
        engine.backward(loss)
        return loss.detach()
    return _cached_forward_backward(engine, loss_fn, micro_batches, teacher)


def _cached_forward_backward(engine: Engine, loss_fn, micro_batches: list[dict], teacher=None) -> torch.Tensor:
    device = engine.device
    inputs = [
        (mb["images"].to(device, non_blocking=True), mb["texts"].to(device, non_blocking=True)) for mb in micro_batches
    ]
    # 1. cache features without building graphs (and the RNG state each micro-batch started from)
    cached: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
    taught: dict[str, list[torch.Tensor]] = {k: [] for k in TEACHER_KEYS[:2]}
    scalars: dict[str, torch.Tensor] = {}
    teacher_scale = None
    rng = []
    with torch.no_grad():
        for (images, texts), mb in zip(inputs, micro_batches):
            rng.append(RNGState(device))
            out = engine.forward(images, texts)
            for k in FEATURES:
                cached[k].append(out[k].float())
            scalars = {k: out[k].float() for k in SCALARS if out.get(k) is not None}
            if teacher is not None:
                t_out = teacher(images, texts, mb)
                for k in taught:
                    taught[k].append(t_out[k])
                teacher_scale = t_out["teacher_logit_scale"]
    sizes = [f.shape[0] for f in cached["image_features"]]
    # 2. loss over the whole batch, gradient w.r.t. the features and scalars only
    leaves = {k: torch.cat(v).requires_grad_(True) for k, v in cached.items()}
    leaves.update({k: v.detach().requires_grad_(True) for k, v in scalars.items()})
    constants = {k: torch.cat(v) for k, v in taught.items() if v}
    if teacher_scale is not None:
        constants["teacher_logit_scale"] = teacher_scale
    loss = loss_fn(*loss_inputs(loss_fn, {**leaves, **constants}))
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    feature_grads = {k: torch.split(grads[k], sizes) for k in FEATURES}
    # 3. re-encode with grad, replaying each micro-batch's RNG (dropout draws the same masks as in
    #    step 1, so the gradients are those of the loss computed there), and push the cached
    #    gradients through the towers
    last = len(inputs) - 1
    after = RNGState(device)
    for j, (images, texts) in enumerate(inputs):
        sync = j == last
        rng[j].restore()
        with engine.no_sync() if not sync else contextlib.nullcontext():
            out = engine.forward(images, texts)
            surrogate = sum((out[k].float() * feature_grads[k][j]).sum() for k in FEATURES)
            for k in scalars:
                # the temperature/bias gradient is applied once, on the synchronised micro-batch
                weight = grads[k] if sync else torch.zeros_like(grads[k])
                surrogate = surrogate + (out[k].float() * weight).sum()
            engine.backward(surrogate)
    after.restore()  # the random stream goes on as if each micro-batch had been encoded once
    return loss.detach()


class RNGState:
    """The CPU generator's state and the current CUDA device's, taken now; `restore()` puts them back."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def global_loss_and_stop(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """One all-reduce per step: the global loss (mean over ranks) and whether any rank was signalled."""
    t = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(1.0 if stop_requested else 0.0).float()])
    if world_size() > 1:
        dist.all_reduce(t)
    total, stops = t.tolist()
    return total / world_size(), stops > 0
