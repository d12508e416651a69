"""Neuron-to-Graph (N2G) explanations of SAE latents (method §C.5) and the reconstruction helpers of C.6.

An explanation is a set of token patterns stored in a trie that is walked backwards from the current
token. It is built from a latent's activating examples by asking the subject model how the latent responds
to truncated and perturbed contexts. The model only enters through the caller's `act_fn`, so every step is
testable with toy callbacks, and all model queries are batched across the examples of all latents.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

log = logging.getLogger("saescale.interpret.n2g")

ActFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""act_fn(tokens [B, L] long right-padded, lengths [B] long >= 1, latents [B] long) -> [B] float: the
activation of latents[b] at position lengths[b]-1 of row b, the row run as a fresh sequence from 0."""
Example = tuple[np.ndarray, int, float]   # (window tokens [S], position idx, activation there > 0)

WILDCARD = -1      # pattern element matching any token: the paper's token(*)
_START = -2        # trie edge label for "before the sequence start": the paper's token(^)
_FIRST_ROUND = 4   # suffix lengths 1..4 are tried first, then 5..8, 9..16, ...: most minimal ones are short

# Thresholds and their provenance (method §C.5). Released code (openai/sparse_autoencoder `explanations.py`):
# the minimal suffix keeps >= ACT_FRACTION of the original activation, the start padding test uses the same
# fraction, and a token with saliency below SALIENCY_THRESHOLD becomes a wildcard. Paper text (Gao et al. §4.3):
# a latent "fires" when its activation is > 0, and up to 16 random nonzero activations build the explanation
# with 16 others for recall (interpret.examples / holdout / sampling). Our choice: MAX_SUFFIX, the longest
# suffix searched (config interpret.max_suffix), since the paper does not state one.
ACT_FRACTION = 0.5
SALIENCY_THRESHOLD = 0.5
MAX_SUFFIX = 16


@dataclass(frozen=True)
class Pattern:
    """One explained context: tokens in forward order (WILDCARD = '*'), ending at the predicted token.

    anchored: the pattern must start the sequence (the paper's non-paddable patterns).
    activation: mean minimal-suffix activation of the `count` examples that produced this pattern.
    """

    tokens: tuple[int, ...]
    anchored: bool
    activation: float
    count: int = 1

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("an N2G pattern needs at least one token")


