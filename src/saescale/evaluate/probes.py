"""Probe loss: recover known binary features with 1-D logistic probes (REFERENCE C.4).

For each task and each column i of an activation matrix (SAE pre-activation latents, or the raw
residual channels for the baseline) a logistic regression on that single column is fit with Newton's
method; the task's probe loss is the held-out binary cross-entropy of the best column.

The paper's 61 tasks were not recovered (REFERENCE C.4, gap), so two builtin task sets are defined over
the text of each window (`TASK_SETS`, chosen by evaluate.probes.task_set): `char_labels` for Python source
(the builtin CPython corpus) and `prose_char_labels` for natural language. `token_labels` maps either onto
the tokens of any tokenizer through its character offsets.

Labels arrive as numpy arrays and are moved to the device of the columns they meet (`_labels`), so the fits
run where the activations are: on the GPU when `cmd_probes` put them there.
"""

from __future__ import annotations

import keyword
import math
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

# Elements of one [rows, columns] float64 block; a chunk of columns holds about this many, so a
# handful of temporaries stay around 128 MiB each whatever N is.
_BLOCK_ELEMENTS = 2 ** 24
_STEP_TOL = 1e-9     # Newton step (standardized units) below which a column counts as converged
_MAX_STEP = 10.0     # clamp on one Newton step: keeps separable columns from jumping to |w| ~ 1/l2


# --------------------------------------------------------------------------- 1-D logistic regression

def _standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Columns to zero mean / unit std with the train statistics; constant columns become 0."""
    constant = std <= 1e-12 * (mean.abs() + 1e-30)
    return torch.where(constant, 0.0, (x - mean) / torch.where(constant, 1.0, std))


def _column_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0, correction=0)


def _bce_with_logits(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -y log s(z) - (1-y) log(1-s(z)) = softplus(z) - y z, stable for any |z|."""
    return (torch.nn.functional.softplus(z) - y * z).mean(0)


