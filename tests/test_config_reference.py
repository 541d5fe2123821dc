"""The config reference is generated from the dataclasses; the README and docs/config.md must be it."""

import re

import pytest

from clipscale import config_reference as ref
from clipscale.config import Config

from helpers import REPO, run_cli


def test_every_setting_has_a_docstring():
    assert ref.undocumented() == []
    keys = [key for key, *_ in ref.rows()]
    assert len(keys) == len(set(keys)) > 60
    assert "checkpoint.async" in keys and "data.prefetch_factor" in keys and "logging.progress" in keys


def test_docs_page_and_readme_table_are_the_generated_reference():
    hint = "run `make docs` (clipscale config --write-docs) and commit the result"
    assert (REPO / "docs" / "config.md").read_text() == ref.page(), hint
    assert ref.readme_block((REPO / "README.md").read_text()) == ref.table(), hint


KNOWN_NON_KEYS = {"optim.lrr"}  # the README's example of a typo


@pytest.mark.parametrize("doc", ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md", "slurm/README.md"])
def test_keys_named_in_the_docs_exist(doc):
    """Every `section.key` a doc shows in backticks or as `section.key=value` is a real key (or a
    section, or an item of a list key such as data.sources.1.weight)."""
    sections = "|".join(Config.__dataclass_fields__)
    key = rf"(?:{sections})\.[a-z_0-9]+(?:\.[a-z_0-9]+)*"
    text = (REPO / doc).read_text()
    named = set(re.findall(rf"`({key})`", text)) | set(re.findall(rf"(?<![\w./-])({key})=", text))
    keys = {k for k, *_ in ref.rows()}
    prefixes = {k.rsplit(".", i)[0] for k in keys for i in range(k.count(".") + 1)}
    unknown = sorted(
        k for k in named - KNOWN_NON_KEYS if k not in prefixes and not is_list_item(k, keys) and not is_file(k, keys)
    )
    assert unknown == [], f"{doc} names config keys the config does not have: {unknown}"


def is_file(token: str, keys: set) -> bool:
    """`loss.png`, `train.py`: a file name, not a key (but `data.manifest.json` would be a stale key)."""
    head, _, suffix = token.rpartition(".")
    return suffix in ("png", "md", "json", "jsonl", "yaml", "pt", "tar", "sh", "sbatch", "py") and head not in keys


def is_list_item(token: str, keys: set) -> bool:
    return re.sub(r"\.\d+(?=\.|$)", "[]", token) in keys or bool(re.fullmatch(r"[a-z_.]+\.\d+", token))


def test_reference_detects_a_missing_docstring_and_a_changed_default():
    from dataclasses import dataclass

    @dataclass
    class Toy:
        documented: int = 1
        """Has one."""
        bare: str = "x"

    assert ref.field_docs(Toy) == {"documented": "Has one."}
    assert ref.undocumented(Toy) == ["bare"]
    assert [r[2] for r in ref.rows(Toy)] == ["1", "x"]


def test_cli_prints_the_reference():
    out = run_cli("config", "--reference").stdout
    assert out == ref.page()
