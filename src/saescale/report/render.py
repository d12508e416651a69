"""Render reports/report.html: load what the pipeline wrote, turn it into tables, figures and findings.

Every number in the report is read from a file under data/ (listed in the report's 'Files' section) or
computed here from those files with the formula named next to it, so each figure is recomputable.
Files outside the report rule's inputs (eval JSONs, the Zarr stores) are optional: when absent the report
says so instead of failing. All text goes through Jinja2 autoescaping: dataset names, model ids and
paths come from users and files, and are never trusted as HTML.

This module loads files (`Sources`, `load_layer`, `load_analyses`, `load_suite`), assembles the template
context (`layer_context`, `subject_context`, `run_context`, `build_context`) and renders (`write_figures`,
`render_report`); the opening scorecard in `scorecard`; the tables, cell formatting and findings live in
`saescale.report.tables`, the
architecture comparison in `comparison` (numbers, verdicts), `arch_sections` and `arch_figures`, the
evaluation suite (probes, N2G, ablation, geometry, dashboards) in `suite_sections` and `suite_figures`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from saescale import paths
from saescale.config import analysed, evaluated, recipe, sae_jobs
from saescale.files import read_json, write_text_atomic
from saescale.report import figures, method_doc, scorecard
from saescale.report.arch_sections import arch_context, verdict_view
from saescale.report.comparison import downstream_fits, power_law_verdict, scaling_archs
from saescale.report.manifold_sections import manifolds_context
from saescale.report.scaling_sections import studies_context
from saescale.report.scaling_sections import subject_context as subject_size_context
from saescale.report.suite_sections import suite_context
from saescale.report.tables import (
    LABELS,
    _col,
    _derived,
    _isnum,
    _plain,
    corpus_table,
    exponent_table,
    findings,
    fit_tables,
    grid_table,
    num,
    pct,
    store_table,
    table,
    text,
)
from saescale.scaling.collect import refuse_old_names

# ---- loading -----------------------------------------------------------------------------------------

class Sources:
    """Every file the report read or looked for, so the 'Files' section can list where numbers come from.

    Per-SAE files share a `pattern` (the path with {arch}, {n}, {k} left in) and are listed once per pattern.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def _see(self, path: str, what: str, pattern: str | None, present: bool) -> bool:
        self.rows.append({"path": path, "what": what, "pattern": pattern, "present": present})
        return present

    def json(self, path: str, what: str, pattern: str | None = None) -> Any:
        if not self._see(path, what, pattern, Path(path).is_file()):
            return None
        try:
            return read_json(path)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); rerun the rule that writes it") from exc

    def csv(self, path: str, what: str, pattern: str | None = None) -> pd.DataFrame | None:
        if not self._see(path, what, pattern, Path(path).is_file()):
            return None
        try:
            return pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as exc:
            raise ValueError(f"{path}: not a readable CSV ({exc}); rerun the rule that writes it") from exc

    def exists(self, path: str, what: str, pattern: str | None = None) -> bool:
        """A file the report links to rather than reads (a dashboard page)."""
        return self._see(path, what, pattern, Path(path).is_file())

    def jsonl(self, path: str, what: str, pattern: str | None = None) -> list[dict] | None:
        """One JSON object a line (blank lines skipped)."""
        if not self._see(path, what, pattern, Path(path).is_file()):
            return None
        try:
            return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON lines ({exc}); rerun the rule that writes it") from exc

    def store(self, path: str, what: str) -> dict | None:
        """Zarr group attrs plus bytes on disk (both layers and the token/window/position index)."""
        if not self._see(path, what, None, Path(path).is_dir()):
            return None
        try:
            import zarr

            with warnings.catch_warnings():  # snakemake's timestamp file inside the store is not zarr
                warnings.simplefilter("ignore")
                attrs = dict(zarr.open_group(path, mode="r").attrs)
        except Exception as exc:  # an unreadable store should not take the whole report down
            attrs = {"error": f"{type(exc).__name__}: {exc}"}
        return {"attrs": attrs, "bytes": _dir_bytes(path),
                "layer_bytes": {p.name: _dir_bytes(p) for p in Path(path).glob("L*") if p.is_dir()}}

    def listing(self) -> list[dict]:
        """One row per file or per-SAE pattern: path, contents, how many were found, which are missing."""
        groups: dict[str, dict] = {}
        for r in self.rows:
            key = r["pattern"] or r["path"]
            g = groups.setdefault(key, {"path": key, "what": r["what"], "paths": {}})
            g["paths"][r["path"]] = r["present"]
        out = []
        for g in groups.values():
            total, found = len(g["paths"]), sum(g["paths"].values())
            missing = [p for p, ok in g["paths"].items() if not ok] if total > 1 else []
            out.append({"path": g["path"], "what": g["what"], "ok": found == total, "missing": missing,
                        "found": "yes" if total == 1 and found else f"{found} of {total}"})
        return out


