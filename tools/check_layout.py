"""The shape of src/clipscale, counted: entries directly under the package (modules and packages,
__init__/__main__ not counted), files over the line limit, functions over the line limit.

    .venv/bin/python tools/check_layout.py            # prints the counts; exit 1 when a limit is broken
    .venv/bin/python tools/check_layout.py --list     # also every module with its lines

Limits (issue 27): at most 18 entries, no file over 600 lines, no function over 60 lines (a function
counts from its `def` line to its last line, docstring included). The import direction is checked
by tests/test_layering.py; tests/test_layering.py also runs this script.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipscale"
MAX_ENTRIES, MAX_FILE_LINES, MAX_FUNCTION_LINES = 18, 600, 60


def entries(package: Path) -> list[str]:
    """Modules and packages directly under `package` (data folders such as configs/ are neither)."""
    out = []
    for path in sorted(package.iterdir()):
        if path.suffix == ".py" and path.stem not in ("__init__", "__main__"):
            out.append(path.name)
        elif path.is_dir() and (path / "__init__.py").is_file():
            out.append(path.name + "/")
    return out


def long_functions(path: Path, limit: int) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def report(package: Path = PACKAGE, show_files: bool = False) -> tuple[list[str], int]:
    """(the report's lines, the number of broken limits)."""
    files = sorted(package.rglob("*.py"))
    lines = {p: len(p.read_text().splitlines()) for p in files}
    top = entries(package)
    long_files = [p for p in files if lines[p] > MAX_FILE_LINES]
    long_fns = [(p, name, n) for p in files for name, n in long_functions(p, MAX_FUNCTION_LINES)]
    functions = sum(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
    )
    out = [
        f"entries under src/clipscale: {len(top)} (limit {MAX_ENTRIES}): {' '.join(top)}",
        f"python files: {len(files)}, {sum(lines.values())} lines, {functions} functions; "
        f"longest file {max(lines.values())} lines, longest function "
        f"{max((n for p in files for _, n in long_functions(p, 0)), default=0)} lines",
        f"files over {MAX_FILE_LINES} lines: {len(long_files)}",
        *(f"  {p.relative_to(package.parent)}: {lines[p]}" for p in long_files),
        f"functions over {MAX_FUNCTION_LINES} lines: {len(long_fns)}",
        *(f"  {p.relative_to(package.parent)}: {name} ({n})" for p, name, n in long_fns),
    ]
    if show_files:
        out += [f"  {lines[p]:5d}  {p.relative_to(package.parent)}" for p in files]
    broken = (len(top) > MAX_ENTRIES) + len(long_files) + len(long_fns)
    return out, broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="also list every module with its lines")
    parser.add_argument("--package", type=Path, default=PACKAGE, help="the package folder (default: src/clipscale)")
    args = parser.parse_args(argv)
    lines, broken = report(args.package, args.list)
    print("\n".join(lines))
    print("OK" if not broken else f"FAILED: {broken} limit(s) broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
