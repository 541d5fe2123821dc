"""Writes tests/data/legacy/: small checkpoints of every format, as a released clipscale wrote them.

tests/test_compat.py resumes, exports and evaluates them with today's code, so a change that moves
or renames what a checkpoint refers to (modules, keys, formats) cannot break users' runs unnoticed.
The files there were written at commit 60ee967 (before the package layout of issue 27); rerun this
script only to add a format, never to refresh the existing ones.

    .venv/bin/python tests/data/make_legacy_checkpoints.py
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import make_shards  # noqa: E402

RUN = [  # the settings tests/test_compat.py resumes with (LEGACY_RUN there)
    "model.name=clip-fixture",
    f"model.config_dirs=[{HERE / 'models'}]",
    "model.precision=fp32",
    "train.device=cpu",
    "train.steps=2",
    "data.batch_size=4",
    "data.workers=0",
    "logging.progress=false",
    "checkpoint.keep_last=1",
    "checkpoint.every_n_steps=1000",
]
FORMATS = {
    "ddp": (1, ["engine.name=ddp"]),
    "fsdp2": (1, ["engine.name=fsdp2"]),
    "zero2": (2, ["engine.name=deepspeed", "engine.zero_stage=2"]),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "shards", n_shards=2, per_shard=8, size=16)
        for name, (nproc, args) in FORMATS.items():
            run_dir = Path(tmp) / name
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
            cmd = [
                sys.executable,
                *launcher,
                "-m",
                "clipscale.train",
                f"run.dir={run_dir}",
                f"data.train_shards={shards}",
                *RUN,
                *args,
            ]
            subprocess.run(cmd, check=True)
            out = HERE / "legacy" / name
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(run_dir / "checkpoints", out)
            print("wrote", out)


if __name__ == "__main__":
    main()
