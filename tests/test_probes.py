"""1-D probe fits, probe loss and the builtin token tasks, code and prose (method §C.4)."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from saescale.evaluate.probe_tasks import (
    PROSE_TASKS,
    TASKS,
    char_labels,
    prose_char_labels,
    resolve_task_set,
    token_labels,
    window_task_labels,
)
from saescale.evaluate.probes import (
    best_probe,
    best_probes,
    fit_logistic_1d,
    fit_logistic_1d_batched,
    probe_losses,
)

LN2 = math.log(2)


def _bce(params, x, y):
    z = params[0] * x + params[1]
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _balanced_labels(n: int, gen: torch.Generator) -> torch.Tensor:
    """[2n] labels, exactly half positive in the train half and in the test half."""
    y = torch.zeros(2, n, dtype=torch.bool)
    for half in y:
        half[torch.randperm(n, generator=gen)[: n // 2]] = True
    return y.reshape(-1)


def test_newton_matches_scipy_minimize_on_a_random_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=500)                       # off-centre, unit-ful: tests the unstandardizing
    y = rng.random(500) < 1 / (1 + np.exp(-(0.7 * x - 1.1)))
    w, b = fit_logistic_1d(torch.tensor(x), torch.tensor(y), l2=0.0)
    ref = minimize(_bce, x0=[0.0, 0.0], args=(x, y), method="BFGS", options={"gtol": 1e-10})
    assert w == pytest.approx(ref.x[0], abs=1e-5)
    assert b == pytest.approx(ref.x[1], abs=1e-5)
    assert _bce([w, b], x, y) <= ref.fun + 1e-12             # Newton reaches the optimum at least as well


def test_batched_fit_matches_per_column_fits():
    gen = torch.Generator().manual_seed(1)
    y = torch.rand(400, generator=gen) < 0.3
    X = torch.randn(400, 5, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 1.0, 1.0])
    X[:, 1] += 5 * y                                         # informative
    X[:, 3] = 7.0                                            # constant: w must stay 0
    X[:, 4] = y + 0.01 * torch.randn(400, generator=gen)     # separable: the damped path
    w, b = fit_logistic_1d_batched(X, y)
    for j in range(5):
        wj, bj = fit_logistic_1d(X[:, j], y)
        assert w[j].item() == pytest.approx(wj, rel=1e-9, abs=1e-12)
        assert b[j].item() == pytest.approx(bj, rel=1e-9, abs=1e-12)
    assert w[3] == 0.0 and b[3].item() == pytest.approx(math.log(0.3 / 0.7), abs=0.15)
    assert w[4] > 0 and w[1] > 0


def test_planted_feature_has_near_zero_held_out_loss_and_is_picked():
    gen = torch.Generator().manual_seed(2)
    n, f, planted = 2000, 64, 41
    y = _balanced_labels(n, gen)
    X = torch.randn(2 * n, f, generator=gen)
    X[:, planted] = y + 0.05 * torch.randn(2 * n, generator=gen)   # classes 20 noise-sd apart: separable
    result = best_probe(X[:n], y[:n], X[n:], y[n:], chunk=10)      # planted column sits in the 5th chunk
    assert result["column"] == planted
    # Separable classes drive the probe towards a step function; after 25 clamped Newton steps the
    # held-out BCE is ~1e-5. 1e-2 is 70x below ln 2, so only a broken fit or selection exceeds it.
    assert result["loss"] < 1e-2
    assert result["baseline"] == pytest.approx(LN2)


def test_noise_has_held_out_loss_near_ln2_for_balanced_labels():
    gen = torch.Generator().manual_seed(3)
    n, f = 4000, 32
    y = _balanced_labels(n, gen)
    X = torch.randn(2 * n, f, generator=gen) * 3 + 1
    losses = probe_losses(X[:n], y[:n], X[n:], y[n:])
    # A 2-parameter probe on noise overfits by ~ 2/(2n) = 2.5e-4 nats and the test mean fluctuates by
    # ~|w| * 0.5 / sqrt(n) ~ 1e-4; 5e-3 is > 10x both, while any real signal or a broken fit is far off.
    assert losses.shape == (f,)
    assert torch.all((losses - LN2).abs() < 5e-3)
    assert torch.all(losses > LN2 - 1e-3)                   # held out, noise cannot beat the base rate
    result = best_probe(X[:n], y[:n], X[n:], y[n:])
    assert abs(result["loss"] - LN2) < 5e-3 and result["baseline"] == pytest.approx(LN2)


def test_best_probes_share_columns_across_tasks_and_skip_single_class_tasks():
    gen = torch.Generator().manual_seed(4)
    n = 1000
    y_a, y_b = _balanced_labels(n, gen), _balanced_labels(n, gen)
    X = torch.randn(2 * n, 8, generator=gen)
    X[:, 2] += 4 * y_a
    X[:, 6] -= 4 * y_b
    train = {"a": y_a[:n], "b": y_b[:n], "never": torch.zeros(n, dtype=torch.bool)}
    test = {"a": y_a[n:], "b": y_b[n:], "never": torch.zeros(n, dtype=torch.bool)}
    result = best_probes(X[:n], train, X[n:], test, chunk=3)
    assert set(result) == {"a", "b"}
    assert result["a"]["column"] == 2 and result["b"]["column"] == 6
    assert result["a"]["loss"] < 0.5 * result["a"]["baseline"]
    with pytest.raises(ValueError, match="both classes"):
        best_probe(X[:n], train["never"], X[n:], test["never"])


SNIPPET = 'def f(a_b):\n    # hi "x"\n    return "s#" + A1\n'
#          0123456789 1 1111111111222 2 2222222223333333333444444 4
#                     0 1234567890123 4 5678901234567890123456789 5


def _positions(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def test_char_labels_on_a_python_snippet():
    labels = char_labels(SNIPPET)
    assert set(labels) == set(TASKS) and len(TASKS) >= 12
    assert all(m.shape == (len(SNIPPET),) and m.dtype == bool for m in labels.values())
    expected = {
        "in_comment": list(range(16, 24)),                  # '# hi "x"': the quotes there are no string
        "in_string": list(range(36, 40)),                   # '"s#"': the '#' there is no comment
        "in_triple_string": [],
        "keyword": [0, 1, 2, *range(29, 35)],               # def, return
        "in_brackets": [6, 7, 8],                           # a_b, not the parentheses
        "line_start": [0, 16, 29],
        "indented_line": [*range(12, 24), *range(25, 45)],
        "digit": [44],
        "uppercase": [43],
        "underscore_word": [6, 7, 8],
        "all_caps_word": [],                                # 'A1' has one capital only
        "after_whitespace": [4, 16, 18, 21, 29, 36, 41, 43],
        "punctuation": [5, 7, 9, 10, 16, 21, 23, 36, 38, 39, 41],
        "whitespace": [3, 11, 12, 13, 14, 15, 17, 20, 24, 25, 26, 27, 28, 35, 40, 42, 45],
        "decorator_line": [],
    }
    for task, positions in expected.items():
        assert _positions(labels[task]) == positions, task


def test_char_labels_docstrings_decorators_and_constants():
    text = '@cache\ndef g():\n    """Doc (x)\n    MAX_N"""\n'
    labels = char_labels(text)
    assert _positions(labels["decorator_line"]) == list(range(6))
    assert _positions(labels["in_triple_string"]) == list(range(20, 43))
    assert _positions(labels["in_brackets"]) == []          # '(x)' is inside the docstring
    assert _positions(labels["all_caps_word"]) == list(range(35, 40))
    assert _positions(labels["keyword"]) == [7, 8, 9]


def test_char_labels_never_raise_on_broken_code():
    text = ") (a) ]\nx = \"abc\ny = '''doc\nf(a, [b"
    labels = char_labels(text)
    assert _positions(labels["in_string"][:16]) == [12, 13, 14, 15]   # '"abc' ends at the newline
    assert labels["in_triple_string"][21:].all()           # unterminated triple quote runs to the end
    assert _positions(labels["in_brackets"][:8]) == [3]     # the stray ')' and ']' do not go negative
    assert all(len(m) == 0 for m in char_labels("").values())


def test_token_labels_use_any_character_and_ignore_empty_offsets():
    text = 'x = "a b"  # c\n'
    offsets = [(0, 0), (0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13), (13, 14), (14, 15), (0, 0)]
    #           BOS    'x'     ' ='    ' "'    'a '    'b"'    '  '     '# '      'c'       '\n'      EOS
    labels = token_labels(text, offsets)
    expected = {
        "in_string": [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0],
        "in_comment": [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        "after_whitespace": [0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0],
        "whitespace": [0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0],
    }
    for task, values in expected.items():
        assert labels[task].tolist() == [bool(v) for v in values], task
    assert all(len(m) == len(offsets) and not m[0] and not m[-1] for m in labels.values())


# ---- the prose task set ------------------------------------------------------------------------------

PROSE = ('She said "Stop it." Then the NASA crew (at 3,000 ft) didn\'t move.\n'
         'Running quickly, they left! 2.5 is “odd” (really (so)) and it’s fine')


def _runs(text: str, mask: np.ndarray) -> list[str]:
    """The maximal runs of labelled characters, as text."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [text[s:e] for s, e in zip(edges[::2], edges[1::2])]


