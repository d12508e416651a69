"""The method document (docs/method.md) inside the report: citations `method §C.5` become links to an
appendix that holds the document itself, so the report stays one self-contained page (no external files, no
scripts) and a reader of reports/report.html reaches every cited section.

One definition of the citation syntax and of the section anchors, shared by the report and by the test that
checks every citation in the repository resolves (tests/test_method_doc.py):

- a section id is a part letter A-G, optionally a number, an optional `b` (A.8b) and one more optional
  number (F.5.1): `A`, `C.5`, `A.8b`, `F.5.1`;
- a citation is `method §` + an id, optionally followed by more ids separated by `, `, ` / `, `/`, or a range
  dash (`-` or `–`): `method §C.4, C.5`, `method §C.4–C.7`, `method §D.1/D.2`;
- a section's anchor is its id in lower case with the first dot removed and any further dot replaced by a
  hyphen: C.5 -> c5, A.8b -> a8b, F.5.1 -> f5-1, F -> f (docs/method.md writes `<a id="c5"></a>`).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

SECTION_ID = r"[A-G](?:\.\d+b?(?:\.\d+)?)?"
# `method §` then ids joined by separators; an id must not run on into a word (C.5 in "C.5x" is not one)
IDS = rf"{SECTION_ID}(?:(?:, |/| / |[-–]){SECTION_ID})*"  # one id, or several joined by a list or range
CITATION = re.compile(rf"method §(?P<ids>{IDS})(?![A-Za-z0-9])")
_ID = re.compile(rf"(?<![A-Za-z0-9.]){SECTION_ID}(?![A-Za-z0-9])")
ANCHOR = re.compile(r'<a id="([a-z0-9-]+)"></a>')
_ESCAPED_ANCHOR = re.compile(r"&lt;a id=&quot;([a-z0-9-]+)&quot;&gt;&lt;/a&gt;")
PREFIX = "method-"  # anchors inside the report get this prefix, away from the report's own ids


def anchor(section_id: str) -> str:
    """The HTML anchor of a section id: C.5 -> c5, A.8b -> a8b, F.5.1 -> f5-1, F -> f."""
    head, _, rest = section_id.lower().partition(".")
    return head + rest.replace(".", "-")


def cited_ids(text: str) -> list[str]:
    """Every section id cited in `text` (ids of a range's two ends, not the ones between)."""
    return [m.group(0) for c in CITATION.finditer(text) for m in _ID.finditer(c.group("ids"))]


def doc_anchors(markdown: str) -> set[str]:
    """The anchors a method document defines with `<a id="..."></a>`."""
    return set(ANCHOR.findall(markdown))


def find_method_doc(start: Path | None = None) -> Path | None:
    """docs/method.md of the checkout this package runs from, looked up from `start` upwards; by default from
    this file (an editable install), then from the working directory (Snakemake runs in the workflow's own
    checkout, whatever way the package was installed). None when not found."""
    starts = [start] if start is not None else [Path(__file__), Path.cwd()]
    for here in starts:
        here = here.resolve()
        for folder in [here, *here.parents]:
            candidate = folder / "docs" / "method.md"
            if candidate.is_file():
                return candidate
    return None


def method_html(markdown: str, prefix: str = PREFIX) -> str:
    """The document as an HTML fragment, anchors prefixed. markdown-it-py renders it when installed (it comes
    with rich); otherwise the text is shown preformatted, still with its anchors, so links always land."""
    try:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)
    except ImportError:
        body = "<pre>" + _ESCAPED_ANCHOR.sub(r'<a id="\1"></a>', html.escape(markdown)) + "</pre>"
    body = ANCHOR.sub(lambda m: f'<a id="{prefix}{m.group(1)}"></a>', body)
    return _page_links(body)


_LINK = re.compile(r'<a href="([^"#][^"]*)">(.*?)</a>', re.S)


def _page_links(body: str) -> str:
    """Links between the two documents point into the report's own copies; a web link becomes its text and
    address, so the report loads nothing and leads nowhere off the page unless the reader copies the address."""
    def one(m: re.Match) -> str:
        target, text = m.group(1), m.group(2)
        doc, _, frag = target.removeprefix("./").partition("#")
        if doc == "method.md":
            return f'<a href="#{PREFIX}{frag or "doc"}">{text}</a>'
        if doc == "metrics.md":
            return f'<a href="#metrics-codebook">{text}</a>'
        return f'{text} (<span class="url">{html.escape(target)}</span>)' if target != text else text
    return _LINK.sub(one, body)


_TAG = re.compile(r"(<[^>]*>)")
_SKIP = {"a", "script", "style", "code", "pre", "title"}


def link_citations(page: str, known: set[str] | None = None, prefix: str = PREFIX) -> str:
    """Each cited id in the text of an HTML page becomes a link to `#{prefix}{anchor}`; ids not in `known`
    (when given), text inside tags' attributes and inside a, code, pre, script, style and title stay as they
    are."""
    parts = _TAG.split(page)
    open_skips = 0
    for i, part in enumerate(parts):
        if i % 2:  # a tag
            name = re.match(r"</?\s*([A-Za-z0-9]+)", part)
            if name and name.group(1).lower() in _SKIP and not part.endswith("/>"):
                open_skips += -1 if part.startswith("</") else 1
                open_skips = max(open_skips, 0)
            continue
        if open_skips or "method §" not in part:
            continue

        def link_ids(cit: re.Match) -> str:
            def one(m: re.Match) -> str:
                a = anchor(m.group(0))
                if known is not None and a not in known:
                    return m.group(0)
                return f'<a class="cite" href="#{prefix}{a}">{m.group(0)}</a>'
            return "method §" + _ID.sub(one, cit.group("ids"))

        parts[i] = CITATION.sub(link_ids, part)
    return "".join(parts)


def embed(page: str, doc: Path | None = None) -> str:
    """`page` with the method document appended before </body> as an appendix and every citation
    linked to it; unchanged (citations as plain text) when the document cannot be found."""
    doc = doc or find_method_doc()
    if doc is None or not doc.is_file():
        return page
    markdown = doc.read_text(encoding="utf-8")
    appendix = (f'<section id="{PREFIX}doc" class="method"><h2>Appendix: the method document</h2>\n'
                f'<p class="src">docs/method.md, the formulas, constants and sources every “method §” '
                f'citation in this report links to.</p>\n{method_html(markdown)}\n</section>\n')
    codebook = doc.with_name("metrics.md")  # the metrics.csv codebook, beside the method document
    if codebook.is_file():
        appendix += (f'<section id="metrics-codebook" class="method"><h2>Appendix: metrics.csv codebook</h2>\n'
                     f'<p class="src">docs/metrics.md: every column of metrics.csv, its unit, the tokens it is '
                     f'measured on, its method section and the SAEBench metric it matches.</p>\n'
                     f'{method_html(codebook.read_text(encoding="utf-8"), prefix="metrics-")}\n</section>\n')
    known = doc_anchors(markdown)
    cut = page.rfind("</body>")
    page = page[:cut] + appendix + page[cut:] if cut >= 0 else page + appendix
    return link_citations(page, known)
