"""Model names and their open_clip JSON configs, read without importing open_clip or torch, so a
config is checked against its model at load (a misspelt model.name, a patch dropout the image tower
cannot do) in the blink `clipscale config` and `clipscale data plan` take."""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "configs" / "models"


def open_clip_config_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model_configs"


@lru_cache(maxsize=16)
def _configs_in(folder: str) -> dict[str, str]:
    """{model name: JSON path} of the model configs in `folder` (as open_clip.add_model_config reads them)."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
            out[path.stem] = str(path)
    return out


def model_configs(config_dirs: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """{name: JSON path} of every model name model.name accepts: open_clip's, clipscale's bundled
    ones, and those of model.config_dirs (later folders win, as with open_clip.add_model_config)."""
    out: dict[str, str] = {}
    for folder in [open_clip_config_dir(), BUNDLED, *map(Path, config_dirs)]:
        if folder is not None and folder.is_dir():
            out.update(_configs_in(str(folder)))
    return out


def model_config(name: str, config_dirs: list[str] | tuple[str, ...] = ()) -> dict | None:
    """The JSON config of model `name`, or None when no folder has it."""
    path = model_configs(tuple(config_dirs)).get(name)
    return json.loads(Path(path).read_text()) if path else None


def vision_tower_kind(config: dict) -> str:
    """'vit' (open_clip's VisionTransformer), 'resnet' (ModifiedResNet) or 'timm'."""
    vision = config.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        return "timm"
    return "resnet" if isinstance(vision.get("layers"), (list, tuple)) else "vit"
