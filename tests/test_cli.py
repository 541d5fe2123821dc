import pytest

from clipscale.cli import build_parser

from helpers import run_cli


def test_help_describes_every_command():
    out = run_cli("--help").stdout
    for cmd in ("train", "demo", "config", "models"):
        assert cmd in out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description, name
        assert "usage" in text


@pytest.mark.parametrize("cmd", ["train", "demo", "config", "models"])
def test_subcommand_help(cmd):
    out = run_cli(cmd, "--help").stdout
    assert "usage: clipscale " + cmd in out


def test_user_error_is_one_line_without_traceback():
    proc = run_cli("train", "optim.lrr=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "clipscale: error: unknown key 'optim.lrr' (did you mean 'optim.lr'?); "
        "valid keys: optim.lr, optim.weight_decay, optim.beta1, optim.beta2, "
        "optim.eps, optim.accum_steps, optim.grad_clip_norm, optim.fused, optim.image_lr, optim.text_lr, "
        "optim.image_weight_decay, optim.text_weight_decay, optim.layer_decay"
    )
    proc = run_cli("train", "data.train_shards=/nonexistent/x-{000..003}.tar", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    first = "/nonexistent/x-000.tar, /nonexistent/x-001.tar, /nonexistent/x-002.tar and 1 more"
    expected = f"clipscale: error: data.train_shards: 4 of 4 shards not found ({first}); set data.missing_shards=skip"
    assert expected in proc.stderr
