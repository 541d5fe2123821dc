"""Typed run configuration: YAML files + dotted `key=value` overrides, validated at start-up.

One `Config` object is loaded once and passed down; nothing else parses settings. Every
mistake (unknown key, wrong type, impossible value) is a `ConfigError` whose message is one
line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .wds.schema import IMAGE_KEYS

LOSS_IMPLS = {"clip": ("local", "full", "chunked"), "siglip": ("gather", "ring")}
"""Every loss implementation by loss name; the first is what `loss.impl: auto` picks."""
LossImpl = Literal[("auto", *(i for impls in LOSS_IMPLS.values() for i in impls))]


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and logs go here."""


@dataclass
class ModelConfig:
    name: str = "clip-tiny"
    """Any open_clip model name (ViT-B-32, RN50, ...) or one of configs/models/*.json."""
    pretrained: str | None = None
    """A local checkpoint path or an open_clip pretrained tag (downloads are unavailable offline)."""
    config_dirs: list[str] = field(default_factory=list)
    """Extra folders of open_clip model JSON configs to register."""
    grad_checkpointing: bool = False
    """open_clip's activation checkpointing: recompute each block in the backward (less memory, ~30% more compute)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision; auto = bf16 on GPUs that support it, fp32 elsewhere."""
    compile: bool = False
    """Wrap the model in torch.compile (DDP engine; compilation takes minutes and needs a C++ compiler on CPU)."""
    context_length: int | None = None
    """Text tokens per caption (null: the model config's, 77 for CLIP); the tokenizer follows it."""
    patch_dropout: float = 0.0
    """FLIP patch dropout: the share of image patches dropped in training (ViT image towers; never in evaluation)."""
    pretrained_image: str | None = None
    """Load the image tower from a local file: an open_clip or clipscale checkpoint (its visual.* part), the
    tower's own state_dict, or a timm state_dict of a timm tower's trunk (LiT)."""
    pretrained_text: str | None = None
    """Load the text tower from a local open_clip or clipscale checkpoint (its text part)."""
    lock_image: bool = False
    """LiT: freeze the image tower (no gradient, no optimizer state, no weight decay, not all-reduced)."""
    lock_image_unlocked_groups: int = 0
    """Leave the last N layer groups of a locked image tower trainable."""
    lock_image_freeze_bn_stats: bool = False
    """Also freeze the BatchNorm statistics of a locked image tower (ResNet / timm towers)."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """Leave the last N layers of a locked text tower trainable."""
    lock_text_freeze_layer_norm: bool = True
    """Keep the LayerNorms of a locked text tower frozen too (also in its unlocked layers)."""


@dataclass
class SourceConfig:
    name: str = ""
    """Name of the source: metrics (data/<name>/epoch, data/<name>/samples), logs and sample_keys.jsonl use it."""
    shards: str = ""
    """The source's WebDataset shard URLs: brace patterns, several joined with '::', local paths or pipe: URLs."""
    weight: float | None = None
    """Share of every global batch taken from this source (weights are normalised to sum to 1)."""
    repeat: float | None = None
    """Instead of a weight: each sample this many times per mixture epoch (0.5: half of the source)."""
    manifest: str | None = None
    """Index with the sample counts of this source's shards (default: manifest.json / sizes.json next to them)."""


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """RandomResizedCrop area range (a fraction of the image)."""
    color_jitter: list[float] | None = None
    """Colour jitter [brightness, contrast, saturation, hue], or [strength] for [s, s, s, s/4]; null: none."""
    color_jitter_prob: float | None = None
    """Probability of applying the colour jitter (null: always when color_jitter is set)."""
    gray_scale_prob: float | None = None
    """Probability of converting an image to grayscale (null: never)."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """One-source shorthand for `data.sources`: WebDataset shard URLs (brace patterns, several joined with '::',
    local paths or pipe: URLs)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several data sets mixed by weight or repeat, each read without replacement in its own epochs (see Data
    mixtures); items are {name, shards, weight | repeat, manifest}."""
    train_num_samples: int | None = None
    """Samples per epoch; defaults to the total from the manifest(s)."""
    manifest: str | None = None
    """Index of the data.train_shards sample counts (default: manifest.json / sizes.json / *_stats.json next to
    the shards)."""
    batch_size: int = 32
    """Per-process micro-batch size."""
    workers: int = 2
    """DataLoader worker processes per rank (0 = read in the training process)."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead."""
    shuffle: bool = True
    """Permute the shards every data epoch and shuffle samples inside each block (false: read in order)."""
    shuffle_block_shards: int = 2
    """Shards interleaved together into one shuffle block (per worker stream)."""
    shuffle_buffer: int = 1000
    """Samples held in the deterministic shuffle buffer inside a block."""
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))
    """Image extensions of a sample, in the order they are looked for (the first found wins)."""
    caption_key: str = "txt"
    """Sample member holding the caption; 'json' reads `caption_json_field` from the .json."""
    caption_json_field: str = "caption"
    """Field of the sample's .json holding the caption (used when `caption_key` is missing or 'json')."""
    max_decode_errors_logged: int = 5
    """Skipped samples logged per stream with their reason (all are counted in skipped_samples)."""
    read_timeout_s: float | None = 600
    """A shard read (local or pipe:) that delivers no bytes for this long is abandoned; its unread samples are
    skipped and counted (unreadable_shard); null: wait forever."""
    storage_options: Any = None
    """Options for fsspec when shards are remote (s3://, gs://, https://), e.g. {endpoint_url: http://minio:9000,
    anon: true} or {profile: research}; null: the standard environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""
    read_retries: int = 5
    """A remote read that fails is retried this often (with back-off, at the byte offset where it broke);
    then the rest of the shard is a counted skip."""
    augment: AugmentConfig | None = None
    """Training augmentation as open_clip's AugmentationCfg, e.g. {scale: [0.4, 1.0], color_jitter: [0.4],
    color_jitter_prob: 0.8, gray_scale_prob: 0.2}; null: the model's default (RandomResizedCrop, scale 0.9-1)."""
    jpeg_draft: bool = True
    """Decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) that is still at least the model's input
    size (PIL's draft): much less decode and resize work when the shards are larger than the model."""
    fast_crop: bool = True
    """Cut and resize training crops without PIL (libjpeg-turbo into an array, torch's uint8 antialiased
    resize, the DCT scale chosen against each crop): 1.7-1.9x the samples per worker at 224 px, the same
    distribution of crops (another random stream), pixels within 2 levels of PIL's; false: open_clip's PIL
    transform, bitwise."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate of AdamW (after warm-up)."""
    weight_decay: float = 0.2
    """AdamW weight decay; gains, biases, embeddings and the temperature are never decayed."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (feature-cached: the loss is over the whole batch)."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    fused: bool = True
    """torch's fused AdamW kernel (CUDA and CPU): one pass over all parameters instead of a loop
    of small operations per tensor."""
    image_lr: float | None = None
    """Peak learning rate of the image tower (null: optim.lr)."""
    text_lr: float | None = None
    """Peak learning rate of the text tower (null: optim.lr)."""
    image_weight_decay: float | None = None
    """Weight decay of the image tower (null: optim.weight_decay)."""
    text_weight_decay: float | None = None
    """Weight decay of the text tower (null: optim.weight_decay)."""
    layer_decay: float | None = None
    """EVA-style layer-wise lr decay, e.g. 0.75: layer i of a tower of L blocks gets lr x decay^(L+1-i)
    (embeddings i=0, block j i=j+1, final norm and projection L+1); the temperature gets the full lr. null: off."""


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up: cosine, linear (both to min_lr at train.steps) or constant."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to optim.lr over this many optimizer steps."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""


@dataclass
class LossConfig:
    name: Literal["clip", "siglip"] = "clip"
    """clip: symmetric InfoNCE (softmax); siglip: the sigmoid loss with a learnable bias."""
    impl: LossImpl = "auto"
    """clip: local | full | chunked (auto = local); siglip: gather | ring (auto = gather). See Losses."""
    chunk_size: int = 4096
    """Tile size of the chunked loss on a GPU (its memory is O(chunk_size^2)); on a CPU tiles are at
    most 512 x 512, which stay in a core's cache."""