def test_prose_labels_on_a_hand_checked_paragraph():
    labels = prose_char_labels(PROSE)
    assert set(labels) == set(PROSE_TASKS) and len(PROSE_TASKS) >= 12
    assert all(m.shape == (len(PROSE),) and m.dtype == bool for m in labels.values())
    expected = {
        "sentence_end": [".", ".", "!"],                   # '2.5' is a number, not an end
        "sentence_start": ["T", "R", "2"],                 # not the window's first word: it may be mid-sentence
        "line_start": ["S", "R"],
        "capitalized_word": ["She", "Stop", "Then", "Running"],
        "all_caps_word": ["NASA"],
        "number": ["3,000", "2.5"],
        "in_quotes": ['"Stop it."', "“odd”"],
        "in_parentheses": ["at 3,000 ft", "really (so)"],  # nested, the outer parentheses excluded
        "punctuation": ['"', '."', "(", ",", ")", "'", ".", ",", "!", ".", "“", "”", "(", "(", "))", "’"],
        "comma": [",", ","],
        "function_word": ["the", "at", "is", "so", "and"],
        "pronoun": ["She", "it", "they", "it"],
        "contraction": ["didn't", "it’s"],
        "ing_word": ["Running"],
        "ly_word": ["quickly", "really"],
    }
    for task, runs in expected.items():
        assert _runs(PROSE, labels[task]) == runs, task
    assert (labels["after_whitespace"] == char_labels(PROSE)["after_whitespace"]).all()  # one definition


