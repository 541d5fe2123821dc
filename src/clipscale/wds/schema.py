"""What a WebDataset sample holds and how to read it: image keys, caption rules, labels.

One sample is `{"__key__": str, "__url__": str, ext: bytes, ...}` as the tar reader groups it.
Training, the shard tools and evaluation all read images, captions and labels through this
module, so a caption that training skips is also one that `shards verify` reports, and the
reasons a sample is unusable have one vocabulary (`SKIP_REASONS`).
"""

from __future__ import annotations

import json
import math
from typing import Any

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""Image extensions, in the order they are looked for (the first one found wins)."""

EMBEDDING_MEMBERS = ("img_emb.npy", "txt_emb.npy", "clip.json")
"""What `clipscale shards embed` adds to a sample: image and text embedding (.npy), {clip_score, logit_scale}."""

IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Image files that folder inputs (shard building, image-folder evaluation sets) pick up."""

SKIP_REASONS = (
    "no_image",
    "corrupt_image",
    "image_too_large",
    "no_caption",
    "empty_caption",
    "bad_caption",
    "unreadable_shard",
    "missing_file",
    "unreadable_file",
    "empty_file",
    "no_teacher_features",
)


class Skip(Exception):
    """This sample (or input row) cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def image_bytes(sample: dict, keys=IMAGE_KEYS) -> bytes | None:
    """The bytes of the first image extension of `keys` the sample has, or None."""
    return next((sample[k] for k in keys if k in sample), None)


def clean_caption(value: Any) -> str:
    """A caption as stored text: stripped, non-empty, valid UTF-8; raises Skip otherwise.

    Accepts what sources hold: str, bytes, None or NaN (a missing table cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Skip("no_caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("bad_caption", "caption is not valid UTF-8") from None
    if not isinstance(value, str):
        raise Skip("bad_caption", f"caption is a {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes kept by surrogateescape
        raise Skip("bad_caption", "caption is not valid UTF-8") from None
    text = value.strip()
    if not text:
        raise Skip("empty_caption")
    return text


def sample_json(sample: dict) -> dict | None:
    """The sample's `.json` as a mapping; None when it has none; Skip when it is unreadable."""
    if "json" not in sample:
        return None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        raise Skip("bad_caption", "unreadable .json") from None
    return meta if isinstance(meta, dict) else None


def caption_of(sample: dict, caption_key: str = "txt", json_field: str = "caption") -> str:
    """The caption: the `caption_key` member (e.g. `.txt`), else `json_field` of the `.json`.

    `caption_key="json"` reads the .json field only. Raises Skip for a missing, empty,
    non-text or non-UTF-8 caption."""
    raw = sample.get(caption_key) if caption_key != "json" else None
    if raw is None:
        meta = sample_json(sample)
        raw = meta.get(json_field) if meta is not None else None
        if raw is not None and not isinstance(raw, str):
            raise Skip("bad_caption", f"json field {json_field!r} is not text")
    return clean_caption(raw)


def captions_of(sample: dict) -> list[str]:
    """Every caption of a sample: a `captions` list in the .json (retrieval sets with several
    captions per image), else the one `caption_of` finds; [] when it has none."""
    try:
        meta = sample_json(sample)
    except Skip:
        meta = None
    if meta is not None and isinstance(meta.get("captions"), list):
        found = [c.strip() for c in meta["captions"] if isinstance(c, str) and c.strip()]
        if found:
            return found
    try:
        return [caption_of(sample)]
    except Skip:
        return []


def label_of(sample: dict) -> int | None:
    """The class index of a labelled sample: its `.cls` member, else `label` in the .json."""
    raw = sample.get("cls")
    if raw is None:
        try:
            meta = sample_json(sample)
        except Skip:
            return None
        raw = meta.get("label") if meta is not None else None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        return None