@dataclass
class EngineConfig:
    name: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    """ddp (DistributedDataParallel; plain model on one process), fsdp2 (torch's fully_shard per transformer
    block: parameters, gradients and optimizer state sharded) or deepspeed (ZeRO 0-3)."""
    zero_stage: int | None = None
    """ZeRO stage 0-3 (default: the deepspeed_config file's zero_optimization.stage, else 2)."""
    deepspeed_config: Any = None
    """Extra DeepSpeed settings: a JSON/YAML file path or an inline mapping."""
    dist_timeout_s: int = 3600
    """Collective timeout: a dead rank makes the others fail after this many seconds. Keep it above
    train.hang_timeout_s (the watchdog leaves stacks and asks for a requeue) and data.read_timeout_s."""


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    """Save a checkpoint every N optimizer steps."""
    resume: str = "none"
    """none | auto (latest checkpoint of the run directory, if any) | a checkpoint path."""
    keep_last: int = 3
    """Checkpoints kept on disk (0 = keep all)."""
    async_save: bool = field(default=False, metadata={"key": "async"})
    """Write checkpoints in a background thread while training goes on (ddp engine)."""
    save_final: bool = True
    """Save a checkpoint after the last step (a preempted run always saves)."""
    remote: str | None = None
    """Mirror every checkpoint to this object-store URL (e.g. s3://bucket/run-x), in the background with
    checkpoint.async; resume=auto in an empty run directory downloads the remote latest (see Storage)."""
    storage_options: Any = None
    """fsspec options for checkpoint.remote (null: the standard environment, AWS_ENDPOINT_URL, AWS_PROFILE, ...);
    data.storage_options do not apply to checkpoints."""


