"""The run configuration's sections as typed dataclasses, each field with its docstring.

The docstrings are the documentation: docs/config.md is generated from them (config/reference.py).
Loading, overrides and type checks are in load.py; every check of the values is in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..wds.schema import IMAGE_KEYS
from .losses import IMPLS, LOSSES

LossName = Literal[tuple(LOSSES)]
LossImpl = Literal[IMPLS]


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
    grad_checkpointing: bool | float = False
    """Activation checkpointing: true recomputes every block in the backward (open_clip's; least memory, ~30 %
    more compute); a share such as 0.5 recomputes that share of each tower's transformer blocks (selective:
    use the smallest share whose batch fits); false: none."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision; auto = bf16 on GPUs that support it, fp32 elsewhere."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model (ddp and fsdp2 engines): auto = on for CUDA GPUs (+30-40 % samples/s on an
    H200), off on CPUs (compiling takes minutes and needs a C++ compiler); the first step's time, compilation
    included, is logged. false opts out."""
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
    """Name of the source: metrics (data/<name>/epoch, data/<name>/samples), logs and the sample-key log use it."""
    shards: str = ""
    """The source's WebDataset shard URLs: brace patterns, local or remote globs, `@list.txt`, pipe: URLs;
    several joined with '::'."""
    weight: float | None = None
    """Share of every global batch taken from this source (weights are normalised to sum to 1)."""
    repeat: float | None = None
    """Instead of a weight: each sample this many times per mixture epoch (0.5: half of the source)."""
    manifest: str | None = None
    """Index with the sample counts of this source's shards (default: manifest.json / sizes.json next to them)."""
    missing_shards: str = "error"
    """Shards the list names that do not exist (a download with gaps): 'error' stops with their count and the
    first few; 'skip' trains on the rest and reports how many were missing at start and in status.json."""


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
    """One-source shorthand for `data.sources`: WebDataset shard URLs - brace patterns, local or remote globs
    (`*`, `**`), a file with one URL per line (`@list.txt`), pipe: URLs; several joined with '::'."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several data sets mixed by weight or repeat, each read without replacement in its own epochs (see Data
    mixtures); items are {name, shards, weight | repeat, manifest}."""
    train_num_samples: int | None = None
    """Samples per epoch; defaults to the total from the manifest(s)."""
    manifest: str | None = None
    """Index of the data.train_shards sample counts (default: manifest.json / sizes.json / *_stats.json next to
    the shards)."""
    missing_shards: str = "error"
    """data.train_shards' missing shards: 'error' (stop, naming them) or 'skip' (train on what is there)."""
    count_concurrency: int = 64
    """Shards without an index are counted once per job, every rank a slice, this many requests in flight per
    rank; the counts are cached in RUN_DIR/shard_counts.json for requeues and resumes."""
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
    gpu_decode: bool = False
    """Decode training JPEGs on the training device (torchvision.io.decode_jpeg: nvJPEG on a GPU) instead of in
    the loader workers, for nodes with few CPU cores per GPU. The workers still read, tokenise and draw the crop
    boxes (the same boxes); the device decodes at full size, as jpeg_draft=false does (pixels within 2 levels).
    Other images, cut files and colour augmentation stay on the CPU path. Needs data.fast_crop."""


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
class StageConfig:
    until_step: int | None = None
    """The stage ends after this optimizer step (or give until_samples; the last stage may name neither: it
    runs to train.steps)."""
    until_samples: int | None = None
    """The stage ends once this many samples were trained on (rounded up to whole global batches)."""
    patch_dropout: float | None = None
    """FLIP patch dropout in this stage (null: the previous stage's, at first model.patch_dropout)."""
    lr_scale: float | None = None
    """The scheduled learning rate times this factor in this stage (null: the previous stage's, at first 1)."""
    image_size: int | None = None
    """Image side in pixels in this stage (CLIPA: 112, then 224; null: the previous stage's, at first the
    model's). The ViT's position embedding is interpolated to the new grid at the boundary as open_clip does
    when it loads weights of another size (bicubic), the crops follow. A multiple of the patch size; engine ddp."""
    context_length: int | None = None
    """Text tokens per caption in this stage (CLIPA: 16 or 32, then 77; null: the previous stage's, at first
    model.context_length): the text positions are cut (the first ones kept) or extended (new ones initialised as
    open_clip does), the tokenizer follows. Engine ddp."""
    batch_size: int | None = None
    """Global batch size in this stage (null: the previous stage's, at first the config's): divisible by
    world size x optim.accum_steps; every sample is still read once (engines ddp and fsdp2)."""


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up: cosine, linear (both to min_lr at train.steps) or constant."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to optim.lr over this many optimizer steps."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    stages: list[StageConfig] = field(default_factory=list)
    """Training stages in one run (FLIP: patch dropout 0.5, then 0 for the last steps; CLIPA: 112 px and short
    texts, then 224 px), each {until_step | until_samples, patch_dropout, lr_scale, image_size, context_length,
    batch_size}; unset values carry over. Exact resume at any step: a step's
    stage follows from the step. See Training stages."""


@dataclass
class LossConfig:
    name: LossName = "clip"
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
    load_attempts: int = 4
    """Reads of a checkpoint that fails with an I/O or memory error (not damage) before the job stops with
    exit code 74 to be requeued; the checkpoint is kept and tried again, never skipped for an older one."""
    load_retry_wait_s: float = 2.0
    """Wait before the second read of such a checkpoint; doubled before each further one."""


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
    """Every rank appends {step, rank, keys, passes, sources} lines to RUN_DIR/sample_keys/rank-NNNNN.jsonl."""
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
    source: Literal["live", "shards"] = "live"
    """live: run the teacher (distill.model, distill.checkpoint) on every batch; shards: read its embeddings
    stored in the training shards by `clipscale shards embed --checkpoint TEACHER` (no teacher forward; the
    features are of the evaluation crop, so they equal the live teacher's where training crops the same)."""


@dataclass
class SpikeGuardConfig:
    factor: float = 3.0
    """A loss above factor x the median of the recent losses counts as a spike."""
    window: int = 100
    """Steps whose losses make the median."""
    patience: int = 3
    """Consecutive spiking steps before the run rolls back."""
    skip_batches: int = 200
    """Global batches consumed without training after a rollback: those that end at the step where the spike was
    detected (the data that caused it); the ones between the checkpoint and them are trained on again."""
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
    preempt_grace_s: float | None = 60
    """A rank whose main thread does not take such a signal within this many seconds of a training step is stuck
    in C (a hung read or collective): it writes its stacks to RUN_DIR/hang/, status preempted, and exits with 75
    without a checkpoint (the requeued job resumes from the last one); during a checkpoint, an evaluation or the
    set-up, 4 x this (ranks wait in C there for good reason); null: wait for it."""
    hang_timeout_s: float | None = 1800
    """A rank that finishes no step for this long writes its stacks to RUN_DIR/hang/ and exits (status hung,
    requeued by clipscale supervise); null: no watchdog."""
    hang_grace_s: float = 3000
    """What the watchdog allows the first step, checkpoint saves and loads, and evaluations instead (keep it
    below engine.dist_timeout_s, or a collective times out first)."""
    deterministic: bool = False
    """Deterministic GPU kernels (cuBLAS workspace, no atomics, math attention): a resumed run equals an
    uninterrupted one bitwise on a GPU too, at a cost in speed (CPU runs are deterministic anyway)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for the MFU metric (null: known GPUs by name at their bf16 peak, e.g.
    H100/H200 989; none on a CPU)."""
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
