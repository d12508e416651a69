"""End to end: the workflow on the quick preset, its incremental behaviour, and config rejection."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from browser import broken_anchors, chromium, inspect, local_targets, screenshot  # noqa: F401 (a fixture)
from helpers import record_authorization

ROOT = Path(__file__).resolve().parents[1]
QUICK = yaml.safe_load((ROOT / "workflow/configs/quick.yaml").read_text())

pytestmark = pytest.mark.slow


def snakemake(wdir: Path, *args: str, config: dict | None = None, check: bool = True,
              cores: str | None = "2") -> subprocess.CompletedProcess:
    if config is not None:
        (wdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wdir),
           *(["--cores", cores] if cores else []), "--workflow-profile", "none", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def planned_jobs(res: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    wdir = tmp_path_factory.mktemp("quick")
    snakemake(wdir, config=QUICK)
    return wdir


SUITE = {"probes": 1, "ablation": 1, "geometry": 1, "interpret": 1, "dashboard": 1}  # per-SAE suite jobs
PENALTY_ARCHS = {"relu", "relu_dn", "prolu", "gated", "jumprelu", "jumprelu_tanh"}


def test_quick_preset_produces_the_report(quick_run):
    report = (quick_run / "reports/report.html").read_text()
    assert "<html" in report.lower() and len(report) > 1000
    metrics = pd.read_csv(quick_run / "data/scaling/tiny/L1/metrics.csv")
    topk = metrics[metrics["arch"] == "topk"]
    assert len(topk) == 4 and set(topk["n"]) == {64, 128} and set(topk["k"]) == {4, 8}
    assert len(metrics) == 15 and set(metrics["base_arch"]) == {"topk", "multitopk", "batchtopk"} | PENALTY_ARCHS
    assert metrics["fvu"].between(0, 1).all() and (topk["l0"] <= topk["k"]).all()
    assert (metrics["delta_ce"] < metrics["delta_ce_zero_ablation"]).all()
    ev = json.loads((quick_run / "data/eval/tiny/L1/topk/n128_k8.json").read_text())
    assert ev["downstream"]["kl_div_with_sae"] >= 0 and ev["train"]["device"] == "cpu"
    assert not list(quick_run.glob("data/saes/**/checkpoint.pt"))
    for exp, archs in (("progressive", ["topk", "multitopk", "relu"]), ("refinement", ["topk", "relu"])):
        for arch in archs:
            assert (quick_run / f"data/analysis/tiny/L1/{arch}/n128_k8/{exp}.json").is_file()


# JS counts read in the page: figures with neither an image nor a note, latent cards without a histogram
FIGURES_BLANK = "[...document.querySelectorAll('figure')].filter(f => !f.querySelector('img, .empty')).length"
CARDS_WITHOUT_HISTOGRAM = ("[...document.querySelectorAll('section.card')]"
                           ".filter(c => !c.querySelector('svg.hist rect')).length")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_and_dashboards_render_in_headless_chromium(quick_run, chromium):  # noqa: F811
    """What a reader sees: no console errors, every figure decoded, every #anchor and every link to a
    dashboard resolves, and each dashboard renders the same way. A full-page screenshot is a CI artifact."""
    report = inspect(chromium, quick_run / "reports/report.html", {"figures_blank": FIGURES_BLANK})
    assert report.errors == [] and report.dialogs == [], report.errors + report.dialogs
    html = (quick_run / "reports/report.html").read_text()
    assert len(report.images) == html.count("<img ") >= 20
    assert [img["src"] for img in report.images if not img["ok"]] == [], "figures that did not decode"
    assert report.probes["figures_blank"] == 0  # every <figure> shows an image or says why it has none
    assert broken_anchors(report) == [] and len([h for h in report.hrefs if h.startswith("#")]) >= 20
    shot = screenshot(chromium, "report.png")
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    assert png_size(shot)[1] == height > 5000, "the screenshot is not of the whole page"
    links = local_targets(report)
    assert set(links.values()) == {p.resolve() for p in (quick_run / "reports/latents").rglob("*.html")}
    assert len(links) == 3  # topk k = 4, 8 and relu at n = 128 (interpret.archs, interpret.n)
    for href, path in links.items():
        page = inspect(chromium, path, {"cards_without_histogram": CARDS_WITHOUT_HISTOGRAM})
        assert page.errors == [] and page.dialogs == [], (href, page.errors + page.dialogs)
        assert page.svgs == 8 and page.probes["cards_without_histogram"] == 0, href  # one per latent card
        assert broken_anchors(page) == [], href
        assert [p for p in local_targets(page).values() if not p.is_file()] == [], href  # the back link
        assert (quick_run / "reports/report.html").resolve() in local_targets(page).values()
    screenshot(chromium, "dashboard.png")


def test_quick_preset_runs_every_scaling_and_manifold_study(quick_run):
    studies = json.loads((quick_run / "data/scaling/tiny/L1/studies.json").read_text())
    topk = [c for c in studies["compute"] if c["arch"] == "topk"]
    assert topk and all(c["fit"]["ok"] and c["points"] for c in topk)  # L(C) over both n
    assert {c["tolerance"] for c in studies["convergence"]} == {0.01, 0.03, 0.1}
    sweep = studies["lr_sweep"]["per_n"]
    assert [r["n"] for r in sweep] == [64, 128] and all(len(r["sweep"]) == 3 for r in sweep)
    assert sorted(p["multiple"] for p in sweep[0]["sweep"]) == [0.5, 1.0, 2.0]
    log = pd.read_csv(quick_run / "data/saes/tiny/L1/topk_lr0p5/n64_k4/train_log.csv")
    assert log["heldout_fvu"].between(0, 2).all()
    toy = json.loads((quick_run / "data/toy/manifolds.json").read_text())
    assert {(c["kind"], c["d"]) for c in toy["curves"]} == {("circle", 2), ("sphere", 3), ("shell", 2)}
    assert [p["n"] for p in toy["circle_panels"]] == [4, 8]
    allocation = json.loads((quick_run / "data/toy/allocation.json").read_text())
    assert all(c["ok"] for c in allocation["checks"])
    truth = json.loads((quick_run / "data/toy/groundtruth.json").read_text())
    assert [d["name"] for d in truth["dictionaries"]] == ["discrete", "manifolds"]
    report = (quick_run / "reports/report.html").read_text()
    for heading in ("18. Scaling studies", "19. Feature manifolds", "20. Files"):
        assert f"<h2>{heading}</h2>" in report


def test_one_more_toy_dimension_adds_only_its_curve(quick_run):
    manifolds = {**QUICK["toy"]["manifolds"], "dims": {"sphere": [3, 4], "shell": [2]}}
    cfg = {**QUICK, "toy": {**QUICK["toy"], "manifolds": manifolds}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"toy_curve": 1, "manifolds": 1, "report": 1, "all": 1}


def test_one_more_lr_multiple_trains_only_its_saes(quick_run):
    lr_sweep = {**QUICK["scaling"]["lr_sweep"], "multiples": [0.5, 2.0, 4.0]}
    cfg = {**QUICK, "scaling": {**QUICK["scaling"], "lr_sweep": lr_sweep}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"train": 2, "scaling": 1, "report": 1, "all": 1}


def test_quick_preset_calibrates_every_penalty_arch_to_its_target_l0(quick_run):
    metrics = pd.read_csv(quick_run / "data/scaling/tiny/L1/metrics.csv")
    penalized = metrics[metrics["base_arch"].isin(PENALTY_ARCHS)]
    assert set(penalized["arch"]) == PENALTY_ARCHS
    off = penalized[(penalized["l0"] / penalized["k"] - 1).abs() > 0.15]
    assert off.empty, f"eval L0 off target by more than 15%:\n{off[['arch', 'k', 'l0', 'penalty']]}"
    assert (penalized["penalty"] > 0).all()


    fits = json.loads((quick_run / "data/scaling/tiny/L1/fits.json").read_text())
    assert fits["fvu"]["per_k"][0]["ok"] is False  # two n per k cannot carry a 3-parameter fit


def test_second_dry_run_has_nothing_to_do(quick_run):
    # config= rewrites config.yaml: the dry runs above leave their own edits behind
    assert planned_jobs(snakemake(quick_run, "-n", config=QUICK)) == {}


def test_one_more_k_plans_only_the_new_sae_jobs(quick_run):
    cfg = {**QUICK, "sweep": {**QUICK["sweep"], "k": [4, 8, 2]}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    # topk at n=128 is analysed (analysis.*.n = [128]) and evaluated by the suite (evaluate.*.n, interpret.n)
    assert jobs == {"train": 2, "evaluate": 2, "analyze": 2, **SUITE, "scaling": 1, "report": 1, "all": 1}


def test_one_more_n_plans_only_the_new_sae_jobs(quick_run):
    cfg = {**QUICK, "sweep": {**QUICK["sweep"], "n": [64, 128, 32]}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"train": 2, "evaluate": 2, "scaling": 1, "report": 1, "all": 1}


def test_a_training_hyperparameter_reruns_training_and_downstream_only(quick_run):
    cfg = {**QUICK, "train": {**QUICK["train"], "auxk_coef": 0.05}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    suite = {rule: 3 for rule in SUITE}  # topk k=4, k=8 and relu at n=128
    # 15 grid SAEs and the lr sweep's 4 (scaling.lr_sweep: 0.5x and 2x at n = 64, 128), which are not evaluated
    assert jobs == {"train": 19, "evaluate": 15, "analyze": 7, **suite, "scaling": 1, "report": 1, "all": 1}


def test_a_variant_override_reruns_only_that_variant(quick_run):
    variants = {**QUICK["sweep"]["variants"], "topk_untied": {"arch": "topk", "train": {"tied_init": False, "seed": 1}}}
    cfg = {**QUICK, "sweep": {**QUICK["sweep"], "variants": variants}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"train": 1, "evaluate": 1, "scaling": 1, "report": 1, "all": 1}


def test_analysing_one_more_arch_adds_only_its_analysis(quick_run):
    progressive = {**QUICK["analysis"]["progressive"], "archs": ["topk", "multitopk", "relu", "gated"]}
    cfg = {**QUICK, "analysis": {**QUICK["analysis"], "progressive": progressive}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"analyze": 1, "report": 1, "all": 1}


def test_quick_preset_runs_every_suite_metric_on_its_selected_saes(quick_run):
    metrics = pd.read_csv(quick_run / "data/scaling/tiny/L1/metrics.csv").set_index(["arch", "n", "k"])
    suite = metrics.loc[[("topk", 128, 4), ("topk", 128, 8), ("relu", 128, 8)]]
    ln2 = 0.6932
    assert suite["probe_loss"].between(0, ln2).all() and suite["probe_loss_resid"].between(0, ln2).all()
    assert suite["ablation_sparsity"].between(0, 1).all() and suite["ablation_sparsity_resid"].between(0, 1).all()
    assert suite["n2g_precision"].between(0, 1).all() and suite["n2g_recall"].between(0, 1).all()
    assert (suite["n2g_delta_ce"] > 0).all() and (suite["bigram_delta_ce"] > 0).all()
    assert (suite["freq_slope"] < 0).all() and suite["average_max_decoder_cosine_sim"].between(-1, 1).all()
    assert metrics.drop(suite.index)["probe_loss"].isna().all()  # not selected: not run
    records = (quick_run / "data/interpret/tiny/L1/topk/n128_k8.jsonl").read_text().splitlines()
    assert len(records) == 16 and all(json.loads(r)["top_examples"] for r in records)
    page = (quick_run / "reports/latents/tiny/L1/topk/n128_k8.html").read_text()
    assert page.count('id="latent-') == 8 and "../../../../report.html" in page
    assert not list(quick_run.glob("data/interpret/**/*.autointerp.json"))  # off unless configured


def test_a_probe_setting_reruns_only_the_probes(quick_run):
    probes = {**QUICK["evaluate"]["probes"], "iters": 20}
    cfg = {**QUICK, "evaluate": {**QUICK["evaluate"], "probes": probes}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"probes": 3, "scaling": 1, "report": 1, "all": 1}


def test_interpreting_one_more_arch_adds_only_its_jobs(quick_run):
    cfg = {**QUICK, "interpret": {**QUICK["interpret"], "archs": ["topk", "relu", "gated"]}}
    jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
    assert jobs == {"interpret": 1, "dashboard": 1, "scaling": 1, "report": 1, "all": 1}


def test_autointerp_through_an_http_endpoint_adds_only_its_jobs_and_never_writes_the_key(quick_run, monkeypatch):
    from test_autointerp import ScriptedModel, serving

    monkeypatch.setenv("SAESCALE_TEST_KEY", "sk-sentinel-0123")
    with serving(ScriptedModel("perfect")) as server:
        authorizations = record_authorization(server)
        auto = {"backend": "openai", "model": "test-model", "base_url": server.base_url,
                "api_key_env": "SAESCALE_TEST_KEY", "latents": 3, "max_retries": 1}
        cfg = {**QUICK, "interpret": {**QUICK["interpret"], "autointerp": auto}}
        jobs = planned_jobs(snakemake(quick_run, "-n", config=cfg))
        assert jobs == {"autointerp": 3, "dashboard": 3, "scaling": 1, "report": 1, "all": 1}
        snakemake(quick_run, config=cfg)
        served = server.request_count
        snakemake(quick_run, "--forcerun", "autointerp", config=cfg)  # every response comes from the cache
        assert server.request_count == served > 0
    summary = json.loads((quick_run / "data/interpret/tiny/L1/topk/n128_k8.autointerp.json").read_text())
    assert summary["n_latents"] == 3 and summary["n_ok"] + summary["n_failed"] == 3
    assert authorizations and set(authorizations) == {"Bearer sk-sentinel-0123"}  # read from the environment
    # every file of the run: data/, logs/, reports/, benchmarks/ and Snakemake's own .snakemake/ metadata
    leaked = [p for p in quick_run.rglob("*") if p.is_file() and b"sk-sentinel-0123" in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    snakemake(quick_run, config=QUICK)  # back to the preset for the tests that follow


def test_packed_saes_train_in_one_job_to_the_weights_of_lone_jobs(quick_run, tmp_path):
    """train.pack: [k] trains both k of each TopK n in one job that reads the store once; each SAE's weights
    equal the quick run's, where every SAE had its own job."""
    from safetensors.torch import load_file

    wdir = tmp_path / "packed"
    shutil.copytree(quick_run, wdir, symlinks=True)  # keeps mtimes: only the SAEs packing moves are redone
    cfg = {**QUICK, "train": {**QUICK["train"], "pack": ["k"]}}
    saes = [f"data/saes/tiny/L1/topk/n{n}_k{k}" for n in (64, 128) for k in (4, 8)]
    targets = [f"{sae}/saescale_sae.json" for sae in saes]
    jobs = planned_jobs(snakemake(wdir, "-n", *targets, config=cfg))
    assert jobs == {"train_pack_tiny_L1_topk_n64_kall": 1, "train_pack_tiny_L1_topk_n128_kall": 1}
    snakemake(wdir, *targets, config=cfg)
    for sae in saes:
        packed, alone = load_file(wdir / sae / "saescale_sae.safetensors"), load_file(quick_run / sae / "saescale_sae.safetensors")
        assert packed.keys() == alone.keys() and all(packed[key].equal(alone[key]) for key in alone), sae
        assert json.loads((wdir / sae / "saescale_sae.json").read_text())["train"]["pack_size"] == 2
    assert (wdir / "logs/train/pack_tiny_L1_topk_n64_kall.log").is_file()
    assert not list(wdir.glob("data/saes/**/checkpoint.pt"))
    assert planned_jobs(snakemake(wdir, "-n", *targets, config=cfg)) == {}


DISTRIBUTED = {"topk_s2": {"data": 1, "latent": 2}, "topk_d2s2": {"data": 2, "latent": 2}}


def test_distributed_variants_train_on_2_and_4_processes_to_the_single_device_weights(quick_run, tmp_path):
    """train.distributed on a sweep.variants entry: its job starts data x latent gloo processes with torchrun and
    writes the usual files, whose weights equal a single-device variant of the same recipe (128 steps) up to float
    summation order (tests/test_distributed.py measures the same tolerance on every step)."""
    from safetensors.torch import load_file

    wdir = tmp_path / "distributed"
    shutil.copytree(quick_run, wdir, symlinks=True)
    cfg = json.loads(json.dumps(QUICK))
    layouts = {"topk_short": {"data": 1, "latent": 1}, **DISTRIBUTED}
    cfg["sweep"]["extra"].append({"archs": list(layouts), "n": [64], "k": [4]})
    cfg["sweep"]["variants"].update({name: {"arch": "topk", "train": {"distributed": layout, "tokens": 32768}}
                                     for name, layout in layouts.items()})
    targets = [f"data/saes/tiny/L1/{name}/n64_k4/saescale_sae.json" for name in layouts]
    assert planned_jobs(snakemake(wdir, "-n", *targets, config=cfg)) == {"train": 3}
    snakemake(wdir, *targets, config=cfg)
    alone = load_file(wdir / "data/saes/tiny/L1/topk_short/n64_k4/saescale_sae.safetensors")
    for name, layout in DISTRIBUTED.items():
        folder = wdir / f"data/saes/tiny/L1/{name}/n64_k4"
        weights = load_file(folder / "saescale_sae.safetensors")
        assert weights.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(weights[key], alone[key], atol=1e-5, rtol=0, msg=f"{name} {key}")
        assert json.loads((folder / "saescale_sae.json").read_text())["train"]["distributed"] == layout
        log = (wdir / f"logs/train/tiny_L1_{name}_n64_k4.log").read_text()
        procs = layout["data"] * layout["latent"]
        assert f"starting {procs} training processes" in log and f"[rank {procs - 1}]" in log
        assert not list(folder.glob("checkpoint*"))


