"""Zero-shot classification and image-text retrieval, during training and for any checkpoint.

Zero-shot: class names + prompt templates → open_clip's `build_zero_shot_classifier` (mean of
the normalised template embeddings per class) → top-1/top-5 over an image-folder tree
(`root/<class>/*.jpg`, ImageNet-val layout) or labelled shards (`cls`). Retrieval: image→text
and text→image Recall@1/5/10 over held-out shards; all captions of an image count as matches
(several captions come from a `captions` list in the .json, or from samples whose image bytes
are identical).

Every rank encodes an equal, strided share of the images and of the captions (padded to the
same number of batches, because ZeRO-3 forwards are collective), the features are gathered and
every rank computes the same numbers. The model runs in eval mode under no_grad, and the RNG
states are put back afterwards, so evaluating never changes training (resume stays exact).

Images that cannot be decoded are found when the sets are loaded (each rank decodes its share
once), agreed on by every rank and left out (`eval/*_skipped`): one bad file must not make one
rank fail hours into training while the others wait for it in a collective. An image that goes
bad later (a file changed on disk) is encoded as a blank image and counted (`eval/decode_errors`).
DataLoader workers ignore the preemption signals, like the training data's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import EvalConfig
from .data.jpeg import decode_image
from .distributed import all_gather_object, rank, world_size
from .errors import DataError, UserError
from .preempt import ignore_signals, signals_blocked, worker_start_method
from .prompts import builtin_classes, builtin_templates
from .wds.schema import IMAGE_FILE_SUFFIXES, captions_of, image_bytes, label_of
from .wds.shardlist import expand, require_shards_exist
from .wds.tar import iter_raw_samples

RECALL_AT = (1, 5, 10)
log = logging.getLogger(__name__)


class EvalDataError(UserError):
    """An evaluation set or class list that cannot be used."""


# --------------------------------------------------------------------------- class names, templates


def _read_list_file(path: str, what: str) -> object:
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"{what}: {path} is neither a built-in name nor a file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exn:
            raise EvalDataError(f"{what}: {path} is not valid YAML/JSON ({str(exn).splitlines()[0]})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_classes_and_templates(
    classes: str | None, templates: str | None, folder_names: list[str] | None = None
) -> tuple[list[str], list]:
    """Class names and templates from built-in names (imagenet, digits | openai, simple, digits)
    or files (.txt: one per line; .yaml/.json: a list, or {classnames: [...], templates: [...]}).
    Without `classes`, an image-folder tree's folder names are the class names."""
    file_templates = None
    if classes is None:
        if folder_names is None:
            raise EvalDataError("eval.zeroshot_classes is needed for labelled shards (a file or 'imagenet')")
        names = [n.replace("_", " ") for n in folder_names]
    else:
        names = builtin_classes(classes)
        if names is None:
            data = _read_list_file(classes, "eval.zeroshot_classes")
            if isinstance(data, dict):
                file_templates = data.get("templates")
                data = data.get("classnames", data.get("classes"))
            if not isinstance(data, list) or not data or not all(isinstance(c, str) for c in data):
                raise EvalDataError(f"eval.zeroshot_classes: {classes} must hold a list of class names")
            names = data
    if templates is None:
        chosen = file_templates or builtin_templates("openai")
    else:
        chosen = builtin_templates(templates)
        if chosen is None:
            data = _read_list_file(templates, "eval.zeroshot_templates")
            if isinstance(data, dict):
                data = data.get("templates")
            if not isinstance(data, list) or not data or not all(isinstance(t, str) and "{}" in t for t in data):
                raise EvalDataError(f"eval.zeroshot_templates: {templates} must hold a list of templates with '{{}}'")
            chosen = data
    return names, chosen


# --------------------------------------------------------------------------- evaluation sets


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
    init = functools.partial(ignore_signals, tuple(signals)) if workers and signals else None
    loader = DataLoader(dataset, worker_init_fn=init, multiprocessing_context=worker_start_method(workers), **kwargs)
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


# --------------------------------------------------------------------------- encoding


