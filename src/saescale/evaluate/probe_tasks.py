"""The builtin probe tasks (Gao et al. section 4.3, probe loss): binary token properties computed from each
eval window's own text, so they work for any corpus and tokenizer.

The paper's 61 tasks were not published, so two sets are defined here (`TASK_SETS`, chosen by
evaluate.probes.task_set): `char_labels` for Python source (the builtin CPython corpus) and `prose_char_labels`
for natural language. A task labels characters; `token_labels` maps the labels onto the tokens of any tokenizer
through its character offsets (a token is positive when any of its characters is).
"""

from __future__ import annotations

import keyword
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping

import numpy as np

# Strings and comments in one left-to-right scan: whichever starts first wins, so a '#' inside a
# string and a quote inside a comment are handled. Unterminated strings end at the newline (single
# quotes) or at the end of the text (triple quotes); a trailing backslash is allowed. Never raises.
_LEXEME = re.compile(r"""
    (?P<comment>\#[^\n]*)
  | (?P<triple>'''(?:[^\\]|\\.)*?(?:'''|\\?\Z) | \"\"\"(?:[^\\]|\\.)*?(?:\"\"\"|\\?\Z))
  | (?P<single>'(?:[^'\\\n]|\\.)*(?:'|(?=\n)|\\?\Z) | "(?:[^"\\\n]|\\.)*(?:"|(?=\n)|\\?\Z))
""", re.VERBOSE | re.DOTALL)
_WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_OPEN, _CLOSE = "([{", ")]}"
_KEYWORDS = frozenset(keyword.kwlist)
_PUNCT = np.zeros(128, dtype=bool)
_PUNCT[[ord(c) for c in string.punctuation]] = True
_INDENT = " \t\f"

TASKS = (
    "in_string",          # inside a string literal, quotes included (prefixes like f/r/b excluded)
    "in_triple_string",   # inside a triple-quoted string (docstrings), quotes included
    "in_comment",         # from '#' outside strings to the end of the line
    "in_brackets",        # inside (), [] or {} in code: nesting depth > 0; the brackets themselves not
    "keyword",            # a Python keyword (whole word) in code
    "line_start",         # first non-blank character of a line
    "indented_line",      # any character of a line that starts with indentation and is not blank
    "decorator_line",     # any character of a line whose first non-blank character is '@'
    "digit",              # 0-9
    "uppercase",          # an uppercase letter
    "whitespace",         # any whitespace character, newlines included
    "after_whitespace",   # a non-blank character preceded by whitespace (word starts)
    "punctuation",        # ASCII punctuation / operator character
    "underscore_word",    # a word (identifier-like) containing '_'
    "all_caps_word",      # a word of >= 2 characters, no lowercase letters, at least two uppercase letters
)


def _code_lexemes(text: str, n: int) -> dict[str, np.ndarray]:
    labels = {k: np.zeros(n, dtype=bool) for k in ("in_string", "in_triple_string", "in_comment")}
    for m in _LEXEME.finditer(text):
        kind = m.lastgroup
        if kind == "comment":
            labels["in_comment"][m.start():m.end()] = True
        else:
            labels["in_string"][m.start():m.end()] = True
            if kind == "triple":
                labels["in_triple_string"][m.start():m.end()] = True
    return labels


def _bracket_depth(text: str, code: np.ndarray, brackets: str = "()[]{}") -> np.ndarray:
    """depth > 0 between matching brackets of code; stray closers are ignored rather than going negative."""
    inside = np.zeros(len(text), dtype=bool)
    depth, opened_at = 0, 0
    for m in re.finditer("[" + re.escape(brackets) + "]", text):
        i = m.start()
        if not code[i]:
            continue
        if text[i] in _OPEN:
            if depth == 0:
                opened_at = i + 1
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                inside[opened_at:i] = True
    if depth > 0:
        inside[opened_at:] = True
    return inside


