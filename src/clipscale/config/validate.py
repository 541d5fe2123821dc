"""Every check a config allows before anything runs: impossible values, unsupported combinations, a
model name no folder knows, a file that is not there, a DeepSpeed setting DeepSpeed does not know.
Each is a ConfigError of one line naming the key and what is allowed. Components keep only the checks
that need the running job (the built model's structure, the world size, the device).
"""

from __future__ import annotations

import importlib.util
import math
import re
import signal
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from .layout import resolve_stages
from .losses import check as check_loss
from .models import model_config, model_configs, vision_tower_kind
from .schema import Config, DataConfig

UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")


def signal_name(name: str, where: str) -> str:
    """A signal as 'SIGUSR1' from 'SIGUSR1', 'sigusr1' or 'USR1'; ConfigError for anything that
    is not a signal a process can catch."""
    upper = str(name).strip().upper()
    full = upper if upper.startswith("SIG") else f"SIG{upper}"
    if not isinstance(getattr(signal, full, None), signal.Signals) or full in UNCATCHABLE_SIGNALS:
        raise ConfigError(
            f"'{where}' has unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM; "
            f"SIGKILL and SIGSTOP cannot be caught)"
        )
    return full


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def at_least(section, key: str, low: float, where: str, or_null: bool = False) -> None:
    """`where.key` must be >= low (or null when `or_null`)."""
    value = getattr(section, key)
    if value is None and or_null:
        return
    require(
        value is not None and value >= low,
        f"'{where}.{key}' must be >= {low}{' or null' if or_null else ''}, got {value}",
    )


def validate(cfg: Config, machine: bool = True) -> None:
    """Every impossible value or unsupported combination, with one line naming the keys. With
    `machine` (a job about to run), also what this machine must have: the files the config names
    and the packages it needs; `clipscale config` and `data plan` leave those out (a login node may
    lack the GPU node's files and DeepSpeed)."""
    require(bool(cfg.run.dir), "'run.dir' must not be empty")
    check_data(cfg.data)
    check_sources(cfg.data)
    check_optim(cfg)
    check_model(cfg, machine)
    require(cfg.loss.chunk_size >= 1, f"'loss.chunk_size' must be >= 1, got {cfg.loss.chunk_size}")
    check_loss(cfg)
    check_engine(cfg, machine)
    check_checkpoint(cfg)
    check_train(cfg)
    check_eval_and_logging(cfg, machine)
    check_recipe(cfg, machine)
    check_stages(cfg)


def check_data(d: DataConfig) -> None:
    for key in ("batch_size", "prefetch_factor", "shuffle_block_shards", "shuffle_buffer"):
        at_least(d, key, 1, "data")
    for key in ("workers", "max_decode_errors_logged", "read_retries"):
        at_least(d, key, 0, "data")
    at_least(d, "train_num_samples", 1, "data", or_null=True)
    require(len(d.image_keys) >= 1, "'data.image_keys' must list at least one extension")
    require(not d.gpu_decode or d.fast_crop, "'data.gpu_decode' needs data.fast_crop=true (the crop it reproduces)")
    require(d.read_timeout_s is None or d.read_timeout_s > 0, "'data.read_timeout_s' must be > 0 or null")
    require(
        d.storage_options is None or isinstance(d.storage_options, dict),
        f"'data.storage_options' must be a mapping (e.g. {{endpoint_url: ...}}), got {d.storage_options!r}",
    )
    a = d.augment
    if a is None:
        return
    require(
        len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
        f"'data.augment.scale' must be [min, max] with 0 < min <= max <= 1, got {a.scale}",
    )
    require(
        a.color_jitter is None or (len(a.color_jitter) in (1, 4) and min(a.color_jitter) >= 0),
        f"'data.augment.color_jitter' must be [strength] or [brightness, contrast, saturation, hue], each >= 0; "
        f"got {a.color_jitter}",
    )
    for key in ("color_jitter_prob", "gray_scale_prob"):
        value = getattr(a, key)
        require(value is None or 0 <= value <= 1, f"'data.augment.{key}' must be in [0, 1]")
    require(
        a.color_jitter_prob is None or a.color_jitter is not None,
        "'data.augment.color_jitter_prob' needs data.augment.color_jitter",
    )


