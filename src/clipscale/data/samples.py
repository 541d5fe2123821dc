"""Turning one raw WebDataset sample into (image tensor, caption), or a counted skip.

Image keys (jpg/jpeg/png/webp) and the caption field are configurable; captions come from
`.txt` or a field of `.json`. Everything that can be wrong with one sample is a `Skip` with
a reason; the stream counts skips by reason and never stops for one.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Callable, Optional

import torch
from PIL import Image

SKIP_REASONS = ("no_image", "corrupt_image", "no_caption", "empty_caption", "bad_caption", "unreadable_shard")


class Skip(Exception):
    """This sample cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, draft_size: Optional[int] = None) -> Image.Image:
    """Decode to RGB; with `draft_size`, let libjpeg downscale large JPEGs while decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF/palette warnings are noise here
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    return img


def caption_of(sample: dict, caption_key: str, json_field: str) -> str:
    """The caption text; raises Skip for a missing, empty or non-UTF-8 caption."""
    raw = sample.get(caption_key) if caption_key != "json" else None
    if raw is None and "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            raise Skip("bad_caption", "unreadable .json") from None
        raw = meta.get(json_field) if isinstance(meta, dict) else None
        if raw is not None and not isinstance(raw, str):
            raise Skip("bad_caption", f"json field {json_field!r} is not text")
    if raw is None:
        raise Skip("no_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("bad_caption", "caption is not UTF-8") from None
    text = raw.strip()
    if not text:
        raise Skip("empty_caption")
    return text


class SampleDecoder:
    """raw sample → (image tensor, caption). Augmentation randomness is seeded per sample so a
    sample looks the same however the stream was interrupted and resumed."""

    def __init__(
        self,
        transform: Callable,
        image_keys: list[str],
        caption_key: str = "txt",
        caption_json_field: str = "caption",
        draft_size: Optional[int] = None,
    ):
        self.transform = transform
        self.image_keys = [k.lower() for k in image_keys]
        self.caption_key = caption_key
        self.caption_json_field = caption_json_field
        self.draft_size = draft_size

    def __call__(self, sample: dict, aug_seed: int) -> tuple[torch.Tensor, str]:
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise Skip("no_image")
        text = caption_of(sample, self.caption_key, self.caption_json_field)
        try:
            img = decode_image(data, self.draft_size)
        except Exception as exn:  # PIL raises many types for bad bytes
            raise Skip("corrupt_image", f"{type(exn).__name__}") from None
        torch.manual_seed(aug_seed)
        return self.transform(img), text
