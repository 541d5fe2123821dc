"""Evaluation sets: an image-folder tree (root/<class>/*.jpg, ImageNet-val layout), labelled shards
(cls), or shards of image-caption pairs; each rank holds its strided share of the images. Images that
do not decode are found once at start-up, agreed on by every rank and left out."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.jpeg import decode_image
from ..errors import DataError
from ..job import workers as worker_processes
from ..job.distributed import all_gather_object
from ..job.preempt import ignore_signals, signals_blocked
from ..wds.schema import IMAGE_FILE_SUFFIXES, captions_of, image_bytes, label_of
from ..wds.shardlist import expand, require_shards_exist
from ..wds.tar import iter_raw_samples
from .errors import EvalDataError

log = logging.getLogger("clipscale.evaluate")


def _batches_needed(total: int, world: int, batch_size: int) -> int:
    """Batches of the largest share (rank 0's): every rank runs this many forwards."""
    return math.ceil(math.ceil(total / world) / batch_size) if total else 0


@dataclass
class EvalSet:
    """The images of this rank (bytes or paths) and, for every item of the whole set, its label
    or captions. `local` holds global indices into `labels` / `captions`."""

    size: int
    local: list[int] = field(default_factory=list)
    sources: list = field(default_factory=list)  # bytes | Path, one per local index
    labels: list[int] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    folder_names: list[str] | None = None
    skipped: int = 0
    largest_share: int | None = None  # images of the rank with the most (None: the strided share's)

    def batches_needed(self, world: int, batch_size: int) -> int:
        """Batches of the largest share: every rank runs this many forwards."""
        if self.largest_share is None:
            return _batches_needed(self.size, world, batch_size)
        return math.ceil(self.largest_share / batch_size)

    def drop(self, bad: set[int]) -> None:
        """Leave out the items with these global indices (the same on every rank): renumber the rest."""
        keep = [i for i in range(self.size) if i not in bad]
        new_index = {old: new for new, old in enumerate(keep)}
        if self.labels:
            self.labels = [self.labels[i] for i in keep]
        if self.captions:
            self.captions = [self.captions[i] for i in keep]
        kept = [(new_index[i], s) for i, s in zip(self.local, self.sources) if i not in bad]
        self.local, self.sources = [i for i, _ in kept], [s for _, s in kept]
        self.size, self.skipped = len(keep), self.skipped + len(bad)


def folder_set(root: Path, share: tuple[int, int]) -> EvalSet:
    """root/<class>/*.jpg; classes in sorted folder order (ImageNet-val: sorted WordNet ids)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise EvalDataError(f"eval.zeroshot: {root} has no class folders (expected root/<class>/*.jpg)")
    files = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_FILE_SUFFIXES
    ]
    if not files:
        raise EvalDataError(f"eval.zeroshot: no images under {root}/<class>/")
    out = EvalSet(size=len(files), labels=[label for _, label in files], folder_names=classes)
    r, w = share
    out.local = list(range(r, len(files), w))
    out.sources = [files[i][0] for i in out.local]
    return out


def shard_set(pattern: str, share: tuple[int, int], need: str) -> EvalSet:
    """Samples of the shards in `pattern`; `need` = "label" (zero-shot) or "captions" (retrieval).
    Samples without an image or without what is needed are counted in `skipped`."""
    try:
        urls = expand(pattern, "the evaluation set")
        require_shards_exist(urls, "evaluation shard")
    except DataError as exn:
        raise EvalDataError(str(exn)) from None
    errors: list[str] = []
    out = EvalSet(size=0)
    groups: dict[str, int] = {}
    r, w = share
    for url in urls:
        for sample in iter_raw_samples(url, on_error=lambda e, u=url: errors.append(f"{u}: {e}")):
            image = image_bytes(sample)
            if image is None:
                out.skipped += 1
                continue
            if need == "label":
                label = label_of(sample)
                if label is None:
                    out.skipped += 1
                    continue
                index, out.size = out.size, out.size + 1
                out.labels.append(label)
            else:
                captions = captions_of(sample)
                if not captions:
                    out.skipped += 1
                    continue
                digest = hashlib.sha1(image).hexdigest()
                if digest in groups:  # the same picture again: one more caption of it
                    out.captions[groups[digest]].extend(captions)
                    continue
                index, out.size = out.size, out.size + 1
                groups[digest] = index
                out.captions.append(captions)
            if index % w == r:
                out.local.append(index)
                out.sources.append(image)
    if errors:
        raise EvalDataError(f"unreadable evaluation shard {errors[0]}")
    if out.size == 0:
        raise EvalDataError(f"no usable samples in {pattern!r} (need an image and a {need})")
    return out


def load_eval_set(source: str, need: str, share: tuple[int, int]) -> EvalSet:
    path = Path(source)
    if path.is_dir():
        if need != "label":
            raise EvalDataError(f"eval.retrieval must be shards of image-caption pairs, not a folder: {source}")
        return folder_set(path, share)
    return shard_set(source, share, need)


class _Images(Dataset):
    """(image tensor, 1) per source; (a blank image, 0) where it cannot be read or decoded.
    With `check`, only whether it decodes: ("" or the error, its position)."""

    def __init__(self, sources: list, transform: Callable, check: bool = False):
        self.sources, self.transform, self.check = sources, transform, check

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src = self.sources[i]
        try:
            image = self.transform(decode_image(src if isinstance(src, bytes) else Path(src).read_bytes()))
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad bytes
            if self.check:
                return f"{type(exn).__name__}: {str(exn)[:100]}", i
            return self.transform(Image.new("RGB", (32, 32))), 0  # the transform gives it the model's shape
        return ("", i) if self.check else (image, 1)


def shielded_loader(dataset: Dataset, signals: Sequence[str] = (), **kwargs) -> Iterator:
    """Iterate a DataLoader whose workers ignore the preemption signals (and die with this process);
    they fork with the signals blocked, so no signal can reach them before they ignore it."""
    workers = kwargs.get("num_workers", 0)
    init = functools.partial(ignore_signals, tuple(signals)) if workers else None
    context = worker_processes.context(workers)
    loader = DataLoader(dataset, worker_init_fn=init, multiprocessing_context=context, **kwargs)
    with signals_blocked(signals if workers else ()):
        iterator = iter(loader)
    yield from iterator


def model_image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return (3, *size)


def leave_out_undecodable(ev: EvalSet, transform: Callable, what: str, workers: int, signals: Sequence[str]) -> None:
    """Collective: decode this rank's images once, agree on the bad ones with every rank, drop them."""
    bad_here: list[tuple[int, str]] = []
    if ev.sources:
        batches = shielded_loader(
            _Images(ev.sources, transform, check=True),
            signals,
            batch_size=64,
            num_workers=workers,
            collate_fn=list,
        )
        for batch in batches:
            bad_here.extend((ev.local[i], error) for error, i in batch if error)
    bad: dict[int, str] = {}
    for part in all_gather_object(bad_here):
        bad.update(part)
    if bad:
        first = min(bad)
        log.warning(
            "%s: %d image(s) cannot be decoded and are left out of the evaluation (item %d: %s)",
            what,
            len(bad),
            first,
            bad[first],
        )
        ev.drop(set(bad))
        if ev.size == 0:
            raise EvalDataError(f"{what}: none of the images can be decoded")
    ev.largest_share = max(all_gather_object(len(ev.local)))
