"""Verdicts of the Scaling-studies and Feature-manifolds sections against hand-made study files with known
answers: each claim must be able to fail."""

from __future__ import annotations

import numpy as np
import pandas as pd

from saescale.report import manifold_sections as ms
from saescale.report import scaling_sections as ss
from saescale.scaling.compute import compute_study
from saescale.scaling.fits import loglog_slope


def _frontier(e: float):
    c = np.logspace(9, 13, 20)
    return [{"arch": "topk", "k": 8, "loss": "heldout_fvu", "n": [128, 256],
             "points": [{"flops": float(x), "loss": float(10 * x**-0.1 + e), "n": 128} for x in c],
             "fit": {"ok": True, "a": 10.0, "b": 0.1, "e": e, "rmse_log": 1e-6}}]


def test_compute_verdict_needs_a_good_fit_that_beats_a_pure_power_law():
    assert ss.compute_verdict(_frontier(0.05)).agrees is True
    bad = _frontier(0.05)
    bad[0]["fit"]["rmse_log"] = 0.5
    assert ss.compute_verdict(bad).agrees is False
    assert ss.compute_verdict([]).agrees is None


def _conv(slope, err=0.02):
    points = [{"n": n, "tokens": 1e5 * n**slope, "censored_at": None} for n in (128, 256, 512)]
    fit = loglog_slope([p["n"] for p in points], [p["tokens"] for p in points])
    fit["slope_err"] = err
    return [{"arch": "topk", "k": 8, "tolerance": 0.01, "points": points, "fit": fit}]


def test_convergence_verdict_compares_the_exponent_with_0_6():
    assert ss.convergence_verdict(_conv(0.6)).agrees is True
    assert ss.convergence_verdict(_conv(1.2)).agrees is False
    censored = [{"arch": "topk", "k": 8, "tolerance": 0.01, "fit": {"ok": False, "reason": "r"},
                 "points": [{"n": 128, "tokens": None, "censored_at": 2.0**21}]}]
    v = ss.convergence_verdict(censored)
    assert v.agrees is None and "0 of 1 at tolerance 0.01" in v.note


def test_lr_verdict_compares_the_exponent_with_minus_half_and_names_the_switch_when_off():
    assert ss.lr_verdict({"fit": {"ok": True, "slope": -0.45, "slope_err": 0.05}}).agrees is True
    assert ss.lr_verdict({"fit": {"ok": True, "slope": 0.3, "slope_err": 0.05}}).agrees is False
    assert "scaling.lr_sweep.enabled" in ss.lr_verdict(None).note


def test_joint_verdict_reads_the_signs_of_gamma_and_eta():
    def joint(gamma, eta):
        consts = [{"name": p, "fit": v, "err": 0.01, "gpt4": 0} for p, v in
                  (("alpha", -0.5), ("beta_k", 0.2), ("beta_n", -0.1), ("gamma", gamma), ("zeta", -1), ("eta", eta))]
        return [{"arch": "topk", "constants": consts, "regime": "converged"}]
    assert ss.joint_verdict(joint(-0.04, -0.1)).agrees is True
    assert ss.joint_verdict(joint(0.04, -0.1)).agrees is False


def _subject(name, d, fvu, b, b_err=0.01, regime="converged", status="converged", rmse=0.01):
    return {"subject": name, "d_model": d, "points": [{"n": 128, "fvu": fvu, "status": status}],
            "fit": {"ok": True, "b": b, "b_err": b_err, "e": 0.01, "rmse_log": rmse, "regime": regime}}


def test_subject_verdict_wants_larger_models_harder_and_shallower():
    assert ss.subject_verdict([_subject("a", 64, 0.1, 0.3), _subject("b", 128, 0.2, 0.2)]).agrees is True
    assert ss.subject_verdict([_subject("a", 64, 0.2, 0.2), _subject("b", 128, 0.1, 0.3)]).agrees is False
    assert "subject-size.yaml" in ss.subject_verdict([_subject("a", 64, 0.1, 0.3)]).note


def test_subject_verdict_needs_differences_beyond_their_errors():
    # b 0.3 vs 0.2 with errors 0.1 each: the difference 0.1 is within 2 sigma (0.28), so cannot tell
    v = ss.subject_verdict([_subject("a", 64, 0.1, 0.3, b_err=0.1), _subject("b", 128, 0.2, 0.2, b_err=0.1)])
    assert v.agrees is None and any("b:" in u for u in v.unsure)
    # FVU 0.100 vs 0.105 with a log-rmse of 0.05: within the scatter of one SAE about its law
    v = ss.subject_verdict([_subject("a", 64, 0.100, 0.3, rmse=0.05), _subject("b", 128, 0.105, 0.2, rmse=0.05)])
    assert v.agrees is None and any("FVU" in u for u in v.unsure)


def test_subject_verdict_does_not_judge_fixed_budget_or_censored_points():
    fixed = [_subject("a", 64, 0.1, 0.3, regime="fixed-budget", status="fixed-budget"),
             _subject("b", 128, 0.2, 0.2, regime="fixed-budget", status="fixed-budget")]
    v = ss.subject_verdict(fixed)
    assert v.agrees is None and "fixed-budget L(n)" in v.note and "b = 0.3" in v.note
    # a censored SAE is an upper bound: its FVU is not compared, only the fits' exponents are
    v = ss.subject_verdict([_subject("a", 64, 0.1, 0.3, status="censored"), _subject("b", 128, 0.2, 0.2)])
    assert v.agrees is True and not any("FVU" in h for h in v.held) and any("b:" in h for h in v.held)


def test_subject_curves_fit_converged_and_censored_sae_as_l_of_n():
    rng = np.random.default_rng(0)
    layers = []
    for name, d, a in (("w64", 64, 1.0), ("w128", 128, 1.6)):
        n = np.array([128, 256, 512, 1024, 2048])
        fvu = a * n ** -0.3 + 0.01
        status = ["converged"] * 4 + ["censored"]
        m = pd.DataFrame({"arch": "topk", "n": n, "k": 8, "fvu": fvu * np.exp(rng.normal(0, 1e-3, 5)),
                          "d_model": d, "convergence": status})
        layers.append({"subject": name, "layer": 2, "metrics_all": m})
    curves = ss.subject_curves(layers, {"scaling": {"subject_size": {"arch": "topk", "k": 8}}, "sweep": {"k": [8]}})
    assert [c["subject"] for c in curves] == ["w64", "w128"]
    assert all(c["fit"]["regime"] == "converged" and c["fit"]["counts"]["censored"] == 1 for c in curves)
    assert [p["status"] for p in curves[0]["points"]][-1] == "censored"
    assert abs(curves[0]["fit"]["b"] - 0.3) < 0.05
    table = ss.subject_table(curves)
    assert "L(N), converged" in str(table)


def _curve(kind, d, losses, beta=None, plateau_n=None):
    ns = [2**i for i in range(len(losses))]
    c = {"kind": kind, "d": d, "arch": "relu_dn", "points": [{"n": n, "loss_min": v} for n, v in zip(ns, losses)],
         "beta_fit": {"ok": beta is not None, "beta": beta, "stderr": 0.01, "range": [ns[0], ns[-1]], "paper_range": False}}
    if plateau_n is not None:
        c["plateau"] = {"plateau_n": plateau_n, "two_d": 2 * d}
    return c


def test_toy_verdict_checks_shell_plateaus_and_high_dimensional_spheres():
    good = {"curves": [_curve("shell", 3, [1, 0.5, 0.2, 0.2], plateau_n=6),
                       _curve("sphere", 6, [1, 0.9, 0.85, 0.8], beta=0.08),
                       _curve("sphere", 3, [1, 0.7, 0.5, 0.5], beta=0.5)]}  # a low-d sphere may plateau
    assert ms.toy_verdict(good).agrees is True
    late = {"curves": [_curve("shell", 3, [1, 0.5, 0.2, 0.2], plateau_n=48)]}
    assert ms.toy_verdict(late).agrees is False
    flat = {"curves": [_curve("sphere", 6, [1, 0.5, 0.5, 0.5], beta=0.08)]}
    assert ms.toy_verdict(flat).agrees is False
    low_keeps_going = {"curves": [_curve("sphere", 3, [1, 0.8, 0.6, 0.4], beta=0.4),
                                  _curve("sphere", 6, [1, 0.9, 0.85, 0.8], beta=0.08)]}
    assert ms.toy_verdict(low_keeps_going).agrees is False


def _truth(discrete, manifolds, on):
    def runs(ds, ons):
        return [{"n": n, "D": d, "latents_on_manifolds": o} for n, d, o in zip((32, 64, 128), ds, ons)]
    return {"m": 512, "dictionaries": [{"name": "discrete", "runs": runs(discrete, (0, 0, 0))},
                                       {"name": "manifolds", "runs": runs(manifolds, on)}]}


def test_groundtruth_verdict_wants_rising_D_and_manifolds_that_take_latents():
    assert ms.groundtruth_verdict(_truth((20, 50, 100), (15, 40, 90), (5, 9, 14))).agrees is True
    assert ms.groundtruth_verdict(_truth((20, 50, 100), (25, 40, 90), (5, 9, 14))).agrees is False
    assert ms.groundtruth_verdict(_truth((20, 10, 100), (15, 8, 90), (5, 9, 14))).agrees is False


def test_allocation_verdict_fails_on_any_failed_check():
    checks = [{"name": "a", "value": 1.0, "expected": 1.0, "tolerance": 0.1, "ok": True}]
    assert ms.allocation_verdict({"checks": checks}).agrees is True
    bad = checks + [{"name": "b", "value": 2.0, "expected": 1.0, "tolerance": 0.1, "ok": False}]
    assert ms.allocation_verdict({"checks": bad}).agrees is False


def planted_compute_logs() -> list:
    """Training logs of TopK at k = 4 over n = 64, 128, 256 whose held-out FVU is a planted L(C) frontier."""
    import pandas as pd

    rows = []
    for n in (64, 128, 256):
        t = 4096 * np.arange(1, 40)
        rows.append(pd.DataFrame({"arch": "topk", "k": 4, "n": n, "tokens": t, "flops": 6.0 * t * n * 32,
                                  "heldout_fvu": 0.05 + 1 / np.sqrt(t / 4096) * (64 / n) ** 0.3}))
    return rows


def test_compute_study_keeps_a_refusal_for_single_n_archs_and_fits_the_rest():
    import pandas as pd

    rows = planted_compute_logs()
    rows.append(rows[0].assign(arch="relu"))
    study = compute_study(pd.concat(rows), reps=20)
    by = {c["arch"]: c for c in study}
    assert by["topk"]["fit"]["ok"] and not by["relu"]["fit"]["ok"]
    ns = [p["n"] for p in by["topk"]["points"]]
    assert by["topk"]["fit"]["rmse_log"] < 0.05 and ns[0] == 64 and ns == sorted(ns)  # small SAEs first, large later


def test_toy_beta_is_judged_on_its_interval_with_the_papers_words():
    def sphere(beta, stderr):
        c = _curve("sphere", 6, [1, 0.9, 0.85, 0.8], beta=beta)
        c["beta_fit"]["stderr"] = stderr
        return {"curves": [c]}
    inside = ms.toy_verdict(sphere(0.08, 0.01))
    assert inside.agrees is True and "0.05" in inside.quote and "our choice" in " ".join(inside.thresholds)
    assert ms.toy_verdict(sphere(0.5, 0.01)).agrees is False  # β well above "small"
    straddles = ms.toy_verdict(sphere(0.18, 0.02))  # 0.18 ± 0.04 crosses 0.2
    assert straddles.agrees is None and straddles.unsure and "cannot tell" in straddles.text
