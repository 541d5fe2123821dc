"""What `clipscale shards embed` adds to a shard set, and how filter and dedup read and carry it.

Each sample of an embedded shard gains three members:
    {key}.img_emb.npy   the image embedding (L2-normalised, float32 or float16, numpy .npy bytes)
    {key}.txt_emb.npy   the text embedding
    {key}.clip.json     {"clip_score": image-text cosine, "logit_scale": the model's temperature}
and each shard `NAME.tar` a sidecar `NAME.emb.npz` with the same numbers for the whole shard (keys,
image, text, clip_score, caption_words, image_sha1, tar_sha256), so that a filter or a deduplication
over millions of samples reads a few arrays instead of every tar. The folder's `embeddings.json`
says which model and checkpoint made them; the sidecar of a shard is written after its tar, so a
shard without one is not finished.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fsutil import atomic_write_bytes
from ..wds.manifest import ShardRecord, write_manifest
from ..wds.schema import EMBEDDING_MEMBERS
from ..wds.tar import iter_raw_samples
from ..wds.urls import local_path
from .writer import write_shard

IMAGE_MEMBER, TEXT_MEMBER, SCORE_MEMBER = EMBEDDING_MEMBERS
INFO_NAME = "embeddings.json"
FORMAT = "clipscale-embeddings/1"
EMBED_HINT = "run `clipscale shards embed INPUT EMBEDDED --checkpoint CK` first and give EMBEDDED"


def sidecar_path(shard: str | Path) -> Path:
    """NAME.emb.npz beside NAME.tar."""
    path = Path(shard)
    return path.with_name(path.name.removesuffix(".gz").removesuffix(".tar") + ".emb.npz")


def npy_bytes(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vector, allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ShardEmbeddings:
    """One shard's sidecar: row i is the shard's i-th sample (in tar order)."""

    keys: np.ndarray  # str
    image: np.ndarray  # [n, d]
    text: np.ndarray  # [n, d]
    clip_score: np.ndarray  # [n] float32
    caption_words: np.ndarray  # [n] int32
    image_sha1: np.ndarray  # [n] str (hex): exact duplicates
    tar_sha256: str = ""

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, image=self.image, text=self.text, clip_score=self.clip_score,
                 caption_words=self.caption_words, image_sha1=self.image_sha1,
                 tar_sha256=np.array(self.tar_sha256))  # fmt: skip
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, vectors: bool = True) -> ShardEmbeddings:
        try:
            with np.load(path, allow_pickle=False) as z:
                empty = np.zeros((len(z["keys"]), 0), dtype=np.float32)
                return cls(z["keys"], z["image"] if vectors else empty, z["text"] if vectors else empty,
                           z["clip_score"], z["caption_words"], z["image_sha1"], str(z["tar_sha256"]))  # fmt: skip
        except (OSError, ValueError, KeyError) as exn:
            raise DataError(f"cannot read the embeddings {path}: {type(exn).__name__}: {exn}"[:300]) from None

    def take(self, rows: np.ndarray) -> ShardEmbeddings:
        return ShardEmbeddings(self.keys[rows], self.image[rows], self.text[rows], self.clip_score[rows],
                               self.caption_words[rows], self.image_sha1[rows])  # fmt: skip

    def __len__(self) -> int:
        return len(self.keys)


def embedded_shards(urls: list[str]) -> list[tuple[str, Path]]:
    """(shard URL, its sidecar) for every shard, or a one-line DataError naming `shards embed`."""
    pairs = []
    for url in urls:
        path = local_path(url)
        if path is None:
            raise DataError(f"{url}: filter and dedup read local shard folders; copy the embedded shards here first")
        sidecar = sidecar_path(path)
        if not sidecar.is_file():
            raise DataError(f"{url} has no embeddings ({sidecar.name} is missing): {EMBED_HINT}")
        pairs.append((url, sidecar))
    return pairs


def read_info(folder: Path) -> dict:
    path = folder / INFO_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read {path}: {exn}") from None


def write_info(folder: Path, info: dict) -> None:
    atomic_write_bytes(folder / INFO_NAME, (json.dumps({"format": FORMAT, **info}, indent=1) + "\n").encode())


def prepare_output(output: Path, overwrite: bool, what: str) -> None:
    """An output folder that holds no shards (or, with `overwrite`, whose shards are removed now)."""
    output.mkdir(parents=True, exist_ok=True)
    held = [p for p in output.iterdir() if p.name.endswith((".tar", ".emb.npz", ".tmp")) or p.name == "manifest.json"]
    if held and not overwrite:
        raise DataError(f"{what}: {output} already holds shards ({held[0].name}, ...); pass --overwrite or another one")
    for path in held:
        path.unlink()


def copy_kept(url: str, out: Path, keep: set[str], embeddings: ShardEmbeddings) -> ShardRecord | None:
    """The shard's samples whose key is in `keep`, every member as it was, into out/NAME.tar with their
    sidecar; None (nothing written) when none is kept."""
    rows = np.array([k in keep for k in embeddings.keys.tolist()], dtype=bool)
    if not rows.any():
        return None
    errors: list[Exception] = []
    kept = (s for s in iter_raw_samples(url, errors.append) if s["__key__"] in keep)
    target = out / Path(local_path(url)).name
    record = write_shard(target, kept)
    if errors:
        target.unlink()
        raise DataError(f"{url}: cannot read it again ({type(errors[0]).__name__}: {errors[0]})"[:300])
    if record.samples != int(rows.sum()):
        target.unlink()
        raise DataError(f"{url}: {record.samples} samples kept, its embeddings say {int(rows.sum())}: re-embed it")
    subset = embeddings.take(np.flatnonzero(rows))
    subset.tar_sha256 = record.sha256
    subset.save(sidecar_path(target))
    return record


def finish_folder(out: Path, records: list[ShardRecord], info: dict) -> None:
    """The embeddings info and the manifest (last: a folder with a manifest is complete)."""
    write_info(out, info)
    write_manifest(out, records)