@contextlib.contextmanager
def preserved_rng():
    """Put every RNG back as it was: evaluation must not shift training's random stream."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def _batches_needed(total: int, world: int, batch_size: int) -> int:
    """Batches of the largest share (rank 0's): every rank runs this many forwards."""
    return math.ceil(math.ceil(total / world) / batch_size) if total else 0


class Encoder:
    """Image and text features of one model, computed in equal numbers of batches on every rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        transform: Callable,
        tokenizer: Callable,
        device: torch.device,
        batch_size: int = 64,
        workers: int = 0,
        autocast: Callable = contextlib.nullcontext,
        signals: Sequence[str] = (),
    ):
        self.model, self.transform, self.tokenizer = model, transform, tokenizer
        self.device, self.batch_size, self.workers, self.autocast = device, batch_size, workers, autocast
        self.signals = tuple(signals)
        self.decode_errors = 0  # images that decoded at start-up but not now (encoded blank)

    def images(self, ev: EvalSet) -> torch.Tensor:
        """Normalised features of the whole set [size, d], gathered from every rank."""
        loader = shielded_loader(
            _Images(ev.sources, self.transform),
            self.signals,
            batch_size=self.batch_size,
            num_workers=self.workers if ev.sources else 0,
        )
        feats = []
        for images, ok in loader:
            self.decode_errors += int((ok == 0).sum())
            feats.append(self._encode_images(images))
        self._pad(len(feats), ev.batches_needed(world_size(), self.batch_size), "image")
        local = torch.cat(feats) if feats else torch.empty(0)
        return _assemble(local, ev.local, ev.size)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised features of `texts` [n, d]; every rank encodes a strided share."""
        r, w = rank(), world_size()
        mine = list(range(r, len(texts), w))
        feats = [
            self._encode_texts([texts[i] for i in mine[s : s + self.batch_size]])
            for s in range(0, len(mine), self.batch_size)
        ]
        self._pad(len(feats), _batches_needed(len(texts), w, self.batch_size), "text")
        local = torch.cat(feats) if feats else torch.empty(0)
        return _assemble(local, mine, len(texts))

    def classifier(self, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
        """[d, classes]: per class, the mean of its normalised template embeddings, normalised."""
        texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
        feats = self.texts(texts).reshape(len(classnames), len(templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1).T

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        with self.autocast():  # (weights may be bf16/fp16 under DeepSpeed: feed them their dtype)
            out = self.model.encode_image(images.to(self.device, dtype=dtype), normalize=True)
        return out.float().cpu()

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        with self.autocast():
            out = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
        return out.float().cpu()

    def _pad(self, done: int, needed: int, kind: str) -> None:
        """Forwards a rank with a smaller share still runs, so collective (ZeRO-3) forwards pair up."""
        if world_size() == 1:
            return
        for _ in range(needed - done):
            if kind == "image":
                self._encode_images(torch.zeros(1, *model_image_shape(self.model)))
            else:
                self._encode_texts(["padding"])


def _assemble(local: torch.Tensor, indices: list[int], size: int) -> torch.Tensor:
    parts = all_gather_object((indices, local))
    dim = next((f.shape[1] for _, f in parts if f.numel()), 0)
    out = torch.zeros(size, dim)
    for idx, feats in parts:
        if idx:
            out[torch.tensor(idx)] = feats
    return out


# --------------------------------------------------------------------------- metrics


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(
    image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """i2t: an image is a hit at k when any of its captions is among its k best texts;
    t2i: a caption is a hit at k when its image is among its k best images."""
    sims = image_feats @ text_feats.T  # [images, texts]
    n_img, n_txt = sims.shape
    match = torch.zeros(n_img, n_txt, dtype=torch.bool)
    match[text_to_image, torch.arange(n_txt)] = True
    out = {}
    i2t_order = sims.argsort(dim=1, descending=True, stable=True)
    first_hit_i2t = match.gather(1, i2t_order).float().argmax(dim=1)  # rank of the best matching text
    t2i_order = sims.T.argsort(dim=1, descending=True, stable=True)
    first_hit_t2i = (t2i_order == text_to_image[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_r{k}"] = (first_hit_i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (first_hit_t2i < k).float().mean().item()
    return out


# --------------------------------------------------------------------------- the evaluations


class Evaluator:
    """Loads the evaluation sets once; `run(model)` returns {"eval/...": value}."""

    def __init__(
        self,
        spec: EvalConfig,
        transform: Callable,
        tokenizer: Callable,
        device: torch.device,
        signals: Sequence[str] = (),
    ):
        """Collective: loads every rank's share of the sets and leaves out the images that do not decode.
        `signals`: the preemption signals the DataLoader workers must ignore."""
        self.spec, self.transform, self.tokenizer, self.device = spec, transform, tokenizer, device
        self.signals = tuple(signals)
        share = (rank(), world_size())
        self.zeroshot_set = self.retrieval_set = None
        if spec.zeroshot:
            self.zeroshot_set = load_eval_set(spec.zeroshot, "label", share)
            leave_out_undecodable(self.zeroshot_set, transform, "eval.zeroshot", spec.workers, self.signals)
            self.classnames, self.templates = load_classes_and_templates(
                spec.zeroshot_classes, spec.zeroshot_templates, self.zeroshot_set.folder_names
            )
            bad = [label for label in self.zeroshot_set.labels if not 0 <= label < len(self.classnames)]
            if bad:
                raise EvalDataError(
                    f"eval.zeroshot: label {bad[0]} is outside the {len(self.classnames)} "
                    f"class names of {spec.zeroshot_classes or 'the class folders'}"
                )
        if spec.retrieval:
            self.retrieval_set = load_eval_set(spec.retrieval, "captions", share)
            leave_out_undecodable(self.retrieval_set, transform, "eval.retrieval", spec.workers, self.signals)

    def run(self, model: torch.nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        enc = Encoder(
            model,
            self.transform,
            self.tokenizer,
            self.device,
            self.spec.batch_size,
            self.spec.workers,
            autocast,
            self.signals,
        )
        out: dict[str, float] = {}
        with preserved_rng(), eval_mode(model):
            if self.zeroshot_set is not None:
                ev = self.zeroshot_set
                classifier = enc.classifier(self.classnames, self.templates)
                acc = topk_accuracy(enc.images(ev) @ classifier, torch.tensor(ev.labels), (1, 5))
                out.update(
                    {
                        "eval/zeroshot_top1": acc[1],
                        "eval/zeroshot_top5": acc[5],
                        "eval/zeroshot_images": ev.size,
                        "eval/zeroshot_skipped": ev.skipped,
                    }
                )
            if self.retrieval_set is not None:
                ev = self.retrieval_set
                texts = [c for caps in ev.captions for c in caps]
                owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps])
                recall = retrieval_recall(enc.images(ev), enc.texts(texts), owner)
                out.update({f"eval/{k}": v for k, v in recall.items()})
                out.update(
                    {
                        "eval/retrieval_images": ev.size,
                        "eval/retrieval_texts": len(texts),
                        "eval/retrieval_skipped": ev.skipped,
                    }
                )
        decode_errors = sum(all_gather_object(enc.decode_errors))
        if decode_errors:
            log.warning("evaluation: %d image(s) no longer decode; they were encoded as blank images", decode_errors)
            out["eval/decode_errors"] = decode_errors
        return out


def iter_eval_rows(results: dict) -> Iterator[tuple[str, str]]:
    """(name, formatted value) rows for a printed table."""
    for key, value in results.items():
        name = key.removeprefix("eval/")
        yield name, (f"{100 * value:.2f}%" if isinstance(value, float) else str(value))


# --------------------------------------------------------------------------- any checkpoint


def model_from_checkpoint(checkpoint: str, model_name: str | None, device: torch.device, ema: bool = False):
    """(ModelBundle with the checkpoint's weights - or its EMA weights -, info) for a clipscale or
    open_clip-format checkpoint."""
    from .config import ModelConfig
    from .export import consolidated_weights
    from .model import create_model, fit_scalar_shapes

    state, info = consolidated_weights(checkpoint, ema)
    name = model_name or info["model_name"]
    if not name:
        raise EvalDataError(f"{checkpoint} does not say which model it holds: pass --model NAME")
    bundle = create_model(ModelConfig(name=name, context_length=info.get("context_length")), device=device)
    try:
        bundle.model.load_state_dict(
            fit_scalar_shapes(state, {k: v.shape for k, v in bundle.model.state_dict().items()})
        )
    except RuntimeError as exn:
        lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
        raise EvalDataError(
            f"{checkpoint} does not fit model {name!r}: {lines[1] if len(lines) > 1 else lines[0]}"[:400]
        ) from None
    return bundle, {**info, "model_name": name}
