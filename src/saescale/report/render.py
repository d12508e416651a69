"""Render reports/report.html: load what the pipeline wrote, turn it into tables, figures and findings.

Every number in the report is read from a file under data/ (listed in the report's 'Files' section) or
computed here from those files with the formula named next to it, so each figure is recomputable.
Files outside the report rule's inputs (eval JSONs, the Zarr stores) are optional: when absent the report
says so instead of failing. All text goes through Jinja2 autoescaping: dataset names, model ids and
paths come from users and files, and are never trusted as HTML.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from saescale import paths
from saescale.files import read_json, write_text_atomic
from saescale.report import figures

# REFERENCE D.1 / E.1: Gao et al. eq. 3 constants fitted on GPT-4; shown for scale, not expected to transfer.
GPT4_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32,
              "eta": -0.085}
GREEK = {"alpha": "α", "beta_k": "β_k", "beta_n": "β_n", "gamma": "γ", "zeta": "ζ", "eta": "η"}
LABELS = {"fvu": "FVU", "delta_ce": "ΔCE (nats)"}
CONVERGED_GAIN = 0.01  # REFERENCE D.1: converged when the loss improves < 1% over the last doubling of tokens


# ---- formatting: every cell is a string, so the template never formats or trusts a value -------------

def _isnum(x: Any) -> bool:
    numeric = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    return numeric and math.isfinite(x)


def text(x: Any) -> str:
    """A free-text cell: missing or NaN reads as an em dash, not 'nan'."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


def num(x: Any, digits: int = 4) -> str:
    """4 significant digits for floats, thousands separators for integers, an em dash for missing/NaN."""
    if not _isnum(x):
        return "—" if x is None or isinstance(x, (float, np.floating)) else str(x)
    if isinstance(x, (int, np.integer)) or (float(x).is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if 1e4 <= abs(x) < 1e15:  # throughputs and token counts read better whole than as 4.758e+05
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _isnum(x) else "—"


def pm(value: Any, err: Any) -> str:
    return f"{num(value)} ± {num(err, 2)}" if _isnum(err) else f"{num(value)} ± n/a"


def size(n_bytes: Any) -> str:
    if not _isnum(n_bytes):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return "—"


def table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": [[c if isinstance(c, str) else num(c) for c in r] for r in rows]}


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
        log, cfg, ev = (getattr(src, kind)(paths.fmt(pat, **job), f"{subject} L{layer}: {what}",
                                           paths.fmt(pat, **pattern)) for pat, kind, what in per_sae)
        if log is not None:
            logs.append(log.assign(arch=arch, n=n, k=k))
        down = (ev or {}).get("downstream") or {}
        train = (cfg or {}).get("train") or {}
        extra.append({"arch": arch, "n": n, "k": k,
                      "kl_zero_ablation": down.get("kl_zero_ablation", math.nan),
                      "dead_latents": (ev or {}).get("dead_latents", math.nan),
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

def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index)
    return pd.to_numeric(df[name], errors="coerce")


def grid_table(m: pd.DataFrame) -> dict:
    """One row per SAE: the eval metrics of REFERENCE C.1-C.3 plus throughput and convergence."""
    multi = m["arch"].nunique() > 1
    cols = ["n", "k", "FVU", "L0", "dead %", "dead latents", "ΔCE (nats)", "KL (nats)", "loss recovered",
            "train tokens", "tokens/s", "lr", "weights", "FVU gain, last doubling"]
    rows = []
    for _, r in m.iterrows():
        rows.append(([r["arch"]] if multi else []) + [
            num(r["n"]), num(r["k"]), num(r.get("fvu")), num(r.get("l0")), pct(r.get("dead_fraction")),
            num(r.get("dead_latents")), num(r.get("delta_ce")), num(r.get("kl")),
            pct(r.get("loss_recovered")),
            num(r.get("train_tokens")), num(r.get("tokens_per_s"), 3), num(r.get("lr"), 3),
            text(r.get("weights")), pct(r.get("last_doubling_gain"))])
    return table((["arch"] if multi else []) + cols, rows)


def _fit_status(fit: dict, params: tuple[str, ...]) -> str:
    """Say plainly when a fit failed or when 'ok' hides parameters the data cannot pin down."""
    if not fit.get("ok"):
        return f"not ok: {fit.get('reason', 'no reason given')}"
    if "b" in params and _isnum(fit.get("b")) and fit["b"] < 1e-6:
        return "ok, but b is at its bound 0: no decrease with n resolved"
    loose = [p for p in params if not _isnum(fit.get(f"{p}_err")) or fit[f"{p}_err"] >= abs(fit.get(p) or 0)]
    names = ", ".join(GREEK.get(p, p) for p in loose)
    return f"ok, but poorly constrained ({names}: σ ≥ |value| or n/a)" if loose else "ok"


def fit_tables(fits: dict) -> list[dict]:
    """Per metric: the per-k L(n) table, the joint eq. 3 table (GPT-4 constants beside), and not-ok notes."""
    out = []
    for metric, fm in fits.items():
        fm = fm or {}
        per_k = [[text(f.get("arch")), num(f.get("k")), num(f.get("n_points")),
                  *(pm(f.get(p), f.get(f"{p}_err")) if f.get("ok") else "—" for p in ("a", "b", "e")),
                  num(f.get("rmse_log"), 3), _fit_status(f, ("a", "b", "e"))] for f in fm.get("per_k", [])]
        joint = []
        for f in fm.get("joint", []):
            for p in GPT4_JOINT:
                fitted = pm(f.get(p), f.get(f"{p}_err")) if f.get("ok") else "—"
                paper = num(GPT4_JOINT[p]) if metric == "fvu" else "—"  # eq. 3 was fitted to MSE only
                joint.append([text(f.get("arch")), GREEK[p], fitted, paper])
            joint.append([text(f.get("arch")), "status", _fit_status(f, tuple(GPT4_JOINT)), ""])
        notes = [f"{metric}: {f.get('arch')} k = {f.get('k')} per-k fit not ok ({f.get('reason')})"
                 for f in fm.get("per_k", []) if not f.get("ok")]
        notes += [f"{metric}: {f.get('arch')} joint fit not ok ({f.get('reason')})"
                  for f in fm.get("joint", []) if not f.get("ok")]
        if fm.get("dropped_rows"):
            notes.append(f"{metric}: {fm['dropped_rows']} rows dropped before fitting (non-finite or ≤ 0)")
        out.append({"metric": LABELS.get(metric, metric), "notes": notes,
                    "per_k": table(["arch", "k", "points", "a", "b", "e", "RMSE (log)", "status"], per_k),
                    "joint": table(["arch", "parameter", "this run", "Gao et al. GPT-4 (eq. 3)"], joint)})
    return out


def exponent_table(fits: dict) -> dict:
    """The n-exponent b at each k: per-k fit, joint law (−(β_n + γ ln k)), and the GPT-4 eq. 3 value."""
    fm = fits.get("fvu") or {}
    joint = {str(f.get("arch")): f for f in fm.get("joint", []) if f.get("ok")}
    rows = []
    for f in fm.get("per_k", []):
        k, j = f.get("k"), joint.get(str(f.get("arch")))
        b_joint = -(j["beta_n"] + j["gamma"] * math.log(k)) if j and _isnum(k) else None
        b_gpt4 = -(GPT4_JOINT["beta_n"] + GPT4_JOINT["gamma"] * math.log(k)) if _isnum(k) else None
        per_k = pm(f["b"], f.get("b_err")) if f.get("ok") else "not fitted"
        rows.append([text(f.get("arch")), num(k), per_k, num(b_joint, 3), num(b_gpt4, 3)])
    return table(["arch", "k", "b, per-k fit", "b, joint law", "b, GPT-4 eq. 3"], rows)


def _loglog_slope(x: pd.Series, y: pd.Series) -> tuple[float, float, int]:
    """Least-squares slope and Pearson r of log y on log x (the Fig. 5b power-law relation)."""
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep].to_numpy(float)), np.log(y[keep].to_numpy(float))
    if len(lx) < 3 or np.ptp(lx) == 0 or np.ptp(ly) == 0:
        return math.nan, math.nan, int(len(lx))
    return float(np.polyfit(lx, ly, 1)[0]), float(np.corrcoef(lx, ly)[0, 1]), int(len(lx))


