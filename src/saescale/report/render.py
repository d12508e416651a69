"""Render reports/report.html: load what the pipeline wrote, turn it into tables, figures and findings.

Every number in the report is read from a file under data/ (listed in the report's 'Files' section) or
computed here from those files with the formula named next to it, so each figure is recomputable.
Files outside the report rule's inputs (eval JSONs, the Zarr stores) are optional: when absent the report
says so instead of failing. All text goes through Jinja2 autoescaping: dataset names, model ids and
paths come from users and files, and are never trusted as HTML.

This module loads files (`Sources`, `load_layer`), assembles the template context (`layer_context`,
`subject_context`, `run_context`, `build_context`) and renders (`write_figures`, `render_report`); the
tables, cell formatting and findings live in `saescale.report.tables`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from saescale import paths
from saescale.files import read_json, write_text_atomic
from saescale.report import figures
from saescale.report.tables import (
    LABELS, _col, _derived, _isnum, _plain, corpus_table, exponent_table, findings, fit_tables, grid_table,
    num, store_table, table, text,
)


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
    """Relative FVU improvement between half the tokens and the end (REFERENCE D.1 convergence rule)."""
    log = log[["tokens", "fvu"]].apply(pd.to_numeric, errors="coerce").dropna().sort_values("tokens")
    if len(log) < 2:
        return math.nan
    end = log.iloc[-1]
    half = log[log["tokens"] <= end["tokens"] / 2]
    if half.empty or half["fvu"].iloc[-1] <= 0:
        return math.nan
    return float(1 - end["fvu"] / half["fvu"].iloc[-1])


def load_layer(src: Sources, subject: str, layer: int, sweep: dict) -> dict:
    """metrics.csv + fits.json, and per SAE its cfg.json, train_log.csv and (optional) eval JSON."""
    where = dict(subject=subject, layer=layer)
    metrics = src.csv(paths.fmt(paths.METRICS, **where), f"{subject} L{layer}: the (n, k) grid")
    fits = src.json(paths.fmt(paths.FITS, **where), f"{subject} L{layer}: fitted scaling laws")
    if metrics is None:
        metrics = pd.DataFrame({"arch": pd.Series(dtype=str), "n": pd.Series(dtype=int),
                                "k": pd.Series(dtype=int), "fvu": pd.Series(dtype=float)})
    grid = {(a, n, k) for a in sweep["archs"] for n in sweep["n"] for k in sweep["k"]}
    grid |= {(str(r.arch), int(r.n), int(r.k)) for r in metrics.itertuples()}
    logs, extra, saes = [], [], []
    pattern = dict(where, arch="{arch}", n="{n}", k="{k}")
    per_sae = [(paths.SAE_LOG, "csv", "SAE training log (tokens, FVU, L0, dead fraction, lr, FLOPs)"),
               (paths.SAE_CFG, "json", "SAE config: training spec, throughput, device, software versions"),
               (paths.EVAL, "json", "SAE evaluation: FVU, L0, dead latents, ΔCE/KL incl. zero ablation")]
    for arch, n, k in sorted(grid):
        job = dict(where, arch=arch, n=n, k=k)
        log, cfg, _eval = (getattr(src, kind)(paths.fmt(pat, **job), f"{subject} L{layer}: {what}",
                                              paths.fmt(pat, **pattern)) for pat, kind, what in per_sae)
        if log is not None:
            logs.append(log.assign(arch=arch, n=n, k=k))
        train = (cfg or {}).get("train") or {}
        # everything per SAE is in metrics.csv but the convergence of its training curve
        extra.append({"arch": arch, "n": n, "k": k,
                      "last_doubling_gain": _last_doubling_gain(log) if log is not None else math.nan})
        spec = (cfg or {}).get("train_spec") or {}
        saes.append({"versions": (cfg or {}).get("versions") or {}, "device": train.get("device"),
                     "dtype": train.get("dtype"), "k_aux": spec.get("k_aux")})
    metrics = metrics.assign(arch=metrics["arch"].astype(str), n=metrics["n"].astype(int),
                             k=metrics["k"].astype(int))
    metrics = metrics.merge(pd.DataFrame(extra), on=["arch", "n", "k"], how="left")
    metrics = metrics.sort_values(["arch", "k", "n"]).reset_index(drop=True)
    logs_df = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["arch", "n", "k"])
    missing = sorted(grid - {(r.arch, r.n, r.k) for r in metrics.itertuples()})
    return {"metrics": metrics, "fits": fits or {}, "logs": logs_df, "saes": saes, "missing": missing}


# ---- per-section context -----------------------------------------------------------------------------

def layer_context(src: Sources, subject: str, layer: int, config: dict, norm: dict | None) -> dict:
    """Sections 2-6 for one (subject, layer): tables, fitted laws, findings and figures."""
    data = load_layer(src, subject, layer, config["sweep"])
    m, logs, fits = data["metrics"], data["logs"], data["fits"]
    ref = {"delta_ce": _col(m, "delta_ce_zero_ablation").median(), "kl": _col(m, "kl_zero_ablation").median()}
    stats = ((norm or {}).get("layers") or {}).get(str(layer))
    norm_table = None
    if stats:
        cols = ("n_rows", "baseline_mse", "raw_norm_mean", "raw_norm_max")
        norm_table = table(["rows", "baseline MSE (E‖x − E[x]‖²)", "raw ‖x‖ mean", "raw ‖x‖ max"],
                           [[stats.get(c) for c in cols]])
    sae = dict(subject=subject, layer=layer, arch="{arch}", n="{n}", k="{k}")
    dead_pct = logs.assign(dead_pct=100 * _col(logs, "dead_fraction"))
    return {
        "id": f"{subject}-L{layer}", "subject": subject, "layer": layer, "n_saes": len(m),
        "missing": [f"{a} n={n} k={k}" for a, n, k in data["missing"]], "norm": norm_table,
        "grid": grid_table(m), "findings": findings(m, fits), "fits": fit_tables(fits),
        "exponents": exponent_table(fits), "saes": data["saes"],
        "zero_ablation": {"delta_ce": num(ref["delta_ce"]), "kl": num(ref["kl"]),
                          "ce_clean": num(_col(m, "ce_clean").median())},
        "src": {"metrics": paths.fmt(paths.METRICS, subject=subject, layer=layer),
                "fits": paths.fmt(paths.FITS, subject=subject, layer=layer),
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
        },
    }


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
    return {"table": table(["", ""], rows),
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
    n_layers = sum(len(s["layers"]) for s in config["subjects"].values())
    sweep = [["architectures", ", ".join(sw["archs"])], ["n (latents)", ", ".join(num(n) for n in sw["n"])],
             ["k (active latents)", ", ".join(num(k) for k in sw["k"])],
             ["SAEs in the sweep", num(len(sw["archs"]) * len(sw["n"]) * len(sw["k"]) * n_layers)]]
    train = [[k, _derived(k, v, saes)] for k, v in config["train"].items()]
    evaluate = [[k, _plain(v)] for k, v in config["evaluate"].items()]
    return {"sweep": table(["", ""], sweep), "train": table(["parameter", "value"], train),
            "evaluate": table(["parameter", "value"], evaluate),
            "versions": table(["package", "version"], [[p, ", ".join(sorted(versions[p]))]
                                                        for p in sorted(versions)]),
            "devices": ", ".join(devices) or "not recorded"}


def build_context(config: dict) -> dict:
    """Everything the template shows, as strings and base64 PNGs; reads files under the current directory."""
    src = Sources()
    subjects, layers = [], []
    for name, subj in config["subjects"].items():
        subjects.append(subject_context(src, name, subj))
        norm = src.json(paths.fmt(paths.NORM, subject=name), f"{name}: per-layer normalization statistics")
        layers += [layer_context(src, name, layer, config, norm) for layer in subj["layers"]]
    return {"title": config["report"]["title"], "subjects": subjects, "layers": layers,
            "run": run_context(config, layers), "files": src.listing(),
            "n_missing_files": sum(not r["present"] for r in src.rows)}


# ---- rendering ---------------------------------------------------------------------------------------

def _environment() -> jinja2.Environment:
    """The Jinja2 environment for templates/: autoescaping, strict undefined, trimmed blocks."""
    # autoescape=True: titles, dataset names and paths are user/file text and must never become markup.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def write_figures(layers: list[dict], folder: str | Path) -> None:
    """Each figure also as a PNG file, so `snakemake --report` can show them one by one."""
    import base64

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        for name, png in layer["fig"].items():
            if png:
                (folder / f"{layer['id']}_{name}.png").write_bytes(base64.b64decode(png))


def render_report(config: dict, out: str, figures_dir: str | None = None) -> None:
    """Render the validated `config`'s run (files under the current directory) into one HTML file at `out`."""
    context = build_context(config)
    if figures_dir:
        write_figures(context["layers"], figures_dir)
    html = _environment().get_template("report.html").render(**context)
    write_text_atomic(out, html)