@dataclass(eq=False)
class Explanation:
    """One latent's N2G explanation: its patterns and the trie compiled from them for vectorized `predict`."""

    patterns: list[Pattern]
    n_examples: int = 0   # activating examples it was built from
    n_skipped: int = 0    # of those, examples without a qualifying suffix up to max_suffix
    # Compiled trie, node 0 = root. Exact-token edges are sorted keys node << 32 | token for searchsorted.
    edge_keys: np.ndarray = field(init=False, repr=False)       # [n_edges] int64
    edge_child: np.ndarray = field(init=False, repr=False)      # [n_edges] int64
    wildcard_child: np.ndarray = field(init=False, repr=False)  # [n_nodes] int64, -1 = no edge
    start_child: np.ndarray = field(init=False, repr=False)     # [n_nodes] int64, -1 = no edge
    value: np.ndarray = field(init=False, repr=False)           # [n_nodes] float32, NaN = not terminal
    depth: int = field(init=False, repr=False)                  # longest root-to-leaf path

    def __post_init__(self):
        # method §C.5 step 5: patterns go in reversed (walked from the token at t backwards); anchored
        # ones get a '^' edge after their first token; the leaf stores the activation.
        children: list[dict[int, int]] = [{}]
        values = [math.nan]
        for p in self.patterns:
            node = 0
            for label in (*reversed(p.tokens), *((_START,) if p.anchored else ())):
                if label not in children[node]:
                    children[node][label] = len(children)
                    children.append({})
                    values.append(math.nan)
                node = children[node][label]
            values[node] = p.activation
        self.value = np.array(values, np.float32)
        self.wildcard_child = np.array([c.get(WILDCARD, -1) for c in children], np.int64)
        self.start_child = np.array([c.get(_START, -1) for c in children], np.int64)
        edges = sorted(((node << 32) | label, child) for node, c in enumerate(children)
                       for label, child in c.items() if label >= 0)
        self.edge_keys = np.array([k for k, _ in edges], np.int64)
        self.edge_child = np.array([c for _, c in edges], np.int64)
        self.depth = max((len(p.tokens) + p.anchored for p in self.patterns), default=0)

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """[W, S] token windows -> [W, S] float32 predicted activation, 0 where no pattern matches.

        Greedy walk as in the paper's code (method §C.5 step 6): exact-token child if present, else the
        wildcard child, else stop, with no backtracking; past the window start only '^' can be taken; the
        first terminal node reached gives the prediction. Vectorized level by level over all positions.
        """
        windows = np.asarray(windows, np.int64)
        n_windows, seq = windows.shape
        out = np.zeros(n_windows * seq, np.float32)
        flat = windows.reshape(-1)
        pos0 = np.tile(np.arange(seq), n_windows)   # [W*S] position of each walk's start in its window
        alive = np.arange(n_windows * seq)          # flat index of the positions still walking
        node = np.zeros(alive.size, np.int64)
        for depth in range(self.depth + 1):
            before_start = pos0[alive] < depth
            if before_start.any():
                child = self.start_child[node[before_start]]
                hit = child >= 0
                out[alive[before_start][hit]] = self.value[child[hit]]
                alive, node = alive[~before_start], node[~before_start]
            child = self._exact_child(node, flat[alive - depth])
            child = np.where(child >= 0, child, self.wildcard_child[node])
            alive, child = alive[child >= 0], child[child >= 0]
            terminal = ~np.isnan(self.value[child])
            out[alive[terminal]] = self.value[child[terminal]]
            alive, node = alive[~terminal], child[~terminal]
            if alive.size == 0:
                break
        return out.reshape(n_windows, seq)

    def _exact_child(self, node: np.ndarray, token: np.ndarray) -> np.ndarray:
        if self.edge_keys.size == 0:
            return np.full(node.shape, -1, np.int64)
        keys = (node << 32) | token
        i = np.minimum(np.searchsorted(self.edge_keys, keys), self.edge_keys.size - 1)
        return np.where(self.edge_keys[i] == keys, self.edge_child[i], -1)

    def to_json(self, decode: Callable[[int], str] | None = None) -> dict:
        """Readable, JSON-safe patterns: '^' first if anchored, '*' for wildcards, tokens decoded if asked."""
        def label(tok: int) -> int | str:
            return "*" if tok == WILDCARD else (decode(tok) if decode is not None else int(tok))
        return {"n_examples": self.n_examples, "n_skipped": self.n_skipped,
                "patterns": [{"tokens": ["^"] * p.anchored + [label(t) for t in p.tokens],
                              "activation": float(p.activation), "count": p.count} for p in self.patterns]}

    @classmethod
    def from_json(cls, data: dict) -> Explanation:
        """Inverse of `to_json` without `decode` (token ids kept as ints)."""
        patterns = []
        for p in data["patterns"]:
            toks, anchored = list(p["tokens"]), p["tokens"][:1] == ["^"]
            toks = [WILDCARD if t == "*" else int(t) for t in toks[anchored:]]
            patterns.append(Pattern(tuple(toks), anchored, float(p["activation"]), int(p["count"])))
        return cls(patterns, int(data["n_examples"]), int(data["n_skipped"]))


# --------------------------------------------------------------------------- building (method §C.5)

def _evaluate(act_fn: ActFn, rows: np.ndarray, lengths: np.ndarray, latents: np.ndarray,
              batch_size: int) -> np.ndarray:
    """act_fn over many queries [Q, L]; batches group similar lengths since short batches are cheap."""
    out = np.empty(len(rows), np.float64)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, order.size, batch_size):
        b = order[start:start + batch_size]
        width = int(lengths[b].max())
        acts = act_fn(torch.from_numpy(np.ascontiguousarray(rows[b, :width])),
                      torch.from_numpy(lengths[b]), torch.from_numpy(latents[b]))
        acts = torch.as_tensor(acts).detach().double().cpu().numpy()
        if acts.shape != (b.size,):
            raise ValueError(f"act_fn returned shape {acts.shape} for a batch of {b.size} rows; expected [B]")
        out[b] = acts
    return out