@dataclass
class WandbConfig:
    project: str = "clipscale"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user; null: your default)."""
    name: str | None = None
    """Run name shown in W&B (null: W&B picks one)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline writes RUN_DIR/wandb/ without network (upload later with `wandb sync`)."""


@dataclass
class LoggingConfig:
    every_n_steps: int = 10
    """Write a metrics.jsonl record (and the console line) every N optimizer steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard."""
    sample_keys: bool = False
    """Every rank appends {step, rank, keys} lines to sample_keys.jsonl."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    wandb: WandbConfig | None = None
    """Also log to Weights & Biases (rank 0): {project, entity, name, tags, mode}; null: off."""


@dataclass
class EMAConfig:
    decay: float | None = None
    """Keep an exponential moving average of the weights with this decay, e.g. 0.9999; null: off."""
    every_n_steps: int = 1
    """Update the average every N optimizer steps."""
    warmup: bool = True
    """Ramp the decay up as min(decay, (1 + k) / (10 + k)) over the first updates k."""


@dataclass
class DistillConfig:
    model: str | None = None
    """Teacher: any open_clip model name (null: no distillation)."""
    checkpoint: str | None = None
    """The teacher's weights: a local open_clip or clipscale checkpoint file."""
    weight: float = 1.0
    """The distillation loss is added to the contrastive loss with this weight."""


@dataclass
class SpikeGuardConfig:
    factor: float = 3.0
    """A loss above factor x the median of the recent losses counts as a spike."""
    window: int = 100
    """Steps whose losses make the median."""
    patience: int = 3
    """Consecutive spiking steps before the run rolls back."""
    skip_batches: int = 200
    """Global batches of data consumed without training after a rollback (the data that led into the spike)."""
    max_rollbacks: int = 3
    """More rollbacks than this within `within_steps` steps stop the run with an error."""
    within_steps: int = 1000
    """The span of steps max_rollbacks counts in."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Total optimizer steps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the process's GPU when there is one (LOCAL_RANK), else the CPU."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss (each is skipped)."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    """Signals that make every rank checkpoint after the current step and exit."""
    hang_timeout_s: float | None = 1800
    """A rank that finishes no step for this long writes its stacks to RUN_DIR/hang/ and exits (status hung,
    requeued by clipscale supervise); null: no watchdog."""
    hang_grace_s: float = 3000
    """What the watchdog allows the first step, checkpoint saves and loads, and evaluations instead (keep it
    below engine.dist_timeout_s, or a collective times out first)."""
    spike_guard: SpikeGuardConfig | None = None
    """Roll back to the latest checkpoint and skip data when the loss spikes, e.g. {factor: 3.0, window: 100,
    patience: 3, skip_batches: 200}; null: off."""


@dataclass
class EvalConfig:
    every_n_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end of the run, see at_end)."""
    at_end: bool = True
    """Evaluate after the last step (when a zero-shot or retrieval set is given)."""
    zeroshot: str | None = None
    """Zero-shot set: an image-folder tree root/<class>/*.jpg (ImageNet-val layout) or labelled shards (cls)."""
    zeroshot_classes: str | None = None
    """Class names: imagenet | digits | a .txt/.yaml/.json file (default: the folder names)."""
    zeroshot_templates: str | None = None
    """Prompt templates: openai | simple | digits | a file (default: the classes file's, else openai)."""
    retrieval: str | None = None
    """Retrieval set: shards of image-caption pairs (several captions per image count together)."""
    batch_size: int = 64
    """Images (or captions) per forward when evaluating."""
    workers: int = 0
    """DataLoader workers that decode evaluation images (0: in the training process)."""
    use_ema: bool = False
    """Evaluate the EMA weights (ema.decay must be set) instead of the trained ones."""


