"""Tests for saescale.report.dashboard: one safe, well-formed, self-contained page per SAE, a card per latent.

Pages are parsed back with html.parser into a small element tree, so the checks read the page's structure
(which span is highlighted, which ids exist) rather than matching strings in the markup.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

from saescale.report.dashboard import load_records, merge_autointerp, render_dashboard, write_dashboard

XSS = "<script>alert(1)</script>"
IDENTITY = {"subject": "builtin", "layer": 2, "arch": "topk", "n": 512, "k": 32}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def iter(self, tag: str | None = None, cls: str | None = None):
        for child in self.children:
            if (tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split()):
                yield child
            yield from child.iter(tag, cls)

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class TreeParser(HTMLParser):
    """Builds a Node tree; fails on an end tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text += data


def parse(html: str) -> Node:
    p = TreeParser()
    p.feed(html)
    p.close()
    assert [n.tag for n in p.stack] == ["#root"], f"unclosed: {[n.tag for n in p.stack[1:]]}"
    return p.root


def example(tokens: list[str], acts: list[float], center: int | None = None) -> dict:
    center = max(range(len(acts)), key=acts.__getitem__) if center is None else center
    return {"tokens": tokens, "acts": acts, "center": center, "activation": acts[center]}


def record(latent: int, **over) -> dict:
    rec = {"latent": latent, "frequency": 0.0123, "max_activation": 4.0, "mean_activation": 1.1,
           "histogram": {"edges": [0.0, 1.0, 2.0, 3.0, 4.0], "counts": [50, 0, 7, 1]},
           "top_examples": [example(["def", " foo", "(", "x", ")"], [0.0, 1.0, 4.0, 2.0, 0.0])],
           "random_examples": [example(["a", " b"], [0.5, 0.0])],
           "n2g": {"patterns": [{"text": "^ def * (", "activation": 2.1}], "precision": 0.93, "recall": 0.81,
                   "f1": 0.87, "n_skipped": 0},
           "logits": {"up": [["(", 1.23], [" bar", 0.8]], "down": [["}", -0.9]]},
           "autointerp": {"explanation": "opening parenthesis after a def", "status": "ok", "error": None,
                          "accuracy": 0.82, "auroc": 0.91}}
    return {**rec, **over}


def card(root: Node, latent: int) -> Node:
    (c,) = [s for s in root.iter("section") if s.attrs.get("id") == f"latent-{latent}"]
    return c


def token_spans(node: Node) -> list[Node]:
    return [s for ctx in node.iter("div", "ctx") for s in ctx.iter("span")]


def test_tokens_and_explanation_are_escaped():
    ai = {"explanation": f'fires on {XSS} & "quotes"', "status": "ok", "accuracy": 0.5, "auroc": 0.5}
    top = [example(["x", XSS, " &", '"q"'], [0.0, 3.0, 1.0, 0.5])]
    rec = record(3, top_examples=top, random_examples=[], autointerp=ai,
                 n2g={"patterns": [{"text": XSS, "activation": 1.0}], "precision": 1, "recall": 1, "f1": 1},
                 logits={"up": [[XSS, 1.0]], "down": [["&amp;", -1.0]]})
    html = render_dashboard({**IDENTITY, "subject": XSS}, [rec])
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&amp;amp;" in html
    root = parse(html)
    assert not list(root.iter("script"))
    assert [s.text for s in token_spans(card(root, 3))] == ["x", XSS, " &", '"q"']  # round-trips exactly
    assert f'fires on {XSS} & "quotes"' in card(root, 3).all_text()


def test_page_is_well_formed_and_self_contained():
    html = render_dashboard(IDENTITY, [record(i) for i in range(3)], back_link="../report.html")
    root = parse(html)  # asserts balanced tags
    refs = [n.attrs.get(a, "") for n in root.iter() for a in ("src", "href")]
    assert all(r == "" or r.startswith("#") or r == "../report.html" for r in refs)
    assert not list(root.iter("link")) and not list(root.iter("img"))


def test_every_latent_has_an_anchor_and_an_index_link():
    latents = [17, 3, 250]
    root = parse(render_dashboard(IDENTITY, [record(i) for i in latents]))
    ids = [n.attrs["id"] for n in root.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids))
    (nav,) = root.iter("nav")
    assert [a.attrs["href"] for a in nav.iter("a")] == [f"#latent-{i}" for i in latents]
    assert all(f"latent-{i}" in ids for i in latents)


def _alpha(span: Node) -> float:
    style = span.attrs.get("style", "")
    return float(style.removeprefix("--a:")) if style else 0.0


def test_highlight_is_proportional_to_activation_over_max():
    rec = record(1, max_activation=4.0, random_examples=[])  # top context acts: 0, 1, 4, 2, 0
    spans = token_spans(card(parse(render_dashboard(IDENTITY, [rec])), 1))
    alphas = [_alpha(s) for s in spans]
    assert alphas == [0.0, 0.25, 1.0, 0.5, 0.0]
    assert "style" not in spans[0].attrs and "title" not in spans[0].attrs
    assert spans[2].attrs["title"] == "4" and spans[1].attrs["title"] == "1"


def test_center_token_is_outlined():
    rec = record(1, top_examples=[example(["a", "b", "c"], [2.0, 1.0, 0.0], center=1)], random_examples=[])
    spans = token_spans(card(parse(render_dashboard(IDENTITY, [rec])), 1))
    assert [s.attrs.get("class") for s in spans] == [None, "c", None]


