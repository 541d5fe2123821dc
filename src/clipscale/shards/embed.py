"""`clipscale shards embed`: every sample's image and text embedding and CLIP score, by a trained model,
written into a copy of the shards (shards/embeddings.py says where).

Each input shard becomes one output shard of the same name with the same samples, keys and members,
plus the embeddings; a sample the model cannot read (no image, an undecodable one, no caption) is
left out and counted, as training would skip it. Images take the model's evaluation transform
(resize, centre crop). Resumable: a shard whose sidecar exists is done and is not redone, and an
output shard depends only on its input shard and the model, so a resumed run writes what an
uninterrupted one would. Under torchrun every rank takes every world-th shard; the manifest is
written once all are done.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from ..job import workers as worker_processes
from ..job.distributed import all_gather_object, barrier, broadcast_object, init_distributed
from ..wds.manifest import ShardRecord, read_index
from ..wds.schema import IMAGE_KEYS, Skip, caption_of, image_bytes
from ..wds.tar import iter_raw_samples
from ..wds.urls import shard_name
from .embeddings import (
    IMAGE_MEMBER,
    SCORE_MEMBER,
    TEXT_MEMBER,
    ShardEmbeddings,
    finish_folder,
    npy_bytes,
    output_folder,
    output_names,
    prepare_output,
    read_info,
    sidecar_path,
    write_info,
)
from .scan import shard_urls
from .writer import write_shard

log = logging.getLogger("clipscale")


class ShardBatches(IterableDataset):
    """The samples of some shards as model inputs, a batch at a time, each tagged with its shard; the
    last batch of a shard says so (and why the shard ended early, if it did). Workers split by shard."""

    def __init__(self, urls: list[tuple[int, str]], transform, tokenizer, batch_size: int, fields: SampleFields):
        self.urls, self.transform, self.tokenizer, self.batch_size = urls, transform, tokenizer, batch_size
        self.fields = fields

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for n, (index, url) in enumerate(self.urls):
            if n % workers == worker:
                yield from self.shard(index, url)

    def shard(self, index: int, url: str):
        errors: list[Exception] = []
        batch: list[tuple] = []
        skipped: Counter = Counter()
        for raw in iter_raw_samples(url, errors.append, read_timeout=self.fields.read_timeout):
            try:
                batch.append((raw, *self.prepare(raw)))
            except Skip as skip:
                skipped[skip.reason] += 1
            if len(batch) == self.batch_size:
                yield self.collate(index, batch, skipped, last=False)
                batch, skipped = [], Counter()
        error = f"{type(errors[0]).__name__}: {errors[0]}"[:300] if errors else None
        yield self.collate(index, batch, skipped, last=True, error=error)

    def prepare(self, raw: dict) -> tuple:
        data = image_bytes(raw, self.fields.image_keys)
        if data is None:
            raise Skip("no_image")
        text = caption_of(raw, self.fields.caption_key, self.fields.caption_json_field)
        try:
            with Image.open(io.BytesIO(data)) as img:
                image = self.transform(img.convert("RGB"))
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise Skip("corrupt_image", type(exn).__name__) from None
        return image, text, hashlib.sha1(data).hexdigest()

    def collate(self, index: int, batch: list, skipped: Counter, last: bool, error: str | None = None) -> dict:
        return {
            "shard": index,
            "raw": [b[0] for b in batch],
            "images": torch.stack([b[1] for b in batch]) if batch else None,
            "texts": self.tokenizer([b[2] for b in batch]) if batch else None,
            "captions": [b[2] for b in batch],
            "sha1": [b[3] for b in batch],
            "skipped": dict(skipped),
            "last": last,
            "error": error,
        }


@dataclass
class SampleFields:
    """Where a sample's image and caption are, as the trainer's data section says (data.image_keys,
    data.caption_key, data.caption_json_field), and how long a stalled read may take."""

    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_key: str = "txt"
    caption_json_field: str = "caption"
    read_timeout: float | None = 600


class Embedder:
    """The model's normalised embeddings and CLIP scores of a batch (no gradient, bf16 autocast on GPUs)."""

    def __init__(self, model, device: torch.device, dtype: str):
        self.model, self.device, self.dtype = model.eval(), device, np.dtype(dtype)
        self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            image = self.model.encode_image(images.to(self.device, non_blocking=True), normalize=True).float()
            text = self.model.encode_text(texts.to(self.device, non_blocking=True), normalize=True).float()
        score = (image * text).sum(-1)
        return image.cpu().numpy(), text.cpu().numpy(), score.cpu().numpy().astype(np.float32)


