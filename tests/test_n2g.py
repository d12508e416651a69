"""N2G explanations (method §C.5) and explanation reconstruction helpers (C.6) on toy activation rules."""

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saescale.interpret.examples import Codes, n2g_examples, n2g_picks
from saescale.interpret.n2g import (
    WILDCARD,
    BigramBaseline,
    Explanation,
    Pattern,
    build_explanations,
    predict_codes,
    scale_factors,
    score_explanation,
)

VOCAB, SEQ, PAD = 50, 32, 0     # random tokens are drawn from 1..VOCAB-1, so PAD never occurs naturally
A, B, C, D, E, X = 7, 11, 13, 17, 19, 23


def _tok(tokens: np.ndarray, pos: np.ndarray, back: int) -> np.ndarray:
    """Token `back` places before pos in each row, -1 before the sequence start."""
    p = pos - back
    return np.where(p >= 0, tokens[np.arange(len(tokens)), np.maximum(p, 0)], -1)


RULES = {   # rule(tokens [B, L], pos [B]) -> [B] activation of the toy latent at pos
    "bigram": lambda t, p: 2.0 * ((_tok(t, p, 1) == A) & (_tok(t, p, 0) == B)),
    "skipgram": lambda t, p: 1.0 * ((_tok(t, p, 2) == A) & (_tok(t, p, 0) == B)),
    "start": lambda t, p: 1.5 * ((p == 0) & (_tok(t, p, 0) == X)),
    "longer_is_stronger": lambda t, p: (_tok(t, p, 0) == B) * (1.0 + (_tok(t, p, 3) == A)),
    "far": lambda t, p: 1.0 * ((_tok(t, p, 5) == A) & (_tok(t, p, 0) == B)),
    "after_a": lambda t, p: 1.0 * (_tok(t, p, 1) == A),
    "late_b": lambda t, p: 1.0 * ((p >= 2) & (_tok(t, p, 0) == B)),
    "position_1": lambda t, p: 1.0 * (p == 1),
}
PLANTS = {   # rule -> (idx range, {offset back from idx: token}) planting one firing example
    "bigram": ((1, SEQ), {1: A, 0: B}), "skipgram": ((2, SEQ), {2: A, 0: B}), "start": ((0, 1), {0: X}),
    "longer_is_stronger": ((3, SEQ), {3: A, 0: B}), "far": ((5, SEQ), {5: A, 0: B}),
    "after_a": ((1, SEQ), {1: A}), "late_b": ((2, SEQ), {0: B}), "position_1": ((1, 2), {}),
}


class CountingActFn:
    """ActFn over RULES by latent id (latent i runs rule names[i]), counting model calls."""

    def __init__(self, *names: str):
        self.names, self.calls, self.rows = names, 0, 0

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += len(tokens)
        t, p, lat = tokens.numpy(), lengths.numpy() - 1, latents.numpy()
        out = np.zeros(len(t))
        for i, name in enumerate(self.names):
            out[lat == i] = RULES[name](t[lat == i], p[lat == i])
        return torch.from_numpy(out.astype(np.float32))


def _all_acts(name: str, windows: np.ndarray) -> np.ndarray:
    """[W, S] activation of the rule at every position (a causal model sees only the prefix)."""
    return np.stack([RULES[name](windows, np.full(len(windows), t)) for t in range(windows.shape[1])], 1)


def _examples(name: str, n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int, float]]:
    (lo, hi), plant = PLANTS[name]
    out = []
    for _ in range(n):
        window, idx = rng.integers(1, VOCAB, SEQ), int(rng.integers(lo, hi))
        for back, tok in plant.items():
            window[idx - back] = tok
        act = float(RULES[name](window[None], np.array([idx]))[0])
        assert act > 0
        out.append((window, idx, act))
    return out