def test_whitespace_tokens_are_drawn_visibly():
    toks = ["\n", "\t", "  indent", "a\r", ""]
    rec = record(1, top_examples=[example(toks, [1.0] * 5)], random_examples=[])
    html = render_dashboard(IDENTITY, [rec])
    assert [s.text for s in token_spans(card(parse(html), 1))] == ["↵", "→", "  indent", "a␍", "∅"]
    assert "white-space: pre;" in html


def test_missing_n2g_logits_autointerp_say_so():
    bare = {k: v for k, v in record(1).items() if k not in ("n2g", "logits", "autointerp")}
    nulls = record(2, n2g=None, logits=None, autointerp=None)
    off = parse(render_dashboard(IDENTITY, [bare, nulls]))
    on = parse(render_dashboard(IDENTITY, [bare, nulls], autointerp_enabled=True))
    for latent in (1, 2):
        text = card(off, latent).all_text()
        assert "N2G not run for this latent" in text and "logit lens not available" in text
        assert "LLM autointerp not configured" in text
        assert "no LLM explanation for this latent" in card(on, latent).all_text()


def test_failed_autointerp_shows_reason_and_no_score():
    ai = {"explanation": None, "status": "failed", "error": "rate limited <429>", "accuracy": None, "auroc": None}
    text = card(parse(render_dashboard(IDENTITY, [record(5, autointerp=ai)], autointerp_enabled=True)), 5).all_text()
    assert "failed: rate limited <429>" in text
    assert "accuracy" not in text and "AUROC" not in text


def test_card_shows_frequency_activations_n2g_and_logits():
    text = card(parse(render_dashboard(IDENTITY, [record(7)])), 7).all_text()
    assert "1.23% of tokens (1 in 81)" in text
    assert "max activation 4" in text and "mean 1.1" in text
    assert "precision 0.93" in text and "F1 0.87" in text and "^ def * (" in text
    assert "+1.23" in text and "-0.9" in text
    assert "simulation accuracy 0.82" in text and "AUROC 0.91" in text


def test_histogram_is_an_inline_svg_with_a_bar_per_nonzero_bin():
    c = card(parse(render_dashboard(IDENTITY, [record(1)])), 1)
    (svg,) = c.iter("svg")
    heights = [float(r.attrs["height"]) for r in svg.iter("rect")]
    assert len(heights) == 3 and max(heights) == float(svg.attrs["height"])  # counts 50, 7, 1 (0 skipped)
    bare = parse(render_dashboard(IDENTITY, [record(2, histogram=None)]))
    assert not list(bare.iter("svg")) and "no histogram" in card(bare, 2).all_text()


def test_header_shows_name_summary_and_back_link():
    summary = {"n2g_precision": 0.9123456, "n2g_recall": 0.7, "n2g_f1": 0.8, "nested": {"skip": 1}}
    root = parse(render_dashboard(IDENTITY, [record(1)], summary=summary, back_link="../report.html"))
    (header,) = root.iter("header")
    text = header.all_text()
    assert "builtin · layer 2 · topk n=512 k=32" in text
    assert "n2g precision" in text and "0.912" in text and "latents shown" in text and "skip" not in text
    assert any(a.attrs.get("href") == "../report.html" for a in header.iter("a"))


def test_duplicate_latents_are_refused():
    with pytest.raises(ValueError, match="latent 4 has two"):
        render_dashboard(IDENTITY, [record(4), record(4)])


def test_32_latent_page_stays_under_2mb():
    rng = random.Random(0)

    def ctx() -> dict:  # every token firing: the heaviest markup a context can have
        return example([rng.choice(["def", " foo", "(", "\n", " <b>", "&"]) for _ in range(30)],
                       [round(rng.uniform(0.01, 4.0), 4) for _ in range(30)])

    hist = {"edges": [i / 10 for i in range(41)], "counts": [rng.randint(1, 500) for _ in range(40)]}
    logits = {"up": [[f" t{i}", 1.0] for i in range(10)], "down": [[f" u{i}", -1.0] for i in range(10)]}
    recs = [record(i * 37, histogram=hist, logits=logits, top_examples=[ctx() for _ in range(10)],
                   random_examples=[ctx() for _ in range(10)]) for i in range(32)]
    size = len(render_dashboard(IDENTITY, recs, summary={"n2g_f1": 0.8}).encode())
    assert size < 2_000_000, size


def test_load_records_merge_autointerp_and_write(tmp_path):
    path = tmp_path / "features.jsonl"
    path.write_text("\n".join(json.dumps(record(i, autointerp=None)) for i in (1, 2)) + "\n\n")
    recs = load_records(path)
    assert [r["latent"] for r in recs] == [1, 2]
    results = [{"latent": 2, "explanation": "commas", "status": "ok", "accuracy": 0.7, "auroc": 0.8},
               {"latent": 99, "explanation": "not on the page", "status": "ok"}]
    merged = merge_autointerp(recs, results)
    assert merged[0]["autointerp"] is None and merged[1]["autointerp"]["explanation"] == "commas"
    assert recs[1]["autointerp"] is None  # inputs are not mutated
    out = tmp_path / "dash" / "topk_n512_k32.html"
    write_dashboard(out, IDENTITY, merged, autointerp_enabled=True)
    assert "commas" in card(parse(out.read_text()), 2).all_text()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .tmp left behind


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "features.jsonl"
    path.write_text(json.dumps(record(1)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"features.jsonl:2: not valid JSON"):
        load_records(path)
