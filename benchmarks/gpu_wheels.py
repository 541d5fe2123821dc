"""Fetch, on a machine with network, the wheels `make gpu-check` installs offline on a GPU machine.

Every package of benchmarks/gpu-wheels.txt at the version this environment runs (the versions the
test suite passed with), as wheels for the GPU machine's Python (--python-version, default 3.12) on
manylinux x86_64, without dependencies (the GPU image has torch, timm and the rest). DeepSpeed has no
wheel on PyPI: it is built here (pure Python, no compiled ops). webdataset 0.2.86, which
open_clip_train needs, goes to a folder of its own (ref/): it must not shadow clipscale's 1.x.

    make gpu-wheels            # or: .venv/bin/python benchmarks/gpu_wheels.py --dest gpu-wheels
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
REFERENCE = ["webdataset==0.2.86"]


def wanted(listing: Path) -> list[str]:
    """name==version for every package of the listing, pinned to this environment's version."""
    pins = []
    for line in listing.read_text().splitlines():
        name = line.split("#")[0].strip()
        if not name:
            continue
        if "==" not in name:
            try:
                name = f"{name}=={version(name)}"
            except PackageNotFoundError:
                pass  # not installed here: the newest
        pins.append(name)
    return pins


def download(pins: list[str], dest: Path, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *platforms,
           "-d", str(dest), *pins]  # fmt: skip
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / "gpu-wheels"))
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = wanted(ROOT / "benchmarks" / "gpu-wheels.txt")
    download(pins, dest, args.python_version)
    download(REFERENCE, dest / "ref", args.python_version)
    deepspeed = f"deepspeed=={version('deepspeed')}"
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(dest), deepspeed], check=True, env=env)  # fmt: skip
    (dest / "PYTHON_VERSION").write_text(args.python_version + "\n")  # make gpu-check compares its interpreter
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    print(f"{len(wheels)} wheels in {dest} (+ {', '.join(REFERENCE)} in {dest / 'ref'}):\n  " + "\n  ".join(wheels))


if __name__ == "__main__":
    main()
