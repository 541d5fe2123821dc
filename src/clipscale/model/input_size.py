"""A model's input size changed in the middle of a run (training stages, CLIPA): the image tower's position
embedding interpolated to a new grid as open_clip does when it loads weights of another size (its own
`resize_pos_embed`: bicubic, antialiased), the text tower's positions cut (the first ones kept: a short text
uses those) or extended (new rows initialised as open_clip initialises them). The optimizer's moments and
the EMA's average follow the same map, so training goes on as if the model had always had that size.

A changed parameter is a new Parameter (autograd keeps the old one's shape in its gradient accumulator): it
takes the old one's place in the module, the optimizer's groups and state, and the EMA; a wrapper that holds
views of the parameters (DDP's buckets) is rebuilt by the engine.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from . import open_clip

# an optimizer state entry of a parameter's shape: the first moments follow the parameter's own (linear) map,
# the second moments one that keeps them >= 0 (bilinear weights are >= 0, bicubic ones are not)
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


def _side(size) -> int:
    """One side of a size open_clip gives as an int or a (height, width) pair."""
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def image_size(model: nn.Module) -> int | None:
    """The image side the model takes (None: a tower without a position grid, which takes any size)."""
    visual = getattr(model, "visual", None)
    if visual is None or getattr(visual, "positional_embedding", None) is None:
        return None
    return _side(visual.image_size)


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text positions: the CLIP model itself (open_clip's built-in text tower is
    flattened into it) or CustomTextCLIP's `text`."""
    return model if hasattr(model, "positional_embedding") else getattr(model, "text", model)


def context_length(model: nn.Module) -> int | None:
    """Text tokens the model takes (None: a text tower without our position table, e.g. Hugging Face's)."""
    text = text_tower(model)
    pos = getattr(text, "positional_embedding", None)
    return int(pos.shape[0]) if pos is not None else None


def patch_size(model: nn.Module) -> int:
    return _side(model.visual.patch_size)


def saved_input_size(state: dict, model: nn.Module) -> tuple[int | None, int | None]:
    """(image side, text tokens) that the position tables of a saved state_dict (open_clip layout) stand for in
    this model's architecture: a checkpoint of a training stage holds them at its stage's size. None where
    the state or the model has no such table."""
    image = state.get("visual.positional_embedding")
    text = state.get("positional_embedding", state.get("text.positional_embedding"))
    size = None
    if image is not None and image.ndim == 2 and image_size(model) is not None and hasattr(model.visual, "grid_size"):
        grid = math.isqrt(image.shape[0] - 1)  # open_clip's ViT: one class token, a square grid
        same_grid = grid == _side(model.visual.grid_size)  # (a side the grid rounds down keeps its size)
        size = image_size(model) if same_grid else grid * patch_size(model)
    length = int(text.shape[0]) if text is not None and context_length(model) is not None else None
    return size, length


def check_sizes(model: nn.Module, image_sizes: set, context_lengths: set) -> str | None:
    """Why the model cannot run at these sizes (one line), or None."""
    sizes = {s for s in image_sizes if s}
    if sizes:
        if image_size(model) is None or not hasattr(model.visual, "grid_size"):
            tower = type(model.visual).__name__
            return f"{tower} has no position grid to interpolate (image_size stages need open_clip's ViT)"
        square = model.visual.image_size
        if isinstance(square, (tuple, list)) and square[0] != square[1]:
            return f"the image tower takes {tuple(square)} images; image_size stages need a square one"
        bad = sorted(s for s in sizes if s % patch_size(model))
        if bad:
            return f"image_size {bad[0]} is not a multiple of the patch size {patch_size(model)}"
    lengths = {c for c in context_lengths if c}
    if lengths:
        text = text_tower(model)
        if context_length(model) is None or getattr(text, "cls_emb", None) is not None:
            return "the text tower has no position table clipscale can cut or extend (context_length stages)"
    return None


@torch.no_grad()
def resize_inputs(
    model: nn.Module,
    image: int | None = None,
    context: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    ema=None,
    seed: int = 0,
) -> list[str]:
    """Bring the model to `image` px and `context` tokens (None: leave as is), with the optimizer's state of
    the changed parameters and the EMA's average. Returns the names of the parameters that changed.
    `seed` draws the rows of new text positions (the same on every rank)."""
    changed = []
    if image and image_size(model) != image:
        changed.append(_resize_image(model, image))
    if context and context_length(model) != context:
        changed.append(_resize_text(model, context, seed))
    names = {id(p): n for n, p in model.named_parameters()}
    for param, first, second in changed:
        name = names[id(param)]
        new = nn.Parameter(first(param.detach()), requires_grad=param.requires_grad)
        owner, attr = _owner(model, name)
        setattr(owner, attr, new)
        if owner is not model and hasattr(model, attr) and getattr(model, attr) is param:  # (CLIP's shared text)
            setattr(model, attr, new)
        if optimizer is not None:
            _move_state(optimizer, param, new, first, second)
        if ema is not None and name in ema.shadow:
            ema.shadow[name] = first(ema.shadow[name])
            ema.params[name] = new
    return [names[id(p)] for p, _, _ in changed]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, first, second) -> None:
    """The optimizer's group entry and state of `old` moved to `new`, state tensors of its shape mapped."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: (second if key in SECOND_MOMENTS else first)(value, fresh=0.0)
            if torch.is_tensor(value) and value.shape == old.shape
            else value
            for key, value in state.items()
        }


def _resize_image(model: nn.Module, size: int) -> tuple[nn.Parameter, Callable, Callable]:
    visual = model.visual
    grid = size // patch_size(model)
    holder = SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid)))

    def interpolate(mode: str):
        def run(tensor: torch.Tensor, fresh=None) -> torch.Tensor:
            state = {"visual.positional_embedding": tensor}
            open_clip.model.resize_pos_embed(state, holder, interpolation=mode)  # the loader's own map
            return state["visual.positional_embedding"].contiguous()

        return run

    visual.image_size, visual.grid_size = (size, size), (grid, grid)
    if isinstance(getattr(visual, "preprocess_cfg", None), dict):
        visual.preprocess_cfg["size"] = (size, size)
    return visual.positional_embedding, interpolate("bicubic"), interpolate("bilinear")


def _resize_text(model: nn.Module, length: int, seed: int) -> tuple[nn.Parameter, Callable, Callable]:
    text = text_tower(model)
    param = text.positional_embedding

    def cut_or_extend(tensor: torch.Tensor, fresh=None) -> torch.Tensor:
        kept = tensor[:length]
        if len(kept) == length:
            return kept.clone()
        rows = (length - len(kept), *tensor.shape[1:])
        if fresh is None:  # open_clip's init of text positions: normal, std 0.01
            generator = torch.Generator().manual_seed(seed)
            new = torch.empty(rows, dtype=torch.float32).normal_(0.0, 0.01, generator=generator).to(tensor.dtype)
        else:
            new = torch.full(rows, fresh, dtype=tensor.dtype)
        return torch.cat([kept, new.to(tensor.device)])

    text.context_length = length
    if hasattr(text, "num_pos"):
        text.num_pos = length
    mask = torch.full((length, length), float("-inf")).triu_(1)  # open_clip's causal mask
    for holder in (text, model):
        if getattr(holder, "attn_mask", None) is not None:
            holder.attn_mask = mask.to(holder.attn_mask.device, holder.attn_mask.dtype)
    if model is not text:
        model.context_length = length
    return param, cut_or_extend, cut_or_extend