def test_snakemake_report_bundles_the_html(quick_run):
    snakemake(quick_run, "--report", str(quick_run / "bundle.html"), config=QUICK, cores=None)
    assert "saescale" in (quick_run / "bundle.html").read_text()


def test_report_zip_and_unlock_work_as_the_readme_writes_them(quick_run):
    """No --cores: `snakemake --unlock` after a killed run, and a zip bundle holding the data behind the figures."""
    snakemake(quick_run, "--unlock", config=QUICK, cores=None)
    snakemake(quick_run, "--report", str(quick_run / "bundle.zip"), config=QUICK, cores=None)
    names = zipfile.ZipFile(quick_run / "bundle.zip").namelist()
    for wanted in ("report.html", "metrics.csv", "fits.json"):
        assert any(name.endswith(wanted) for name in names), (wanted, names)
    dashboards = [name for name in names if re.search(r"/n\d+_k\d+\.html$", name)]
    assert len(dashboards) == len(list((quick_run / "reports/latents").rglob("*.html"))) > 0, names


def test_malformed_config_is_rejected_naming_the_key(tmp_path):
    bad = {**QUICK, "sweep": {**QUICK["sweep"], "k": [4, "eight"]}}
    res = snakemake(tmp_path, "-n", config=bad, check=False)
    assert res.returncode != 0
    assert "config.sweep.k[1]" in res.stdout + res.stderr
