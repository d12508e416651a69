"""Feature dashboards: one self-contained HTML page per SAE, a card per sampled latent.

Researchers open these pages from the main report's index to read latents. The per-latent records (JSONL,
one per latent: frequency, activation histogram, top/random contexts, N2G, logit lens, autointerp) come
from the feature-analysis stage; this module only turns them into a page. Every string from the corpus,
the tokenizer or an LLM goes through Jinja2 autoescaping (a token can be `<script>` or a lone `&`), and
every number is formatted here, so the template neither formats nor trusts a value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from saescale.files import write_text_atomic
from saescale.report.tables import _isnum, num, text

HIST_W, HIST_H = 180, 44  # px: small enough to sit beside the stats line of a card
# Whitespace tokens would otherwise be invisible (or break the row); control characters get their
# Unicode "control picture" (U+2400 block), so \r reads as ␍ rather than vanishing.
_VISIBLE = {"\n": "↵", "\t": "→", **{chr(c): chr(0x2400 + c) for c in range(32) if c not in (9, 10)},
            "\x7f": "␡"}


def visible(token: str) -> str:
    """The token with newlines, tabs and control characters drawn; spaces stay (the CSS keeps them)."""
    return "".join(_VISIBLE.get(ch, ch) for ch in str(token)) or "∅"


def frequency(f: Any) -> str:
    """Firing frequency as a percentage and as '1 in N tokens', which reads better for rare latents."""
    if not _isnum(f):
        return "frequency unknown"
    if f <= 0:
        return "never fired on the eval tokens"
    return f"fires on {100 * f:.3g}% of tokens (1 in {num(round(1 / f))})"


def histogram(hist: dict | None) -> dict | None:
    """Bars of an inline SVG (x, y, width, height in px) for the nonzero-activation histogram."""
    edges, counts = (hist or {}).get("edges") or [], (hist or {}).get("counts") or []
    if not counts or len(edges) != len(counts) + 1 or max(counts) <= 0:
        return None
    w, top = HIST_W / len(counts), max(counts)
    bars = [{"x": round(i * w, 1), "w": round(max(w - 0.5, 0.5), 1), "h": round(HIST_H * c / top, 1),
             "y": round(HIST_H - HIST_H * c / top, 1), "title": f"{num(lo, 3)}–{num(hi, 3)}: {num(c)}"}
            for i, (c, lo, hi) in enumerate(zip(counts, edges, edges[1:])) if c > 0]
    return {"bars": bars, "lo": num(edges[0], 3), "hi": num(edges[-1], 3), "total": num(sum(counts)),
            "w": HIST_W, "h": HIST_H}


def _alpha(act: float, max_act: float) -> str:
    """Background opacity act / max_act in [0, 1] as a short CSS number ('.52', '1'); '' for none."""
    a = round(min(max(act / max_act, 0.0), 1.0), 2) if max_act > 0 else 0.0
    return "" if a <= 0 else ("1" if a >= 1 else f"{a:.2f}".lstrip("0"))


def context(example: dict, max_act: float) -> dict:
    """One context row: tokens with their highlight, the exact activation as a tooltip, the centre flagged."""
    acts, center = example.get("acts") or [], example.get("center")
    tokens = []
    for i, tok in enumerate(example.get("tokens") or []):
        act = float(acts[i]) if i < len(acts) and _isnum(acts[i]) else 0.0
        tokens.append({"text": visible(tok), "alpha": _alpha(act, max_act), "center": i == center,
                       "title": f"{act:g}" if act else ""})  # zero-act tokens carry no tooltip: keeps pages light
    return {"activation": num(example.get("activation"), 3), "tokens": tokens}


def _max_act(record: dict) -> float:
    """The latent's max activation, else the largest in its contexts: the scale every highlight shares."""
    m = record.get("max_activation")
    if _isnum(m) and m > 0:
        return float(m)
    acts = [a for key in ("top_examples", "random_examples") for ex in record.get(key) or []
            for a in ex.get("acts") or [] if _isnum(a)]
    return max(acts, default=0.0)


def autointerp(ai: dict | None, enabled: bool) -> dict:
    """The LLM explanation with its scores, or the sentence that says why there is none."""
    out = {"note": None, "failed": False, "explanation": None, "accuracy": None, "auroc": None}
    if not ai:
        return {**out, "note": "no LLM explanation for this latent" if enabled else "LLM autointerp not configured"}
    if ai.get("status") == "failed":
        return {**out, "failed": True, "note": f"failed: {text(ai.get('error') or 'no reason recorded')}"}
    return {**out, "explanation": text(ai.get("explanation")), "accuracy": num(ai.get("accuracy"), 3),
            "auroc": num(ai.get("auroc"), 3)}


