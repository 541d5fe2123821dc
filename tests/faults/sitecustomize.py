"""Faults at the file-system boundary, for tests that run clipscale in a child process: Python
imports this module at start-up when tests/faults is on the child's PYTHONPATH
(process_helpers.with_faults). Nothing in clipscale is patched: every `open` of the process is.

CLIPSCALE_FAULTS is a JSON list of rules, each about the files of one base name:
    {"name": "step_00000004.pt", "opens": [2], "error": "EIO"}   its 2nd open (in this process) fails
    {"name": "step_00000004.pt", "from": 2, "error": "EIO"}      its 2nd and every later open fails
"error" is an errno name (EIO, ENOSPC, EACCES, ETIMEDOUT...) raised as OSError, or "MemoryError".
"""

import builtins
import errno
import io
import json
import os

RULES = json.loads(os.environ.get("CLIPSCALE_FAULTS") or "[]")


def _error(rule: dict, path) -> BaseException:
    if rule["error"] == "MemoryError":
        return MemoryError(f"injected MemoryError opening {os.fsdecode(path)}")
    code = getattr(errno, rule["error"])
    return OSError(code, f"{os.strerror(code)} (injected)", os.fsdecode(path))


def _install() -> None:
    real_open, counts = io.open, [0] * len(RULES)

    def faulty_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            name = os.path.basename(os.fsdecode(file))
            for i, rule in enumerate(RULES):
                if rule["name"] == name:
                    counts[i] += 1
                    if counts[i] in rule.get("opens", ()) or counts[i] >= rule.get("from", float("inf")):
                        raise _error(rule, file)
        return real_open(file, *args, **kwargs)

    builtins.open = io.open = faulty_open


if RULES:
    _install()