def _dir_bytes(path: str | Path) -> int:
    """Total size of the files under `path`, recursively."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _last_doubling_gain(log: pd.DataFrame) -> float:
    """Relative FVU improvement between half the tokens and the end (method §D.1 convergence rule)."""
    log = log[["tokens", "fvu"]].apply(pd.to_numeric, errors="coerce").dropna().sort_values("tokens")
    if len(log) < 2:
        return math.nan
    end = log.iloc[-1]
    half = log[log["tokens"] <= end["tokens"] / 2]
    if half.empty or half["fvu"].iloc[-1] <= 0:
        return math.nan
    return float(1 - end["fvu"] / half["fvu"].iloc[-1])


def load_layer(src: Sources, subject: str, layer: int, config: dict) -> dict:
    """metrics.csv + fits.json; per SAE its saescale_sae.json, train_log.csv and (optional) eval JSON; and the
    analysis JSONs (progressive, refinement) of the SAEs config.analysis selects."""
    where = dict(subject=subject, layer=layer)
    metrics = src.csv(paths.fmt(paths.METRICS, **where), f"{subject} L{layer}: the (n, k) grid")
    fits = src.json(paths.fmt(paths.FITS, **where), f"{subject} L{layer}: fitted scaling laws")
    if metrics is not None:  # one of an earlier version would show blank cells for the renamed columns
        refuse_old_names(metrics.columns, paths.fmt(paths.METRICS, **where), "its scaling job")
    else:
        metrics = pd.DataFrame({"arch": pd.Series(dtype=str), "n": pd.Series(dtype=int),
                                "k": pd.Series(dtype=int), "fvu": pd.Series(dtype=float)})
    jobs = [j for j in sae_jobs(config) if j["subject"] == subject and j["layer"] == layer]
    grid = {(j["arch"], j["n"], j["k"]) for j in jobs}
    grid |= {(str(r.arch), int(r.n), int(r.k)) for r in metrics.itertuples()}
    logs, extra, saes = [], [], []
    pattern = dict(where, arch="{arch}", n="{n}", k="{k}")
    per_sae = [(paths.SAE_LOG, "csv", "SAE training log (tokens, FVU, L0, dead fraction, lr, FLOPs)"),
               (paths.SAE_CFG, "json", "SAE config: training spec (AuxK, tied init), throughput, versions"),
               (paths.EVAL, "json", "SAE evaluation: FVU, L0, dead latents, ΔCE/KL incl. zero ablation")]
    for arch, n, k in sorted(grid):
        job = dict(where, arch=arch, n=n, k=k)
        log, cfg, _eval = (getattr(src, kind)(paths.fmt(pat, **job), f"{subject} L{layer}: {what}",
                                              paths.fmt(pat, **pattern)) for pat, kind, what in per_sae)
        if log is not None:
            logs.append(log.assign(arch=arch, n=n, k=k))
        train = (cfg or {}).get("train") or {}
        spec = (cfg or {}).get("train_spec") or {}
        # everything per SAE is in metrics.csv but the convergence of its training curve and the A.8
        # ablation settings (AuxK, tied init) with the dead fraction at the end of training
        extra.append({"arch": arch, "n": n, "k": k,
                      "last_doubling_gain": _last_doubling_gain(log) if log is not None else math.nan,
                      "auxk": spec.get("auxk"), "tied_init": spec.get("tied_init"),
                      "train_dead_fraction": _final_dead(train, log), "train_dead_tokens": spec.get("dead_tokens")})
        saes.append({"versions": (cfg or {}).get("versions") or {}, "device": train.get("device"),
                     "dtype": train.get("dtype"), "k_aux": spec.get("k_aux")})
    metrics = metrics.assign(arch=metrics["arch"].astype(str), n=metrics["n"].astype(int),
                             k=metrics["k"].astype(int))
    if "base_arch" not in metrics.columns:  # metrics.csv from before variants: the config knows
        metrics["base_arch"] = [recipe(config, a)[0] if a in config["sweep"]["variants"] else a
                                for a in metrics["arch"]]
    extra_df = pd.DataFrame(extra, columns=["arch", "n", "k", "last_doubling_gain", "auxk", "tied_init",
                                            "train_dead_fraction", "train_dead_tokens"])
    metrics = metrics.merge(extra_df, on=["arch", "n", "k"], how="left")
    metrics = metrics.sort_values(["arch", "k", "n"]).reset_index(drop=True)
    logs_df = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["arch", "n", "k"])
    missing = sorted(grid - {(r.arch, r.n, r.k) for r in metrics.itertuples()})
    return {"metrics": metrics, "fits": fits or {}, "logs": logs_df, "saes": saes, "missing": missing,
            "analyses": load_analyses(src, jobs, config), "suite": load_suite(src, jobs, config)}


def _final_dead(train: dict, log: pd.DataFrame | None) -> float:
    """Dead fraction at the end of training: saescale_sae.json's summary, else the log's last row."""
    value = train.get("final_dead_fraction")
    if _isnum(value):
        return float(value)
    if log is not None and "dead_fraction" in log.columns and len(log):
        return float(pd.to_numeric(log["dead_fraction"], errors="coerce").iloc[-1])
    return math.nan


def load_analyses(src: Sources, jobs: list[dict], config: dict) -> dict[str, list[dict]]:
    """{experiment: [analysis JSON + arch, base_arch, n, k]} for the SAEs config.analysis selects."""
    what = {"progressive": "progressive recovery: test-time TopK(k') / JumpReLU(θ) sweeps (method §C.8)",
            "refinement": "refinement of nonzero activations on a fixed support (method §C.9)"}
    out: dict[str, list[dict]] = {e: [] for e in what}
    for experiment, desc in what.items():
        for job in jobs:
            if not analysed(config, experiment, job):
                continue
            pattern = paths.fmt(paths.ANALYSIS, **dict(job, arch="{arch}", n="{n}", k="{k}"),
                                experiment=experiment)
            data = src.json(paths.fmt(paths.ANALYSIS, **job, experiment=experiment),
                            f"{job['subject']} L{job['layer']}: {desc}", pattern)
            if data:
                base = data.get("base_arch") or recipe(config, job["arch"])[0]
                out[experiment].append({**data, "arch": job["arch"], "base_arch": base, "n": job["n"],
                                        "k": job["k"]})
    return out


SUITE_FILES = {  # stage: (path pattern, extra wildcards, what it holds)
    "probes": (paths.METRIC, {"metric": "probes"}, "probe loss per task, SAE codes and channels (C.4)"),
    "ablation": (paths.METRIC, {"metric": "ablation"}, "ablation sparsity of latents and channels (C.7)"),
    "geometry": (paths.METRIC, {"metric": "geometry"}, "frequency-rank curve, decoder nn cosines (F.3, F.4)"),
    "interpret": (paths.INTERPRET, {}, "N2G precision / recall / F1, explanation reconstruction (C.5, C.6)"),
}


def load_suite(src: Sources, jobs: list[dict], config: dict) -> dict:
    """The evaluation suite's per-SAE files, for the SAEs the config runs each metric on: {"jobs", "selected":
    {stage: [job]}, "records": {stage: [JSON + arch, n, k]}, "dashboards": [job + exists, shown]}."""
    recon_n = config["interpret"]["reconstruction"]["n"]
    selected = {stage: [j for j in jobs if evaluated(config, stage, j)] for stage in SUITE_FILES}
    selected["reconstruction"] = [j for j in selected["interpret"] if recon_n is None or j["n"] in recon_n]
    files = dict(SUITE_FILES)
    if config["interpret"]["autointerp"]["backend"] != "none":
        selected["autointerp"] = selected["interpret"]
        files["autointerp"] = (paths.AUTOINTERP, {}, "LLM autointerp: detection accuracy and AUROC")
    records: dict[str, list[dict]] = {"autointerp": []}
    for stage, (pattern, extra, what) in files.items():
        records[stage] = []
        for job in selected[stage]:
            where = f"{job['subject']} L{job['layer']}: {what}"
            data = src.json(paths.fmt(pattern, **job, **extra), where,
                            paths.fmt(pattern, **dict(job, arch="{arch}", n="{n}", k="{k}"), **extra))
            if data:
                records[stage].append({**data, **{key: job[key] for key in ("arch", "n", "k")}})
    dashboards = []
    for job in selected["interpret"]:
        pattern = {**job, "arch": "{arch}", "n": "{n}", "k": "{k}"}
        what = f"{job['subject']} L{job['layer']}"
        exists = src.exists(paths.fmt(paths.DASHBOARD, **job), f"{what}: feature dashboard page",
                            paths.fmt(paths.DASHBOARD, **pattern))
        lines = src.jsonl(paths.fmt(paths.INTERPRET_RECORDS, **job), f"{what}: per-latent records",
                          paths.fmt(paths.INTERPRET_RECORDS, **pattern))
        shown = sum(bool(r.get("dashboard", True)) for r in lines) if lines is not None else None
        dashboards.append({**job, "exists": exists, "shown": shown, "n2g_se": n2g_standard_errors(lines)})
    return {"jobs": jobs, "selected": selected, "records": records, "dashboards": dashboards}


def n2g_standard_errors(lines: list[dict] | None) -> dict[str, float]:
    """Standard errors of one SAE's mean N2G precision, recall and F1 over its sampled latents (std / √count
    of the finite per-latent values in the interpret records), so TopK-vs-ReLU comparisons carry a spread."""
    out = {}
    for key in ("precision", "recall", "f1"):
        vals = np.array([float(v) for r in lines or [] for v in [(r.get("n2g") or {}).get(key)]
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])
        out[f"n2g_{key}_se"] = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
    return out


# ---- per-section context -----------------------------------------------------------------------------

def _fits_for(fits: dict, archs: list[str]) -> dict:
    """fits.json restricted to `archs` (the ones with an L(N) to show)."""
    keep = set(archs)
    return {metric: {**fm, **{part: [f for f in fm.get(part, []) if str(f.get("arch")) in keep]
                              for part in ("per_k", "joint")}}
            for metric, fm in fits.items() if isinstance(fm, dict)}


def layer_context(src: Sources, subject: str, layer: int, config: dict, norm: dict | None,
                  report_dir: str = os.path.dirname(paths.REPORT)) -> dict:
    """The sections for one (subject, layer): tables, fitted laws, findings, figures and the arch comparison.

    The scaling sections (curves, heatmaps, fits) show only archs trained at >= 2 values of n; the rest are
    compared in the architecture sections (`arch_sections`)."""
    data = load_layer(src, subject, layer, config)
    everything, logs_all = data["metrics"], data["logs"]
    main = scaling_archs(everything)
    m = everything[everything["arch"].isin(main)]
    logs = logs_all[logs_all["arch"].isin(main)] if not logs_all.empty else logs_all
    fits = _fits_for(data["fits"], main)
    studies = src.json(paths.fmt(paths.STUDIES, subject=subject, layer=layer),
                       f"{subject} L{layer}: scaling studies (L(C), tokens to convergence, lr vs n, eq. 3 vs GPT-4)")
    scaling = studies_context(studies, logs_all[logs_all["arch"].isin(main)] if not logs_all.empty else logs_all, main)
    ref = {"delta_ce": _col(m, "delta_ce_zero_ablation").median(),
           "kl_div_with_sae": _col(m, "kl_div_with_ablation").median()}
    stats = ((norm or {}).get("layers") or {}).get(str(layer))
    norm_table = None
    if stats:
        cols = ("n_rows", "baseline_mse", "raw_norm_mean", "raw_norm_max")
        norm_table = table(["rows", "baseline MSE (E‖x − E[x]‖²)", "raw ‖x‖ mean", "raw ‖x‖ max"],
                           [[stats.get(c) for c in cols]])
    where = dict(subject=subject, layer=layer)
    sae = dict(where, arch="{arch}", n="{n}", k="{k}")
    dead_pct = logs.assign(dead_pct=100 * _col(logs, "dead_fraction"))
    archs = arch_context(everything, logs_all, data["analyses"], config["report"].get("compare_n"), where)
    suite = suite_context(everything, data["suite"], config, where, report_dir)
    return {
        "id": f"{subject}-L{layer}", "subject": subject, "layer": layer, "n_saes": len(everything),
        "main_archs": ", ".join(main), "other_archs": ", ".join(sorted(set(everything["arch"]) - set(main))),
        "missing": [f"{a} n={n} k={k}" for a, n, k in data["missing"]], "norm": norm_table,
        "grid": grid_table(everything), "findings": findings(m, fits) + archs["findings"] + suite["findings"] + scaling["findings"],
        "fits": fit_tables(fits), "exponents": exponent_table(fits), "saes": data["saes"], "arch": archs,
        "downstream": verdict_view(power_law_verdict(downstream_fits(m))),
        "suite": suite, "scaling": scaling, "metrics_all": everything,
        "zero_ablation": {"delta_ce": num(ref["delta_ce"]), "kl": num(ref["kl_div_with_sae"]),
                          "ce_clean": num(_col(m, "ce_loss_without_sae").median())},
        "src": {"metrics": paths.fmt(paths.METRICS, **where), "fits": paths.fmt(paths.FITS, **where),
                "studies": paths.fmt(paths.STUDIES, **where),
                "log": paths.fmt(paths.SAE_LOG, **sae), "eval": paths.fmt(paths.EVAL, **sae)},
        "fig": {
            "fvu_curves": figures.training_curves(logs, "fvu", "training FVU"),
            "dead_curves": figures.training_curves(dead_pct, "dead_pct", "dead latents (%)", log_y=False),
            "compute": figures.training_curves(logs, "fvu", "training FVU", x="flops",
                                               xlabel="training FLOPs", envelope=True),
            "fvu_heatmap": figures.grid_heatmap(m, "fvu", "FVU"),
            "scaling": figures.scaling_laws(m, {k: fits.get(k) for k in ("fvu", "delta_ce")}, LABELS),
            "downstream": figures.downstream_vs_fvu(m, ref),
            "dead_heatmap": figures.grid_heatmap(m, "dead_fraction", "dead latents, % (count)", fmt="{:.1f}",
                                                 scale=100, cmap="rocket_r", annot_extra="dead_latents"),
            **{f"arch_{name}": fig for name, fig in _arch_figures(archs).items()},
            **{f"suite_{name}": fig for name, fig in suite["fig"].items()},
            **{f"scaling_{name}": fig for name, fig in scaling["fig"].items()},
        },
    }


def _arch_figures(archs: dict) -> dict:
    """The architecture sections' figures, by name, for write_figures."""
    return {"matched": archs["matched"].get("fig"), "fvu_vs_n": archs["slopes"].get("fig"),
            "dead_curves": archs["dead"].get("curves"), "progressive": archs["progressive"].get("fig"),
            "refinement": archs["refinement"].get("fig")}