def _newton(x: torch.Tensor, y: torch.Tensor, iters: int, l2: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit sigmoid(w x_j + b) to y for every column j of standardized x at once.

    x: [N, C] float64, standardized; y: [N] float64 in {0, 1}. Minimizes
    mean BCE + l2/2 (w^2 + b^2) with exact 2x2 Newton steps per column. The step is damped by a lazy
    line search: each pass evaluates the objective at the proposed point, and a column whose objective
    went up is sent back halfway to its last accepted point. With separable data (a planted feature)
    the optimum has |w| ~ log(1/l2), reached through clamped steps.
    Returns (w [C], b [C], train BCE [C]) at the last accepted point.
    """
    c = x.shape[1]
    yc = y[:, None]
    rate = float(y.mean().clamp(1e-6, 1 - 1e-6))
    w = torch.zeros(c, dtype=x.dtype, device=x.device)
    b = torch.full((c,), math.log(rate / (1 - rate)), dtype=x.dtype, device=x.device)   # exact optimum at w = 0
    w_acc, b_acc = w.clone(), b.clone()
    obj_acc = torch.full((c,), math.inf, dtype=x.dtype, device=x.device)
    bce_acc = obj_acc.clone()
    active = torch.arange(c, device=x.device)   # columns still moving; converged ones leave the [N, C] work
    xa = x
    for it in range(iters):
        wa, ba = w[active], b[active]
        z = xa * wa + ba                                                    # [N, active]
        bce = _bce_with_logits(z, yc)
        obj = bce + 0.5 * l2 * (wa * wa + ba * ba)
        accept = obj <= obj_acc[active]
        w_acc[active] = torch.where(accept, wa, w_acc[active])
        b_acc[active] = torch.where(accept, ba, b_acc[active])
        obj_acc[active] = torch.where(accept, obj, obj_acc[active])
        bce_acc[active] = torch.where(accept, bce, bce_acc[active])
        if it == iters - 1:
            break
        p = torch.sigmoid(z)
        r = p - yc                                                          # dBCE/dz
        s = p * (1 - p)                                                     # d2BCE/dz2
        sx = s * xa
        g_w, g_b = (r * xa).mean(0) + l2 * wa, r.mean(0) + l2 * ba
        h_ww, h_wb, h_bb = (sx * xa).mean(0) + l2, sx.mean(0), s.mean(0) + l2
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-300)
        d_w = ((-h_bb * g_w + h_wb * g_b) / det).nan_to_num(0.0).clamp(-_MAX_STEP, _MAX_STEP)
        d_b = ((-h_ww * g_b + h_wb * g_w) / det).nan_to_num(0.0).clamp(-_MAX_STEP, _MAX_STEP)
        # Accepted columns step from the new point; rejected ones halve their step from the last good one.
        wa_acc, ba_acc = w_acc[active], b_acc[active]
        w_next = torch.where(accept, wa + d_w, wa_acc + 0.5 * (wa - wa_acc))
        b_next = torch.where(accept, ba + d_b, ba_acc + 0.5 * (ba - ba_acc))
        w[active], b[active] = w_next, b_next
        moving = (w_next - wa_acc).abs() + (b_next - ba_acc).abs() >= _STEP_TOL
        if not bool(moving.all()):
            active, xa = active[moving], xa[:, moving]
            if len(active) == 0:
                break
    return w_acc, b_acc, bce_acc


def fit_logistic_1d_batched(X, y, iters: int = 25, l2: float = 1e-6
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent 1-D logistic regressions of y on each column of X: P(y=1) = sigmoid(w_j X_j + b_j).

    X: [N, F]; y: [N] bool or 0/1. Newton's method in float64 on each column standardized to zero
    mean / unit std (so `l2`, applied to the standardized weight and bias, is scale-free); the
    returned (w [F], b [F]) are in the units of X. Constant columns get w = 0.
    """
    x = torch.as_tensor(X).to(torch.float64)
    mean, std = _column_stats(x)
    w_s, b_s, _ = _newton(_standardize(x, mean, std), _labels(y, x.device), iters, l2)
    constant = std <= 1e-12 * (mean.abs() + 1e-30)
    w = torch.where(constant, 0.0, w_s / torch.where(constant, 1.0, std))
    return w, b_s - w * mean


def fit_logistic_1d(x, y, iters: int = 25, l2: float = 1e-6) -> tuple[float, float]:
    """One 1-D logistic regression P(y=1) = sigmoid(w x + b); see `fit_logistic_1d_batched`."""
    w, b = fit_logistic_1d_batched(torch.as_tensor(x).reshape(-1, 1), y, iters, l2)
    return float(w[0]), float(b[0])


def _labels(y, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels as float64 0/1 on `device`, the device of the columns they meet (the CPU for numpy or Zarr X)."""
    return torch.as_tensor(y).reshape(-1).to(device, torch.float64)


def _data_device(X) -> torch.device:
    """Where X's column blocks come out: a tensor's (or CodeColumns') device, else the CPU."""
    return X.device if isinstance(X, (torch.Tensor, CodeColumns)) else torch.device("cpu")


# --------------------------------------------------------------------------- probe losses

def _auto_chunk(n_rows: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _BLOCK_ELEMENTS // max(n_rows, 1))


def _column_blocks(X_train, X_test, chunk: int | None, progress: bool
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first column, train block [N, C], test block [M, C]) standardized with the train statistics.

    X_train / X_test only need shape and column slicing (`X[:, i:j]`), so torch tensors, numpy arrays
    and Zarr arrays all work and only one block is in memory at a time.
    """
    n_cols = X_train.shape[1]
    if X_test.shape[1] != n_cols:
        raise ValueError(f"probe: train has {n_cols} columns but test has {X_test.shape[1]}")
    step = _auto_chunk(X_train.shape[0], chunk)
    for start in tqdm(range(0, n_cols, step), desc="probe columns", unit="chunk", disable=not progress):
        train, test = _block(X_train, start, step), _block(X_test, start, step)
        mean, std = _column_stats(train)
        yield start, _standardize(train, mean, std), _standardize(test, mean, std)


def _block(X, start: int, width: int) -> torch.Tensor:
    block = X[:, start:start + width]
    block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))
    return block.to(torch.float64)


def probe_losses(X_train, y_train, X_test, y_test, chunk: int | None = None, iters: int = 25,
                 l2: float = 1e-6, progress: bool = False) -> torch.Tensor:
    """Held-out mean BCE of each column's 1-D probe, fit on the train rows: [F] float64.

    chunk: columns fit together (memory ~ 6 x N x chunk float64); None picks ~2^24 / N.
    """
    yt, ye = _labels(y_train, _data_device(X_train)), _labels(y_test, _data_device(X_test))
    _check_rows("probe", X_train, yt, X_test, ye)
    out = []
    for _, train, test in _column_blocks(X_train, X_test, chunk, progress):
        w, b, _ = _newton(train, yt, iters, l2)
        out.append(_bce_with_logits(test * w + b, ye[:, None]))
    return torch.cat(out)


def _check_rows(what: str, X_train, y_train: torch.Tensor, X_test, y_test: torch.Tensor) -> None:
    if len(y_train) != X_train.shape[0] or len(y_test) != X_test.shape[0]:
        raise ValueError(f"{what}: {len(y_train)}/{len(y_test)} labels for "
                         f"{X_train.shape[0]}/{X_test.shape[0]} train/test rows")


def _entropy_baseline(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test BCE of always predicting the train base rate: what a probe must beat."""
    q = float(y_train.mean().clamp(1e-6, 1 - 1e-6))
    return float(-(y_test * math.log(q) + (1 - y_test) * math.log(1 - q)).mean())


def _screen(X_train, ys: Mapping[str, tuple[torch.Tensor, torch.Tensor]], chunk: int | None, keep: int
            ) -> dict[str, torch.Tensor]:
    """{task: the `keep` columns with the largest |correlation| with the train labels}, sorted.

    N corr(x, y)^2 is the score-test statistic of a 1-D logistic fit at w = 0, a cheap and close proxy for
    how much a column's probe can lower the loss; only these columns get the full Newton fit.
    """
    Y = torch.stack([yt - yt.mean() for yt, _ in ys.values()], 1)  # [N, tasks], on the columns' device
    best = {t: (Y.new_empty(0), torch.empty(0, dtype=torch.long, device=Y.device)) for t in ys}
    step = _auto_chunk(X_train.shape[0], chunk)
    for start in range(0, X_train.shape[1], step):
        train = _block(X_train, start, step)
        train = _standardize(train, *_column_stats(train))
        corr = (train.T @ Y).abs()  # [C, tasks]
        cols = torch.arange(start, start + train.shape[1], device=Y.device)
        for j, task in enumerate(ys):
            score, idx = best[task]
            score, idx = torch.cat([score, corr[:, j]]), torch.cat([idx, cols])
            top = score.topk(min(keep, score.numel())).indices
            best[task] = (score[top], idx[top])
    return {t: idx.sort().values for t, (_, idx) in best.items()}


def best_probes(X_train, labels_train: Mapping[str, object], X_test, labels_test: Mapping[str, object],
                chunk: int | None = None, iters: int = 25, l2: float = 1e-6,
                progress: bool = False, candidates: int | None = None) -> dict[str, dict]:
    """Best single-column probe for every task: {task: {loss, column, train_loss, baseline}}.

    REFERENCE C.4: probe_loss(task) = min over (i, w, b) of the BCE of sigmoid(w z_i + b), with z_i
    the *pre-activation* latents for an SAE and the residual channels for the baseline; the paper
    reports the mean over tasks. The minimum over (w, b) is the Newton fit on the train rows; the
    minimum over i is also taken on the train rows, and `loss` is the held-out BCE of that column.
    Choosing i on the test rows would let the best of up to 2^17 noisy columns look like a feature;
    selecting on train and reporting test follows the SAEBench substitute in C.4 (fit and select on
    train, report test). `baseline` is the entropy of the train base rate on the test rows.

    candidates: fit only each task's columns most correlated with its labels (`_screen`), which makes
    wide SAEs affordable (n columns x tasks Newton fits otherwise); None fits every column.
    Columns are read in chunks and shared by all tasks, so Zarr-backed X is read once per pass.
    Tasks whose train or test labels hold one class only are left out of the result.
    """
    ys = {}
    train_device, test_device = _data_device(X_train), _data_device(X_test)
    for task, y in labels_train.items():
        yt, ye = _labels(y, train_device), _labels(labels_test[task], test_device)
        _check_rows(f"probe task {task!r}", X_train, yt, X_test, ye)
        if 0 < yt.mean() < 1 and 0 < ye.mean() < 1:
            ys[task] = (yt, ye)
    best = {t: {"loss": math.inf, "column": -1, "train_loss": math.inf,
                "baseline": _entropy_baseline(*ys[t])} for t in ys}
    screened = _screen(X_train, ys, chunk, candidates) if candidates is not None and ys else None
    for start, train, test in _column_blocks(X_train, X_test, chunk, progress):
        for task, (yt, ye) in ys.items():
            cols = torch.arange(train.shape[1], device=train.device)
            if screened is not None:
                cols = screened[task][(screened[task] >= start) & (screened[task] < start + train.shape[1])] - start
                if cols.numel() == 0:
                    continue
            w, b, train_bce = _newton(train[:, cols], yt, iters, l2)
            j = int(train_bce.argmin())
            if float(train_bce[j]) < best[task]["train_loss"]:
                test_bce = _bce_with_logits(test[:, cols[j]] * w[j] + b[j], ye)
                best[task].update(loss=float(test_bce), column=start + int(cols[j]), train_loss=float(train_bce[j]))
    return best


def best_probe(X_train, y_train, X_test, y_test, chunk: int | None = None, iters: int = 25,
               l2: float = 1e-6, progress: bool = False) -> dict:
    """{loss, column, train_loss, baseline} of the best single column for one task; see `best_probes`."""
    result = best_probes(X_train, {"task": y_train}, X_test, {"task": y_test}, chunk, iters, l2, progress)
    if "task" not in result:
        raise ValueError("probe: the labels need both classes in the train and in the test split")
    return result["task"]


# --------------------------------------------------------------------------- builtin tasks

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


# --------------------------------------------------------------------------- the probes rule

class CodeColumns:
    """Columns of an SAE code computed on demand, so `best_probes` never holds [N, n] at once.

    which='pre': the encoder's pre-activations (REFERENCE C.4 as recalled); 'post': the sparse latents.
    Supports the `X.shape` / `X[:, i:j]` protocol of `best_probes`.
    """

    def __init__(self, sae, x_norm: torch.Tensor, which: str):
        self.sae, self.x, self.which = sae, x_norm, which
        self.shape = (x_norm.shape[0], sae.n_latents)
        self.device = x_norm.device
        self._latents = sae.encode(x_norm) if which == "post" else None

    @torch.no_grad()
    def __getitem__(self, key) -> torch.Tensor:
        cols = key[1]
        if self.which == "pre":
            sae = self.sae
            return torch.nn.functional.linear(self.x - sae.b_pre, sae.W_enc[cols], sae.b_enc[cols])
        lat = self._latents
        if lat.indices is None:
            return lat.values[:, cols]
        start, stop = cols.start, min(cols.stop, self.shape[1])
        inside = (lat.indices >= start) & (lat.indices < stop)
        out = torch.zeros(self.shape[0], stop - start, dtype=lat.values.dtype, device=lat.values.device)
        local = torch.where(inside, lat.indices - start, 0)
        return out.scatter_add_(1, local, torch.where(inside, lat.values, 0.0))


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


def _summary(per_task: dict[str, dict]) -> dict:
    losses = [r["loss"] for r in per_task.values()]
    return {"mean_loss": float(np.mean(losses)) if losses else float("nan"), "n_tasks": len(losses),
            "tasks": per_task}


def probe_suite(features: Mapping[str, tuple[object, object]], labels_train: Mapping[str, np.ndarray],
                labels_test: Mapping[str, np.ndarray], iters: int) -> dict[str, dict]:
    """{feature set: {mean_loss, n_tasks, tasks}} for each (train X, test X) feature set, e.g. the SAE's
    pre-activations, its latents and the residual channels (the baseline of REFERENCE C.4)."""
    return {name: _summary(best_probes(Xt, labels_train, Xe, labels_test, iters=iters))
            for name, (Xt, Xe) in features.items()}


def pooled_codes(sae, resid: list[torch.Tensor], which: str, pool: str) -> torch.Tensor:
    """[texts, n] one row per text: its tokens' codes (or raw channels, which='resid') averaged, or the
    last token's, for user tasks labelled per text (the SAEBench-style substitute of REFERENCE C.4)."""
    from saescale.normalize import normalize

    rows = []
    for r in resid:  # [tokens, d]
        codes = r if which == "resid" else CodeColumns(sae, normalize(r)[0], which)[:, 0:sae.n_latents]
        rows.append(codes.mean(0) if pool == "mean" else codes[-1])
    return torch.stack(rows)


@torch.no_grad()
def probe_record(sae, x_raw: torch.Tensor, windows: np.ndarray, strings: Mapping[int, str], spec: dict,
                 user_tasks: Mapping[str, tuple[list[torch.Tensor], np.ndarray, str]] = ()) -> dict:
    """Probe losses of one SAE for the builtin tasks on `windows` (rows of x_raw [W*S, d], row-major) and
    the user tasks ({task: (per-text resid [tokens, d], labels [texts], pool)}), per feature set.

    Even windows (texts) fit the probe and select the latent, odd ones report the loss, so the two never
    share a document. Feature sets: the configured SAE codes and `resid`, the raw channels (the baseline).
    """
    from saescale.normalize import normalize

    names = [*spec["activations"], "resid"]
    tasks: dict[str, dict[str, dict]] = {name: {} for name in names}
    positives: dict[str, float] = {}
    task_set = spec.get("task_set", "code")  # resolved by the caller (resolve_task_set), never "auto" here
    if spec["builtin_tasks"]:
        W, S = windows.shape
        train = torch.from_numpy(np.repeat(np.arange(W) % 2 == 0, S))
        labels = window_task_labels(windows, strings, task_set)
        positives.update({t: float(y.mean()) for t, y in labels.items()})
        x_norm = normalize(x_raw)[0]
        feats = {w: (CodeColumns(sae, x_norm[train], w), CodeColumns(sae, x_norm[~train], w))
                 for w in spec["activations"]}
        feats["resid"] = (x_raw[train], x_raw[~train])
        lt = {t: y[train.numpy()] for t, y in labels.items()}
        le = {t: y[~train.numpy()] for t, y in labels.items()}
        for name, (Xt, Xe) in feats.items():
            tasks[name].update(best_probes(Xt, lt, Xe, le, iters=spec["iters"], candidates=spec["candidates"]))
    for task, (resid, y, pool) in dict(user_tasks).items():
        positives[task] = float(np.mean(y))
        fit = np.arange(len(y)) % 2 == 0
        for name in names:
            X = pooled_codes(sae, resid, name, pool)
            tasks[name].update(best_probes(X[fit], {task: y[fit]}, X[~fit], {task: y[~fit]}, iters=spec["iters"],
                                           candidates=spec["candidates"]))
    return {"feature_sets": {name: _summary(t) for name, t in tasks.items()}, "positive_rate": positives,
            "windows": int(len(windows)), "task_set": task_set if spec["builtin_tasks"] else None,
            "user_tasks": sorted(dict(user_tasks))}


def load_user_task(ds: dict, tokenizer, ctx_len: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """(token ids per text, truncated to ctx_len; binary labels) of one `evaluate.probes.datasets` entry,
    through datasets.load_dataset, shuffled so that the alternating fit/test split is not label-sorted."""
    import datasets

    where = f"config.evaluate.probes.datasets[{ds['task']}]"
    kwargs = {"name": ds["name"], "split": ds["split"]}
    if ds["data_files"] is not None:
        kwargs["data_files"] = ds["data_files"]
    table = datasets.load_dataset(ds["path"], **kwargs)
    for field in ("text_field", "label_field"):
        if ds[field] not in table.column_names:
            raise ValueError(f"{where}.{field}: column '{ds[field]}' not in the dataset "
                             f"(columns: {table.column_names})")
    raw = table[ds["label_field"]]
    if ds["positive"] is not None:
        labels = np.array([v == ds["positive"] for v in raw])
    elif set(raw) <= {0, 1}:  # booleans too (True == 1)
        labels = np.array(raw, dtype=bool)
    else:
        raise ValueError(f"{where}.positive: labels {sorted(set(map(str, raw)))[:5]} are not 0/1; "
                         "name the positive label value")
    order = np.random.default_rng(seed).permutation(len(labels))[:ds["max_examples"]]
    texts = table[ds["text_field"]]
    ids = [tokenizer(texts[i], truncation=True, max_length=ctx_len)["input_ids"] for i in order]
    keep = [j for j, t in enumerate(ids) if t]
    labels = labels[order][keep]
    if labels.all() or not labels.any():
        raise ValueError(f"{where}: every example has the same label; a probe needs both classes")
    return [ids[j] for j in keep], labels.astype(np.float64)


@torch.no_grad()
def text_resids(model, layer: int, token_lists: list[list[int]], device) -> list[torch.Tensor]:
    """resid_post of `layer` for each text run on its own: [tokens, d] float32 per text, on the CPU."""
    from saescale.subject import record_resid, run_until_recorded

    out = []
    with record_resid(model, [layer], stop=True) as captured:
        for ids in token_lists:
            run_until_recorded(model, torch.tensor([ids], device=device))
            out.append(captured[layer][0].float().cpu())
    return out
