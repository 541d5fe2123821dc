"""Faults at the file-system boundary, for tests that run clipscale in a child process: Python
imports this module at start-up when tests/faults is on the child's PYTHONPATH
(process_helpers.with_faults). Nothing in clipscale is patched: every `open` of the process is.

CLIPSCALE_FAULTS is a JSON list of rules, each about the files of one base name ("name") or of
the base names that match a shell pattern ("glob"):
    {"name": "step_00000004.pt", "opens": [2], "error": "EIO"}   its 2nd open (in this process) fails
    {"name": "step_00000004.pt", "from": 2, "error": "EIO"}      its 2nd and every later open fails
    {"glob": "*step_00000040.pt*", "write_budget": 65536, "error": "ENOSPC"}
        a file opened for writing takes 65,536 bytes, then every write fails (a full disk)
"error" is an errno name (EIO, ENOSPC, EACCES, ETIMEDOUT...) raised as OSError, or "MemoryError".
"""

import builtins
import errno
import fnmatch
import io
import json
import os

RULES = json.loads(os.environ.get("CLIPSCALE_FAULTS") or "[]")


def _error(rule: dict, path) -> BaseException:
    if rule["error"] == "MemoryError":
        return MemoryError(f"injected MemoryError opening {os.fsdecode(path)}")
    code = getattr(errno, rule["error"])
    return OSError(code, f"{os.strerror(code)} (injected)", os.fsdecode(path))


def _matches(rule: dict, name: str) -> bool:
    return rule.get("name") == name or ("glob" in rule and fnmatch.fnmatchcase(name, rule["glob"]))


class _BudgetWriter:
    """A file opened for writing whose writes fail once `budget` bytes were taken."""

    def __init__(self, file, budget: int, error: BaseException):
        self._file, self._left, self._error = file, budget, error

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._left:
            self._left = 0
            raise self._error
        self._left -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


def _install() -> None:
    real_open, counts = io.open, [0] * len(RULES)

    def faulty_open(file, mode="r", *args, **kwargs):
        budget = None
        if isinstance(file, (str, bytes, os.PathLike)):
            name = os.path.basename(os.fsdecode(file))
            for i, rule in enumerate(RULES):
                if not _matches(rule, name):
                    continue
                if "write_budget" in rule:
                    if any(c in mode for c in "wax+"):
                        budget = rule
                    continue
                counts[i] += 1
                if counts[i] in rule.get("opens", ()) or counts[i] >= rule.get("from", float("inf")):
                    raise _error(rule, file)
        opened = real_open(file, mode, *args, **kwargs)
        if budget is not None:
            return _BudgetWriter(opened, budget["write_budget"], _error(budget, file))
        return opened

    builtins.open = io.open = faulty_open


if RULES:
    _install()
