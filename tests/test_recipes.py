"""The recipe knobs: LiT locking and single-tower loading, patch dropout, per-tower and layer-wise
learning rates, EMA, distillation, context length and augmentation, and the bundled recipes."""

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import DistillClipLoss

from clipscale.checkpoint.export import consolidated_weights
from clipscale.config import load_config
from clipscale.errors import ConfigError
from clipscale.job.distributed import DistEnv
from clipscale.loss import ClipLoss
from clipscale.loss.distill import DistillLoss
from clipscale.metrics import read_jsonl
from clipscale.model import create_model, to_open_clip_layout
from clipscale.train import Trainer, train

from helpers import REPO, cli_here, optimizer_of, tiny_config
from process_helpers import run

ENV = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")  # one process, no process group
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def tiny(tmp_path, toy_shards, **overrides):
    return tiny_config(tmp_path / "run", toy_shards, **overrides)


def save_tiny_model(path: Path, seed: int, **model_overrides) -> dict:
    """A clip-tiny open_clip-layout state_dict (a stand-in for a pretrained checkpoint)."""
    torch.manual_seed(seed)
    cfg = tiny_config(path.parent / "unused", "x", **{f"model__{k}": v for k, v in model_overrides.items()})
    state = to_open_clip_layout(create_model(cfg.model).model.state_dict())
    torch.save({"state_dict": state}, path)
    return state


# --------------------------------------------------------------------------- LiT


def visual(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("visual.")}


def optimizer_numel(run_dir: Path) -> int:
    """Elements of AdamW state (exp_avg + exp_avg_sq) in the newest checkpoint of a run."""
    from clipscale.checkpoint import CheckpointManager
    from clipscale.checkpoint.formats import full_state

    _, optim, _ = full_state(CheckpointManager(run_dir, is_main=False).latest())
    return sum(v.numel() for s in optim["state"].values() for k, v in s.items() if k != "step")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_lit_keeps_the_pretrained_image_tower_bitwise_and_needs_less_optimizer_state(tmp_path, toy_shards, engine):
    pretrained = save_tiny_model(tmp_path / "pretrained.pt", seed=7)
    engine_args = ["engine.name=deepspeed", "engine.zero_stage=2"] if engine == "zero2" else []
    common = [*engine_args, "train.steps=20", "checkpoint.every_n_steps=20", "optim.weight_decay=0.5"]
    run(
        2,
        tmp_path / "lit",
        toy_shards,
        *common,
        f"model.pretrained_image={tmp_path}/pretrained.pt",
        "model.lock_image=true",
    )
    run(2, tmp_path / "full", toy_shards, *common)
    lit, _ = consolidated_weights(tmp_path / "lit")
    full, _ = consolidated_weights(tmp_path / "full")
    for name, value in visual(pretrained).items():
        assert torch.equal(lit[name], value.reshape(lit[name].shape)), name  # bitwise, after 20 steps of decay 0.5
    assert not torch.equal(lit["text_projection"], full["text_projection"])  # the text tower did train
    image_params = sum(v.numel() for v in visual(pretrained).values())
    if engine == "ddp":
        locked, unlocked = optimizer_numel(tmp_path / "lit"), optimizer_numel(tmp_path / "full")
        assert unlocked - locked == 2 * image_params  # no AdamW moments for the locked tower
    else:
        size = lambda d: sum(p.stat().st_size for p in (d / "checkpoints").rglob("*optim_states.pt"))  # noqa: E731
        assert size(tmp_path / "full") - size(tmp_path / "lit") >= 2 * 4 * image_params  # fp32 moments at least