def findings(m: pd.DataFrame, fits: dict) -> list[str]:
    """Short, data-derived sentences comparing this layer with the paper's claims."""
    out, trends = [], []
    multi = m["arch"].nunique() > 1
    for (arch, k), g in m.groupby(["arch", "k"]):
        g = g[np.isfinite(_col(g, "fvu"))].sort_values("n")
        if g["n"].nunique() >= 2:
            lo, hi = g.iloc[0], g.iloc[-1]
            verb = "falls" if hi["fvu"] < lo["fvu"] else "rises"
            steps = np.sign(np.diff(g["fvu"].to_numpy(float)))
            shape = "" if len(set(steps)) <= 1 else ", not monotonically"
            trends.append((verb, f"{arch + ' ' if multi else ''}k = {k}: {num(lo['fvu'])} → {num(hi['fvu'])} "
                                 f"(n = {lo['n']} → {hi['n']}{shape})"))
    if trends:
        falls = [t for v, t in trends if v == "falls"]
        rises = [t for v, t in trends if v == "rises"]
        if falls:
            out.append("FVU falls with n, as in Gao Fig. 1b, at " + "; ".join(falls) + ".")
        if rises:
            out.append("FVU rises with n at " + "; ".join(rises) + ". The paper's L(N) is measured at "
                       "convergence; rising FVU usually means the larger SAEs are under-trained for this "
                       "token budget (see the 'FVU gain, last doubling' column).")
    gain = _col(m, "last_doubling_gain")
    if gain.notna().any():
        still = int((gain > CONVERGED_GAIN).sum())
        out.append(f"{still} of {int(gain.notna().sum())} SAEs still improved training FVU by more than "
                   f"{CONVERGED_GAIN:.0%} over their last doubling of tokens (not converged by REFERENCE "
                   "D.1's rule).")
    joint = [f for f in (fits.get("fvu") or {}).get("joint", []) if f.get("ok")]
    for f in joint:
        g, e = f["gamma"], f["eta"]
        out.append(f"Joint law ({f['arch']}): γ = {num(g, 3)} (paper −0.042; "
                   f"{'same' if g < 0 else 'opposite'} sign: L(N) {'steeper' if g < 0 else 'shallower'} for "
                   f"larger k); η = {num(e, 3)} (paper −0.085; here the irreducible loss "
                   f"{'falls' if e < 0 else 'rises'} with k).")
    slope, r, npts = _loglog_slope(_col(m, "fvu"), _col(m, "delta_ce"))
    if _isnum(slope):
        out.append(f"ΔCE vs FVU pooled over the grid (all n and k): log-log slope {num(slope, 3)}, "
                   f"Pearson r = {num(r, 3)} on {npts} SAEs (Gao Fig. 5b finds a clean power law at fixed L0 "
                   "as n varies).")
    dead = _col(m, "dead_fraction")
    if dead.notna().any():
        i = dead.idxmax()
        out.append(f"Dead latents over the eval tokens: at most {pct(dead[i])} (n = {m.loc[i, 'n']}, "
                   f"k = {m.loc[i, 'k']}); the paper reports few dead latents with TopK + AuxK "
                   "(7% for GPT-4 16M).")
    rec = _col(m, "loss_recovered")
    if rec.notna().any():
        out.append(f"Loss recovered: {pct(rec.min())} to {pct(rec.max())} (GPT-4 16M SAE: 98.2%; the paper "
                   "prefers ΔCE, since this number looks good even for poor SAEs).")
    return out


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


