"""The documentation says what the code does: every config key written in README.md, docs/ and the
other guides exists, and every `clipscale ...` command shown in their code blocks parses (its
options with the CLI's parser, its key=value overrides against the config's keys)."""

import re
import shlex

import pytest

from clipscale.cli import build_parser
from clipscale.config import Config, read_config
from clipscale.config import reference as ref
from clipscale.errors import ConfigError

from helpers import REPO

DOCS = sorted(
    [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "BENCHMARKS.md", REPO / "slurm" / "README.md"]
    + [p for p in (REPO / "docs").glob("*.md") if p.name != "config.md"]  # (config.md is generated from the code)
)
KNOWN_NON_KEYS = {"optim.lrr"}  # the README's example of a typo
KEYS = {k for k, *_ in ref.rows()}
PREFIXES = {k.rsplit(".", i)[0] for k in KEYS for i in range(k.count(".") + 1)}


def named_keys(text: str) -> set[str]:
    """Every `section.key` a text shows in backticks or as `section.key=value`."""
    sections = "|".join(Config.__dataclass_fields__)
    key = rf"(?:{sections})\.[a-z_0-9]+(?:\.[a-z_0-9]+)*"
    return set(re.findall(rf"`({key})`", text)) | set(re.findall(rf"(?<![\w./-])({key})=", text))


def unknown_keys(text: str) -> list[str]:
    return sorted(
        k for k in named_keys(text) - KNOWN_NON_KEYS if k not in PREFIXES and not is_list_item(k) and not is_file(k)
    )


def is_file(token: str) -> bool:
    """`loss.png`, `train.py`: a file name, not a key (but `data.manifest.json` would be a stale key)."""
    head, _, suffix = token.rpartition(".")
    return suffix in ("png", "md", "json", "jsonl", "yaml", "pt", "tar", "sh", "sbatch", "py") and head not in KEYS


def is_list_item(token: str) -> bool:
    return re.sub(r"\.\d+(?=\.|$)", "[]", token) in KEYS or bool(re.fullmatch(r"[a-z_.]+\.\d+", token))


def shown_commands(text: str) -> list[str]:
    """The `clipscale ...` command lines of a text's fenced code blocks (continuations joined; what a
    command prints, `clipscale: error: ...`, is not a command)."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if line.startswith("clipscale ") and not line.startswith(("clipscale:", "clipscale launch:")):
                commands.append(line)
    return commands


def problem_of(command: str) -> str | None:
    """Why `command` would not run as written (None: it parses and names only real config keys)."""
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return "the CLI's parser refuses it"
    overrides = [a for a in getattr(args, "overrides", None) or [] if "=" in a]
    try:
        read_config(None, overrides)  # keys and types (the values may name the reader's own files)
    except ConfigError as exn:
        return str(exn)
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_keys_named_in_the_docs_exist(doc):
    """Every `section.key` a doc shows is a real key (or a section, or an item of a list key such as
    data.sources.1.weight)."""
    assert unknown_keys(doc.read_text()) == [], f"{doc.name} names config keys the config does not have"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_shown_in_the_docs_parse(doc):
    commands = shown_commands(doc.read_text())
    problems = {c: p for c in commands if (p := problem_of(c))}
    assert problems == {}


def test_the_docs_show_commands_at_all():
    shown = {str(doc.relative_to(REPO)): len(shown_commands(doc.read_text())) for doc in DOCS}
    assert sum(shown.values()) >= 15 and shown["README.md"] >= 8, shown


def test_the_checks_fail_on_a_renamed_key_and_a_changed_option():
    readme = (REPO / "README.md").read_text()
    assert "checkpoint.resume=auto" in readme
    assert unknown_keys(readme.replace("checkpoint.resume=auto", "checkpoint.restore=auto")) == ["checkpoint.restore"]
    assert unknown_keys(readme.replace("`model.name`", "`model.arch`")) == ["model.arch"]
    assert problem_of("clipscale export --checkpoint runs/x --output m.pt") is None
    assert problem_of("clipscale export --checkpoint runs/x --to m.pt") == "the CLI's parser refuses it"
    assert "unknown key 'optim.lrr'" in problem_of("clipscale train --config x.yaml optim.lrr=3e-4")
    assert problem_of("clipscale train --config x.yaml data.train_shards=/data/{0..9}.tar optim.lr=3e-4") is None


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    linked = set(re.findall(r"\]\((docs/[a-z-]+\.md)", "\n".join(lines)))
    pages = {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    for page in pages:
        assert (REPO / page).read_text().startswith("# "), page


def test_relative_links_in_the_docs_lead_somewhere():
    broken = []
    for doc in DOCS + [REPO / "docs" / "config.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []
