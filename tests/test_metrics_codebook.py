"""docs/metrics.md documents every column of metrics.csv, and only those; the columns are read from what
`saescale.scaling.collect` writes for a small fixture, not from a list kept here."""

from __future__ import annotations

import json
import math
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


@pytest.mark.parametrize("column", ["fvu", "l0", "kl_div_with_sae", "ce_loss_score",
                                    "average_max_decoder_cosine_sim"])
def test_shared_quantities_name_their_saebench_metric(column):
    assert re.search(r"`[a-z_0-9]+`", codebook()[column].split(" | ")[-1]), column


# (our earlier name, SAEBench's `core` name) for each quantity the two compute the same way, formula checked
# against SAEBench's core eval; columns whose quantity differs (fvu, dead_fraction, the deltas, token counts)
# keep ours. Written out here rather than read from collect.RENAMED, so that a change to either shows.
SAEBENCH_PAIRS = [("ce_clean", "ce_loss_without_sae"), ("ce_spliced", "ce_loss_with_sae"),
                  ("ce_zero_ablation", "ce_loss_with_ablation"), ("loss_recovered", "ce_loss_score"),
                  ("kl", "kl_div_with_sae"), ("kl_zero_ablation", "kl_div_with_ablation"),
                  ("nn_mean", "average_max_decoder_cosine_sim")]
SAEBENCH_ONLY = ["l0", "kl_div_score"]  # l0 always had SAEBench's name; kl_div_score is new


def test_same_quantities_carry_saebenchs_names_and_the_old_names_are_gone(tmp_path, monkeypatch):
    columns = written_columns(tmp_path, monkeypatch)
    for old, new in SAEBENCH_PAIRS:
        assert old not in columns, f"metrics.csv still writes {old}; SAEBench's name is {new}"
    for name in [new for _, new in SAEBENCH_PAIRS if new != "ce_loss_with_ablation"] + SAEBENCH_ONLY:
        assert name in columns, name
        assert codebook()[name].split(" | ")[-1].startswith(f"`{name}` (same"), f"docs/metrics.md row {name}"
    assert "ce_loss_with_ablation" in columns
    assert dict(SAEBENCH_PAIRS) == collect.RENAMED


def test_columns_keeping_our_names_say_why_not_saebenchs():
    """FVU is computed on the normalized activations, SAEBench's explained variance on the SAE's input space:
    not the same quantity, so not SAEBench's name, and the codebook says so."""
    book = codebook()
    assert "explained_variance" not in book and "frac_alive" not in book
    for ours in ("fvu", "dead_fraction", "eval_tokens", "downstream_tokens", "delta_ce",
                 "delta_ce_zero_ablation"):
        assert book[ours].split(" | ")[-1].startswith(("≈", "—", "1 −")), ours


def test_the_scores_follow_saebenchs_formulas():
    from saescale.evaluate.downstream import downstream_summary

    clean, sae, abl, kl_sae, kl_abl = 3.0, 3.2, 5.5, 0.1, 2.5
    m = downstream_summary(clean, sae, abl, kl_sae, kl_abl)
    assert m["ce_loss_score"] == pytest.approx((abl - sae) / (abl - clean))
    assert m["kl_div_score"] == pytest.approx((kl_abl - kl_sae) / kl_abl)
    assert (m["ce_loss_without_sae"], m["ce_loss_with_sae"], m["ce_loss_with_ablation"]) == (clean, sae, abl)
    assert (m["kl_div_with_sae"], m["kl_div_with_ablation"]) == (kl_sae, kl_abl)
    assert m["delta_ce"] == pytest.approx(sae - clean)
    assert m["delta_ce_zero_ablation"] == pytest.approx(abl - clean)
    assert set(m) == set(collect.DOWNSTREAM)  # every downstream column of metrics.csv, no other
    baseline_free = downstream_summary(clean, sae, clean, kl_sae, 0.0)
    assert math.isnan(baseline_free["ce_loss_score"]) and math.isnan(baseline_free["kl_div_score"])


def test_a_record_or_table_of_an_earlier_version_is_refused_by_name(tmp_path):
    old = {"subject": "tiny", "layer": 2, "arch": "topk", "n": 64, "k": 4,
           "downstream": {"delta_ce": 0.1, "kl": 0.05, "ce_clean": 3.0, "loss_recovered": 0.9}}
    path = tmp_path / "n64_k4.json"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"n64_k4\.json.*kl -> kl_div_with_sae.*rerun its evaluate job"):
        collect.collect([str(path)])
    with pytest.raises(ValueError, match=r"metrics\.csv.*nn_mean -> average_max_decoder_cosine_sim"):
        collect.refuse_old_names(["fvu", "nn_mean"], "metrics.csv", "its scaling job")
    collect.refuse_old_names(collect.COLUMNS, "metrics.csv", "its scaling job")  # today's columns pass
