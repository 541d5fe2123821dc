"""Whether a checkpoint fits this run: the same model (weights, shapes, embedding size, model and
loss name), and which settings changed since it was written."""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointMismatch


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "deepspeed_config":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint value, current value) for every setting that differs."""
    a, b = flatten(saved or {}), flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def incompatibility(
    source: str, saved_config: dict | None, current_config: dict, model_state: dict, saved_state: dict
) -> str | None:
    """One line listing why a checkpoint cannot be loaded into this run, or None if it can."""
    weights = []
    shapes = [
        f"{k} {tuple(saved_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in saved_state and tuple(saved_state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    if shapes:
        weights.append(f"{len(shapes)} weight shape(s) differ, e.g. {'; '.join(shapes[:2])} (checkpoint vs now)")
    if missing:
        weights.append(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        weights.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    settings = [
        f"{k}: {old!r} in the checkpoint, {new!r} now"
        for k, old, new in config_changes(saved_config or {}, current_config)
        if saved_config and k in ("model.name", "loss.name")
    ]
    if "text_projection" in saved_state and "text_projection" in model_state:
        a, b = saved_state["text_projection"].shape[-1], model_state["text_projection"].shape[-1]
        if a != b:
            settings.append(f"embedding size: {a} in the checkpoint, {b} now")
    if not weights and not any(s.startswith("model.name") for s in settings):
        return None
    return f"{source} does not fit this model: " + "; ".join(settings + weights)


def shape_only(state: dict) -> dict:
    """Shape-only stand-ins for weights; a 1-element tensor counts as a scalar (open_clip stores the
    temperature 0-d, clipscale trains it as a 1-element vector)."""

    def meta(shape) -> torch.Tensor:
        shape = tuple(shape)
        return torch.empty(() if math.prod(shape) == 1 else shape, device="meta")

    return {k: meta(v.shape if hasattr(v, "shape") else v) for k, v in state.items()}


def check_fits(path, train_state: dict, identity: dict, now: dict, saved: dict) -> None:
    """CheckpointMismatch (one line) when the checkpoint's model is not this run's: other weights,
    shapes, model name, loss or embedding size. `identity`: this run's config (as a nested dict, at
    least model.name and loss.name); `now` and `saved` map names to tensors or shapes."""
    saved_config = (train_state.get("meta") or {}).get("config")
    problem = incompatibility(str(path), saved_config, identity, shape_only(now), shape_only(saved))
    if problem:
        raise CheckpointMismatch(problem)