def corpus_table(src: Sources) -> dict | None:
    """Provenance of the builtin corpus: which Python's standard library, and its hash."""
    info = src.json(paths.CORPUS_INFO, "builtin corpus provenance")
    if not info:
        return None
    return table(["", ""], [["source", text(info.get("source"))],
                            ["Python version", text(info.get("python_version"))],
                            ["files / bytes", f"{num(info.get('n_files'))} / {num(info.get('n_bytes'))}"],
                            ["sha256", text(info.get("sha256"))]])


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


def store_table(src: Sources, name: str) -> dict | None:
    """Sizes of the token and activation stores; bytes per token show what the cache costs at scale."""
    rows = []
    tok = src.store(paths.fmt(paths.TOKENS, subject=name), f"{name}: token windows (Zarr)")
    if tok:
        a = tok["attrs"]
        n_win, ctx = a.get("n_windows"), a.get("ctx_len")
        n_tok = n_win * ctx if _isnum(n_win) and _isnum(ctx) else None
        rows.append(["token store", f"{num(n_win)} windows × {num(ctx)} = {num(n_tok)} tokens "
                     f"({num(a.get('n_train'))} train / {num(a.get('n_eval'))} eval windows)",
                     size(tok["bytes"]), num(tok["bytes"] / n_tok if n_tok else None, 3)])
    act = src.store(paths.fmt(paths.ACTIVATIONS, subject=name), f"{name}: activations (Zarr)")
    if act:
        a = act["attrs"]
        n_rows = a.get("n_rows") if _isnum(a.get("n_rows")) else None
        rows.append(["activation store", f"{num(n_rows)} rows ({num(a.get('n_train'))} train / "
                     f"{num(a.get('n_eval'))} eval) × {len(a.get('layers') or [])} layers × "
                     f"d = {num(a.get('d_model'))}, {text(a.get('dtype'))}; extracted in "
                     f"{num(a.get('extract_seconds'), 3)} s", size(act["bytes"]),
                     num(act["bytes"] / n_rows if n_rows else None, 3)])
        width = {"float16": 2, "float32": 4}.get(a.get("dtype"))
        for layer, b in sorted(act["layer_bytes"].items()):
            raw = a["d_model"] * width if width and _isnum(a.get("d_model")) else None
            rows.append([f"  {layer}/x", f"uncompressed {num(raw)} B/token", size(b),
                         num(b / n_rows if n_rows else None, 3)])
    return table(["store", "contents", "on disk", "bytes/token"], rows) if rows else None


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


def _derived(key: str, value: Any, saes: list[dict]) -> str:
    """Config values left null are derived per SAE; say by which rule and what was used."""
    if value is not None:
        return _plain(value)
    if key == "lr":
        return "null: lr ∝ 1/√n from lr_ref at lr_ref_n (REFERENCE A.7); per-SAE values in the grid table"
    if key == "k_aux":
        used = ", ".join(num(k) for k in sorted({s["k_aux"] for s in saes if _isnum(s.get("k_aux"))}))
        return f"null: power of two near d_model/2 (REFERENCE A.5); used {used or '—'}"
    return "null"


def _plain(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(_plain(x) for x in v)
    return num(v) if _isnum(v) else ("null" if v is None else str(v))


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


def _environment() -> jinja2.Environment:
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
