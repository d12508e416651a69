"""docs/metrics.md documents every column of metrics.csv, and only those; the columns are read from what
`saescale.scaling.collect` writes for a small fixture, not from a list kept here."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from saescale.report import method_doc as md
from saescale.scaling import collect

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = ROOT / "docs" / "metrics.md"
ROW = re.compile(r"^\| `([^`]+)` \|(.*)\|\s*$", re.M)


class Record(dict):
    """An eval record that has whatever key the collector asks for: a nested record for a mapping it reads
    into, 1.0 as a value; so the fixture follows collect.flatten without restating its keys."""

    def __missing__(self, key):
        return Record()

    def __float__(self) -> float:
        return 1.0

    def get(self, key, default=None):
        return self[key] if key in self else (default if default is not None else 1.0)


def written_columns(tmp_path: Path, monkeypatch) -> list[str]:
    """The header of the metrics.csv `write_scaling` writes from one fixture eval record."""
    identity = {"subject": "tiny", "layer": 2, "arch": "topk", "n": 64, "k": 4}
    monkeypatch.setattr(collect, "read_json", lambda path: Record(identity))
    monkeypatch.chdir(tmp_path)  # the suite's files are looked up relative to here: none exist
    table = collect.collect(["eval.json"])
    out = tmp_path / "metrics.csv"
    table.to_csv(out, index=False)  # as write_scaling does (write_text_atomic(table.to_csv(index=False)))
    return list(pd.read_csv(out, nrows=0).columns)


def codebook() -> dict[str, str]:
    return {name: rest for name, rest in ROW.findall(CODEBOOK.read_text(encoding="utf-8"))}


def test_fixture_writes_the_collectors_columns(tmp_path, monkeypatch):
    assert written_columns(tmp_path, monkeypatch) == list(collect.COLUMNS)


def test_every_written_column_is_in_the_codebook(tmp_path, monkeypatch):
    missing = [c for c in written_columns(tmp_path, monkeypatch) if c not in codebook()]
    assert not missing, f"metrics.csv columns without an entry in docs/metrics.md: {missing}"


def test_codebook_lists_no_column_the_code_does_not_write(tmp_path, monkeypatch):
    stale = sorted(set(codebook()) - set(written_columns(tmp_path, monkeypatch)))
    assert not stale, f"docs/metrics.md documents columns metrics.csv does not have: {stale}"


def test_codebook_rows_are_complete_and_cite_existing_sections():
    anchors = md.doc_anchors((ROOT / "docs" / "method.md").read_text(encoding="utf-8"))
    for name, rest in codebook().items():
        cells = [c.strip() for c in rest.split(" | ")]
        assert len(cells) == 5 and all(cells), f"docs/metrics.md row {name}: {cells}"
        for sid in re.findall(rf"§({md.SECTION_ID})", cells[3]):
            assert md.anchor(sid) in anchors, f"docs/metrics.md row {name} cites §{sid}, not in method.md"


def test_checker_catches_an_undocumented_column(tmp_path, monkeypatch):
    monkeypatch.setattr(collect, "COLUMNS", [*collect.COLUMNS, "brand_new_metric"])
    assert "brand_new_metric" in written_columns(tmp_path, monkeypatch)
    assert "brand_new_metric" not in codebook()


@pytest.mark.parametrize("column", ["fvu", "l0", "kl", "loss_recovered", "nn_mean"])
def test_shared_quantities_name_their_saebench_metric(column):
    assert re.search(r"`[a-z_0-9]+`", codebook()[column].split(" | ")[-1]), column