def lm_context(src: Sources, name: str) -> dict | None:
    """The builtin subject LM: its size, training budget and final validation loss (training.json)."""
    info = src.json(paths.fmt(paths.MODEL_TRAINING, subject=name), f"{name}: builtin LM training")
    if not info:
        return None
    c = info.get("config") or {}
    val = info.get("final_val_loss")
    rows = [["parameters", num(info.get("n_params"))],
            ["layers × width × heads", " × ".join(num(c.get(x)) for x in ("n_layer", "n_embd", "n_head"))],
            ["vocabulary / context", f"{num(c.get('vocab_size'))} / {num(c.get('n_positions'))}"],
            ["training tokens", num(info.get("train_tokens"))],
            ["training time", f"{num(info.get('train_seconds'), 3)} s on {text(info.get('device'))}"],
            ["throughput", f"{num(info.get('tokens_per_s'), 3)} tokens/s"],
            ["final validation loss", f"{num(val)} nats/token (perplexity "
                                      f"{num(math.exp(val) if _isnum(val) else None)})"]]
    return {"table": table(["", ""], rows), "n_params": info.get("n_params"),
            "curve": figures.lm_training_curve(pd.DataFrame(info.get("history") or []))}


def subject_context(src: Sources, name: str, subj: dict) -> dict:
    """What the SAEs were trained on: the subject LM, its corpus, the token and activation stores."""
    ds = subj["dataset"]
    setup = [["model", subj["model"] + (f" @ {subj['revision']}" if subj.get("revision") else "")],
             ["layers (resid_post)", ", ".join(str(x) for x in subj["layers"])],
             ["context length", num(subj["ctx_len"])],
             ["SAE training rows per layer", num(subj["train_tokens"])],
             ["eval tokens", num(subj["eval_tokens"])], ["activation dtype", subj["dtype"]],
             ["dataset", ", ".join(f"{k}={v}" for k, v in ds.items() if v is not None)]]
    return {"name": name, "setup": table(["", ""], setup),
            "lm": lm_context(src, name) if subj["model"] == "builtin" else None,
            "corpus": corpus_table(src) if ds["path"] == "builtin" else None,
            "stores": store_table(src, name)}


def run_context(config: dict, layers: list[dict]) -> dict:
    """The sweep, shared hyperparameters, software versions and devices of all trained SAEs."""
    sw = config["sweep"]
    saes = [s for lay in layers for s in lay["saes"]]
    versions: dict[str, set] = {}
    for s in saes:
        for pkg, v in s["versions"].items():
            versions.setdefault(pkg, set()).add(str(v))
    devices = sorted({f"{s['device']} ({text(s['dtype'])})" for s in saes if s["device"]})

    def grid(g: dict) -> str:
        return (f"{', '.join(g['archs'])} × n ∈ {{{', '.join(num(n) for n in g['n'])}}} × "
                f"k ∈ {{{', '.join(num(k) for k in g['k'])}}}")

    def overrides(v: dict) -> str:
        return ", ".join(f"{key} = {_plain(val)}" for key, val in (v.get("train") or {}).items()) or "none"

    sweep = [["main grid", grid(sw)], *([f"extra grid {i + 1}", grid(g)] for i, g in enumerate(sw["extra"])),
             *([f"variant {name}", f"{v['arch']}, train overrides: {overrides(v)}"]
               for name, v in sw["variants"].items()),
             ["SAEs in the sweep", num(len(sae_jobs(config)))],
             ["k for penalty archs", "the target L0 their penalty λ is calibrated to (achieved: L0)"]]
    for exp in ("progressive", "refinement"):
        a = config["analysis"][exp]
        ns = "all" if a["n"] is None else ", ".join(num(n) for n in a["n"])
        sweep.append([f"analysis: {exp}", f"{', '.join(a['archs'])} at n {ns}; {num(a['tokens'])} tokens"])
    train = [[k, _derived(k, v, saes)] for k, v in config["train"].items()]
    evaluate, interpret = _flat(config["evaluate"]), _flat(config["interpret"])
    return {"sweep": table(["", ""], sweep), "train": table(["parameter", "value"], train),
            "evaluate": table(["parameter", "value"], evaluate),
            "interpret": table(["parameter", "value"], interpret),
            "versions": table(["package", "version"], [[p, ", ".join(sorted(versions[p]))]
                                                        for p in sorted(versions)]),
            "devices": ", ".join(devices) or "not recorded"}


def _flat(settings: dict, prefix: str = "") -> list[list[str]]:
    """Nested config settings as (dotted key, value) rows, the keys as a user writes them in config.yaml."""
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _plain(value)])
    return rows


TOY_FILES = {"allocation": (paths.TOY_ALLOCATION, "capacity-allocation model: D(N), L(N), phase diagram (F.2, F.5)"),
             "manifolds": (paths.TOY_MANIFOLDS, "toy manifold SAEs: L(n) curves, beta fits, circle panels (F.1)"),
             "groundtruth": (paths.TOY_GROUNDTRUTH, "SAEs on synthetic superposition: features discovered D(N)")}


def toy_studies(src: Sources, config: dict) -> tuple[dict | None, dict | None, dict | None]:
    """The toy studies' JSONs (None for a study that is off or missing)."""
    return tuple(src.json(path, what) if config["toy"].get(study, {}).get("enabled") else None
                 for study, (path, what) in TOY_FILES.items())


def imported_context(src: Sources, config: dict, layers: list[dict]) -> dict | None:
    """config.imported: each SAE trained elsewhere beside this run's SAE of its (subject, layer) closest in
    (n, k), on the same eval metrics. A comparison only: imported SAEs never enter the fits."""
    if not config["imported"]:
        return None
    metrics = {(lay["subject"], lay["layer"]): lay["metrics_all"] for lay in layers}
    rows = []
    for name, imp in config["imported"].items():
        ev = src.json(paths.fmt(paths.IMPORTED_EVAL, name=name), f"imported SAE '{name}': evaluation",
                      paths.IMPORTED_EVAL) or {}
        down = ev.get("downstream") or {}
        refuse_old_names(down, paths.fmt(paths.IMPORTED_EVAL, name=name), "its evaluate_imported job")
        rows.append([name, f"{imp['format']}: {imp['path']}", f"{imp['subject']} L{imp['layer']}",
                     text(ev.get("base_arch")), num(ev.get("n")), num(ev.get("k")), num(ev.get("fvu")),
                     num(ev.get("l0")), pct(ev.get("dead_fraction")), num(down.get("delta_ce")),
                     num(down.get("kl_div_with_sae")),
                     _closest_sae(metrics.get((imp["subject"], imp["layer"])), ev.get("n"), ev.get("k"))])
    cols = ["name", "source", "subject", "arch", "n", "k", "FVU", "L0", "dead %", "ΔCE (nats)", "KL (nats)",
            "this run's closest SAE (n, k): FVU, ΔCE"]
    return {"table": table(cols, rows), "src": paths.IMPORTED_EVAL}