def _eval_windows(name: str, rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    """Random windows, a quarter of them with the trigger planted, so both precision and recall are tested."""
    windows = rng.integers(1, VOCAB, (n, SEQ))
    for w, _, _ in _examples(name, n // 4, rng):
        windows[rng.integers(n)] = w
    return windows


def _explain_and_score(name: str, **kwargs) -> tuple[Explanation, dict]:
    rng = np.random.default_rng(0)
    train, holdout = _examples(name, 16, rng), _examples(name, 16, rng)
    expl = build_explanations(CountingActFn(name), {0: train}, PAD, **kwargs)[0]
    windows = _eval_windows(name, rng)
    return expl, score_explanation(expl, windows, _all_acts(name, windows), holdout)


def test_planted_bigram_gives_one_unanchored_pattern_with_full_precision_and_recall():
    expl, score = _explain_and_score("bigram")
    assert expl.patterns == [Pattern((A, B), anchored=False, activation=2.0, count=16)]
    assert expl.n_examples == 16 and expl.n_skipped == 0
    assert score["precision"] > 0.95 and score["recall"] > 0.95 and score["n_predicted"] > 100


def test_skipgram_trigger_gets_a_wildcard_in_the_middle():
    expl, score = _explain_and_score("skipgram")
    assert [p.tokens for p in expl.patterns] == [(A, WILDCARD, B)]
    assert not expl.patterns[0].anchored
    assert score["precision"] > 0.95 and score["recall"] > 0.95


def test_start_anchored_trigger_only_predicts_at_the_sequence_start():
    expl, score = _explain_and_score("start")
    assert expl.patterns == [Pattern((X,), anchored=True, activation=1.5, count=16)]
    assert score["precision"] > 0.95 and score["recall"] > 0.95
    np.testing.assert_array_equal(expl.predict(np.array([[X, X, 1, X]])), [[1.5, 0, 0, 0]])


def test_minimal_suffix_is_the_shortest_reaching_act_fraction_of_the_original():
    # act = 1 + [A three back] on B: with the full context 2.0, and half of that is reached by "B" alone.
    rng = np.random.default_rng(1)
    examples = {0: _examples("longer_is_stronger", 8, rng)}
    short = build_explanations(CountingActFn("longer_is_stronger"), examples, PAD)[0]
    assert short.patterns == [Pattern((B,), anchored=False, activation=1.0, count=8)]
    long = build_explanations(CountingActFn("longer_is_stronger"), examples, PAD, act_fraction=0.75)[0]
    assert long.patterns == [Pattern((A, WILDCARD, WILDCARD, B), anchored=False, activation=2.0, count=8)]


def test_example_without_a_qualifying_suffix_up_to_max_suffix_is_skipped():
    rng = np.random.default_rng(2)
    expl = build_explanations(CountingActFn("far"), {0: _examples("far", 16, rng)}, PAD, max_suffix=4)[0]
    assert expl.patterns == [] and expl.n_skipped == 16
    assert not expl.predict(rng.integers(1, VOCAB, (8, SEQ))).any()


def test_wildcard_conventions_last_token_leading_wildcards_and_anchors():
    rng = np.random.default_rng(3)
    names = ("after_a", "late_b", "position_1")
    examples = {i: _examples(name, 8, rng) for i, name in enumerate(names)}
    expl = build_explanations(CountingActFn(*names), examples, PAD)
    # The current token itself is a wildcard when it does not matter (as in the paper's code).
    assert [(p.tokens, p.anchored) for p in expl[0].patterns] == [((A, WILDCARD), False)]
    # "* * B" constrains nothing but B once leading wildcards are dropped ...
    assert [(p.tokens, p.anchored) for p in expl[1].patterns] == [((B,), False)]
    # ... unless anchored: "^ * *" pins the position.
    assert [(p.tokens, p.anchored) for p in expl[2].patterns] == [((WILDCARD, WILDCARD), True)]
    assert expl[2].predict(rng.integers(1, VOCAB, (3, 5)))[:, 1].tolist() == [1.0] * 3
    assert expl[2].predict(rng.integers(1, VOCAB, (3, 5)))[:, [0, 2, 3, 4]].sum() == 0


def test_trie_walk_is_greedy_without_backtracking_as_in_the_paper():
    expl = Explanation([Pattern((C, A, B), False, 1.0), Pattern((D, WILDCARD, B), False, 3.0)])
    # At A the exact child is taken and dead-ends at D; the wildcard branch (D * B) would have matched.
    assert expl.predict(np.array([[D, A, B]]))[0, 2] == 0.0
    assert expl.predict(np.array([[D, E, B]]))[0, 2] == 3.0
    assert expl.predict(np.array([[C, A, B]]))[0, 2] == 1.0


def _reference_predict(patterns: list[Pattern], tokens: list[int]) -> list[float]:
    """The paper's NtgExplanation.predict (openai/sparse_autoencoder explanations.py), per position."""
    trie: dict = {}
    for p in patterns:
        cur = trie
        for tok in [*reversed(p.tokens), *(["^"] if p.anchored else [])]:
            cur = cur.setdefault(tok, {})
        cur["value"] = p.activation
    out = []
    for i in range(len(tokens)):
        cur, pred = trie, 0.0
        for j in range(i, -1, -1):
            if tokens[j] in cur or WILDCARD in cur:
                cur = cur[tokens[j]] if tokens[j] in cur else cur[WILDCARD]
            else:
                break
            if "value" in cur:
                pred = cur["value"]
                break
            if j == 0 and "^" in cur:
                pred = cur["^"]["value"]
                break
        out.append(pred)
    return out


def test_vectorized_predict_matches_the_papers_walk_on_random_tries():
    rng = np.random.default_rng(4)
    for _ in range(20):
        keys = {(tuple(int(t) for t in rng.integers(-1, 4, rng.integers(1, 5))), bool(rng.random() < 0.3))
                for _ in range(12)}
        patterns = [Pattern(toks, anch, float(i + 1)) for i, (toks, anch) in enumerate(sorted(keys))
                    if any(t != WILDCARD for t in toks) or anch]
        windows = rng.integers(0, 4, (16, 10))
        expected = [_reference_predict(patterns, w.tolist()) for w in windows]
        np.testing.assert_array_equal(Explanation(patterns).predict(windows), expected)


def test_act_fn_is_called_in_a_few_large_batches():
    rng = np.random.default_rng(5)
    names = ("bigram", "skipgram", "far", "start")
    act_fn = CountingActFn(*names)
    expl = build_explanations(act_fn, {i: _examples(n, 16, rng) for i, n in enumerate(names)}, PAD)
    assert sum(e.n_examples for e in expl.values()) == 64
    assert [e.patterns[0].tokens for e in expl.values()] == [(A, B), (A, WILDCARD, B),
                                                              (A, *[WILDCARD] * 4, B), (X,)]
    # rounds of lengths 1..4 (all) and 5..8 (only "far"), then one pass of pad/saliency queries
    assert act_fn.calls <= 4 and act_fn.rows / act_fn.calls > 64


def test_degenerate_scores_follow_the_documented_conventions():
    rng = np.random.default_rng(6)
    windows = rng.integers(1, VOCAB, (4, SEQ))
    holdout = _examples("bigram", 4, rng)
    empty = score_explanation(Explanation([]), windows, _all_acts("bigram", windows), holdout)
    assert math.isnan(empty["precision"]) and empty["recall"] == 0.0 and empty["f1"] == 0.0
    no_holdout = score_explanation(Explanation([Pattern((B,), False, 1.0)]), windows, windows * 0, [])
    assert math.isnan(no_holdout["recall"]) and math.isnan(no_holdout["f1"])


def test_json_is_readable_and_round_trips():
    expl = Explanation([Pattern((A, WILDCARD, B), True, 2.5, 3)], n_examples=4, n_skipped=1)
    data = json.loads(json.dumps(expl.to_json()))
    assert data["patterns"][0]["tokens"] == ["^", A, "*", B]
    assert Explanation.from_json(data).patterns == expl.patterns
    assert expl.to_json(decode=lambda t: f"<{t}>")["patterns"][0]["tokens"] == ["^", "<7>", "*", "<11>"]


def test_predict_codes_places_each_latent_at_its_positions_and_applies_the_scale():
    expls = {1: Explanation([Pattern((A,), False, 2.0)]), 3: Explanation([Pattern((B,), False, 4.0)])}
    windows = np.array([[A, B, 1], [1, 1, A]])
    codes = predict_codes(expls, windows, n_latents=5)
    assert codes.shape == (6, 5) and codes.nnz == 3
    np.testing.assert_array_equal(codes.toarray()[[0, 1, 5]][:, [1, 3]], [[2, 0], [0, 4], [2, 0]])
    scaled = predict_codes(expls, windows, 5, scale=np.array([0, 0.5, 0, 0.25, 0]))
    np.testing.assert_allclose(scaled.toarray(), codes.toarray() * [0, 0.5, 0, 0.25, 0])
    np.testing.assert_allclose(predict_codes(expls, windows, 5, scale={1: 0.5, 3: 0.25}).toarray(),
                               scaled.toarray())


def test_scale_factors_are_the_least_squares_fit_of_truth_on_prediction():
    rng = np.random.default_rng(7)
    true = sp.random(200, 4, density=0.2, random_state=8, format="csr")
    pred = true.multiply(np.array([2.0, 2.0, 0.0, 4.0])).tocsr()    # latent 2 never predicted
    np.testing.assert_allclose(scale_factors(pred, true), [0.5, 0.5, 0.0, 0.25])
    np.testing.assert_allclose(scale_factors(pred, true.toarray()), [0.5, 0.5, 0.0, 0.25])
    s = rng.random(50)
    noisy = s * 3 + rng.normal(0, 0.1, 50)
    c = scale_factors(sp.csr_matrix(s[:, None]), noisy[:, None])
    np.testing.assert_allclose(c, [np.dot(s, noisy) / np.dot(s, s)])


def test_bigram_baseline_recovers_a_bigram_determined_code_and_zeros_unseen_bigrams():
    rng = np.random.default_rng(9)

    def code(windows):   # [W*S, 3], a function of (previous token or start, token) only
        prev = np.concatenate([np.full((len(windows), 1), -1), windows[:, :-1]], 1).reshape(-1)
        cur = windows.reshape(-1)
        return np.stack([(prev == -1) * (cur + 1.0), ((prev * 7 + cur) % 5 == 0) * (prev + 2.0),
                         np.zeros(cur.size)], 1)

    train = rng.integers(0, 10, (400, 16))
    baseline = BigramBaseline.fit(train, sp.csr_matrix(code(train)))
    test = rng.integers(0, 10, (20, 16))
    np.testing.assert_allclose(baseline.predict(test).toarray(), code(test), rtol=1e-6)
    unseen = baseline.predict(np.array([[3, 42, 42]])).toarray()
    assert unseen[1:].sum() == 0 and unseen[0, 0] == 4.0


def test_build_rejects_non_positive_example_activations():
    with pytest.raises(ValueError, match="positive"):
        build_explanations(CountingActFn("bigram"), {0: [(np.arange(1, 5), 2, 0.0)]}, PAD)


# --------------------------------------------------------------------------- example sampling (method §C.5)

def _picks_frequency(sampling: str, n_acts: int, draws: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How often each nonzero activation (vals ascending, so index = rank) lands in the build / holdout set."""
    vals = np.linspace(0.1, 5.0, n_acts)
    rng = np.random.default_rng(seed)
    build, holdout = np.zeros(n_acts), np.zeros(n_acts)
    for _ in range(draws):
        b, h = n2g_picks(vals, 16, 16, rng, sampling)
        build[b] += 1
        holdout[h] += 1
    return build / draws, holdout / draws


def test_default_sampling_is_uniform_over_nonzero_activations_with_no_top_bias():
    from scipy.stats import chisquare

    draws, n_acts = 3000, 60
    build, holdout = _picks_frequency("random", n_acts, draws)
    for freq in (build, holdout):
        # every activation equally likely: 16 / 60 of the draws, whatever its size
        assert chisquare(freq * draws).pvalue > 1e-3
        np.testing.assert_allclose(freq, 16 / n_acts, atol=0.04)
    # the 8 largest activations are picked no more often than the 8 smallest
    assert abs(build[-8:].mean() - build[:8].mean()) < 0.05


def test_top_and_random_sampling_stays_available_and_always_builds_from_the_top_half():
    build, holdout = _picks_frequency("top_and_random", 60, 500)
    np.testing.assert_array_equal(build[-8:], 1.0)
    np.testing.assert_array_equal(holdout[-8:], 0.0)
    assert build[:-8].mean() == pytest.approx(8 / 52, abs=0.02)


@pytest.mark.parametrize("sampling", ["random", "top_and_random"])
@pytest.mark.parametrize("n_acts", [5, 20, 100])
def test_recall_examples_are_disjoint_from_the_build_sample(sampling, n_acts):
    rng = np.random.default_rng(1)
    for _ in range(50):
        build, holdout = n2g_picks(rng.random(n_acts) + 0.01, 16, 16, rng, sampling)
        assert build.size == min(16, n_acts) and holdout.size == min(16, n_acts - build.size)
        assert len(set(build) | set(holdout)) == build.size + holdout.size


def test_n2g_examples_are_the_windows_positions_and_values_of_the_picked_activations():
    rng = np.random.default_rng(2)
    windows = rng.integers(1, VOCAB, (40, 8))
    dense = np.where(rng.random(windows.shape) < 0.3, rng.random(windows.shape) + 0.5, 0).astype(np.float32)
    codes = Codes(windows, sp.csc_matrix(np.stack([dense.reshape(-1), 0 * dense.reshape(-1)], 1)))
    row_of = {tuple(w): i for i, w in enumerate(windows)}   # random windows: all distinct
    build, holdout = n2g_examples(codes, 0, 16, 16, rng)
    assert len(build) == len(holdout) == 16
    keys = [(row_of[tuple(toks)], idx) for toks, idx, _ in build + holdout]
    assert [dense[w, i] for w, i in keys] == [act for _, _, act in build + holdout]
    assert len(set(keys)) == 32 and all(dense[w, i] > 0 for w, i in keys)
    assert n2g_examples(codes, 1, 16, 16, rng) == ([], [])


def test_unknown_sampling_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="config.interpret.sampling"):
        n2g_picks(np.ones(4), 2, 2, np.random.default_rng(), "top")


def test_config_default_is_the_papers_random_sampling():
    from saescale.config import validate

    cfg = validate({"subjects": {"tiny": {"model": "builtin", "layers": [2]}}})
    assert cfg["interpret"]["sampling"] == "random"
    assert validate({"subjects": {"tiny": {"model": "builtin", "layers": [2]}},
                     "interpret": {"sampling": "top_and_random"}})["interpret"]["sampling"] == "top_and_random"
