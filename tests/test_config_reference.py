"""The config reference is generated from the dataclasses; docs/config.md must be it."""

from clipscale.config import reference as ref

from helpers import REPO, run_cli


def test_every_setting_has_a_docstring():
    assert ref.undocumented() == []
    keys = [key for key, *_ in ref.rows()]
    assert len(keys) == len(set(keys)) > 60
    assert "checkpoint.async" in keys and "data.prefetch_factor" in keys and "logging.progress" in keys


def test_docs_page_is_the_generated_reference():
    hint = "run `make docs` (clipscale config --write-docs) and commit the result"
    assert (REPO / "docs" / "config.md").read_text() == ref.page(), hint


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