@dataclass
class Config:
    seed: int = 0
    """Seeds model initialisation, the data order (with the data epoch) and augmentation."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# --------------------------------------------------------------------------- key plumbing


def yaml_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field (a field may alias a Python keyword, e.g. `async`)."""
    return f.metadata.get("key", f.name)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {yaml_key(f): f for f in dataclasses.fields(cls)}


def field_type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; convert the harmless cases (int → float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}' must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            + (_suggest(str(value), map(str, choices)) if isinstance(value, str) else "")
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"'{key}' must be a list of mappings, got {value!r}")
            return [_new(item_tp, v, f"{key}.{i}.") for i, v in enumerate(value)]
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            value = [value] if value is not None and not isinstance(value, dict) else value
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be {type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {tp}")


def _new(cls, data: dict, prefix: str):
    """A `cls` dataclass (a list item such as a data source) from a mapping."""
    obj = cls()
    _apply(obj, data, prefix)
    return obj


def _apply_to_items(items: list, item_tp, data: dict, prefix: str) -> None:
    """`data.sources.1.weight=0.2`: set fields of list items by index; the next index appends one."""
    for index, value in data.items():
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise ConfigError(
                f"'{prefix}{index}': expected an item number 0..{len(items)} of '{prefix[:-1]}'"
            ) from None
        if not 0 <= i <= len(items):
            raise ConfigError(
                f"'{prefix}{i}': '{prefix[:-1]}' has {len(items)} item(s); the next one is {prefix}{len(items)}"
            )
        if i == len(items):
            items.append(_new(item_tp, value if value is not None else {}, f"{prefix}{i}."))
        else:
            _apply(items[i], value if value is not None else {}, f"{prefix}{i}.")


def _apply(obj, data: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from a nested mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = _fields(type(obj))
    hints = field_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown key '{full}'{_suggest(str(key), fields, prefix)}; valid keys: "
                + ", ".join(prefix + k for k in fields)
            )
        f = fields[key]
        current = getattr(obj, f.name)
        item_tp = _dataclass_items(hints[f.name])
        optional_tp = _optional_dataclass(hints[f.name])
        if optional_tp is not None:  # a settings group that may be off (null)
            if value is None or value is False:
                setattr(obj, f.name, None)
            else:
                group = current if current is not None else optional_tp()
                _apply(group, {} if value is True else value, full + ".")
                setattr(obj, f.name, group)
        elif dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, full + ".")
        elif item_tp is not None and isinstance(value, dict):
            _apply_to_items(current, item_tp, value, full + ".")
        else:
            setattr(obj, f.name, _coerce(full, value, hints[f.name]))


def _optional_dataclass(tp):
    """The dataclass of an `X | None` annotation where X is a dataclass, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]) and type(None) in typing.get_args(tp):
            return args[0]
    return None


def _dataclass_items(tp):
    """The item dataclass of a `list[SomeDataclass]` annotation, else None."""
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exn:
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: say why it is not one
            problem = str(exn).splitlines()[0] if str(exn) else "parse error"
            raise ConfigError(
                f"override '{key}': the value is not valid YAML ({problem}); quote brace patterns "
                f"inside lists and mappings, e.g. {{name: x, shards: '/d/x-{{0..9}}.tar'}}"
            ) from None
        value = raw  # a plain string such as a brace pattern: /data/x-{000..009}.tar
    return key, value


def to_dict(cfg) -> dict:
    """The config as a plain nested dict with YAML key names."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            v = [to_dict(item) for item in v]
        out[yaml_key(f)] = v
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML `path` (optional), apply dotted overrides, validate; ConfigError on any problem."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        _apply(cfg, data)
    for item in overrides or []:
        key, value = _parse_override(item)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- validation

UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")