def _closest_sae(m: pd.DataFrame | None, n: Any, k: Any) -> str:
    """This run's SAE nearest in log n, then in log k, as 'arch n=.. k=..: FVU .., ΔCE ..'."""
    if m is None or m.empty or not _isnum(n) or not _isnum(k):
        return "—"
    dist = (np.log(m["n"].astype(float) / n).abs() + np.log(m["k"].astype(float) / k).abs() / 100)
    r = m.loc[dist.idxmin()]
    return f"{r['arch']} n={int(r['n'])} k={int(r['k'])}: FVU {num(r.get('fvu'))}, ΔCE {num(r.get('delta_ce'))}"


def build_context(config: dict, report_dir: str = os.path.dirname(paths.REPORT)) -> dict:
    """Everything the template shows, as strings and base64 PNGs; reads files under the current directory.
    Links to other pages (the feature dashboards) are relative to `report_dir`, the report's folder."""
    src = Sources()
    subjects, layers = [], []
    for name, subj in config["subjects"].items():
        subjects.append(subject_context(src, name, subj))
        norm = src.json(paths.fmt(paths.NORM, subject=name), f"{name}: per-layer normalization statistics")
        n_params = (subjects[-1]["lm"] or {}).get("n_params")
        layers += [{**layer_context(src, name, layer, config, norm, report_dir), "n_params": n_params}
                   for layer in subj["layers"]]
    context = {"title": config["report"]["title"], "subjects": subjects, "layers": layers,
               "subject_size": subject_size_context(layers, config),
               "manifolds": manifolds_context(*toy_studies(src, config), layers),
               "run": run_context(config, layers), "imported": imported_context(src, config, layers),
               "files": src.listing(),
               "n_missing_files": sum(not r["present"] for r in src.rows)}
    rows = scorecard.collect(context)  # after every section: it gives each verdict its element id
    return {**context, "scorecard": rows, "scorecard_counts": scorecard.counts(rows)}