def test_locked_towers_get_no_gradient_no_state_no_decay(tmp_path, toy_shards):
    cfg = tiny(tmp_path, toy_shards, model__lock_image="true", model__lock_image_unlocked_groups=1)
    model = create_model(cfg.model).model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trained and "visual.conv1.weight" not in trained  # the last group unlocked
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in trained
    optimizer = optimizer_of(model, cfg)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in model.parameters() if not p.requires_grad)

    # open_clip's groups from the end: the projection, then the last block with ln_final, ...
    cfg = tiny(tmp_path, toy_shards, model__lock_text="true", model__lock_text_unlocked_layers=2)
    model = create_model(cfg.model).model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "token_embedding.weight" in frozen and "transformer.resblocks.0.ln_1.weight" in frozen
    assert "transformer.resblocks.1.mlp.c_fc.weight" not in frozen and "text_projection" not in frozen
    assert "visual.proj" not in frozen


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__lock_image_unlocked_groups": 2}, "needs model.lock_image=true"),
        ({"model__lock_image": "true", "model__lock_text": "true"}, "leave no parameter to train"),
        ({"model__lock_text": "true", "model__lock_text_freeze_layer_norm": "false"}, "model.lock_text"),
        ({"model__pretrained_image": "/nonexistent.pt"}, "file not found"),
    ],
)
def test_impossible_locks_are_one_line_errors(tmp_path, toy_shards, overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model(tiny(tmp_path, toy_shards, **overrides).model)


def test_a_tower_of_another_model_is_refused_with_what_does_not_fit(tmp_path, toy_shards):
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(3, 3, 1, 1)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"does not fit this model's image tower: \d+ missing"):
        create_model(tiny(tmp_path, toy_shards, model__pretrained_image=str(tmp_path / "other.pt")).model)


def test_pretrained_towers_load_from_whole_models_and_tower_files(tmp_path, toy_shards):
    whole = save_tiny_model(tmp_path / "whole.pt", seed=3)
    torch.save({k[len("visual.") :]: v for k, v in visual(whole).items()}, tmp_path / "visual_only.pt")
    for source in ("whole.pt", "visual_only.pt"):
        model = create_model(tiny(tmp_path, toy_shards, model__pretrained_image=str(tmp_path / source)).model).model
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in visual(whole).items()), source
    model = create_model(tiny(tmp_path, toy_shards, model__pretrained_text=str(tmp_path / "whole.pt")).model).model
    state = model.state_dict()
    assert torch.equal(state["token_embedding.weight"], whole["token_embedding.weight"])
    assert not torch.equal(state["visual.conv1.weight"], whole["visual.conv1.weight"])


# --------------------------------------------------------------------------- patch dropout


def test_patch_dropout_acts_in_training_only(tmp_path, toy_shards):
    torch.manual_seed(0)
    plain = create_model(tiny(tmp_path, toy_shards).model).model
    dropped = create_model(tiny(tmp_path, toy_shards, model__patch_dropout=0.5).model).model
    dropped.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), dropped.encode_image(images))  # evaluation: all patches
    dropped.train(), plain.train()
    with torch.no_grad():
        assert not torch.allclose(plain.encode_image(images), dropped.encode_image(images))


def test_patch_dropout_needs_a_vit_image_tower(tmp_path, toy_shards):
    with pytest.raises(ConfigError, match="needs an open_clip ViT image tower"):
        create_model(tiny(tmp_path, toy_shards, model__name="RN50", model__patch_dropout=0.5).model)


# --------------------------------------------------------------------------- learning rates


