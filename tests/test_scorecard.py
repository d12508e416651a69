"""The report's opening scorecard (one row per judged claim, badge, working link) and the verdicts issue 19
changed: each on planted data where it agrees, where it does not, and where its interval straddles."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from test_report import _arch_config, _skip_png_encoding, write_arch_run
from test_report_suite import render as render_suite

from saescale.report import comparison as cmp
from saescale.report import scorecard
from saescale.report import suite_verdicts as sv
from saescale.report.arch_sections import verdict_view
from saescale.report.render import n2g_standard_errors, render_report
from saescale.report.tables import findings


def _render_arch_run(tmp_path: Path, monkeypatch) -> str:
    _skip_png_encoding(monkeypatch)
    cfg = _arch_config()
    monkeypatch.chdir(tmp_path)
    write_arch_run(cfg)
    render_report(cfg, "reports/report.html")
    return Path("reports/report.html").read_text()


def test_the_scorecard_has_one_row_per_rendered_verdict_each_with_a_badge_and_a_working_link(
        tmp_path, monkeypatch):
    html = _render_arch_run(tmp_path, monkeypatch)
    card, rows, verdicts = _check_links(html)
    assert len(rows) >= 8  # 6 arch verdicts, Fig. 5b, subject size
    assert "“At a fixed number of latents (n = 32768), TopK has a better" in card  # the paper's words
    assert "Thresholds: " in html and "(our choice)" in html  # provenance beside each verdict


def test_the_suite_verdicts_are_on_the_scorecard_too(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    card, rows, _ = _check_links(render_suite(tmp_path, monkeypatch))
    for section in ("Probe loss", "N2G explanations", "Explanation reconstruction", "Ablation sparsity",
                    "Latent geometry"):
        assert f">{section}</a>" in card
    assert "“TopK beats ReLU on N2G F1 score." in card


def _check_links(html: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """The scorecard, its rows and the rendered verdicts; asserts one row per verdict, each with a badge that
    matches its verdict and a link to an id present exactly once."""
    card = html[html.index('<table class="scorecard">'):]
    card = card[:card.index("</table>")]
    rows = re.findall(r"<tr>\s*<td class=\"claim-text\">.*?</tr>", card, flags=re.S)
    verdicts = re.findall(r'<div class="verdict (agrees|disagrees|unknown)" id="([^"]+)"', html)
    assert len(rows) == len(verdicts) == html.count('<div class="verdict ')
    assert html.index('<table class="scorecard">') < html.index('id="run"')  # the report opens with it
    ids = dict((v_id, cls) for cls, v_id in verdicts)
    for row in rows:
        badge = re.search(r'<span class="badge (agrees|disagrees|unknown)">([^<]+)</span>', row)
        assert badge and badge.group(2) in ("agrees", "does not agree", "cannot tell")
        target = re.search(r'<a href="#([^"]+)">', row).group(1)
        assert target in ids and html.count(f'id="{target}"') == 1
        assert badge.group(1) == ids[target]  # the badge is the linked verdict's
    return card, rows, verdicts


def test_collect_takes_every_scaling_verdict_whatever_its_key_and_skips_unrendered_sections():
    v = verdict_view(cmp.Verdict(True, "claim", ("x",), quote="words", source="Gao §3", paper_value="1",
                                 run_value="1.1 ± 0.1"))
    lay = {"id": "s-L0", "subject": "s", "layer": 0, "arch": {"matched": {"note": "not run"}},
           "scaling": {"present": True, "verdicts": {"compute": dict(v), "new_claim": dict(v)}}}
    ctx = {"layers": [lay, {**lay, "id": "t-L1", "subject": "t", "layer": 1,
                             "scaling": {"present": False, "verdicts": {"compute": dict(v)}}}],
           "subject_size": {"verdict": dict(v)}, "manifolds": {"toy": {"present": False}}}
    rows = scorecard.collect(ctx)
    assert [r["id"] for r in rows] == ["verdict-s-l0-scaling-compute", "verdict-s-l0-scaling-new-claim",
                                       "verdict-subject-size-verdict"]
    assert lay["scaling"]["verdicts"]["compute"]["id"] == rows[0]["id"]  # the section renders that id
    assert rows[0]["quote"] == "words" and rows[0]["run_value"] == "1.1 ± 0.1" and rows[0]["badge"] == "agrees"
    no_quote = verdict_view(cmp.Verdict(None, "our summary"))
    row = scorecard.collect({"layers": [], "subject_size": {"verdict": no_quote}})[0]
    assert row["paraphrase"] and row["quote"] == "our summary" and row["badge"] == "cannot tell"


# ---- the sign rule and the three-valued combination ---------------------------------------------------------

def test_a_sign_holds_only_when_its_interval_excludes_the_other_sign():
    assert cmp.sign_claim(0.3, 0.1) is True
    assert cmp.sign_claim(-0.3, 0.1) is False
    assert cmp.sign_claim(0.1, 0.1) is None  # 0.1 ± 0.2 straddles 0
    assert cmp.sign_claim(np.float64(0.1), math.nan) is True  # no spread measured: the point value
    v = cmp._combine([(True, "a"), (None, "b")], "p", "")
    assert v.agrees is None and v.tally == "1 of 2 checks hold, 1 cannot tell"
    assert cmp._combine([(np.bool_(True), "a"), (None, "b"), (np.bool_(False), "c")], "p", "").agrees is False


def test_joint_signs_in_the_findings_respect_their_error_bars():
    m = pd.DataFrame({"arch": ["topk"], "n": [64], "k": [8], "fvu": [0.1]})
    def joint(g, g_err):
        return {"fvu": {"joint": [{"arch": "topk", "ok": True, "gamma": g, "gamma_err": g_err, "eta": -0.1,
                                   "eta_err": 0.01}]}}
    assert "sign not resolved" in " ".join(findings(m, joint(-0.01, 0.05)))
    assert "negative beyond 2σ" in " ".join(findings(m, joint(-0.2, 0.05)))
    assert "positive beyond 2σ" in " ".join(findings(m, joint(0.2, 0.05)))


# ---- Fig. 2b: steeper for TopK, with slope errors ------------------------------------------------------------

def _slopes(topk_noise: float, relu_slope: float) -> list[dict]:
    ns = [64, 128, 256, 512]
    wiggle = np.array([1, -1, 1, -1]) * topk_noise
    rows = [{"arch": "topk", "n": n, "k": 8, "fvu": n ** -0.3 * math.exp(w)} for n, w in zip(ns, wiggle)]
    rows += [{"arch": "relu", "n": n, "k": 8, "fvu": n ** relu_slope * math.exp(w)} for n, w in zip(ns, wiggle)]
    return cmp.n_slopes(pd.DataFrame(rows))


def test_steeper_verdict_agrees_disagrees_or_cannot_tell_from_the_slope_errors():
    assert cmp.steeper_verdict(_slopes(0.01, -0.1)).agrees is True
    assert cmp.steeper_verdict(_slopes(0.01, -0.6)).agrees is False
    unsure = cmp.steeper_verdict(_slopes(0.3, -0.25))  # noise far larger than the slopes' difference
    assert unsure.agrees is None and "difference ±" in unsure.text
    assert unsure.quote.startswith("At a fixed sparsity level (L0 = 128)")


# ---- Fig. 5b: per k, never pooled ----------------------------------------------------------------------------

def _downstream(per_k: dict[int, list[float]], ns=(64, 128, 256)) -> pd.DataFrame:
    rows = []
    for k, dce in per_k.items():
        for n, d in zip(ns, dce):
            rows.append({"arch": "topk", "n": n, "k": k, "fvu": 0.5 * n ** -0.3 * k ** -0.2, "delta_ce": d})
    return pd.DataFrame(rows)


def test_fig_5b_is_judged_per_k_and_a_pooled_line_would_not_hide_a_broken_k():
    def law(k, c):
        return [c * (0.5 * n ** -0.3 * k ** -0.2) ** 1.5 for n in (64, 128, 256)]
    clean = _downstream({8: law(8, 1.0), 32: law(32, 5.0)})  # clean at each k, offsets differ across k
    fits = cmp.downstream_fits(clean)
    assert [f["k"] for f in fits] == [8, 32] and all(abs(f["slope"] - 1.5) < 1e-9 for f in fits)
    v = cmp.power_law_verdict(fits)
    assert v.agrees is True and "§4.1" in v.source
    broken = _downstream({8: law(8, 1.0), 32: [0.02, 0.05, 0.01]})  # k = 32: no power law
    v = cmp.power_law_verdict(cmp.downstream_fits(broken))
    assert v.agrees is False and any("k = 32" in f for f in v.failed)
    two = cmp.power_law_verdict(cmp.downstream_fits(_downstream({8: law(8, 1.0)[:2]}, ns=(64, 128))))
    assert two.agrees is None and "2 points fit any line" in two.text


# ---- suite verdicts: trends and the channel comparison with intervals -----------------------------------------

def test_a_noisy_trend_over_n_cannot_tell_and_a_clean_one_decides():
    ns = (32, 64, 128, 256)
    def grid(values):
        return pd.DataFrame([{"arch": "topk", "n": n, "k": 8, "l0": 8, "probe_loss": v} for n, v in zip(ns, values)])
    assert sv.probe_verdict(grid([0.50, 0.48, 0.46, 0.44])).agrees is True
    assert sv.probe_verdict(grid([0.44, 0.46, 0.48, 0.50])).agrees is False
    noisy = sv.probe_verdict(grid([0.50, 0.40, 0.52, 0.41]))
    assert noisy.agrees is None and noisy.unsure


def test_latents_sparser_than_channels_needs_the_gap_beyond_the_sems():
    m = pd.DataFrame({"arch": "topk", "n": [64], "k": [8], "d_model": 32, "ablation_sparsity": [0.10],
                      "ablation_sparsity_resid": [0.20], "sem": [0.01], "sem_ch": [0.01]})
    assert sv.ablation_verdict(m).agrees is True
    assert sv.ablation_verdict(m.assign(sem=0.08, sem_ch=0.08)).agrees is None  # 0.1 ± 0.23 straddles 0
    assert sv.ablation_verdict(m.assign(ablation_sparsity=0.3)).agrees is False


def test_n2g_topk_vs_relu_uses_the_per_latent_standard_errors():
    m = pd.DataFrame({"arch": ["topk", "relu"], "n": 64, "k": 8, "l0": 8.0, "n2g_precision": [0.6, 0.62],
                      "n2g_recall": [0.4, 0.25], "n2g_f1": [0.48, 0.35], "n2g_precision_se": 0.001,
                      "n2g_recall_se": 0.01, "n2g_f1_se": 0.01})
    assert sv.n2g_verdict(m).agrees is True
    v = sv.n2g_verdict(m.assign(n2g_precision_se=0.05))  # 0.02 lower ± 0.14: cannot tell
    assert v.agrees is None and any("precision" in u for u in v.unsure)
    v = sv.n2g_verdict(m.assign(n2g_precision_se=[0.05, math.nan]))  # one spread missing: point values
    assert v.agrees is True
    spread = n2g_standard_errors(
        [{"n2g": {"precision": p, "recall": 0.5, "f1": math.nan}} for p in (0.2, 0.4, 0.6)])
    assert abs(spread["n2g_precision_se"] - 0.2 / math.sqrt(3)) < 1e-12 and math.isnan(spread["n2g_f1_se"])