def test_prose_quotes_ignore_a_stray_closer_and_end_an_open_quote_at_the_newline():
    text = 'end." He said "yes\nno" x "a" and “b'
    # the first '"' closes nothing (no quote is open), the newline ends '"yes', 'no"' closes nothing
    assert _runs(text, prose_char_labels(text)["in_quotes"]) == ['"yes', '"a"', "“b"]
    assert all(len(m) == 0 for m in prose_char_labels("").values())


def test_window_labels_use_the_task_set():
    strings = {0: "The", 1: " cat", 2: " sat", 3: ".", 4: " It", 5: " ran"}
    windows = np.array([[0, 1, 2, 3, 4, 5]])
    prose = window_task_labels(windows, strings, "prose")
    assert set(prose) == set(PROSE_TASKS)
    assert prose["sentence_start"].tolist() == [False, False, False, False, True, False]   # ' It'
    assert prose["function_word"].tolist() == [True, False, False, False, False, False]
    assert prose["pronoun"].tolist() == [False, False, False, False, True, False]
    assert set(window_task_labels(windows, strings)) == set(TASKS)                          # code by default


def test_auto_task_set_is_code_for_the_builtin_corpus_and_prose_for_any_other_dataset():
    assert resolve_task_set("auto", {"path": "builtin"}) == "code"
    assert resolve_task_set("auto", {"path": "Skylion007/openwebtext", "name": None}) == "prose"
    assert resolve_task_set("auto", {"path": "text", "data_files": ["a.txt"]}) == "prose"
    assert resolve_task_set("auto", None) == "prose"
    assert resolve_task_set("code", {"path": "text"}) == "code"
    assert resolve_task_set("prose", {"path": "builtin"}) == "prose"
    with pytest.raises(ValueError, match="task_set"):
        resolve_task_set("poetry", {"path": "builtin"})