def test_per_tower_and_layer_decay_groups_get_the_documented_lr(tmp_path, toy_shards):
    cfg = tiny(
        tmp_path,
        toy_shards,
        optim__lr=1e-3,
        optim__image_lr=2e-3,
        optim__text_weight_decay=0.05,
        optim__weight_decay=0.2,
        optim__layer_decay=0.5,
    )
    model = create_model(cfg.model).model
    groups = {g["group"]: g for g in optimizer_of(model, cfg).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {key: {names[id(p)] for p in g["params"]} for key, g in groups.items()}
    # clip-tiny: 3 image blocks, 2 text blocks
    image_block0 = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert image_block0 in members["image/layer01/decay"]
    assert groups["image/layer01/decay"]["lr"] == pytest.approx(2e-3 * 0.5**3)
    assert "visual.conv1.weight" in members["image/layer00/decay"]
    assert groups["image/layer00/decay"]["lr"] == pytest.approx(2e-3 * 0.5**4)  # embeddings lowest
    assert "visual.proj" in members["image/layer04/decay"] and groups["image/layer04/decay"]["lr"] == pytest.approx(
        2e-3
    )
    assert (
        groups["text/layer03/decay"]["lr"] == pytest.approx(1e-3) and "text_projection" in members["text/layer03/decay"]
    )
    assert groups["text/layer03/decay"]["weight_decay"] == 0.05 and groups["image/layer04/decay"]["weight_decay"] == 0.2
    assert groups["text/layer00/no_decay"]["weight_decay"] == 0.0  # the token embedding
    assert members["shared/no_decay"] == {"logit_scale"} and groups["shared/no_decay"]["lr"] == pytest.approx(1e-3)


def test_resume_rederives_group_lrs_from_the_current_config(tmp_path, toy_shards):
    overrides = {"optim__image_lr": 2e-3, "optim__layer_decay": 0.5, "checkpoint__every_n_steps": 2, "train__steps": 2}
    train(tiny(tmp_path, toy_shards, **overrides))
    changed = {**overrides, "optim__image_lr": 4e-3, "train__steps": 3, "checkpoint__resume": "auto"}
    trainer = Trainer(tiny(tmp_path, toy_shards, **changed), ENV)
    try:
        groups = {g["group"]: g for g in trainer.engine.optimizer.param_groups}
        assert groups["image/layer04/decay"]["initial_lr"] == pytest.approx(4e-3)
        assert groups["image/layer03/decay"]["initial_lr"] == pytest.approx(4e-3 * 0.5)
    finally:
        trainer.close()


def test_layer_decay_on_a_tower_without_numbered_blocks_is_an_error(tmp_path, toy_shards):
    with pytest.raises(ConfigError, match="RN50's image tower is a ResNet: set optim.layer_decay=null"):
        tiny(tmp_path, toy_shards, model__name="RN50", optim__layer_decay=0.75)  # found at load, from its config
    tiny(tmp_path, toy_shards, model__name="RN50", optim__layer_decay=0.75, model__lock_image="true")  # not trained

    from clipscale.optim import trained_tower_layers

    class Staged(torch.nn.Module):  # a tower of stages (ConvNeXt), known only once the model is built
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.ModuleDict({"stages": torch.nn.ModuleList([torch.nn.Linear(2, 2)])})
            self.transformer = torch.nn.ModuleDict({"resblocks": torch.nn.ModuleList([torch.nn.Linear(2, 2)])})

    with pytest.raises(ConfigError, match="needs a image tower of numbered transformer blocks"):
        trained_tower_layers(Staged(), 0.75)
    assert trained_tower_layers(Staged(), None) == {"image": 0, "text": 1}


# --------------------------------------------------------------------------- EMA


def test_ema_follows_the_formula_and_is_what_use_ema_evaluates(tmp_path, toy_shards):
    from clipscale.engine.ema import ModelEMA

    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.9, every_n_steps=2, warmup=True)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not ema.update(1)  # every 2nd step only
    assert ema.update(2)
    d = min(0.9, 1 / 10)  # the warm-up ramp at the first update
    assert torch.allclose(ema.shadow["weight"], d * start + (1 - d) * (start + 1))
    with ema.swapped_in():
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, start + 1)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_ema_resumes_bitwise_and_exports_to_open_clip(tmp_path, toy_shards, engine):
    args = ["ema.decay=0.9", "ema.warmup=false", "checkpoint.every_n_steps=3", "train.steps=6", f"engine.name={engine}"]
    run(2, tmp_path / "full", toy_shards, *args)
    step3 = tmp_path / "full" / "checkpoints" / ("step_00000003" + (".pt" if engine == "ddp" else ""))
    run(2, tmp_path / "part", toy_shards, *args, f"checkpoint.resume={step3}")  # as if stopped there
    assert [r["step"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if "loss" in r] == [4, 5, 6]
    full, _ = consolidated_weights(tmp_path / "full", ema=True)
    resumed, _ = consolidated_weights(tmp_path / "part", ema=True)
    trained, _ = consolidated_weights(tmp_path / "full")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not torch.equal(full["visual.proj"], trained["visual.proj"])  # the average is not the weights
    cli_here("export", "--checkpoint", str(tmp_path / "full"), "--output", str(tmp_path / "ema.pt"), "--ema")
    from clipscale.model import register_model_configs

    register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(tmp_path / "ema.pt"))
    assert torch.equal(model.state_dict()["visual.proj"], full["visual.proj"])


