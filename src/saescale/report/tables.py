"""Tables, formatting and findings for the HTML report: pure functions from loaded data to strings.

Every cell is formatted here into a string, so the template never formats or trusts a value. The
functions take the frames and dicts that `render.load_layer` and `render.Sources` produce and return
`table` dicts ({"columns", "rows"}) or plain sentences; nothing here reads files except through a
`Sources` passed in (so the report's 'Files' section still lists what was read).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from saescale import paths
from saescale.report.comparison import downstream_fits, sign_claim
from saescale.evaluate.dead_window import dead_window_comparable, paper_comparison, window_text
from saescale.report.comparison import L0_TOLERANCE

if TYPE_CHECKING:
    from saescale.report.render import Sources

# method §D.1 / E.1: Gao et al. eq. 3 constants fitted on GPT-4; shown for scale, not expected to transfer.
GPT4_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32,
              "eta": -0.085}
GREEK = {"alpha": "α", "beta_k": "β_k", "beta_n": "β_n", "gamma": "γ", "zeta": "ζ", "eta": "η"}
LABELS = {"fvu": "FVU", "delta_ce": "ΔCE (nats)"}
CONVERGED_GAIN = 0.01  # method §D.1: converged when the loss improves < 1% over the last doubling of tokens


# ---- formatting: every cell is a string, so the template never formats or trusts a value -------------

def _isnum(x: Any) -> bool:
    """A finite int or float (numpy scalars included); bools and NaN/inf are not numbers here."""
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
    """A fraction as a percentage with one decimal, an em dash for missing/NaN."""
    return f"{100 * x:.1f}%" if _isnum(x) else "—"


def pm(value: Any, err: Any) -> str:
    """A fitted value ± its standard error (2 significant digits), '± n/a' when the error is unknown."""
    return f"{num(value)} ± {num(err, 2)}" if _isnum(err) else f"{num(value)} ± n/a"


def size(n_bytes: Any) -> str:
    """Bytes in binary units (B, KiB, MiB, GiB), an em dash for missing/NaN."""
    if not _isnum(n_bytes):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return "—"


def table(columns: list[str], rows: list[list[Any]]) -> dict:
    """A table for the template: string cells kept as they are, anything else formatted with `num`."""
    return {"columns": columns, "rows": [[c if isinstance(c, str) else num(c) for c in r] for r in rows]}


# ---- per-layer tables and findings ------------------------------------------------------------------

def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """Column `name` as numbers (unparseable cells NaN), or all NaN when the column is absent."""
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index)
    return pd.to_numeric(df[name], errors="coerce")


def grid_table(m: pd.DataFrame) -> dict:
    """One row per SAE: the eval metrics of method §C.1-C.3 plus throughput and convergence."""
    multi = m["arch"].nunique() > 1
    over = f"over {window_text(dead_windows(m)['eval'])} of eval"  # method §A.8: a count needs its window
    cols = ["n", "k", "FVU", "L0", f"dead % ({over})", "dead latents", "ΔCE (nats)", "KL (nats)", "loss recovered",
            "train tokens", "tokens/s", "lr", "weights", "FVU gain, last doubling"]
    rows = []
    for _, r in m.iterrows():
        rows.append(([r["arch"]] if multi else []) + [
            num(r["n"]), num(r["k"]), num(r.get("fvu")), _l0_cell(r), pct(r.get("dead_fraction")),
            num(r.get("dead_latents")), num(r.get("delta_ce")), num(r.get("kl_div_with_sae")),
            pct(r.get("ce_loss_score")),
            num(r.get("train_tokens")), num(r.get("tokens_per_s"), 3), num(r.get("lr"), 3),
            text(r.get("weights")), pct(r.get("last_doubling_gain"))])
    return table((["arch"] if multi else []) + cols, rows)


def _l0_cell(r: pd.Series) -> str:
    """Achieved L0; for a penalty arch (calibrated λ) more than L0_TOLERANCE off its target k, flagged with ⚠ and
    the miss, since k is then not the sparsity it was trained at."""
    l0, k = r.get("l0"), r.get("k")
    if _isnum(r.get("penalty")) and _isnum(l0) and _isnum(k) and k > 0 and abs(l0 / k - 1) > L0_TOLERANCE:
        return f"{num(l0)} ⚠ ({l0 / k - 1:+.0%} vs target {num(k)})"
    return num(l0)


def _fit_status(fit: dict, params: tuple[str, ...]) -> str:
    """Say plainly when a fit failed or when 'ok' hides parameters the data cannot pin down."""
    if not fit.get("ok"):
        return f"not ok: {fit.get('reason', 'no reason given')}"
    if "b" in params and _isnum(fit.get("b")) and fit["b"] < 1e-6:
        return "ok, but b is at its bound 0: no decrease with n resolved"
    loose = [p for p in params if not _isnum(fit.get(f"{p}_err")) or fit[f"{p}_err"] >= abs(fit.get(p) or 0)]
    names = ", ".join(GREEK.get(p, p) for p in loose)
    return f"ok, but poorly constrained ({names}: σ ≥ |value| or n/a)" if loose else "ok"


def _points(fit: dict) -> str:
    """How many SAEs a fit used and what they are (method §D.1): converged points count exactly, censored ones
    (stopped at their token cap) as bounds, fixed-budget ones are not converged at all."""
    counts = {key: value for key, value in (fit.get("counts") or {}).items() if value}
    said = ", ".join(f"{value} {key}" for key, value in counts.items())
    return f"{num(fit.get('n_points'))} ({said})" if said else num(fit.get("n_points"))


def fit_tables(fits: dict) -> list[dict]:
    """Per metric: the per-k L(n) table, the joint eq. 3 table (GPT-4 constants beside), and not-ok notes."""
    out = []
    for metric, fm in fits.items():
        fm = fm or {}
        per_k = [[text(f.get("arch")), num(f.get("k")), text(f.get("label") or "L(n)"), _points(f),
                  *(pm(f.get(p), f.get(f"{p}_err")) if f.get("ok") else "—" for p in ("a", "b", "e")),
                  num(f.get("rmse_log"), 3), _fit_status(f, ("a", "b", "e"))] for f in fm.get("per_k", [])]
        joint = []
        for f in fm.get("joint", []):
            for p in GPT4_JOINT:
                fitted = pm(f.get(p), f.get(f"{p}_err")) if f.get("ok") else "—"
                paper = num(GPT4_JOINT[p]) if metric == "fvu" else "—"  # eq. 3 was fitted to MSE only
                joint.append([text(f.get("arch")), GREEK[p], fitted, paper])
            joint.append([text(f.get("arch")), "fitted to", f"{text(f.get('label') or 'eq. 3')}: {_points(f)}", ""])
            joint.append([text(f.get("arch")), "status", _fit_status(f, tuple(GPT4_JOINT)), ""])
        notes = [f"{metric}: {f.get('arch')} k = {f.get('k')} per-k fit not ok ({f.get('reason')})"
                 for f in fm.get("per_k", []) if not f.get("ok")]
        notes += [f"{metric}: {f.get('arch')} joint fit not ok ({f.get('reason')})"
                  for f in fm.get("joint", []) if not f.get("ok")]
        if fm.get("dropped_rows"):
            notes.append(f"{metric}: {fm['dropped_rows']} rows dropped before fitting (non-finite or ≤ 0)")
        out.append({"metric": LABELS.get(metric, metric), "notes": notes,
                    "per_k": table(["arch", "k", "law", "SAEs", "a", "b", "e", "RMSE (log)", "status"], per_k),
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


def _sign_read(value: float, err: Any, negative_means: str) -> str:
    """Whether a fitted constant is negative (the paper's sign) beyond 2σ, positive beyond 2σ, or not
    resolved by its error bar (method §D.1; the ±2σ rule is our choice)."""
    if not _isnum(err):
        return f"{'negative' if value < 0 else 'positive'} as a point value; no error bar"
    return {True: f"negative beyond 2σ: {negative_means}", False: "positive beyond 2σ: the opposite sign",
            None: "sign not resolved within 2σ"}[sign_claim(-value, float(err))]


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
                   f"{CONVERGED_GAIN:.0%} over their last doubling of tokens (not converged by method §"
                   "D.1's rule).")
    joint = [f for f in (fits.get("fvu") or {}).get("joint", []) if f.get("ok")]
    for f in joint:
        out.append(f"Joint law ({f['arch']}): γ = {pm(f['gamma'], f.get('gamma_err'))} (paper −0.042; "
                   f"{_sign_read(f['gamma'], f.get('gamma_err'), 'L(N) steeper for larger k')}); "
                   f"η = {pm(f['eta'], f.get('eta_err'))} (paper −0.085; "
                   f"{_sign_read(f['eta'], f.get('eta_err'), 'the irreducible loss falls with k')}).")
    fits_5b = downstream_fits(m)
    if fits_5b:
        out.append("ΔCE vs FVU at fixed k as n varies (Gao Fig. 5b holds L0 fixed; k is never pooled): "
                   + "; ".join(f"{f['arch']} k = {f['k']}: slope {num(f['slope'], 3)}"
                               + (f" ± {num(f['se'], 2)}, r² = {num(f['r2'], 3)}" if _isnum(f["se"])
                                  else " (2 SAEs: no fit quality)") for f in fits_5b) + ".")
    out += dead_findings(m)
    rec = _col(m, "ce_loss_score")
    if rec.notna().any():
        out.append(f"Loss recovered: {pct(rec.min())} to {pct(rec.max())} (GPT-4 16M SAE: 98.2%; the paper "
                   "prefers ΔCE, since this number looks good even for poor SAEs).")
    return out


def dead_windows(m: pd.DataFrame) -> dict[str, float]:
    """The token window of each dead-latent count (method §A.8): `eval`, every eval token (the record's
    dead_window_tokens, else eval_tokens), and `train`, the last train.dead_tokens training tokens (column
    train_dead_tokens; NaN when the table does not carry it). One value each: the largest, if SAEs differ."""
    def widest(*names: str) -> float:
        for name in names:
            v = _col(m, name)
            if v.notna().any():
                return float(v.max())
        return math.nan
    return {"eval": widest("dead_window_tokens", "eval_tokens"), "train": widest("train_dead_tokens")}


def dead_findings(m: pd.DataFrame) -> list[str]:
    """The most dead latents over each window, each labelled with its token count, and the paper's numbers
    (~10M-token window) only beside a window of comparable length; otherwise why they cannot be compared."""
    windows, out = dead_windows(m), []
    counts = [("eval", "dead_fraction"), ("train", "train_dead_fraction")]
    comparable = []
    for key, column in counts:
        dead = _col(m, column)
        if not dead.notna().any():
            continue
        i = dead.idxmax()
        windows[key] = dead_windows(m.loc[[i]])[key]  # the window of the SAE quoted
        how = (f"never fired on any of the {window_text(windows['eval'])} evaluated" if key == "eval" else
               "not fired within the last train.dead_tokens" + (
                   f" = {window_text(windows['train'])} of training" if _isnum(windows["train"]) else
                   " training tokens, at the end of training"))
        out.append(f"Dead latents ({how}): at most {pct(dead[i])} (n = {m.loc[i, 'n']}, k = {m.loc[i, 'k']}).")
        if dead_window_comparable(windows[key]):
            comparable.append(key)
    if out:
        paper = "The paper reports few dead latents with TopK + AuxK (7% for GPT-4 16M)"
        if comparable:
            out.append(f"{paper}; {paper_comparison(windows[comparable[0]])}, so compare the "
                       f"{comparable[0]} count with it.")
        else:
            shown = [k for k, c in counts if _col(m, c).notna().any() and _isnum(windows[k])]
            why = "; ".join(f"{k} window: {paper_comparison(windows[k])}" for k in shown) or \
                paper_comparison(None)
            out.append(f"{paper}. No count here uses a comparable window ({why}).")
    return out


# ---- subject and run tables ---------------------------------------------------------------------------

def corpus_table(src: Sources) -> dict | None:
    """Provenance of the builtin corpus: which Python's standard library, and its hash."""
    info = src.json(paths.CORPUS_INFO, "builtin corpus provenance")
    if not info:
        return None
    return table(["", ""], [["source", text(info.get("source"))],
                            ["Python version", text(info.get("python_version"))],
                            ["files / bytes", f"{num(info.get('n_files'))} / {num(info.get('n_bytes'))}"],
                            ["sha256", text(info.get("sha256"))]])


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


def _derived(key: str, value: Any, saes: list[dict]) -> str:
    """Config values left null are derived per SAE; say by which rule and what was used."""
    if value is not None:
        return _plain(value)
    if key == "lr":
        return "null: lr ∝ 1/√n from lr_ref at lr_ref_n (method §A.7); per-SAE values in the grid table"
    if key == "k_aux":
        used = ", ".join(num(k) for k in sorted({s["k_aux"] for s in saes if _isnum(s.get("k_aux"))}))
        return f"null: power of two near d_model/2 (method §A.5); used {used or '—'}"
    return "null"


def _plain(v: Any) -> str:
    """A config value as text: lists comma-joined, numbers via `num`, None as 'null'."""
    if isinstance(v, list):
        return ", ".join(_plain(x) for x in v)
    return num(v) if _isnum(v) else ("null" if v is None else str(v))