def _suffix_rows(ctx: np.ndarray, ex: np.ndarray, lengths: np.ndarray, pad: int) -> np.ndarray:
    """The last lengths[q] tokens of the right-aligned contexts ctx[ex[q]], right-padded: [Q, max len]."""
    m, k = ctx.shape[1], np.arange(int(lengths.max(initial=1)))
    cols = np.minimum(m - lengths[:, None] + k, m - 1)
    return np.where(k < lengths[:, None], ctx[ex[:, None], cols], pad)


def _pattern_tokens(suffix: np.ndarray, wild: np.ndarray, anchored: bool) -> tuple[int, ...]:
    """method §C.5 step 4: non-salient tokens become wildcards, the last token included as in the paper's
    code, so "token after X" latents get X *. Leading wildcards constrain nothing unless anchored and are
    dropped; an unanchored all-wildcard pattern would fire everywhere, so it keeps its last token exact."""
    toks = np.where(wild, WILDCARD, suffix)
    if not anchored:
        exact = np.flatnonzero(toks != WILDCARD)
        toks = toks[exact[0]:] if exact.size else suffix[-1:]
    return tuple(int(t) for t in toks)


def build_explanations(act_fn: ActFn, examples: Mapping[int, Sequence[Example]], pad_token: int,
                       max_suffix: int = MAX_SUFFIX, act_fraction: float = ACT_FRACTION,
                       saliency_threshold: float = SALIENCY_THRESHOLD,
                       batch_size: int = 512) -> dict[int, Explanation]:
    """N2G explanation per latent from its activating examples (method §C.5, `create_n2g_explanation`).

    examples[latent] = [(window tokens [S], idx, activation at idx > 0), ...]. All model queries of all
    latents go through `act_fn` in batches of `batch_size`. An example whose activation needs more than
    max_suffix tokens of context is left out and counted in `Explanation.n_skipped`. Identical patterns
    from several examples are merged into one with their mean suffix activation (implementation choice;
    the paper's trie keeps whichever came last).
    """
    if not 0 < act_fraction <= 1:
        raise ValueError(f"act_fraction must be in (0, 1], got {act_fraction}")
    flat = [(latent, np.asarray(toks), int(idx), float(act))
            for latent, exs in examples.items() for toks, idx, act in exs]
    n = len(flat)
    latents = np.array([f[0] for f in flat], np.int64)
    orig = np.array([f[3] for f in flat], np.float64)
    if (orig <= 0).any():
        raise ValueError("N2G examples need a positive activation at idx (method §C.5)")
    # method §C.5 step 2 truncates after idx: ctx = the last max_suffix tokens up to idx, right-aligned.
    ctx = np.full((n, max_suffix), pad_token, np.int64)
    cap = np.empty(n, np.int64)   # longest suffix that may be tried
    for i, (latent, toks, idx, _) in enumerate(flat):
        if not 0 <= idx < len(toks):
            raise ValueError(f"latent {latent}: example idx {idx} outside its window of {len(toks)} tokens")
        cap[i] = min(idx + 1, max_suffix)
        ctx[i, max_suffix - cap[i]:] = toks[idx + 1 - cap[i]: idx + 1]

    # C.5 step 2, minimal suffix (lengths 1, 2, ...): lengths are evaluated lazily in rounds, each round
    # only for the examples still unresolved.
    length = np.zeros(n, np.int64)    # 0 = no qualifying suffix (yet)
    act_suffix = np.zeros(n)
    lo, hi = 1, _FIRST_ROUND
    while lo <= max_suffix:
        todo = np.flatnonzero((length == 0) & (cap >= lo))
        if todo.size == 0:
            break
        q_ex = np.repeat(todo, hi - lo + 1)
        q_len = np.tile(np.arange(lo, hi + 1), todo.size)    # example-major, increasing length
        keep = q_len <= cap[q_ex]
        q_ex, q_len = q_ex[keep], q_len[keep]
        log.info("N2G minimal suffixes: lengths %d..%d for %d examples", lo, min(hi, max_suffix), todo.size)
        acts = _evaluate(act_fn, _suffix_rows(ctx, q_ex, q_len, pad_token), q_len, latents[q_ex], batch_size)
        ok = np.flatnonzero(acts >= act_fraction * orig[q_ex])
        ex, first = np.unique(q_ex[ok], return_index=True)   # first qualifying = shortest per example
        length[ex], act_suffix[ex] = q_len[ok[first]], acts[ok[first]]
        lo, hi = hi + 1, 2 * hi

    # C.5 steps 3 (can_pad_start) and 4 (saliency) in one batched pass: the pad-prefixed suffix, then the
    # suffix with each of its tokens in turn replaced by the pad.
    res = np.flatnonzero(length > 0)
    lens = length[res]
    base = _suffix_rows(ctx, res, lens, pad_token)                            # [R, Lmax]
    padded = np.concatenate([np.full((res.size, 1), pad_token), base], 1)     # [R, Lmax + 1]
    owner = np.repeat(np.arange(res.size), lens)                              # saliency query -> row of res
    starts = np.cumsum(lens) - lens
    j = np.arange(owner.size) - np.repeat(starts, lens)                       # replaced position
    ablated = np.concatenate([base[owner], np.full((owner.size, 1), pad_token)], 1)
    ablated[np.arange(owner.size), j] = pad_token
    acts = _evaluate(act_fn, np.concatenate([padded, ablated]), np.concatenate([lens + 1, lens[owner]]),
                     latents[np.concatenate([res, res[owner]])], batch_size)
    anchored = acts[:res.size] < act_fraction * orig[res]
    wild = 1.0 - acts[res.size:] / act_suffix[res][owner] < saliency_threshold   # [sum lens]

    merged: dict[int, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r, e in enumerate(res):
        sel = slice(starts[r], starts[r] + lens[r])
        key = (_pattern_tokens(base[r, :lens[r]], wild[sel], bool(anchored[r])), bool(anchored[r]))
        merged[int(latents[e])][key].append(float(act_suffix[e]))
    out = {}
    for latent, exs in examples.items():
        patterns = [Pattern(toks, anch, float(np.mean(a)), len(a))
                    for (toks, anch), a in merged[latent].items()]
        patterns.sort(key=lambda p: (-p.count, -p.activation))
        out[latent] = Explanation(patterns, len(exs), int(np.sum((latents == latent) & (length == 0))))
    return out


# --------------------------------------------------------------------------- scoring (method §C.5)

def score_explanation(expl: Explanation, windows: np.ndarray, acts: np.ndarray,
                      holdout: Sequence[Example]) -> dict:
    """Precision over all positions of the evaluation windows, recall over the held-out positive examples.

    windows/acts: [W, S] tokens and the latent's true activations. Conventions: nothing predicted ->
    precision NaN and f1 0.0 (an explanation that never fires explains nothing); no holdout -> recall and f1
    NaN.
    """
    fired = expl.predict(windows) > 0
    n_predicted, n_tp = int(fired.sum()), int((fired & (np.asarray(acts) > 0)).sum())
    precision = n_tp / n_predicted if n_predicted else math.nan
    n_recalled = 0
    if holdout:
        # Only tokens up to idx matter for the prediction at idx, so windows are cut and right-padded.
        width = max(int(idx) for _, idx, _ in holdout) + 1
        rows = np.zeros((len(holdout), width), np.int64)
        for h, (toks, idx, _) in enumerate(holdout):
            rows[h, :idx + 1] = np.asarray(toks)[:idx + 1]
        at = np.array([idx for _, idx, _ in holdout])
        n_recalled = int((expl.predict(rows)[np.arange(len(holdout)), at] > 0).sum())
    recall = n_recalled / len(holdout) if holdout else math.nan
    if math.isnan(recall):
        f1 = math.nan
    elif n_predicted == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "n_predicted": n_predicted,
            "n_true_positive": n_tp, "n_holdout": len(holdout), "n_recalled": n_recalled}


