"""`clipscale demo` end to end, shortened: 2 processes under torchrun, evaluation on the held-out
digits, and the report with its pictures. (The full demo's accuracy is measured by running it:
see README and the issue notes.)"""

import json

import pytest
from PIL import Image

from clipscale.metrics import read_jsonl

from helpers import run_cli

pytestmark = pytest.mark.slow


def test_short_demo_writes_metrics_report_and_pictures(tmp_path):
    run = tmp_path / "demo"
    proc = run_cli(
        "demo",
        "--run-dir",
        str(run),
        "--steps",
        "20",
        "eval.every_n_steps=10",
        "logging.progress=false",
        "data.batch_size=32",
    )
    assert "held-out zero-shot top-1" in proc.stderr and "report.md" in proc.stderr
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for key in ("eval/zeroshot_top1", "eval/zeroshot_top5", "eval/i2t_r1", "eval/t2i_r1"):
        assert 0.0 <= evals[-1][key] <= 1.0
    assert evals[-1]["eval/zeroshot_images"] == 359  # the held-out 20% of 1,797 scans
    report = (run / "report.md").read_text()
    assert "2 process(es)" in report and f"{100 * evals[-1]['eval/zeroshot_top1']:.1f}%" in report
    for name, min_size in (("loss.png", (600, 300)), ("samples.png", (600, 400))):
        with Image.open(run / name) as img:
            assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
            assert len(set(img.convert("L").getdata())) > 20  # a drawing, not a blank canvas
    assert (run / "checkpoints" / "latest").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["world_size"] == 2
