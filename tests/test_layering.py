"""The shape of the code: imports point down through the layers, nothing imports in a circle, and
the shard format and shard tools load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipscale"

# Top to bottom; a module may import its own layer or a lower one (never a higher one).
LAYERS = [
    ("entry points", {"__main__", "cli", "demo", "launch"}),
    ("trainer", {"train"}),
    ("evaluation", {"evaluate"}),  # below the trainer: evaluating a checkpoint never loads the trainer
    ("components", {"engine", "checkpoint", "loss", "data", "shards"}),
    ("model", {"model", "optim"}),
    ("format/config", {"wds", "config"}),
    ("job and utilities", {"__init__", "job", "metrics", "errors", "fsutil"}),
]
NEVER = [
    ("data", "shards"),
    ("shards", "data"),
    ("wds", "config"),
    ("wds", "job"),
]  # the format knows nothing of the run


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """clipscale modules that `name` imports (anywhere in the file: lazy imports are arrows too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("clipscale") and target != name:
                found.add(target)
    return found


def component(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return "__main__" if parts[1] == "__main__" else parts[1]


def layer_of(comp: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if comp in members:
            return i
    raise AssertionError(f"component {comp!r} is in no layer: add it to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]):
    """One cycle as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_arrow_points_down(graph):
    wrong = [
        f"{a} ({LAYERS[layer_of(component(a))][0]}) -> {b} ({LAYERS[layer_of(component(b))][0]})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(component(a)) > layer_of(component(b))
    ]
    assert not wrong, "imports that point up:\n" + "\n".join(sorted(wrong))
    forbidden = [
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if (component(a), component(b)) in NEVER
    ]
    assert not forbidden, "imports between packages that must stay apart:\n" + "\n".join(forbidden)


def test_no_import_circles(graph):
    assert find_cycle(graph) is None, f"module import circle: {' -> '.join(find_cycle(graph))}"
    components: dict[str, set[str]] = {}
    for a, targets in graph.items():
        components.setdefault(component(a), set()).update(component(b) for b in targets if component(b) != component(a))
    cycle = find_cycle(components)
    assert cycle is None, f"package import circle: {' -> '.join(cycle)}"


def test_the_checker_sees_circles_and_upward_arrows():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("wds") > layer_of("data") > layer_of("train") > layer_of("cli")


TORCH_FREE = """
import sys
import clipscale.shards, clipscale.shards.build, clipscale.shards.scan, clipscale.shards.verify
import clipscale.shards.inspect, clipscale.shards.sources
import clipscale.wds.tar, clipscale.wds.schema, clipscale.wds.shardlist, clipscale.wds.manifest
import clipscale.config, clipscale.config.reference, clipscale.job.supervise, clipscale.job.status, clipscale.cli
heavy = sorted(m for m in ("torch", "webdataset", "open_clip", "deepspeed") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_shard_tools_and_the_format_load_no_torch():
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none", out.stdout + out.stderr


CHECK_LAYOUT = PACKAGE.parents[1] / "tools" / "check_layout.py"


def test_the_package_keeps_its_shape():
    """At most 18 entries under src/clipscale, no file over 600 lines, no function over 60 (counts printed)."""
    out = subprocess.run([sys.executable, str(CHECK_LAYOUT)], capture_output=True, text=True)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "entries under src/clipscale:" in out.stdout and out.stdout.strip().endswith("OK")


def test_the_shape_check_sees_too_many_entries_long_files_and_long_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for i in range(19):
        (pkg / f"m{i}.py").write_text("x = 1\n")
    body = "".join(f"    y{i} = {i}\n" for i in range(61))
    (pkg / "long.py").write_text("def long():\n" + body + "\n" * 600)
    out = subprocess.run([sys.executable, str(CHECK_LAYOUT), "--package", str(pkg)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "entries under src/clipscale: 20 (limit 18)" in out.stdout
    assert "files over 600 lines: 1" in out.stdout and "long.py: long (62)" in out.stdout
