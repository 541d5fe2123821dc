"""The config reference is generated from the dataclasses; the README and docs/config.md must be it."""

import re

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


def test_keys_named_anywhere_in_the_readme_exist():
    sections = "|".join(Config.__dataclass_fields__)
    named = set(re.findall(rf"`((?:{sections})\.[a-z_0-9.]+)", (REPO / "README.md").read_text()))
    keys = {key for key, *_ in ref.rows()}
    assert len(named) > 20, "the README names no config keys?"
    files = re.compile(r"\.(png|md|json|jsonl|yaml|pt|tar)$")  # `loss.png` is a file, not a key
    unknown = sorted(k for k in named if k not in keys and not files.search(k))
    assert unknown == [], f"the README names keys the config does not have: {unknown}"


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