def test_export_ema_of_a_run_without_ema_is_one_line(tmp_path, toy_shards):
    train(tiny(tmp_path, toy_shards, train__steps=1))
    from clipscale.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        consolidated_weights(tmp_path / "run", ema=True)


# --------------------------------------------------------------------------- distillation


def test_distill_loss_matches_open_clip(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = [
        torch.nn.functional.normalize(torch.randn(8, d, generator=g, dtype=torch.float64), dim=-1)
        for d in (16, 16, 24, 24)
    ]
    img, txt, t_img, t_txt = feats  # the teacher's embedding size differs: only logits meet
    scale, t_scale = torch.tensor(14.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)
    ours = DistillLoss(ClipLoss(impl="local"), weight=0.7)(img, txt, scale, t_img, t_txt, t_scale)
    contrastive, distill = DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale)
    assert ours.item() == pytest.approx((contrastive + 0.7 * distill).item(), rel=1e-12)


def _distill_on_rank(rank, world, feats, weight):
    b = feats[0].shape[0] // world
    mine = [f[rank * b : (rank + 1) * b] for f in feats[:4]]
    loss = DistillLoss(ClipLoss(impl="local"), weight)(mine[0], mine[1], feats[4], mine[2], mine[3], feats[5])
    return loss.item()


def test_distill_loss_over_two_ranks_is_the_loss_of_the_global_batch():
    """Each rank holds half the batch; the teacher's features are gathered as the student's."""
    from distributed_helpers import run_distributed

    g = torch.Generator().manual_seed(1)
    feats = [
        torch.nn.functional.normalize(torch.randn(8, d, generator=g, dtype=torch.float64), dim=-1)
        for d in (16, 16, 24, 24)
    ]
    feats += [torch.tensor(10.0, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64)]
    per_rank = run_distributed(_distill_on_rank, 2, feats, 0.5)
    img, txt, t_img, t_txt, scale, t_scale = feats
    contrastive, distill = DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale)
    assert sum(per_rank) / 2 == pytest.approx((contrastive + 0.5 * distill).item(), rel=1e-12)


def test_distillation_trains_with_a_frozen_teacher(tmp_path, toy_shards):
    save_tiny_model(tmp_path / "teacher.pt", seed=5)
    teacher_before = torch.load(tmp_path / "teacher.pt")["state_dict"]
    cfg = tiny(
        tmp_path,
        toy_shards,
        distill__model="clip-tiny",
        distill__checkpoint=str(tmp_path / "teacher.pt"),
        train__steps=3,
        optim__accum_steps=2,
        data__batch_size=8,
    )
    trainer = Trainer(cfg, ENV)
    try:
        trainer.fit()
        assert not trainer.teacher.model.training
        after = to_open_clip_layout(trainer.teacher.model.state_dict())
        assert all(torch.equal(after[k], v) for k, v in teacher_before.items())
    finally:
        trainer.close()
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, toy_shards):
    save_tiny_model(tmp_path / "teacher.pt", seed=5, context_length=16)
    cfg = tiny(tmp_path, toy_shards, distill__model="clip-tiny", distill__checkpoint=str(tmp_path / "teacher.pt"),
               model__context_length=20)  # fmt: skip
    with pytest.raises(ConfigError, match="tokenizes text otherwise"):
        Trainer(cfg, ENV)


# --------------------------------------------------------------------------- text length, augmentation