def check_optim(cfg: Config) -> None:
    o, s = cfg.optim, cfg.schedule
    require(o.lr >= 0, f"'optim.lr' must be >= 0, got {o.lr}")
    require(o.weight_decay >= 0, "'optim.weight_decay' must be >= 0")
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "'optim.beta1/beta2' must be in [0, 1)")
    require(o.eps > 0, "'optim.eps' must be > 0")
    at_least(o, "accum_steps", 1, "optim")
    require(o.grad_clip_norm is None or o.grad_clip_norm > 0, "'optim.grad_clip_norm' must be > 0 or null")
    for key in ("image_lr", "text_lr", "image_weight_decay", "text_weight_decay"):
        at_least(o, key, 0, "optim", or_null=True)
    require(
        o.layer_decay is None or 0 < o.layer_decay <= 1, f"'optim.layer_decay' must be in (0, 1], got {o.layer_decay}"
    )
    at_least(s, "warmup_steps", 0, "schedule")
    at_least(s, "min_lr", 0, "schedule")


def check_model(cfg: Config, machine: bool = True) -> None:
    """The model section against the model's own config (read without torch) and the file system."""
    m = cfg.model
    require(
        isinstance(m.grad_checkpointing, bool) or 0.0 <= m.grad_checkpointing <= 1.0,
        f"'model.grad_checkpointing' must be true, false or a share of the blocks in [0, 1]; "
        f"got {m.grad_checkpointing}",
    )
    for folder in m.config_dirs:
        require(Path(folder).is_dir(), f"'model.config_dirs': {folder} is not a directory")
    spec = model_config(m.name, tuple(m.config_dirs))
    if spec is None:
        import difflib

        close = difflib.get_close_matches(m.name, list(model_configs(tuple(m.config_dirs))), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown model 'model.name={m.name}'{hint}; see `clipscale models`")
    if machine:
        check_model_files(m)
    kind = vision_tower_kind(spec)
    require(0 <= m.patch_dropout < 1, f"'model.patch_dropout' must be in [0, 1), got {m.patch_dropout}")
    require(
        not m.patch_dropout or kind == "vit",
        f"'model.patch_dropout' needs an open_clip ViT image tower; {m.name}'s is a {kind} tower",
    )
    image_trains = not m.lock_image or m.lock_image_unlocked_groups > 0
    require(
        cfg.optim.layer_decay is None or not image_trains or kind != "resnet",
        f"'optim.layer_decay' needs towers of numbered transformer blocks; {m.name}'s image tower is a ResNet: "
        "set optim.layer_decay=null (or lock the image tower)",
    )
    check_locks(m, spec)


def check_model_files(m) -> None:
    """The weights files the model section names are there (an open_clip tag such as `openai` is not a file)."""
    if m.pretrained and Path(m.pretrained).suffix in WEIGHT_FILES:
        require(Path(m.pretrained).is_file(), f"'model.pretrained': file not found: {m.pretrained}")
    for tower in ("image", "text"):
        path = getattr(m, f"pretrained_{tower}")
        if path and Path(path).is_dir():
            raise ConfigError(
                f"model.pretrained_{tower}: {path} is a checkpoint folder (FSDP2 or DeepSpeed): write it as one "
                f"file first with clipscale export --checkpoint {path} --output tower.pt"
            )
        require(not path or Path(path).is_file(), f"model.pretrained_{tower}: file not found: {path}")


def check_locks(m, spec: dict) -> None:
    require(m.context_length is None or m.context_length >= 2, "'model.context_length' must be >= 2")
    require(m.lock_image_unlocked_groups >= 0, "'model.lock_image_unlocked_groups' must be >= 0")
    require(m.lock_text_unlocked_layers >= 0, "'model.lock_text_unlocked_layers' must be >= 0")
    for key in ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"):
        require(not getattr(m, key) or m.lock_image, f"'model.{key}' needs model.lock_image=true")
    require(
        not m.lock_text_unlocked_layers or m.lock_text, "'model.lock_text_unlocked_layers' needs model.lock_text=true"
    )
    # open_clip's own towers lock whole; a timm tower keeps its head and a Hugging Face text tower its
    # projection trainable (the built model is checked again: model.lock_towers)
    own_towers = vision_tower_kind(spec) != "timm" and not (spec.get("text_cfg") or {}).get("hf_model_name")
    everything_locked = (
        own_towers
        and m.lock_image
        and m.lock_text
        and not m.lock_image_unlocked_groups
        and not m.lock_text_unlocked_layers
        and m.lock_text_freeze_layer_norm
    )
    require(
        not everything_locked, "model.lock_image and model.lock_text leave no parameter to train but the temperature"
    )


def check_engine(cfg: Config, machine: bool = True) -> None:
    e = cfg.engine
    require(e.zero_stage in (None, 0, 1, 2, 3), f"'engine.zero_stage' must be one of 0, 1, 2, 3; got {e.zero_stage}")
    for key in ("zero_stage", "deepspeed_config"):
        require(
            getattr(e, key) is None or e.name == "deepspeed",
            f"'engine.{key}' is a DeepSpeed setting; set engine.name=deepspeed (now {e.name})",
        )
    at_least(e, "dist_timeout_s", 1, "engine")
    require(
        not (cfg.model.compile is True and e.name == "deepspeed"),  # auto: off under DeepSpeed
        "'model.compile' is not supported with engine.name=deepspeed yet; use engine.name=ddp or model.compile=false",
    )
    require(
        not (e.name == "fsdp2" and cfg.model.precision == "fp16"),
        "'model.precision=fp16' is not supported with engine.name=fsdp2 (no sharded loss scaling); use bf16",
    )
    if e.name != "deepspeed":
        return
    require(
        not machine or importlib.util.find_spec("deepspeed") is not None,
        "engine.name=deepspeed is unavailable (deepspeed is not installed); install it with: "
        "pip install 'clipscale[deepspeed]'",
    )
    from .deepspeed import check as check_deepspeed

    stage = check_deepspeed(cfg, known_keys=machine)
    require(
        not (cfg.ema.decay is not None and stage == 3),
        "'ema.decay' is not supported with DeepSpeed ZeRO-3 (its parameters are partitioned); use engine.name=fsdp2",
    )


def check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    require(
        not (c.async_save and cfg.engine.name != "ddp"),
        f"'checkpoint.async' is not supported with engine.name={cfg.engine.name} (its checkpoints are written by "
        "every rank together); set checkpoint.async=false",
    )
    at_least(c, "every_n_steps", 1, "checkpoint")
    at_least(c, "keep_last", 0, "checkpoint")
    at_least(c, "load_attempts", 1, "checkpoint")
    at_least(c, "load_retry_wait_s", 0, "checkpoint")
    require(
        c.storage_options is None or isinstance(c.storage_options, dict),
        f"'checkpoint.storage_options' must be a mapping, got {c.storage_options!r}",
    )
    require(
        c.remote is None or "://" in c.remote,
        f"'checkpoint.remote' must be an object-store URL such as s3://bucket/run, got {c.remote!r}",
    )


def check_train(cfg: Config) -> None:
    t = cfg.train
    at_least(t, "steps", 1, "train")
    at_least(t, "max_nonfinite_steps", 1, "train")
    t.preempt_signals = [signal_name(n, "train.preempt_signals") for n in t.preempt_signals]
    require(
        t.hang_timeout_s is None or t.hang_timeout_s > 0, "'train.hang_timeout_s' must be > 0 or null (no watchdog)"
    )
    require(t.hang_grace_s > 0, "'train.hang_grace_s' must be > 0")
    at_least(t, "preempt_grace_s", 0, "train", or_null=True)
    guard = t.spike_guard
    if guard is None:
        return
    require(guard.factor > 1, f"'train.spike_guard.factor' must be > 1, got {guard.factor}")
    at_least(guard, "window", 5, "train.spike_guard")
    at_least(guard, "patience", 1, "train.spike_guard")
    at_least(guard, "skip_batches", 0, "train.spike_guard")
    require(
        guard.max_rollbacks >= 1 and guard.within_steps >= 1,
        "'train.spike_guard.max_rollbacks' and 'within_steps' must be >= 1",
    )


def check_eval_and_logging(cfg: Config, machine: bool = True) -> None:
    at_least(cfg.eval, "every_n_steps", 0, "eval")
    at_least(cfg.eval, "batch_size", 1, "eval")
    at_least(cfg.eval, "workers", 0, "eval")
    require(not cfg.eval.use_ema or cfg.ema.decay is not None, "'eval.use_ema' needs ema.decay (an EMA to evaluate)")
    at_least(cfg.logging, "every_n_steps", 1, "logging")
    require(
        cfg.logging.wandb is None or not machine or importlib.util.find_spec("wandb") is not None,
        "logging.wandb is set but wandb is not installed: pip install wandb",
    )


def check_recipe(cfg: Config, machine: bool = True) -> None:
    """EMA and distillation."""
    e = cfg.ema
    if e.decay is not None:
        require(0 < e.decay < 1, f"'ema.decay' must be in (0, 1), got {e.decay}")
        at_least(e, "every_n_steps", 1, "ema")
    d = cfg.distill
    if d.source == "live":
        require((d.model is None) == (d.checkpoint is None), "'distill.model' and 'distill.checkpoint' go together")
    else:
        require(d.checkpoint is None, "'distill.checkpoint' is for distill.source=live; shards carry the features")
    if d.model is not None or d.source == "shards":
        require(d.weight > 0, f"'distill.weight' must be > 0, got {d.weight}")
    if d.model is not None:
        require(
            model_config(d.model, tuple(cfg.model.config_dirs)) is not None,
            f"unknown model 'distill.model={d.model}'; see `clipscale models`",
        )
        if machine and d.checkpoint and Path(d.checkpoint).suffix in WEIGHT_FILES:  # (else an open_clip tag)
            require(Path(d.checkpoint).is_file(), f"'distill.checkpoint': file not found: {d.checkpoint}")


MISSING_POLICIES = ("error", "skip")


def check_sources(data: DataConfig) -> None:
    """data.sources: unique names, shards each, weights or repeats (not both kinds), all positive."""
    require(
        data.missing_shards in MISSING_POLICIES,
        f"'data.missing_shards' must be one of {', '.join(MISSING_POLICIES)}, got {data.missing_shards!r}",
    )
    require(data.count_concurrency >= 1, f"'data.count_concurrency' must be >= 1, got {data.count_concurrency}")
    if not data.sources:
        return
    require(
        data.missing_shards == "error",
        "'data.missing_shards' belongs to data.train_shards; give each of data.sources its own 'missing_shards'",
    )
    require(not data.train_shards, "set either 'data.train_shards' (one source) or 'data.sources', not both")
    require(
        data.manifest is None,
        "'data.manifest' belongs to data.train_shards; give each of data.sources its own 'manifest'",
    )
    names = [src.name for src in data.sources]
    for i, src in enumerate(data.sources):
        where = f"data.sources.{i}"
        require(
            re.fullmatch(r"[A-Za-z0-9_.-]+", src.name) is not None,
            f"'{where}.name' must be a name of letters, digits, '_', '-' or '.'; got {src.name!r}",
        )
        require(names.count(src.name) == 1, f"'{where}.name': the name {src.name!r} is used twice in data.sources")
        require(bool(src.shards), f"'{where}.shards' is empty: give the source's shard URLs")
        require(
            src.missing_shards in MISSING_POLICIES,
            f"'{where}.missing_shards' must be one of {', '.join(MISSING_POLICIES)}, got {src.missing_shards!r}",
        )
        require(
            src.weight is None or src.repeat is None,
            f"'{where}' sets both weight and repeat; a source is mixed by one of them",
        )
        for key in ("weight", "repeat"):
            value = getattr(src, key)
            require(
                value is None or (math.isfinite(value) and value > 0),
                f"'{where}.{key}' must be a finite number > 0, got {value}",
            )
    weighted = [s.name for s in data.sources if s.weight is not None]
    repeated = [s.name for s in data.sources if s.repeat is not None]
    require(
        not (weighted and repeated),
        f"data.sources mixes weights ({', '.join(weighted)}) and repeats ({', '.join(repeated)}); "
        f"use one kind for every source",
    )
    missing = [s.name for s in data.sources if s.weight is None]
    require(
        not weighted or not missing,
        f"data.sources: {', '.join(missing)} has no weight while others have one; give every source a weight",
    )


def check_stages(cfg: Config) -> None:
    """schedule.stages as far as the config alone decides: boundaries in samples become steps only at the
    job's world size (the trainer checks those again at start); here they are checked in order only."""
    stages = cfg.schedule.stages
    if not stages:
        return
    accum = cfg.optim.accum_steps  # the world size is known at start, where the trainer checks again
    try:
        if all(st.until_samples is None for st in stages):
            resolve_stages(stages, cfg.model.patch_dropout, 1, cfg.train.steps, accum)
        else:
            for i, st in enumerate(stages):
                if st.until_step is not None and st.until_samples is not None:
                    raise ValueError(f"'schedule.stages[{i}]': give until_step or until_samples, not both")
            ends = [st.until_samples or st.until_step for st in stages]
            positional = [replace(st, until_step=None if end is None else i + 1, until_samples=None)
                          for i, (st, end) in enumerate(zip(stages, ends))]  # fmt: skip
            resolve_stages(positional, cfg.model.patch_dropout, 1, len(stages), accum)
    except ValueError as exn:
        raise ConfigError(str(exn)) from None
    check_stage_inputs(cfg)


def check_stage_inputs(cfg: Config) -> None:
    """Stages that change the model's input size or the batch: what the engine, the model and the rest of the
    config allow."""
    stages, engine = cfg.schedule.stages, cfg.engine.name
    shaped = next((i for i, st in enumerate(stages) if st.image_size or st.context_length), None)
    if shaped is not None:
        where = f"'schedule.stages[{shaped}]'"
        require(engine == "ddp", f"{where}: image_size and context_length stages run on engine ddp (they change the "
                f"shape of the position embeddings, which engine {engine} keeps in flat shards); use engine ddp or "
                "run each stage as its own job")  # fmt: skip
        distilled = cfg.distill.model or cfg.distill.source == "shards"
        require(not distilled, f"{where}: image_size and context_length stages cannot be combined with "
                "distillation (the teacher's inputs would change with them)")  # fmt: skip
        spec = model_config(cfg.model.name, tuple(cfg.model.config_dirs)) or {}
        vision = spec.get("vision_cfg") or {}
        patch = vision.get("patch_size")
        for i, st in enumerate(stages):
            if not st.image_size:
                continue
            require(vision_tower_kind(spec) == "vit", f"'schedule.stages[{i}].image_size': {cfg.model.name} has no "
                    "open_clip ViT image tower; image_size stages interpolate its position embedding")  # fmt: skip
            require(not patch or st.image_size % patch == 0, f"'schedule.stages[{i}].image_size'={st.image_size} is "
                    f"not a multiple of {cfg.model.name}'s patch size {patch}")  # fmt: skip
    batched = next((i for i, st in enumerate(stages) if st.batch_size), None)
    require(batched is None or engine != "deepspeed", f"'schedule.stages[{batched}].batch_size': batch size "
            "stages run on engines ddp and fsdp2 (DeepSpeed fixes its batch in its config); run the stage as its own "
            "job")  # fmt: skip
