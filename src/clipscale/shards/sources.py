"""Inputs of the shard builder: a table of (image path, caption, extra columns) rows, or a folder
tree of images with sidecar captions. Everything becomes a list of `Row`s in a stable order.

Only a missing or malformed table (or a missing column) is fatal, with a one-line error that
names the available columns; problems with single rows are the builder's counted skips.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..wds.schema import IMAGE_FILE_SUFFIXES

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
DEFAULT_COLUMNS = (("filepath", "caption"), ("image", "text"))


@dataclass
class Row:
    image: str  # absolute path of the image file
    caption: Any  # whatever the source holds (str, bytes, None, NaN...); validated by the builder
    source: str  # the image reference as written in the input
    extra: dict = field(default_factory=dict)


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    # surrogateescape keeps undecodable bytes visible, so one bad caption is a counted skip
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty table (no header row)")
        return list(reader)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(obj)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exn:
        raise DataError(f"{path}: cannot read parquet: {exn}") from None


def read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, ",")
    if suffix == ".tsv":
        return _read_csv(path, "\t")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported table type {suffix!r} (use {', '.join(TABLE_SUFFIXES)})")


def _columns(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records[:1000]:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _pick_columns(columns: list[str], image_col: str | None, caption_col: str | None, where: Path):
    available = ", ".join(columns) or "(none)"
    if image_col is None and caption_col is None:
        for img, cap in DEFAULT_COLUMNS:
            if img in columns and cap in columns:
                return img, cap
        raise DataError(
            f"{where}: no default image/caption columns (filepath/caption or image/text); "
            f"available columns: {available}; set --image-col and --caption-col"
        )
    image_col = image_col or next((c for c, _ in DEFAULT_COLUMNS if c in columns), "filepath")
    caption_col = caption_col or next((c for _, c in DEFAULT_COLUMNS if c in columns), "caption")
    for flag, col in (("--image-col", image_col), ("--caption-col", caption_col)):
        if col not in columns:
            raise DataError(f"{where}: column {col!r} ({flag}) not found; available columns: {available}")
    return image_col, caption_col


def _clean(value):
    """JSON-safe extra column values (NaN → None, bytes → str)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def table_rows(path: Path, image_col: str | None = None, caption_col: str | None = None) -> list[Row]:
    if not path.is_file():
        raise DataError(f"input table not found: {path}")
    records = read_table(path)
    if not records:
        raise DataError(f"{path}: the table has no rows")
    image_col, caption_col = _pick_columns(_columns(records), image_col, caption_col, path)
    base = path.parent
    rows = []
    for rec in records:
        ref = rec.get(image_col)
        ref_str = "" if ref is None or (isinstance(ref, float) and math.isnan(ref)) else str(ref)
        image = str(ref_str if os.path.isabs(ref_str) else (base / ref_str)) if ref_str else ""
        extra = {k: _clean(v) for k, v in rec.items() if k not in (image_col, caption_col)}
        rows.append(Row(image=image, caption=rec.get(caption_col), source=ref_str, extra=extra))
    return rows


def _sidecar_caption(image: Path, caption_field: str | None):
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return txt.read_bytes(), {}
    meta_path = image.with_suffix(".json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_bytes())
        except ValueError:
            return None, {}
        if isinstance(meta, dict):
            fields = [caption_field] if caption_field else ["caption", "text"]
            caption = next((meta[f] for f in fields if f in meta), None)
            extra = {k: _clean(v) for k, v in meta.items() if k not in fields}
            return caption, extra
    return None, {}


def folder_rows(root: Path, caption_field: str | None = None) -> list[Row]:
    """Every image under `root` (sorted by relative path) with its sidecar .txt or .json caption."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_FILE_SUFFIXES)})")
    rows = []
    for img in images:
        caption, extra = _sidecar_caption(img, caption_field)
        rows.append(Row(image=str(img), caption=caption, source=str(img.relative_to(root)), extra=extra))
    return rows


def load_rows(
    src: str, image_col: str | None = None, caption_col: str | None = None, caption_field: str | None = None
) -> list[Row]:
    path = Path(src)
    if path.is_dir():
        return folder_rows(path, caption_field)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return table_rows(path, image_col, caption_col)
    if not path.exists():
        raise DataError(f"input not found: {src}")
    raise DataError(f"{src}: expected a folder of images or a table ({', '.join(TABLE_SUFFIXES)})")