def test_context_length_reaches_model_and_tokenizer(tmp_path, toy_shards):
    bundle = create_model(tiny(tmp_path, toy_shards, model__context_length=16).model)
    assert bundle.model.positional_embedding.shape[0] == 16
    assert bundle.tokenizer(["a red square"]).shape == (1, 16)


def test_augment_builds_open_clips_augmentation_and_stays_exact_on_resume(tmp_path, toy_shards):
    aug = ["data.augment.scale=[0.5, 1.0]", "data.augment.color_jitter=[0.4]", "data.augment.gray_scale_prob=0.5"]
    cfg = load_config(None, [f"run.dir={tmp_path}/x", f"data.train_shards={toy_shards}", "model.name=clip-tiny", *aug])
    bundle = create_model(cfg.model, augment=cfg.data.augment)
    text = repr(bundle.train_transform)
    assert "scale=(0.5, 1.0)" in text and "color_jitter" in text and "gray_scale" in text
    args = [*aug, "checkpoint.every_n_steps=2", "data.workers=2"]
    run(1, tmp_path / "full", toy_shards, *args, "train.steps=4")
    run(1, tmp_path / "part", toy_shards, *args, "train.steps=2")
    run(1, tmp_path / "part", toy_shards, *args, "train.steps=4", "checkpoint.resume=auto")
    loss = lambda d: {r["step"]: r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r}  # noqa: E731
    assert loss(tmp_path / "full")[4] == loss(tmp_path / "part")[4]  # jitter and grayscale seeded per sample


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.scale=[0.9, 0.5]", "data.augment.scale"),
        ("data.augment.color_jitter=[0.1, 0.2]", "data.augment.color_jitter"),
        ("model.patch_dropout=1.0", "model.patch_dropout"),
        ("optim.layer_decay=0", "optim.layer_decay"),
        ("eval.use_ema=true", "needs ema.decay"),
        ("distill.model=clip-tiny", "go together"),
        ("ema.decay=1.5", "ema.decay"),
    ],
)
def test_bad_recipe_settings_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"run.dir={tmp_path}", "data.train_shards=x", override])


def test_ema_with_zero3_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(None, [f"run.dir={tmp_path}", "data.train_shards=x", "ema.decay=0.99",
                           "engine.name=deepspeed", "engine.zero_stage=3"])  # fmt: skip


# --------------------------------------------------------------------------- the recipes