def signal_name(name: str, where: str) -> str:
    """A signal as 'SIGUSR1' from 'SIGUSR1', 'sigusr1' or 'USR1'; ConfigError for anything that
    is not a signal a process can catch."""
    import signal

    upper = str(name).strip().upper()
    full = upper if upper.startswith("SIG") else f"SIG{upper}"
    if not isinstance(getattr(signal, full, None), signal.Signals) or full in UNCATCHABLE_SIGNALS:
        raise ConfigError(
            f"'{where}' has unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM; "
            f"SIGKILL and SIGSTOP cannot be caught)"
        )
    return full


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Every impossible value or unsupported combination, with one line naming the keys."""
    _require(cfg.data.batch_size >= 1, f"'data.batch_size' must be >= 1, got {cfg.data.batch_size}")
    _require(cfg.data.workers >= 0, f"'data.workers' must be >= 0, got {cfg.data.workers}")
    _require(cfg.eval.every_n_steps >= 0, f"'eval.every_n_steps' must be >= 0, got {cfg.eval.every_n_steps}")
    _require(cfg.eval.batch_size >= 1, f"'eval.batch_size' must be >= 1, got {cfg.eval.batch_size}")
    _require(cfg.eval.workers >= 0, f"'eval.workers' must be >= 0, got {cfg.eval.workers}")
    _require(cfg.data.prefetch_factor >= 1, "'data.prefetch_factor' must be >= 1")
    _require(cfg.data.shuffle_block_shards >= 1, "'data.shuffle_block_shards' must be >= 1")
    _require(cfg.data.shuffle_buffer >= 1, "'data.shuffle_buffer' must be >= 1")
    _require(
        cfg.data.train_num_samples is None or cfg.data.train_num_samples >= 1, "'data.train_num_samples' must be >= 1"
    )
    _require(len(cfg.data.image_keys) >= 1, "'data.image_keys' must list at least one extension")
    _require(cfg.data.max_decode_errors_logged >= 0, "'data.max_decode_errors_logged' must be >= 0")
    _require(cfg.optim.lr >= 0, f"'optim.lr' must be >= 0, got {cfg.optim.lr}")
    _require(cfg.optim.weight_decay >= 0, "'optim.weight_decay' must be >= 0")
    _require(0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "'optim.beta1/beta2' must be in [0, 1)")
    _require(cfg.optim.eps > 0, "'optim.eps' must be > 0")
    _require(cfg.optim.accum_steps >= 1, f"'optim.accum_steps' must be >= 1, got {cfg.optim.accum_steps}")
    _require(
        cfg.optim.grad_clip_norm is None or cfg.optim.grad_clip_norm > 0, "'optim.grad_clip_norm' must be > 0 or null"
    )
    _require(cfg.schedule.warmup_steps >= 0, "'schedule.warmup_steps' must be >= 0")
    _require(cfg.schedule.min_lr >= 0, "'schedule.min_lr' must be >= 0")
    _require(cfg.train.steps >= 1, f"'train.steps' must be >= 1, got {cfg.train.steps}")
    _require(cfg.train.max_nonfinite_steps >= 1, "'train.max_nonfinite_steps' must be >= 1")
    _require(cfg.loss.chunk_size >= 1, "'loss.chunk_size' must be >= 1")
    impls = LOSS_IMPLS[cfg.loss.name]
    _require(
        cfg.loss.impl == "auto" or cfg.loss.impl in impls,
        f"'loss.impl' must be one of auto, {', '.join(impls)} for loss.name={cfg.loss.name}; got {cfg.loss.impl!r}",
    )
    _require(
        cfg.engine.zero_stage in (None, 0, 1, 2, 3),
        f"'engine.zero_stage' must be one of 0, 1, 2, 3; got {cfg.engine.zero_stage}",
    )
    _require(
        cfg.engine.zero_stage is None or cfg.engine.name == "deepspeed",
        f"'engine.zero_stage' is a DeepSpeed setting; set engine.name=deepspeed (now {cfg.engine.name})",
    )
    _require(
        cfg.engine.deepspeed_config is None or cfg.engine.name == "deepspeed",
        f"'engine.deepspeed_config' is a DeepSpeed setting; set engine.name=deepspeed (now {cfg.engine.name})",
    )
    _require(cfg.engine.dist_timeout_s >= 1, "'engine.dist_timeout_s' must be >= 1")
    _require(
        not (cfg.model.compile and cfg.engine.name == "deepspeed"),
        "'model.compile' is not supported with engine.name=deepspeed yet; use engine.name=ddp or model.compile=false",
    )
    _require(
        not (cfg.engine.name == "fsdp2" and cfg.model.precision == "fp16"),
        "'model.precision=fp16' is not supported with engine.name=fsdp2 (no sharded loss scaling); use bf16",
    )
    _require(
        not (cfg.checkpoint.async_save and cfg.engine.name != "ddp"),
        f"'checkpoint.async' is not supported with engine.name={cfg.engine.name} (its checkpoints are written by "
        "every rank together); set checkpoint.async=false",
    )
    _require(cfg.checkpoint.every_n_steps >= 1, "'checkpoint.every_n_steps' must be >= 1")
    _require(cfg.checkpoint.keep_last >= 0, "'checkpoint.keep_last' must be >= 0")
    _require(
        cfg.checkpoint.storage_options is None or isinstance(cfg.checkpoint.storage_options, dict),
        f"'checkpoint.storage_options' must be a mapping, got {cfg.checkpoint.storage_options!r}",
    )
    _require(
        cfg.checkpoint.remote is None or "://" in cfg.checkpoint.remote,
        f"'checkpoint.remote' must be an object-store URL such as s3://bucket/run, got {cfg.checkpoint.remote!r}",
    )
    _require(cfg.logging.every_n_steps >= 1, "'logging.every_n_steps' must be >= 1")
    _require(bool(cfg.run.dir), "'run.dir' must not be empty")
    cfg.train.preempt_signals = [signal_name(n, "train.preempt_signals") for n in cfg.train.preempt_signals]
    _require(
        cfg.train.hang_timeout_s is None or cfg.train.hang_timeout_s > 0,
        "'train.hang_timeout_s' must be > 0 or null (no watchdog)",
    )
    _require(cfg.train.hang_grace_s > 0, "'train.hang_grace_s' must be > 0")
    _require(
        cfg.data.read_timeout_s is None or cfg.data.read_timeout_s > 0, "'data.read_timeout_s' must be > 0 or null"
    )
    _require(
        cfg.data.storage_options is None or isinstance(cfg.data.storage_options, dict),
        f"'data.storage_options' must be a mapping (e.g. {{endpoint_url: ...}}), got {cfg.data.storage_options!r}",
    )
    _require(cfg.data.read_retries >= 0, "'data.read_retries' must be >= 0")
    guard = cfg.train.spike_guard
    if guard is not None:
        _require(guard.factor > 1, f"'train.spike_guard.factor' must be > 1, got {guard.factor}")
        _require(guard.window >= 5, "'train.spike_guard.window' must be >= 5")
        _require(guard.patience >= 1, "'train.spike_guard.patience' must be >= 1")
        _require(guard.skip_batches >= 0, "'train.spike_guard.skip_batches' must be >= 0")
        _require(
            guard.max_rollbacks >= 1 and guard.within_steps >= 1,
            "'train.spike_guard.max_rollbacks' and 'within_steps' must be >= 1",
        )
    validate_recipe(cfg)
    validate_sources(cfg.data)


def _share(value: float | None) -> bool:
    return value is None or 0 <= value <= 1


def validate_recipe(cfg: Config) -> None:
    """Towers, augmentation, EMA and distillation settings (the model-dependent checks are in model.py)."""
    m, o = cfg.model, cfg.optim
    _require(0 <= m.patch_dropout < 1, f"'model.patch_dropout' must be in [0, 1), got {m.patch_dropout}")
    _require(m.context_length is None or m.context_length >= 2, "'model.context_length' must be >= 2")
    _require(m.lock_image_unlocked_groups >= 0, "'model.lock_image_unlocked_groups' must be >= 0")
    _require(m.lock_text_unlocked_layers >= 0, "'model.lock_text_unlocked_layers' must be >= 0")
    for key in ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"):
        _require(not getattr(m, key) or m.lock_image, f"'model.{key}' needs model.lock_image=true")
    _require(
        not m.lock_text_unlocked_layers or m.lock_text, "'model.lock_text_unlocked_layers' needs model.lock_text=true"
    )
    for key in ("image_lr", "text_lr", "image_weight_decay", "text_weight_decay"):
        value = getattr(o, key)
        _require(value is None or value >= 0, f"'optim.{key}' must be >= 0 or null, got {value}")
    _require(
        o.layer_decay is None or 0 < o.layer_decay <= 1, f"'optim.layer_decay' must be in (0, 1], got {o.layer_decay}"
    )
    a = cfg.data.augment
    if a is not None:
        _require(
            len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
            f"'data.augment.scale' must be [min, max] with 0 < min <= max <= 1, got {a.scale}",
        )
        _require(
            a.color_jitter is None or (len(a.color_jitter) in (1, 4) and min(a.color_jitter) >= 0),
            f"'data.augment.color_jitter' must be [strength] or [brightness, contrast, saturation, hue], each >= 0; "
            f"got {a.color_jitter}",
        )
        _require(_share(a.color_jitter_prob), "'data.augment.color_jitter_prob' must be in [0, 1]")
        _require(_share(a.gray_scale_prob), "'data.augment.gray_scale_prob' must be in [0, 1]")
        _require(
            a.color_jitter_prob is None or a.color_jitter is not None,
            "'data.augment.color_jitter_prob' needs data.augment.color_jitter",
        )
    e = cfg.ema
    if e.decay is not None:
        _require(0 < e.decay < 1, f"'ema.decay' must be in (0, 1), got {e.decay}")
        _require(e.every_n_steps >= 1, "'ema.every_n_steps' must be >= 1")
        _require(
            not (cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3),
            "'ema.decay' is not supported with DeepSpeed ZeRO-3 (its parameters are partitioned); "
            "use engine.name=fsdp2",
        )
    _require(not cfg.eval.use_ema or e.decay is not None, "'eval.use_ema' needs ema.decay (an EMA to evaluate)")
    d = cfg.distill
    _require((d.model is None) == (d.checkpoint is None), "'distill.model' and 'distill.checkpoint' go together")
    if d.model is not None:
        _require(d.weight > 0, f"'distill.weight' must be > 0, got {d.weight}")
        _require(cfg.loss.name == "clip", "'distill' works with loss.name=clip (OpenCLIP's DistillClipLoss)")


def validate_sources(data: DataConfig) -> None:
    """data.sources: unique names, shards each, weights or repeats (not both kinds), all positive."""
    if not data.sources:
        return
    _require(not data.train_shards, "set either 'data.train_shards' (one source) or 'data.sources', not both")
    _require(
        data.manifest is None,
        "'data.manifest' belongs to data.train_shards; give each of data.sources its own 'manifest'",
    )
    names = [src.name for src in data.sources]
    for i, src in enumerate(data.sources):
        where = f"data.sources.{i}"
        _require(
            re.fullmatch(r"[A-Za-z0-9_.-]+", src.name) is not None,
            f"'{where}.name' must be a name of letters, digits, '_', '-' or '.'; got {src.name!r}",
        )
        _require(names.count(src.name) == 1, f"'{where}.name': the name {src.name!r} is used twice in data.sources")
        _require(bool(src.shards), f"'{where}.shards' is empty: give the source's shard URLs")
        _require(
            src.weight is None or src.repeat is None,
            f"'{where}' sets both weight and repeat; a source is mixed by one of them",
        )
        _require(
            src.weight is None or (math.isfinite(src.weight) and src.weight > 0),
            f"'{where}.weight' must be a finite number > 0, got {src.weight}",
        )
        _require(
            src.repeat is None or (math.isfinite(src.repeat) and src.repeat > 0),
            f"'{where}.repeat' must be a finite number > 0, got {src.repeat}",
        )
    weighted = [s.name for s in data.sources if s.weight is not None]
    repeated = [s.name for s in data.sources if s.repeat is not None]
    _require(
        not (weighted and repeated),
        f"data.sources mixes weights ({', '.join(weighted)}) and repeats ({', '.join(repeated)}); "
        f"use one kind for every source",
    )
    missing = [s.name for s in data.sources if s.weight is None]
    _require(
        not weighted or not missing,
        f"data.sources: {', '.join(missing)} has no weight while others have one; give every source a weight",
    )


def resolved_loss_impl(cfg: Config) -> str:
    """`loss.impl`, with auto replaced by the loss's default implementation."""
    return cfg.loss.impl if cfg.loss.impl != "auto" else LOSS_IMPLS[cfg.loss.name][0]


# --------------------------------------------------------------------------- command line


def add_config_arguments(parser) -> None:
    """`--config FILE` and `key=value` overrides on an argparse parser (clipscale train/config, and
    `python -m clipscale.train` under torchrun)."""
    parser.add_argument("--config", "-c", help="YAML run config (see configs/); defaults apply to missing keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=3e-4 data.batch_size=256 checkpoint.resume=auto"