class ShardWriter:
    """Collects one shard's batches and writes the shard and its sidecar when its last batch comes."""

    def __init__(self, out: Path, names: dict[int, str], embedder: Embedder):
        self.out, self.names, self.embedder, self.parts = out, names, embedder, {}

    def add(self, batch: dict) -> dict | None:
        """None, or {shard, record | error, skipped} when the batch finished its shard."""
        parts = self.parts.setdefault(batch["shard"], {"raw": [], "rows": [], "skipped": Counter()})
        parts["skipped"].update(batch["skipped"])
        if batch["raw"]:
            image, text, score = self.embedder(batch["images"], batch["texts"])
            parts["raw"] += batch["raw"]
            parts["rows"] += list(zip(image, text, score, batch["captions"], batch["sha1"]))
        if not batch["last"]:
            return None
        del self.parts[batch["shard"]]
        result = {"shard": batch["shard"], "skipped": parts["skipped"], "samples": len(parts["raw"])}
        if batch["error"]:  # a truncated or unreadable input shard: not written, tried again by the next run
            return {**result, "error": batch["error"]}
        return {**result, "record": self.write(self.names[batch["shard"]], parts)}

    def write(self, name: str, parts: dict) -> ShardRecord:
        """NAME.tar (the samples with their new members), then NAME.emb.npz: the shard is done."""
        dtype, rows, scale = self.embedder.dtype, parts["rows"], self.embedder.logit_scale
        image = np.stack([r[0] for r in rows]).astype(dtype) if rows else np.zeros((0, 0), dtype)
        text = np.stack([r[1] for r in rows]).astype(dtype) if rows else np.zeros((0, 0), dtype)
        score = np.array([r[2] for r in rows], dtype=np.float32)
        samples = []
        for i, raw in enumerate(parts["raw"]):
            sample = {k: v for k, v in raw.items() if k != "__url__"}
            sample[IMAGE_MEMBER], sample[TEXT_MEMBER] = npy_bytes(image[i]), npy_bytes(text[i])
            sample[SCORE_MEMBER] = json_bytes({"clip_score": round(float(score[i]), 7), "logit_scale": scale})
            samples.append(sample)
        record = write_shard(self.out / name, samples)
        ShardEmbeddings(
            np.array([s["__key__"] for s in samples], dtype=str), image, text, score,
            np.array([len(r[3].split()) for r in rows], dtype=np.int32), np.array([r[4] for r in rows], dtype=str),
            record.sha256,
        ).save(sidecar_path(self.out / name))  # fmt: skip
        return record


def json_bytes(value: dict) -> bytes:
    import json

    return json.dumps(value, sort_keys=True).encode()


def claim_output(out: Path, identity: dict, overwrite: bool) -> bool:
    """The output folder for this embedding: True when it continues an earlier run of the same one."""
    earlier = read_info(out)
    same = bool(earlier) and all(earlier.get(k) == v for k, v in identity.items())
    if same and not overwrite:
        return True
    if earlier and not overwrite:
        raise DataError(
            f"{out} holds an embedding of {earlier.get('input')} by {earlier.get('checkpoint')}, not of this input "
            "and checkpoint: pass --overwrite or another folder"
        )
    prepare_output(out, overwrite, "shards embed")
    write_info(out, identity)
    return False


def manifest_records(out: Path, names: list[str]) -> list[ShardRecord]:
    """The finished output shards' records, from their sidecars (no tar read again)."""
    records = []
    for name in names:
        path = out / name
        if sidecar_path(path).is_file() and path.is_file():
            done = ShardEmbeddings.load(sidecar_path(path), vectors=False)
            records.append(ShardRecord(name, len(done), path.stat().st_size, done.tar_sha256))
    return records


