import pytest
import yaml

from clipscale.config import Config, load_config, to_dict
from clipscale.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\ndata:\n  batch_size: 8\n  train_shards: /x/a-{0..3}.tar\n")
    cfg = load_config(
        path,
        [
            "optim.lr=3e-4",
            "data.batch_size=256",
            "model.grad_checkpointing=true",
            "checkpoint.resume=auto",
            "loss.name=siglip",
            "optim.grad_clip_norm=null",
        ],
    )
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 256 and isinstance(cfg.data.batch_size, int)
    assert cfg.model.grad_checkpointing is True
    assert cfg.checkpoint.resume == "auto"
    assert cfg.loss.name == "siglip"
    assert cfg.optim.grad_clip_norm is None
    assert cfg.data.train_shards == "/x/a-{0..3}.tar"


def test_int_is_accepted_for_float_and_list_from_string(tmp_path):
    cfg = load_config(None, ["optim.lr=1", "data.image_keys=jpg,png"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.image_keys == ["jpg", "png"]


def test_aliased_key_async(tmp_path):
    cfg = load_config(write(tmp_path, "checkpoint:\n  async: true\n"))
    assert cfg.checkpoint.async_save is True
    assert to_dict(cfg)["checkpoint"]["async"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optimm.lr=1", "unknown key 'optimm' (did you mean 'optim'?)"),
        ("data.batch_size=abc", "'data.batch_size' must be an integer, got 'abc'"),
        ("data.batch_size=0", "'data.batch_size' must be >= 1"),
        ("model.grad_checkpointing=maybe", "'model.grad_checkpointing' must be true/false or a number, got 'maybe'"),
        ("model.grad_checkpointing=1.5", "'model.grad_checkpointing' must be true, false or a share of the blocks"),
        ("model.compile=fast", "'model.compile' must be true/false or one of 'auto', got 'fast'"),
        ("loss.name=infonce", "'loss.name' must be one of clip, siglip"),
        ("loss.impl=ring", "'loss.impl' must be one of auto, local, full, chunked for loss.name=clip"),
        ("engine.zero_stage=5", "'engine.zero_stage' must be one of 0, 1, 2, 3"),
        ("optim.lr=-1", "'optim.lr' must be >= 0"),
        ("train.preempt_signals=[SIGFOO]", "unknown signal 'SIGFOO'"),
        ("nonsense", "must look like key=value"),
    ],
)
def test_bad_overrides_fail_with_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_in_yaml_names_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize' \(did you mean 'data.batch_size'\?\)"):
        load_config(write(tmp_path, "data:\n  batchsize: 3\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_every_shipped_config_loads():

    from clipscale.engine.ds_config import zero_stage

    from helpers import REPO

    runs = sorted((REPO / "configs").glob("*.yaml"))
    deepspeed_files = sorted((REPO / "configs" / "deepspeed").glob("*.yaml"))
    assert runs and [p.name for p in deepspeed_files] == ["zero1.yaml", "zero2.yaml", "zero3.yaml"]
    for p in runs:
        load_config(str(p))
    for stage, p in enumerate(deepspeed_files, start=1):  # DeepSpeed pass-through files, validated
        cfg = load_config(None, ["engine.name=deepspeed", f"engine.deepspeed_config={p}"])
        assert zero_stage(cfg.engine) == stage


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=2e-4", "checkpoint.async=true"])
    again = load_config(write(tmp_path, yaml.safe_dump(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)


SOURCES = (
    "data.sources=[{name: laion, shards: '/d/l-{0..9}.tar', weight: 0.7}, "
    "{name: cc12m, shards: '/d/c-{0..3}.tar', weight: 0.3}]"
)


def test_sources_and_overrides_of_list_items():
    cfg = load_config(
        None,
        [
            SOURCES,
            "data.sources.1.weight=0.2",
            "data.sources.2.name=coyo",
            "data.sources.2.shards=/d/y-{0..1}.tar",
            "data.sources.2.weight=0.1",
        ],
    )
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("laion", 0.7), ("cc12m", 0.2), ("coyo", 0.1)]
    again = load_config(
        None, ["data.sources=" + yaml.safe_dump(to_dict(cfg)["data"]["sources"], default_flow_style=True)]
    )
    assert to_dict(again)["data"]["sources"] == to_dict(cfg)["data"]["sources"]
    with pytest.raises(ConfigError, match="quote brace patterns"):
        load_config(None, ["data.sources=[{name: a, shards: /d/l-{0..9}.tar}]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sources.0.weight=0"], "'data.sources.0.weight' must be a finite number > 0, got 0.0"),
        (["data.sources.1.weight=-1"], "'data.sources.1.weight' must be a finite number > 0"),
        (["data.sources.1.name=laion"], "the name 'laion' is used twice in data.sources"),
        (["data.sources.1.weight=null", "data.sources.1.repeat=2"], "mixes weights (laion) and repeats (cc12m)"),
        (["data.sources.1.weight=null"], "cc12m has no weight while others have one"),
        (["data.sources.0.repeat=2"], "'data.sources.0' sets both weight and repeat"),
        (["data.sources.0.wieght=1"], "unknown key 'data.sources.0.wieght' (did you mean 'data.sources.0.weight'?)"),
        (["data.sources.5.weight=1"], "'data.sources' has 2 item(s); the next one is data.sources.2"),
        (["data.sources.x.weight=1"], "expected an item number"),
        (["data.train_shards=/d/x.tar"], "set either 'data.train_shards' (one source) or 'data.sources', not both"),
        (["data.sources.1.shards="], "'data.sources.1.shards' is empty"),
        (["data.sources.1.name=a b"], "'data.sources.1.name' must be a name"),
    ],
)
def test_bad_sources_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [SOURCES, *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- checks at load


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=ViT-B-23"], "unknown model 'model.name=ViT-B-23' (did you mean 'ViT-B-32'"),
        (["model.name=RN50", "model.patch_dropout=0.5"], "'model.patch_dropout' needs an open_clip ViT image tower"),
        (["model.pretrained=/nowhere/weights.pt"], "'model.pretrained': file not found: /nowhere/weights.pt"),
        (["model.pretrained_text=/nowhere/text.pt"], "model.pretrained_text: file not found: /nowhere/text.pt"),
        (["model.config_dirs=[/nowhere]"], "'model.config_dirs': /nowhere is not a directory"),
        (["model.lock_image=true", "model.lock_text=true"], "leave no parameter to train but the temperature"),
        (
            ["loss.name=siglip", "loss.impl=chunked"],
            "'loss.impl' must be one of auto, gather, ring for loss.name=siglip",
        ),
        (["loss.chunk_size=0"], "'loss.chunk_size' must be >= 1"),
        (
            ["loss.name=siglip", "distill.model=clip-tiny", "distill.checkpoint=/x.pt"],
            "'distill' works with loss.name=clip",
        ),
        (["distill.model=clip-tiny", "distill.checkpoint=/nowhere/t.pt"], "'distill.checkpoint': file not found"),
        (
            ["engine.name=deepspeed", "engine.deepspeed_config={zero_optimization: {stage: 3}}", "ema.decay=0.999"],
            "'ema.decay' is not supported with DeepSpeed ZeRO-3",
        ),  # fmt: skip
    ],
)
def test_what_the_config_alone_can_tell_is_found_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_checks_at_load_need_no_torch(tmp_path):
    """`clipscale config` answers a misspelt model name in one line, without loading torch."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom clipscale.config import load_config\nfrom clipscale.errors import ConfigError\n"
        "try:\n    load_config(None, ['model.name=ViT-B-23', 'loss.name=siglip'])\nexcept ConfigError as e:\n"
        "    print(e)\nprint(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "unknown model 'model.name=ViT-B-23'" in out and out.strip().endswith("[]")


def test_a_renamed_key_keeps_working_with_one_line_naming_the_new_one(monkeypatch, tmp_path, caplog):
    from clipscale.config import load

    monkeypatch.setitem(load.RENAMED, "train.total_steps", "train.steps")  # (a rename as a release would add)
    path = write(tmp_path, "train:\n  total_steps: 7\n")
    with caplog.at_level("WARNING", logger="clipscale"):
        assert load_config(path).train.steps == 7
        assert load_config(None, ["train.total_steps=9"]).train.steps == 9
    said = [r.getMessage() for r in caplog.records]
    assert any("'train.total_steps' is now called 'train.steps'" in m for m in said), said
    with pytest.raises(ConfigError, match="sets both 'train.total_steps' and its new name 'train.steps'"):
        load_config(write(tmp_path, "train:\n  total_steps: 7\n  steps: 8\n"))


def test_a_removed_key_says_why():
    with pytest.raises(
        ConfigError, match=r"'data.augment.ratio' was removed: open_clip's RandomResizedCrop ignores it"
    ):
        load_config(None, ["data.augment.ratio=[0.75,1.33]"])


def test_every_registered_loss_builds_and_checks_its_settings():
    import torch

    from clipscale.config.losses import LOSSES
    from clipscale.loss import build_loss

    for name, spec in LOSSES.items():
        for impl in ("auto", *spec.impls):
            cfg = load_config(None, [f"loss.name={name}", f"loss.impl={impl}"])
            loss = build_loss(cfg.loss)
            assert isinstance(loss, torch.nn.Module) and loss.impl == (spec.impls[0] if impl == "auto" else impl)
            assert getattr(loss, "uses_bias", False) == spec.uses_bias


def test_what_open_clip_allows_is_not_refused_at_load():
    # a timm image tower keeps its head trainable when locked: locking both towers leaves something to train
    load_config(None, ["model.name=convnext_base", "model.lock_image=true", "model.lock_text=true"])
    load_config(None, ["distill.model=ViT-B-32", "distill.checkpoint=openai"])  # an open_clip tag, not a file
    with pytest.raises(ConfigError, match="'loss.chunk_size' must be >= 1"):
        load_config(None, ["loss.name=siglip", "loss.chunk_size=0"])


def test_the_machine_checks_are_left_to_the_machine_that_runs(tmp_path):
    """`clipscale config` and `data plan` show a config whose files live on the cluster's nodes."""
    import subprocess
    import sys

    args = ["model.pretrained=/cluster/only/weights.pt", "engine.name=deepspeed", "engine.zero_stage=2"]
    assert load_config(None, args, machine=False).model.pretrained == "/cluster/only/weights.pt"
    with pytest.raises(ConfigError, match="'model.pretrained': file not found: /cluster/only/weights.pt"):
        load_config(None, args)
    out = subprocess.run([sys.executable, "-m", "clipscale", "config", *args], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrained: /cluster/only/weights.pt" in out.stdout, out.stderr
