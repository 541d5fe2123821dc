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
from ..wds.urls import local_path, shard_name
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
    """(shard URL, its sidecar) for every shard of a finished embedding, or a one-line DataError: not
    local, not embedded (naming `shards embed`), or embedded only in part (no manifest yet)."""
    pairs, folders = [], set()
    for url in urls:
        path = local_path(url)
        if path is None:
            raise DataError(f"{url}: filter and dedup read local shard folders; copy the embedded shards here first")
        sidecar = sidecar_path(path)
        if not sidecar.is_file():
            raise DataError(f"{url} has no embeddings ({sidecar.name} is missing): {EMBED_HINT}")
        folders.add(Path(path).parent)
        pairs.append((url, sidecar))
    for folder in sorted(folders):
        if not (folder / INFO_NAME).is_file() or not (folder / "manifest.json").is_file():
            raise DataError(
                f"{folder} is an unfinished embedding (no {INFO_NAME} or manifest.json yet): run the same "
                "`clipscale shards embed` again to finish it"
            )
    return pairs


def output_name(url: str) -> str:
    """The name of the shard written for input `url`: its file name (a .tar.gz input is written as .tar)."""
    return shard_name(url).removesuffix(".gz")


def output_names(urls: list[str]) -> dict[int, str]:
    """Output shard names of the inputs, by input index (one-line error when two inputs would share one)."""
    names, seen = {}, {}
    for i, url in enumerate(urls):
        name = output_name(url)
        if name in seen:
            raise DataError(f"two input shards would both be written as {name} ({seen[name]}, {url}): "
                            "curate them into separate folders")  # fmt: skip
        names[i], seen[name] = name, url
    return names


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


OUTPUT_FILES = (".tar", ".tar.gz", ".emb.npz", ".tmp")
OUTPUT_NAMES = ("manifest.json", INFO_NAME, "filter_report.json", "filter_report.png", "dedup_report.json")


def output_folder(output: str, urls: list[str], what: str) -> Path:
    """The local output folder, never one holding an input shard (one-line errors)."""
    if "://" in output:
        raise DataError(f"{what}: OUTPUT must be a local folder (got {output}); copy the result to a bucket after")
    out = Path(output).resolve()
    for url in urls:
        path = local_path(url)
        if path is not None and Path(path).resolve().parent == out:
            raise DataError(f"{what}: OUTPUT {output} is where the input shards are; write into another folder")
    return out


def prepare_output(output: Path, overwrite: bool, what: str) -> None:
    """An output folder that holds no shards (or, with `overwrite`, whose shards and reports go now)."""
    output.mkdir(parents=True, exist_ok=True)
    held = [p for p in output.iterdir() if p.name.endswith(OUTPUT_FILES) or p.name in OUTPUT_NAMES]
    if any(p.name != INFO_NAME for p in held) and not overwrite:
        shown = next(p.name for p in held if p.name != INFO_NAME)
        raise DataError(f"{what}: {output} already holds shards ({shown}, ...); pass --overwrite or another one")
    for path in held:
        path.unlink()


def copy_kept(url: str, target: Path, rows: np.ndarray, embeddings: ShardEmbeddings) -> ShardRecord | None:
    """The shard's samples at the positions `rows` marks (its tar order is its sidecar's), every member as it
    was, into `target` with their sidecar; None (nothing written) when none is kept."""
    if not rows.any():
        return None
    errors: list[Exception] = []
    keys = embeddings.keys.tolist()

    def kept():
        for i, sample in enumerate(iter_raw_samples(url, errors.append)):
            if i >= len(keys) or sample["__key__"] != keys[i]:
                raise DataError(f"{url} and its {sidecar_path(url).name} disagree at sample {i}: re-embed it")
            if rows[i]:
                yield sample

    try:
        record = write_shard(target, kept())
    except DataError:
        target.unlink(missing_ok=True)
        raise
    if errors or record.samples != int(rows.sum()):
        target.unlink()
        why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"{record.samples} samples read back"
        raise DataError(f"{url}: cannot copy its kept samples ({why}); re-embed it"[:300])
    subset = embeddings.take(np.flatnonzero(rows))
    subset.tar_sha256 = record.sha256
    subset.save(sidecar_path(target))
    return record


def finish_folder(out: Path, records: list[ShardRecord], info: dict) -> None:
    """The embeddings info and the manifest (last: a folder with a manifest is complete)."""
    write_info(out, info)
    write_manifest(out, records)