# --------------------------------------------------------------------------- reconstruction (method §C.6)

def predict_codes(explanations: Mapping[int, Explanation], windows: np.ndarray, n_latents: int,
                  scale: Mapping[int, float] | np.ndarray | None = None) -> sp.csr_matrix:
    """Simulated codes [W*S, n_latents] (row = flattened window position), latent i scaled by scale[i]."""
    windows = np.asarray(windows)
    rows, cols, vals = [], [], []
    for latent, expl in explanations.items():
        if not 0 <= latent < n_latents:
            raise ValueError(f"explained latent {latent} outside 0..{n_latents - 1}")
        pred = expl.predict(windows).reshape(-1)
        nz = np.flatnonzero(pred)
        rows.append(nz)
        cols.append(np.full(nz.size, latent))
        vals.append(pred[nz] * (1.0 if scale is None else float(scale[latent])))
    n = windows.shape[0] * windows.shape[1]
    vals, rows, cols = (np.concatenate(x or [[]]) for x in (vals, rows, cols))
    codes = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, n_latents))
    codes.eliminate_zeros()
    return codes


def scale_factors(pred: sp.spmatrix, true: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Per-latent least-squares factor c_i = E[s a] / E[s^2] (method §C.6); 0 where s is never nonzero."""
    pred = sp.csr_matrix(pred, dtype=np.float64)
    true = true if sp.issparse(true) else np.asarray(true, np.float64)
    num = np.asarray(pred.multiply(true).sum(0), np.float64).ravel()
    den = np.asarray(pred.multiply(pred).sum(0), np.float64).ravel()
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _bigram_keys(windows: np.ndarray) -> np.ndarray:
    """[W*S] int64 key of (previous token, token); position 0 gets previous = -1, a distinct start id."""
    w = np.asarray(windows, np.int64)
    if w.size and w.min() < 0:
        raise ValueError("token ids must be non-negative")
    prev = np.concatenate([np.full((w.shape[0], 1), -1), w[:, :-1]], 1)
    return (((prev + 1) << 32) | w).reshape(-1)


@dataclass(eq=False)
class BigramBaseline:
    """method §C.6 baseline explanation: each latent's mean activation given (previous, current token)."""

    keys: np.ndarray        # [n_bigrams] sorted bigram keys seen in training
    means: sp.csr_matrix    # [n_bigrams + 1, n_latents]; the last, empty row answers unseen bigrams

    @classmethod
    def fit(cls, windows: np.ndarray, codes: sp.spmatrix | np.ndarray) -> BigramBaseline:
        """windows [W, S] training tokens; codes [W*S, n] their true latent activations."""
        keys = _bigram_keys(windows)
        codes = sp.csr_matrix(codes, dtype=np.float64)
        if codes.shape[0] != keys.size:
            raise ValueError(f"codes have {codes.shape[0]} rows for {keys.size} window positions")
        uniq, inv = np.unique(keys, return_inverse=True)
        averaging = sp.csr_matrix((1.0 / np.bincount(inv)[inv], (inv, np.arange(keys.size))),
                                  shape=(uniq.size, keys.size))
        means = sp.vstack([averaging @ codes, sp.csr_matrix((1, codes.shape[1]))]).tocsr()
        return cls(uniq, means.astype(np.float32))

    def predict(self, windows: np.ndarray) -> sp.csr_matrix:
        """[W*S, n] predicted codes; bigrams never seen in training predict 0."""
        keys = _bigram_keys(windows)
        i = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        found = self.keys[i] == keys if self.keys.size else np.zeros(keys.size, bool)
        return self.means[np.where(found, i, self.keys.size)]
