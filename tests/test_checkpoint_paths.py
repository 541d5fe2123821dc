"""Every way a user names a checkpoint works with every command that takes one (export, eval,
checkpoint.resume), on a local disk and in a bucket (moto's S3 server on 127.0.0.1); a wrong path is
one line naming what was looked for."""

import json
import shutil
from pathlib import Path

import pytest
from s3_helpers import S3Server

from clipscale.checkpoint import locate
from clipscale.cli import main
from clipscale.wds import remote

from helpers import make_shards, run_cli

LEGACY = Path(__file__).parent / "data" / "legacy"  # checkpoints of clip-fixture at step 2 (test_compat.py)
MODELS = Path(__file__).parent / "data" / "models"  # clip-fixture's config (the checkpoints name the folder
# they were written from, which a clone elsewhere does not have)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders holding the legacy checkpoints: ddp (a step file), fsdp2 (a step folder)."""
    root = tmp_path_factory.mktemp("runs")
    for fmt in ("ddp", "fsdp2"):
        shutil.copytree(LEGACY / fmt, root / fmt / "checkpoints")
    return root


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("eval"), n_shards=1, per_shard=8, size=16).replace(
        "{000000..000000}", "000000"
    )


@pytest.fixture(scope="module")
def bucket(runs):
    server = S3Server()
    s3 = server.client()
    s3.create_bucket(Bucket="ckpt")
    for path in sorted(runs.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "ckpt", str(path.relative_to(runs)))
    remote.configure()
    yield "s3://ckpt"
    server.stop()
    remote.configure()


def forms(root: str, fmt: str) -> dict[str, str]:
    step = "step_00000002.pt" if fmt == "ddp" else "step_00000002"
    return {
        "step": f"{root}/{fmt}/checkpoints/{step}",
        "latest": f"{root}/{fmt}/checkpoints/latest",
        "checkpoints": f"{root}/{fmt}/checkpoints",
        "run": f"{root}/{fmt}",
    }


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["ddp", "fsdp2"])
@pytest.mark.parametrize("where", ["local", "bucket"])
def test_export_and_eval_take_every_form(runs, bucket, eval_shards, tmp_path, capsys, fmt, where):
    root = str(runs) if where == "local" else bucket
    for form, path in forms(root, fmt).items():
        out = tmp_path / f"{form}.pt"
        code, stdout, stderr = cli(capsys, "export", "--checkpoint", path, "--output", str(out))
        assert code == 0 and "(step 2)" in stdout, (form, stderr)
        assert out.stat().st_size > 0
        result = tmp_path / f"{form}.json"
        code, stdout, stderr = cli(capsys, "eval", "--checkpoint", path, "--retrieval", eval_shards, "--workers", "0",
                                   "--config-dir", str(MODELS), "--output", str(result))  # fmt: skip
        assert code == 0, (form, stderr)
        record = json.loads(result.read_text())
        assert record["step"] == 2 and record["model"] == "clip-fixture" and record["eval/retrieval_images"] == 8