def char_labels(text: str) -> dict[str, np.ndarray]:
    """{task: [len(text)] bool} for every task in `TASKS`.

    Character-class and line tasks hold for any text; string, comment, bracket and keyword tasks
    assume Python-like code (on prose an apostrophe opens a "string" that the newline closes).
    A lexical scan, not `tokenize`, so broken or truncated code still gets labels.
    """
    n = len(text)
    chars = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    labels = _code_lexemes(text, n)
    code = ~(labels["in_string"] | labels["in_comment"])
    labels["in_brackets"] = _bracket_depth(text, code)

    is_space = np.fromiter((c.isspace() for c in text), dtype=bool, count=n)
    labels["digit"] = (chars >= ord("0")) & (chars <= ord("9"))
    labels["uppercase"] = np.fromiter((c.isupper() for c in text), dtype=bool, count=n)
    labels["whitespace"] = is_space
    labels["after_whitespace"] = _after_whitespace(is_space)
    labels["punctuation"] = np.where(chars < 128, _PUNCT[np.minimum(chars, 127)], False)

    for k in ("keyword", "underscore_word", "all_caps_word"):
        labels[k] = np.zeros(n, dtype=bool)
    for m in _WORD.finditer(text):
        word, s, e = m.group(), m.start(), m.end()
        if word in _KEYWORDS and code[s]:
            labels["keyword"][s:e] = True
        if "_" in word:
            labels["underscore_word"][s:e] = True
        if len(word) >= 2 and word.upper() == word and sum(c.isupper() for c in word) >= 2:
            labels["all_caps_word"][s:e] = True

    labels["line_start"] = _line_start(text)
    for k in ("indented_line", "decorator_line"):
        labels[k] = np.zeros(n, dtype=bool)
    for start, first, end in _lines(text):
        if first > start:
            labels["indented_line"][start:end] = True
        if text[first] == "@":
            labels["decorator_line"][start:end] = True
    return {k: labels[k] for k in TASKS}


def _lines(text: str) -> Iterator[tuple[int, int, int]]:
    """(start, first non-blank character, end) of every line that is not blank."""
    start = 0
    for line in text.split("\n"):
        body = line.lstrip(_INDENT)
        if body.strip():
            yield start, start + len(line) - len(body), start + len(line)
        start += len(line) + 1


def _line_start(text: str) -> np.ndarray:
    out = np.zeros(len(text), dtype=bool)
    out[[first for _, first, _ in _lines(text)]] = True
    return out


def _after_whitespace(is_space: np.ndarray) -> np.ndarray:
    return ~is_space & np.concatenate([[False], is_space[:-1]])


# ---- prose: natural-language text (OpenWebText and the like), where most code tasks are degenerate

PROSE_TASKS = (
    "sentence_start",     # first letter or digit after a sentence end ([.!?], closing quotes or brackets, space)
    "sentence_end",       # '.', '!' or '?' followed by optional closing quotes/brackets, then space or the end
    "line_start",         # first non-blank character of a line (in web text: of a paragraph)
    "capitalized_word",   # a word starting with an uppercase letter, with a lowercase one ("The", not "NASA")
    "all_caps_word",      # a word of >= 2 letters, all uppercase
    "number",             # a run of digits, with ',' or '.' between digits ("1,000", "3.14")
    "in_quotes",          # inside double quotes, quotes included (straight or curly)
    "in_parentheses",     # inside (): depth > 0; the parentheses themselves not
    "punctuation",        # a Unicode punctuation character (curly quotes and dashes included)
    "comma",              # ','
    "function_word",      # a word of FUNCTION_WORDS (articles, prepositions, conjunctions, auxiliaries), any case
    "pronoun",            # a word of PRONOUNS, any case
    "contraction",        # letters, an apostrophe (' or ’), letters: "don't", "it’s"
    "ing_word",           # a word of >= 5 letters ending in "ing" (spelling, not morphology: "string" counts)
    "ly_word",            # a word of >= 4 letters ending in "ly" (spelling: "family" counts)
    "after_whitespace",   # a non-blank character preceded by whitespace (word starts)
)
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for with from as into about over after before between through under "
    "and or but nor so if than that which who whom whose is are was were be been being am has have had do "
    "does did not no this these those there".split())
PRONOUNS = frozenset("i me my mine you your yours he him his she her hers it its we us our ours they them their "
                     "theirs myself yourself himself herself itself ourselves themselves".split())
_LETTERS = re.compile(r"[^\W\d_]+")                    # a word: a maximal run of letters
_CLOSERS = re.escape("\"'”’)]")                       # may stand between a sentence's end and the space
_SENTENCE_END = re.compile(rf"[.!?]+(?=[{_CLOSERS}]*(?:\s|\Z))")
_SENTENCE_START = re.compile(rf"[.!?][{_CLOSERS}]*\s+[^\w]*?(?P<first>[^\W_])")
_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")
_CONTRACTION = re.compile(r"[^\W\d_]+['’][^\W\d_]+")


def _quotes(text: str) -> np.ndarray:
    """Inside double quotes, the quotes included. A straight quote at the start, after whitespace or after an
    opening bracket opens; any other closes the open quote, or is ignored when none is open (a window that
    starts inside a quotation sees only its end). Curly quotes say which they are. An unclosed quote ends at
    the newline."""
    inside = np.zeros(len(text), dtype=bool)
    opened = None
    for m in re.finditer(r"[\"“”\n]", text):
        i, c = m.start(), m.group()
        if c == "\n":
            if opened is not None:
                inside[opened:i] = True
            opened = None
        elif opened is None and (c == "“" or c == '"' and (i == 0 or text[i - 1].isspace() or text[i - 1] in "([{")):
            opened = i
        elif opened is not None and c in '"”':
            inside[opened:i + 1] = True
            opened = None
    if opened is not None:
        inside[opened:] = True
    return inside


