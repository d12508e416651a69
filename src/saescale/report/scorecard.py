"""The report's opening table: one row per judged claim of the papers, built from the verdict views every
section computes (`arch_sections.verdict_view`).

A row gives the claim in the paper's words and where it stands, the paper's number, this run's number with
its uncertainty, the verdict as a badge, and a link to the verdict in its section. The rows are collected
from the template context by `collect`, which also gives each verdict a unique element id, so a link can
never point at a section that was not rendered.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# Where each per-layer verdict lives in a layer's context: (path of keys, section title). Scaling verdicts are
# not listed: every entry of layer["scaling"]["verdicts"] is taken, whatever keys the scaling section uses.
LAYER_VERDICTS = (
    (("downstream",), "Downstream loss vs FVU"),
    (("arch", "matched", "order"), "Architectures at matched sparsity"),
    (("arch", "matched", "lowest"), "Architectures at matched sparsity"),
    (("arch", "slopes", "verdict"), "FVU vs n: TopK vs ReLU"),
    (("arch", "dead", "verdict"), "Dead latents"),
    (("arch", "progressive", "verdict"), "Progressive recovery"),
    (("arch", "refinement", "verdict"), "Refinement"),
    (("suite", "probes", "verdict"), "Probe loss"),
    (("suite", "n2g", "verdict"), "N2G explanations"),
    (("suite", "reconstruction", "verdict"), "Explanation reconstruction"),
    (("suite", "ablation", "verdict"), "Ablation sparsity"),
    (("suite", "geometry", "freq"), "Latent geometry"),
    (("suite", "geometry", "nn"), "Latent geometry"),
)
GLOBAL_VERDICTS = (
    (("subject_size", "verdict"), "Scaling studies: subject-model size"),
    (("manifolds", "toy", "verdict"), "Feature manifolds: toy manifolds"),
    (("manifolds", "allocation", "verdict"), "Feature manifolds: allocation model"),
    (("manifolds", "groundtruth", "verdict"), "Feature manifolds: ground truth"),
)
BADGE = {"agrees": "agrees", "disagrees": "does not agree", "unknown": "cannot tell"}


def _get(ctx: dict, keys: tuple[str, ...]) -> dict | None:
    for key in keys:
        if not isinstance(ctx, dict):
            return None
        ctx = ctx.get(key)
    return ctx if isinstance(ctx, dict) and "label" in ctx else None


def slug(*parts: object) -> str:
    """An HTML id from parts: lowercase letters, digits and hyphens only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def _verdicts(context: dict) -> Iterator[tuple[dict, str, str, str]]:
    """(view, section title, where, key) for every verdict view in the context, in report order."""
    for lay in context.get("layers", []):
        where = f"{lay['subject']} · L{lay['layer']}"
        for keys, title in LAYER_VERDICTS:
            view = _get(lay, keys)
            if view:
                yield view, title, where, slug(lay["id"], *keys)
        scaling = lay.get("scaling") or {}
        if not scaling.get("present", True):  # no studies.json: the section renders no verdict to link to
            continue
        for key, view in (scaling.get("verdicts") or {}).items():
            if isinstance(view, dict) and "label" in view:
                yield view, "Scaling studies", where, slug(lay["id"], "scaling", key)
    for keys, title in GLOBAL_VERDICTS:
        view = _get(context, keys)
        if view:
            yield view, title, "", slug(*keys)


def collect(context: dict) -> list[dict]:
    """The scorecard's rows, one per verdict view in `context`. Gives each view its element `id`
    ("verdict-…") in place, which the template's verdict macro renders and the row links to."""
    rows = []
    for view, title, where, key in _verdicts(context):
        view["id"] = f"verdict-{key}"
        quote = view.get("quote") or ""
        rows.append({"id": view["id"], "section": title, "where": where,
                     "quote": quote or view.get("paper", ""), "paraphrase": not quote,
                     "source": view.get("source") or "", "paper_value": view.get("paper_value") or "—",
                     "run_value": view.get("run_value") or "—", "label": view["label"], "cls": view["cls"],
                     "badge": BADGE.get(view["cls"], view["label"])})
    return rows


def counts(rows: list[dict]) -> dict[str, int]:
    """How many rows carry each verdict, for the line above the table."""
    return {badge: sum(r["badge"] == badge for r in rows) for badge in BADGE.values()}