def n2g(model: dict | None) -> dict | None:
    """N2G patterns (whitespace drawn) and the model's precision / recall / F1 at predicting firing."""
    if not model:
        return None
    return {"patterns": [{"text": visible(p.get("text", "")), "activation": num(p.get("activation"), 3)}
                         for p in model.get("patterns") or []],
            **{key: num(model.get(key), 3) for key in ("precision", "recall", "f1")},
            "n_skipped": model.get("n_skipped") or 0}


def logits(lens: dict | None) -> dict | None:
    """Top and bottom logit-lens tokens: the output side of the latent, as (token, value) strings."""
    if not lens:
        return None
    return {side: [(visible(tok), f"{val:+.3g}" if _isnum(val) else text(val)) for tok, val in lens.get(side) or []]
            for side in ("up", "down")}


def card(record: dict, autointerp_enabled: bool, show_negative: bool = False) -> dict:
    """Everything one latent's card shows, as strings."""
    scale = _max_act(record)
    rows = {key: [context(ex, scale) for ex in record.get(f"{key}_examples") or []]
            for key in ("top", "random", "negative") if key != "negative" or show_negative}
    return {"latent": int(record["latent"]), "frequency": frequency(record.get("frequency")),
            "max": num(record.get("max_activation"), 3), "mean": num(record.get("mean_activation"), 3),
            "hist": histogram(record.get("histogram")), "contexts": rows, "n2g": n2g(record.get("n2g")),
            "logits": logits(record.get("logits")),
            "autointerp": autointerp(record.get("autointerp"), autointerp_enabled)}


def sae_name(identity: dict) -> str:
    """'subject · layer L · arch n=N k=K', the name the main report uses for an SAE."""
    return (f"{text(identity.get('subject'))} · layer {text(identity.get('layer'))} · "
            f"{text(identity.get('arch'))} n={num(identity.get('n'))} k={num(identity.get('k'))}")


def summary_rows(summary: dict | None, n_latents: int) -> list[tuple[str, str]]:
    """The page-level numbers (scalars only) as (label, value), starting with the latents shown."""
    rows = [("latents shown", num(n_latents))]
    for key, value in (summary or {}).items():
        if isinstance(value, (str, int, float)) and key != "n_latents":
            rows.append((key.replace("_", " "), num(value, 3) if _isnum(value) else text(value)))
    return rows


def render_dashboard(identity: dict, records: list[dict], summary: dict | None = None,
                     autointerp_enabled: bool = False, back_link: str | None = None,
                     show_negative: bool = False) -> str:
    """The dashboard page for one SAE as an HTML string; raises on records no card can be made from."""
    seen: set[int] = set()
    for i, r in enumerate(records):
        if "latent" not in r:
            raise ValueError(f"feature record {i} has no 'latent' key; rerun the rule that writes it")
        if int(r["latent"]) in seen:
            raise ValueError(f"latent {r['latent']} has two feature records; each latent gets one card")
        seen.add(int(r["latent"]))
    extra = {k: text(v) for k, v in identity.items() if k not in ("subject", "layer", "arch", "n", "k")}
    return _environment().get_template("dashboard.html").render(
        name=sae_name(identity), identity=extra, summary=summary_rows(summary, len(records)),
        back_link=back_link, cards=[card(r, autointerp_enabled, show_negative) for r in records])


def write_dashboard(path: str | Path, identity: dict, records: list[dict], **kwargs: Any) -> None:
    """Render and write the page atomically, so a killed job never leaves half a page behind."""
    write_text_atomic(path, render_dashboard(identity, records, **kwargs))


def load_records(jsonl_path: str | Path) -> list[dict]:
    """Per-latent records from a JSONL file (one JSON object a line; blank lines skipped)."""
    out = []
    for i, line in enumerate(Path(jsonl_path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{jsonl_path}:{i}: not valid JSON ({exc}); rerun the rule that writes it") from exc
    return out


def merge_autointerp(records: list[dict], results: list[dict]) -> list[dict]:
    """Copies of `records` with each one's autointerp result (matched on 'latent') under 'autointerp'.

    Autointerp runs as its own (optional, slow, networked) stage, so its results arrive separately;
    records without a result keep whatever they had, results for latents not on the page are ignored.
    """
    by_latent = {int(r["latent"]): {k: v for k, v in r.items() if k != "latent"} for r in results}
    return [{**r, "autointerp": by_latent[int(r["latent"])]} if int(r["latent"]) in by_latent else dict(r)
            for r in records]


def _environment() -> jinja2.Environment:
    """Like the main report's: autoescaping (corpus text is never markup), strict undefined, trimmed blocks."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)