def test_the_same_weights_whatever_the_form(runs, tmp_path, capsys):
    import torch

    exported = {}
    for form, path in forms(str(runs), "ddp").items():
        cli(capsys, "export", "--checkpoint", path, "--output", str(tmp_path / f"{form}.pt"))
        exported[form] = torch.load(tmp_path / f"{form}.pt", weights_only=True)
    first = exported.pop("step")
    assert all(torch.equal(first[k], state[k]) for state in exported.values() for k in first)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("{tmp}/nothing-here", "no checkpoint at {tmp}/nothing-here: expected a step file or folder"),
        ("{tmp}/empty", "{tmp}/empty holds no checkpoint: expected a step file or folder"),
        ("{tmp}/run-without/checkpoints", "no intact checkpoint in {tmp}/run-without/checkpoints"),
        ("s3://ckpt/nope", "no checkpoint in s3://ckpt/nope/checkpoints (no latest there)"),
        ("s3://ckpt/ddp/checkpoints/step_00000009.pt", "no checkpoint step_00000009.pt in s3://ckpt/ddp/checkpoints"),
    ],
)
def test_a_wrong_path_is_one_line_naming_what_was_looked_for(bucket, tmp_path, capsys, path, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run-without" / "checkpoints").mkdir(parents=True)
    code, _, stderr = cli(capsys, "export", "--checkpoint", path.format(tmp=tmp_path), "--output", str(tmp_path / "x"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "x").exists()


def test_resume_takes_the_same_forms(runs, tmp_path):
    from clipscale.checkpoint import CheckpointManager
    from clipscale.errors import CheckpointError

    manager = CheckpointManager(tmp_path / "new-run")
    for form, path in forms(str(runs), "ddp").items():
        candidates, exact = manager.plan_resume(path)
        assert candidates[0].name == "step_00000002.pt", form
        assert exact == (form == "step")  # a folder's newest may fall back to an older one
    with pytest.raises(CheckpointError, match="no checkpoint at .*nothing: expected a step file or folder"):
        manager.plan_resume(str(tmp_path / "nothing"))
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)  # a run that never saved: not a fresh start
    with pytest.raises(CheckpointError, match="no checkpoint in .*empty-run/checkpoints"):
        manager.plan_resume(str(tmp_path / "empty-run"))
    pointer = tmp_path / "pointing" / "checkpoints"
    shutil.copytree(LEGACY / "ddp", pointer)
    (pointer / "step_00000002.pt").unlink()  # the pointer names a checkpoint that is gone: say so
    for use in (lambda: manager.plan_resume(str(pointer / "latest")), lambda: locate(pointer / "latest")):
        with pytest.raises(CheckpointError, match="latest names 'step_00000002.pt', which is not a checkpoint"):
            use()


def test_a_requeued_job_continues_its_own_run_when_the_checkpoint_it_started_from_is_gone(runs, tmp_path):
    from clipscale.checkpoint import CheckpointManager

    source = tmp_path / "source"
    shutil.copytree(runs / "ddp", source)
    manager = CheckpointManager(tmp_path / "finetune")
    named = str(source / "checkpoints" / "step_00000002.pt")
    manager.dir.joinpath(manager.RESUMED_FROM).write_text(str(Path(named).resolve()) + "\n")  # applied before
    shutil.copy(LEGACY / "ddp" / "step_00000002.pt", manager.path_for(5))  # this run saved step 5
    shutil.rmtree(source)  # the scratch purge took the source
    candidates, _ = manager.plan_resume(named)
    assert [p.name for p in candidates] == ["step_00000005.pt"]


def test_eval_knows_the_model_configs_the_checkpoint_was_trained_with(tmp_path, eval_shards, capsys):
    from clipscale.train import train

    from helpers import tiny_config

    folder = tmp_path / "my-models"
    shutil.copytree(MODELS, folder)
    cfg = tiny_config(tmp_path / "run", eval_shards, model__name="clip-fixture", model__config_dirs=f"[{folder}]",
                      train__steps=1, data__batch_size=4)  # fmt: skip
    train(cfg)
    code, _, stderr = cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--retrieval", eval_shards,
                          "--workers", "0", "--output", str(tmp_path / "e.json"))  # fmt: skip
    assert code == 0, stderr
    shutil.move(folder, tmp_path / "moved")  # (in new processes: open_clip's registry is per process)
    proc = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--retrieval", eval_shards, check=False)
    assert proc.returncode == 2 and "unknown model 'model.name=clip-fixture'" in proc.stderr.splitlines()[-1]
    assert "no longer exist" in proc.stderr and "--config-dir" in proc.stderr
    proc = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--retrieval", eval_shards,
                   "--config-dir", str(tmp_path / "moved"), "--workers", "0")  # fmt: skip
    assert "retrieval_images" in proc.stdout
