"""Build the DeepSpeed ops a CPU run JIT-compiles at its first start (today: the shared-memory
collectives of the CPU accelerator) into torch's extension cache, once, at install time.

Without this the first DeepSpeed job of a fresh machine compiles them inside its start-up (about a
minute on 2 idle cores, several when the cores are busy), and concurrent first jobs wait on each
other's lock. `make install` runs it; it does nothing when the ops are built already, when DeepSpeed
is not installed, or where its accelerator needs none.

    .venv/bin/python tools/build_deepspeed_ops.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import time


def main() -> int:
    if importlib.util.find_spec("deepspeed") is None:
        print("build_deepspeed_ops: deepspeed is not installed; nothing to build")
        return 0
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates the accelerator and the build
        from deepspeed.comm.torch import build_shm_op

        op = build_shm_op()
    took = time.perf_counter() - t0
    state = "ready" if op is not None else "not used here"
    print(f"build_deepspeed_ops: shared-memory collectives {state} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