def prose_char_labels(text: str) -> dict[str, np.ndarray]:
    """{task: [len(text)] bool} for every task in `PROSE_TASKS`, tasks that are well defined on natural
    language: sentence and quote structure, word classes by spelling, and punctuation."""
    n = len(text)
    labels = {k: np.zeros(n, dtype=bool) for k in PROSE_TASKS}
    for m in _SENTENCE_END.finditer(text):
        labels["sentence_end"][m.start():m.end()] = True
    for m in _SENTENCE_START.finditer(text):
        labels["sentence_start"][m.start("first")] = True
    for m in _NUMBER.finditer(text):
        labels["number"][m.start():m.end()] = True
    for m in _CONTRACTION.finditer(text):
        labels["contraction"][m.start():m.end()] = True
    for m in _LETTERS.finditer(text):
        word, s, e = m.group(), m.start(), m.end()
        lower = word.lower()
        if word[0].isupper() and any(c.islower() for c in word):
            labels["capitalized_word"][s:e] = True
        if len(word) >= 2 and word.isupper():
            labels["all_caps_word"][s:e] = True
        if lower in FUNCTION_WORDS:
            labels["function_word"][s:e] = True
        if lower in PRONOUNS:
            labels["pronoun"][s:e] = True
        if len(word) >= 5 and lower.endswith("ing"):
            labels["ing_word"][s:e] = True
        if len(word) >= 4 and lower.endswith("ly"):
            labels["ly_word"][s:e] = True
    is_space = np.fromiter((c.isspace() for c in text), dtype=bool, count=n)
    labels["line_start"] = _line_start(text)
    labels["after_whitespace"] = _after_whitespace(is_space)
    labels["in_quotes"] = _quotes(text)
    labels["in_parentheses"] = _bracket_depth(text, np.ones(n, dtype=bool), "()")
    labels["punctuation"] = np.fromiter((unicodedata.category(c)[0] == "P" for c in text), dtype=bool, count=n)
    labels["comma"] = np.fromiter((c == "," for c in text), dtype=bool, count=n)
    return labels


# {task set: (its tasks, the function labelling a text's characters)}: evaluate.probes.task_set
TASK_SETS = {"code": (TASKS, char_labels), "prose": (PROSE_TASKS, prose_char_labels)}


def resolve_task_set(setting: str, dataset: Mapping | None) -> str:
    """evaluate.probes.task_set for one subject: `auto` is `code` for the builtin CPython corpus and `prose` for
    any other dataset (the subject's config.subjects.<name>.dataset, as its activation store records it)."""
    if setting != "auto":
        if setting not in TASK_SETS:
            raise ValueError(f"config.evaluate.probes.task_set: {setting!r} is not auto, {', '.join(TASK_SETS)}")
        return setting
    return "code" if (dataset or {}).get("path") == "builtin" else "prose"


def token_labels(text: str, offsets, labels: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """{task: [n_tokens] bool}: a token is positive when ANY of its characters is.

    offsets: [(start, end)] character spans per token, as a Hugging Face fast tokenizer returns with
    `return_offsets_mapping=True`. "Any character" keeps tasks like `line_start` and `in_string`
    true on tokens that merge a leading space or a closing quote with the next character. Empty spans
    (special tokens report (0, 0)) are negative for every task. `labels` defaults to `char_labels(text)`.
    """
    labels = char_labels(text) if labels is None else labels
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(text))
    start, end = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0])
    out = {}
    for task, per_char in labels.items():
        counts = np.concatenate([[0], np.cumsum(per_char, dtype=np.int64)])   # [len(text) + 1]
        out[task] = counts[end] - counts[start] > 0
    return out


def token_strings(tokenizer, ids: np.ndarray) -> dict[int, str]:
    """Each distinct token id decoded on its own: the text a window's labels are computed on."""
    return {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}


def window_task_labels(windows: np.ndarray, strings: Mapping[int, str], task_set: str = "code"
                       ) -> dict[str, np.ndarray]:
    """{task: [W * S] bool} for the builtin tasks of `task_set` (TASK_SETS), row-major over the windows.

    Each window is labelled from its own text only: the model cannot see before the window either, so a
    window that opens inside a string is labelled as code, as the model would have to read it.
    """
    tasks, label_chars = TASK_SETS[task_set]
    out: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for row in windows:
        pieces = [strings[int(t)] for t in row]
        ends = np.cumsum([len(p) for p in pieces])
        starts = ends - np.array([len(p) for p in pieces])
        text = "".join(pieces)
        for task, y in token_labels(text, np.stack([starts, ends], 1), label_chars(text)).items():
            out[task].append(y)
    return {t: np.concatenate(v) for t, v in out.items()}