# ---- rendering ---------------------------------------------------------------------------------------

def _environment() -> jinja2.Environment:
    """The Jinja2 environment for templates/: autoescaping, strict undefined, trimmed blocks."""
    # autoescape=True: titles, dataset names and paths are user/file text and must never become markup.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def write_figures(context: dict, folder: str | Path) -> None:
    """Each figure also as a PNG file, so `snakemake --report` can show them one by one."""
    import base64

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    named = {f"{layer['id']}_{name}": png for layer in context["layers"] for name, png in layer["fig"].items()}
    named["subject_size"] = context["subject_size"]["fig"]
    for part in ("allocation", "toy", "groundtruth"):
        named |= {f"manifolds_{part}_{name}": png
                  for name, png in (context["manifolds"][part].get("fig") or {}).items()}
    for name, png in named.items():
        if png:
            (folder / f"{name}.png").write_bytes(base64.b64decode(png))


def render_report(config: dict, out: str, figures_dir: str | None = None) -> None:
    """Render the validated `config`'s run (files under the current directory) into one HTML file at `out`."""
    context = build_context(config, os.path.dirname(out) or ".")
    if figures_dir:
        write_figures(context, figures_dir)
    html = _environment().get_template("report.html").render(**context)
    write_text_atomic(out, method_doc.embed(html))  # the method document as an appendix; citations link into it
