"""Render reports/report.html (placeholder: the grid table)."""

from __future__ import annotations

import html

import pandas as pd

from saescale import paths
from saescale.files import write_text_atomic


def render_report(config: dict, out: str) -> None:
    parts = [f"<h1>{html.escape(config['report']['title'])}</h1>"]
    for name, subj in config["subjects"].items():
        for layer in subj["layers"]:
            table = pd.read_csv(paths.fmt(paths.METRICS, subject=name, layer=layer))
            parts.append(table.to_html(index=False))
    write_text_atomic(out, "<html><body>" + "\n".join(parts) + "</body></html>")