def test_there_are_the_recipes():
    assert {p.stem for p in RECIPES} >= {
        "openclip-laion400m-vit-b-32",
        "datacomp-1b-vit-l-14",
        "siglip-vit-b-16",
        "lit-vit-b-16",
        "flip",
        "clipa-v2",
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_resolves_and_runs_two_steps_with_a_tiny_model(tmp_path, toy_shards, recipe):
    cfg = load_config(str(recipe), [f"run.dir={tmp_path}/x"], machine=False)  # resolves as written
    assert cfg.train.steps > 1000 and cfg.data.batch_size >= 1
    files = []  # the files a recipe names that are the user's own (a pretrained tower): one line when missing
    if cfg.model.pretrained_image:
        with pytest.raises(ConfigError, match=r"^model.pretrained_image: file not found: /models/"):
            load_config(str(recipe), [f"run.dir={tmp_path}/x"])
        save_tiny_model(tmp_path / "tower.pt", seed=1)
        files.append(f"model.pretrained_image={tmp_path}/tower.pt")
    small = [
        f"data.train_shards={toy_shards}",
        "model.name=clip-tiny",
        "model.context_length=null",
        "model.precision=fp32",
        "data.batch_size=4",
        "data.workers=0",
        "optim.accum_steps=1",
        "train.steps=2",
        "train.device=cpu",
        "engine.name=ddp",
        "engine.zero_stage=null",
        "engine.deepspeed_config=null",
        "model.compile=false",
        "model.grad_checkpointing=false",
        "checkpoint.every_n_steps=1000",
        "eval.zeroshot=null",
        "eval.retrieval=null",
        "logging.progress=false",
        "logging.every_n_steps=1",
        *files,
    ]
    if cfg.schedule.stages:  # the recipe's stages, at two steps: the first one step, the last one the other
        kept = ("patch_dropout", "lr_scale")
        tiny_sizes = {"image_size": (16, 32), "context_length": (8, 16), "batch_size": (8, 4)}  # clip-tiny's
        first, last = ({k: v for k, v in vars(st).items() if k in kept and v is not None}
                       for st in (cfg.schedule.stages[0], cfg.schedule.stages[-1]))  # fmt: skip
        for key, (small_first, small_last) in tiny_sizes.items():
            if getattr(cfg.schedule.stages[0], key) or getattr(cfg.schedule.stages[-1], key):
                first[key], last[key] = small_first, small_last
        small.append(f"schedule.stages=[{dict(first, until_step=1)}, {last}]".replace("'", ""))
    if cfg.distill.model:
        save_tiny_model(tmp_path / "teacher.pt", seed=2)
        small += ["distill.model=clip-tiny", f"distill.checkpoint={tmp_path}/teacher.pt"]
    result = train(load_config(str(recipe), [f"run.dir={tmp_path}/run", *small]))
    assert result["step"] == 2
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    json.loads((tmp_path / "run" / "status.json").read_text())


def test_use_ema_evaluates_the_average_and_puts_the_trained_weights_back(tmp_path, toy_shards):
    from test_evaluate import color_folder

    folder = str(color_folder(tmp_path / "val"))
    cfg = tiny(tmp_path, toy_shards, ema__decay=0.5, ema__warmup="false", train__steps=3,
               eval__zeroshot=folder, eval__use_ema="true", eval__at_end="false")  # fmt: skip
    trainer = Trainer(cfg, ENV)
    try:
        trainer.fit()
        trained = trainer.engine.module.visual.proj.detach().clone()
        seen = []
        real_run = trainer.evaluator.run
        trainer.evaluator.run = lambda model, autocast: (
            seen.append(model.visual.proj.detach().clone()) or real_run(model, autocast)
        )
        results = trainer.evaluate()
        assert torch.equal(seen[0], trainer.ema.shadow["visual.proj"]) and not torch.equal(seen[0], trained)
        assert torch.equal(trainer.engine.module.visual.proj, trained)
        assert "eval/zeroshot_top1" in results
    finally:
        trainer.close()


def test_a_teacher_that_takes_other_images_is_refused(tmp_path, toy_shards):
    spec = json.loads((REPO / "src" / "clipscale" / "configs" / "models" / "clip-tiny.json").read_text())
    spec["vision_cfg"]["image_size"] = 48
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "clip-tiny-48.json").write_text(json.dumps(spec))
    cfg = tiny(tmp_path, toy_shards, model__config_dirs=f"[{tmp_path}/models]")
    from clipscale.model import register_model_configs

    register_model_configs(cfg.model.config_dirs)
    torch.save(
        {"state_dict": create_model(cfg.model.__class__(name="clip-tiny-48")).model.state_dict()}, tmp_path / "t.pt"
    )
    cfg = tiny(tmp_path, toy_shards, model__config_dirs=f"[{tmp_path}/models]", distill__model="clip-tiny-48",
               distill__checkpoint=str(tmp_path / "t.pt"))  # fmt: skip
    with pytest.raises(ConfigError, match="takes other images"):
        Trainer(cfg, ENV)


@pytest.mark.slow
def test_fsdp2_resumes_into_another_grouping_of_parameters(tmp_path, toy_shards):
    """The moments are loaded by parameter name; the groups are the current config's."""
    args = ["engine.name=fsdp2", "checkpoint.every_n_steps=2"]
    run(2, tmp_path / "run", toy_shards, *args, "train.steps=2")
    run(2, tmp_path / "run", toy_shards, *args, "train.steps=4", "checkpoint.resume=auto", "optim.image_lr=2e-3",
        "optim.layer_decay=0.8")  # fmt: skip
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