def embed_shards(
    source: str, output: str, checkpoint: str, model: str | None = None, batch_size: int = 256, workers: int = 2,
    device: str = "auto", overwrite: bool = False, dtype: str = "float32", progress: bool = True,
    fields: SampleFields | None = None, config_dirs: list | None = None, ema: bool = False,
) -> dict:  # fmt: skip
    """Embed every shard of `source` into `output`; returns the summary (this rank's and the job's)."""
    from ..checkpoint.weights import model_from_checkpoint

    if batch_size < 1 or workers < 0:
        raise DataError(f"shards embed: --batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    env = init_distributed(device)
    urls, _ = shard_urls(source)
    names = output_names(urls)
    out = output_folder(output, urls, "shards embed")
    bundle, info = model_from_checkpoint(checkpoint, model, env.device, ema=ema, config_dirs=config_dirs)
    identity = {"input": _absolute(source), "checkpoint": str(info["source"]), "model": info["model_name"],
                "ema": ema, "dtype": dtype}  # fmt: skip
    error, resumed = None, False
    if env.is_main:
        try:
            resumed = claim_output(out, identity, overwrite)
        except DataError as exn:
            error = str(exn)
    error, resumed = broadcast_object((error, resumed))
    if error:
        raise DataError(error)
    mine = [(i, u) for i, u in enumerate(urls) if i % env.world_size == env.rank]
    todo = [(i, u) for i, u in mine if not sidecar_path(out / names[i]).is_file()]
    started, summary = time.perf_counter(), {"shards_done_before": len(mine) - len(todo)}
    results = run_embedding(todo, names, bundle, env, out, (batch_size, workers, dtype, fields or SampleFields()),
                            progress and env.is_main)  # fmt: skip
    seconds = time.perf_counter() - started
    everyone = all_gather_object(results)
    barrier()
    failed = [r for rs in everyone for r in rs if "error" in r]
    done = [r for rs in everyone for r in rs if "record" in r]
    records = manifest_records(out, list(names.values())) if env.is_main and not failed else None
    if records is not None and not sum(r.samples for r in records):
        raise DataError(f"no sample of {source} could be embedded (skipped: {dict(_skipped(everyone))}): check "
                        "--image-keys / --caption-key / --caption-json-field")  # fmt: skip
    if records is not None:
        finish_folder(out, records, {**identity, "dim": _dim(out, names)})
    skipped = _skipped(everyone)
    summary.update(
        shards=len(urls), written=len(done), resumed=resumed, failed=[(urls[r["shard"]], r["error"]) for r in failed],
        samples=sum(r["samples"] for r in done), skipped=dict(skipped), seconds=seconds, world_size=env.world_size,
        samples_per_s=sum(r["samples"] for r in results if "record" in r) / max(seconds, 1e-9),
        model=info["model_name"], checkpoint=str(info["source"]),
    )  # fmt: skip
    return summary


def _skipped(everyone: list[list[dict]]) -> Counter:
    skipped: Counter = Counter()
    for r in (r for rs in everyone for r in rs):
        skipped.update(r["skipped"])
    return skipped


def _absolute(source: str) -> str:
    """The input as it identifies the embedding: local paths absolute (a relative path names the same data)."""
    return str(Path(source).resolve()) if "://" not in source and not source.startswith(("pipe:", "@")) else source


def _dim(out: Path, names: dict[int, str]) -> int | None:
    for name in names.values():
        if sidecar_path(out / name).is_file():
            e = ShardEmbeddings.load(sidecar_path(out / name))
            if len(e):
                return int(e.image.shape[1])
    return None


def run_embedding(todo, names, bundle, env, out: Path, how: tuple, progress: bool):
    """This rank's shards through the model; [{shard, record | error, skipped, samples}]. `how`: (batch size,
    workers, dtype, SampleFields)."""
    batch_size, workers, dtype, fields = how
    if not todo:
        return []
    dataset = ShardBatches(todo, bundle.val_transform, bundle.tokenizer, batch_size, fields)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context=worker_processes.context(workers),
                        pin_memory=env.device.type == "cuda")  # fmt: skip
    writer = ShardWriter(out, names, Embedder(bundle.model, env.device, dtype))
    bar = _progress(todo, progress)
    results = []
    for batch in loader:
        if bar is not None:
            bar.update(len(batch["raw"]))
        result = writer.add(batch)
        if result is not None:
            results.append(result)
            if "error" in result:
                log.warning("shard %s not embedded: %s", todo_url(todo, result["shard"]), result["error"])
    if bar is not None:
        bar.close()
    return results


def todo_url(todo, index: int) -> str:
    return next(u for i, u in todo if i == index)


def _progress(todo, enabled: bool):
    """A tqdm bar over samples (the total from the input's manifest, where there is one)."""
    if not enabled:
        return None
    from tqdm import tqdm

    total = None
    try:
        from ..wds.urls import local_path

        first = local_path(todo[0][1])
        if first is not None and (Path(first).parent / "manifest.json").is_file():
            index = read_index(Path(first).parent / "manifest.json")
            total = sum(index[shard_name(u)].samples for _, u in todo if shard_name(u) in index)
    except (DataError, KeyError):
        total = None
    return tqdm(total=total, unit="sample", desc="embed", dynamic_ncols=True, mininterval=1.0)
