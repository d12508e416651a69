"""The shipped method document (docs/method.md) and the citations that point into it.

Citation syntax and anchor rule: saescale.report.method_doc (CITATION, anchor). In short, `method §C.5`,
lists `method §C.4, C.5`, ranges `method §C.4–C.7` (or `-`) and `method §D.1/D.2`; section C.5 is anchored
by `<a id="c5"></a>` (A.8b -> a8b, F.5.1 -> f5-1, part F -> f).

Scanned files: the repository's tracked and untracked-not-ignored files (git ls-files) outside tests/, the
user-facing ones (src/, workflow/, README.md, benchmarks/, docs/, config.yaml, ...).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from saescale.report import method_doc as md

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
OLD = "REF" + "ERENCE"  # spelled in pieces, so this file's own checks are not flagged as old citations

# The section ids the code has cited since before the document existed, plus the parts: each must keep its
# anchor and a heading that starts with the id, so every existing citation keeps resolving.
PARTS = list("ABCDEFG")
SECTIONS = ([f"A.{i}" for i in range(1, 10)] + ["A.8b"] + [f"B.{i}" for i in range(1, 7)]
            + [f"C.{i}" for i in range(1, 10)] + ["D.1", "D.2", "E.1", "E.2", "E.3"]
            + [f"F.{i}" for i in range(0, 6)])
# A Python string literal split right after the prefix: "... (method §" newline "A.2) ...".
SPLIT_CITATION = re.compile(rf'method §"\s*\n\s*[rbfRBF]*"(?P<ids>{md.IDS})')


def user_facing_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the repository's file list is unknown")
    names = sorted(n for n in out.split("\0") if n and not n.startswith("tests/"))
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def citations(text: str) -> list[tuple[int, str]]:
    """(line, section id) of every citation in `text`, split string literals included."""
    found = []
    for pattern in (md.CITATION, SPLIT_CITATION):
        for c in pattern.finditer(text):
            ids = md._ID.finditer(c.group("ids"))
            found += [(line_of(text, c.start()), m.group(0)) for m in ids]
    return found


def unresolved(files: dict[str, str], anchors: set[str]) -> list[str]:
    """'file:line: method §X' for each citation whose anchor the document lacks."""
    return [f"{name}:{line}: method §{sid} (no anchor #{md.anchor(sid)})"
            for name, text in files.items() for line, sid in citations(text) if md.anchor(sid) not in anchors]


def old_citations(files: dict[str, str]) -> list[str]:
    """'file:line: text' for each occurrence of the old internal citation word (a section id after it, the
    old document's file name, a bare table header): users cannot open what it pointed to."""
    word = re.compile(rf"\b{OLD}\b")
    return [f"{name}:{line_of(text, m.start())}: {text.splitlines()[line_of(text, m.start()) - 1].strip()}"
            for name, text in files.items() for m in word.finditer(text)]


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def repo_texts() -> dict[str, str]:
    texts = {}
    for path in user_facing_files():
        text = text_of(path)
        if text is not None:
            texts[str(path.relative_to(ROOT))] = text
    return texts


# ---- the document -------------------------------------------------------------------------------------

def test_anchor_rule():
    assert [md.anchor(s) for s in ("C.5", "A.8b", "F.5.1", "F", "D.1")] == ["c5", "a8b", "f5-1", "f", "d1"]


@pytest.mark.parametrize("sid", PARTS + SECTIONS)
def test_every_section_has_an_anchor_and_a_heading(doc_text, sid):
    """`<a id="c5"></a>` directly followed by a heading whose text starts with the id (`### C.5 ...`,
    `## C. Metrics`)."""
    m = re.search(rf'<a id="{re.escape(md.anchor(sid))}"></a>\n(#+) (\S+)', doc_text)
    assert m, f'docs/method.md: no <a id="{md.anchor(sid)}"></a> followed by a heading for section {sid}'
    heading = m.group(2).rstrip(".")
    assert heading == sid, f"docs/method.md: anchor {md.anchor(sid)} heads '{heading}', not {sid}"
    assert len(m.group(1)) == (2 if sid in PARTS else 3)


def test_anchors_are_unique(doc_text):
    ids = md.ANCHOR.findall(doc_text)
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_document_states_its_provenance_convention(doc_text):
    for tag in ("[paper]", "[paper, unverified]", "[code]", "[ours]"):
        assert tag in doc_text
    assert "saescale's choice" in doc_text


def test_document_names_no_internal_material(doc_text):
    assert OLD not in doc_text
    assert not re.search(r"/work/|shared/notes|issues show", doc_text)


def test_document_constants_match_the_code(doc_text):
    """A few constants the document quotes, read from the code that uses them."""
    from saescale.evaluate.geometry import NN_THRESHOLDS, PAPER_RANK_RANGE
    from saescale.normalize import GEOMETRIC_MEDIAN_SAMPLES
    from saescale.sae.model import ENCODER_RESCALE_SAMPLES
    from saescale.sae.train import FIRING_THRESHOLD, SELECTION_ROWS
    from saescale.scaling.studies import GPT4_JOINT

    assert f"{GEOMETRIC_MEDIAN_SAMPLES:,}" in doc_text and f"{SELECTION_ROWS:,}" in doc_text
    assert f"ENCODER_RESCALE_SAMPLES = {ENCODER_RESCALE_SAMPLES}" in doc_text
    assert f"value > {FIRING_THRESHOLD:.0e}".replace("e-0", "e-") in doc_text
    assert f"thresholds {NN_THRESHOLDS[0]} and {NN_THRESHOLDS[1]}" in doc_text
    assert PAPER_RANK_RANGE == (100, 10_000) and "ranks [10², 10⁴]" in doc_text
    symbols = {"alpha": "α", "beta_k": "β_k", "beta_n": "β_n", "gamma": "γ", "zeta": "ζ", "eta": "η"}
    eq3 = doc_text[doc_text.index('<a id="d1"></a>'):doc_text.index('<a id="d2"></a>')].replace("−", "-")
    for name, value in GPT4_JOINT.items():
        quoted = re.search(rf"\*\*.*{symbols[name]} = (-?[0-9.]+)", eq3)
        assert quoted and float(quoted.group(1)) == value, f"eq. 3 {name}: code {value}, document {quoted}"


# ---- citations in the repository ---------------------------------------------------------------------

def test_citation_syntax():
    text = ('a (method §C.4, C.5) b method §C.4–C.7; c method §D.1/D.2 d method §A.8b. e method §F.5.1\n'
            'f "x (method §"\n    "A.2) y" g method §Cx not one')
    expected = ["C.4", "C.5", "C.4", "C.7", "D.1", "D.2", "A.8b", "F.5.1", "A.2"]
    assert [s for _, s in citations(text)] == expected


def test_checker_reports_a_missing_anchor():
    bad = unresolved({"src/x.py": "ok method §C.5\nbroken method §C.99, C.5\n"}, {"c5"})
    assert bad == ["src/x.py:2: method §C.99 (no anchor #c99)"]


def test_every_citation_has_an_anchor(doc_text, repo_texts):
    assert repo_texts, "git ls-files found no files"
    bad = unresolved(repo_texts, md.doc_anchors(doc_text))
    assert not bad, "citations of sections docs/method.md does not have:\n" + "\n".join(bad)


def test_checker_reports_old_citations():
    found = old_citations({"README.md": f"x\nsee {OLD} C.5 and\n", "a.py": f'("{OLD} "\n "A.2)")'})
    assert found == [f"README.md:2: see {OLD} C.5 and", f'a.py:1: ("{OLD} "']


def test_no_user_facing_file_cites_the_old_document(repo_texts):
    """Every citation must point into docs/method.md, which ships; the internal reference it replaced does not."""
    bad = old_citations(repo_texts)
    assert not bad, (f"{len(bad)} citation(s) of a document users do not have (cite `method §X.Y`, a section "
                     "of docs/method.md):\n" + "\n".join(bad))


# ---- the report's copy -------------------------------------------------------------------------------

def test_report_links_citations_to_the_embedded_document(doc_text):
    page = ('<html><head><title>method §C.5</title></head><body><p>(method §C.4, C.5) and method §Z.1</p>'
            '<img alt="method §C.5"><code>method §C.5</code></body></html>')
    out = md.embed(page, DOC)
    c4, c5 = ('<a class="cite" href="#method-c4">C.4</a>', '<a class="cite" href="#method-c5">C.5</a>')
    assert f"(method §{c4}, {c5})" in out
    for kept in ("<title>method §C.5</title>", 'alt="method §C.5"', "<code>method §C.5</code>"):
        assert kept in out
    assert "method §Z.1" in out  # not a section: left as text
    for sid in SECTIONS:
        assert f'id="method-{md.anchor(sid)}"' in out
    assert out.index('id="method-doc"') < out.index("</body>")
    # the metrics.csv codebook follows it, with every column the collector writes
    codebook = out[out.index('id="metrics-codebook"'):out.index("</body>")]
    for column in ("fvu", "dead_window_tokens", "n2g_precision"):
        assert f"<code>{column}</code>" in codebook, column


def test_report_is_unchanged_without_the_document(tmp_path):
    page = "<html><body><p>method §C.5</p></body></html>"
    assert md.embed(page, tmp_path / "missing.md") == page


def test_links_between_the_documents_stay_on_the_page_and_web_links_become_text():
    out = md._page_links('<a href="method.md#c5">C.5</a> <a href="metrics.md">codebook</a> '
                         '<a href="https://example.org/x">SAEBench</a> <a href="#here">here</a>')
    assert '<a href="#method-c5">C.5</a>' in out and '<a href="#metrics-codebook">codebook</a>' in out
    assert 'SAEBench (<span class="url">https://example.org/x</span>)' in out and 'href="https' not in out
    assert '<a href="#here">here</a>' in out
