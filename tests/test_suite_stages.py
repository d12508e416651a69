"""The evaluation suite's per-SAE stages on a real (random, tiny) GPT-2 and SAE: the pieces between the
pure metrics and the rules (probe features and labels, the one-position residual edit, ablation and
geometry records, N2G's activation callback, examples, logit lens, explanation reconstruction)."""


import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_gpt2, write_text_files

from saescale.evaluate.ablation import ablation_record
from saescale.evaluate.downstream import downstream_metrics
from saescale.evaluate.geometry import geometry_record
from saescale.evaluate.probe_tasks import TASKS, token_labels, window_task_labels
from saescale.evaluate.probes import CodeColumns, best_probes, probe_record
from saescale.interpret.examples import Codes, latent_card, n2g_examples, sample_latents
from saescale.interpret.n2g import Explanation, Pattern
from saescale.interpret.stage import explanation_reconstruction, logit_lens, make_act_fn
from saescale.normalize import normalize
from saescale.sae.model import SparseAutoencoder
from saescale.subject import add_at_positions, load_model, load_tokenizer, record_resid, run_until_recorded

LAYER = 0


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    path = random_gpt2(folder / "model", write_text_files(folder / "text"))
    return load_model(path), load_tokenizer(path)


def _sae(d: int, n: int = 32, k: int = 4, arch: str = "topk") -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, n, arch, k)
    torch.nn.init.normal_(sae.W_dec)
    sae.normalize_decoder_()
    sae.W_enc.data = sae.W_dec.data.clone()
    return sae.eval()


def _windows(vocab: int, W: int = 16, S: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(W, S)))


def _resid(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), record_resid(model, [LAYER], stop=True) as captured:
        run_until_recorded(model, windows)
    return captured[LAYER]


# ---- probes ----------------------------------------------------------------------------------------

def test_code_columns_match_the_dense_codes_for_pre_and_post_activations():
    sae = _sae(8, n=40, k=3)
    x = normalize(torch.randn(50, 8))[0]
    with torch.no_grad():
        pre = sae.pre_acts(x)
        post = sae.encode(x).dense(40)
        for which, full in (("pre", pre), ("post", post)):
            cols = CodeColumns(sae, x, which)
            assert cols.shape == (50, 40)
            assert torch.allclose(torch.cat([cols[:, i:i + 16] for i in range(0, 40, 16)], 1), full, atol=1e-6)


def test_screened_probes_pick_the_same_columns_as_the_exhaustive_search():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 300, generator=gen)
    labels = {f"t{j}": (X[:, 7 * j] + 0.5 * torch.randn(2000, generator=gen) > 0.3) for j in range(5)}
    tr, te = slice(0, 1000), slice(1000, 2000)
    lt = {t: y[tr] for t, y in labels.items()}
    le = {t: y[te] for t, y in labels.items()}
    full = best_probes(X[tr], lt, X[te], le)
    screened = best_probes(X[tr], lt, X[te], le, candidates=8, chunk=64)
    for task in labels:
        assert screened[task]["column"] == full[task]["column"] == 7 * int(task[1:])
        assert screened[task]["loss"] == pytest.approx(full[task]["loss"])


def test_window_labels_follow_each_tokens_text():
    strings = {0: "def", 1: " f", 2: "(", 3: "x", 4: ")", 5: ":", 6: "\n", 7: "    ", 8: "# hi", 9: "1"}
    windows = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    labels = window_task_labels(windows, strings)
    assert set(labels) == set(TASKS)
    assert labels["keyword"].tolist() == [True] + [False] * 9
    assert labels["in_brackets"][3] and not labels["in_brackets"][2]
    assert labels["in_comment"].tolist() == [False] * 8 + [True, True]  # "1" is on the comment's line
    text = "".join(strings[int(t)] for t in windows[0])
    offsets = np.cumsum([0] + [len(strings[int(t)]) for t in windows[0]])
    direct = token_labels(text, np.stack([offsets[:-1], offsets[1:]], 1))
    assert all((direct[t] == labels[t]).all() for t in TASKS)


def test_probe_record_finds_a_planted_latent_and_reports_every_feature_set():
    sae = _sae(8, n=16, k=16, arch="relu")
    W, S = 40, 8
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 10, size=(W, S))
    strings = {i: ("1" if i == 3 else "a") for i in range(10)}  # the `digit` task: token 3
    x = torch.randn(W * S, 8) * 0.1
    x[windows.reshape(-1) == 3] += 5 * sae.W_enc[5].detach()  # latent 5 reads the digit direction
    spec = {"activations": ["pre", "post"], "builtin_tasks": True, "iters": 25, "candidates": 4}
    rec = probe_record(sae, x, windows, strings, spec)
    assert set(rec["feature_sets"]) == {"pre", "post", "resid"}
    digit = rec["feature_sets"]["pre"]["tasks"]["digit"]
    assert digit["column"] == 5 and digit["loss"] < 0.05 < digit["baseline"]


# ---- ablation and geometry -------------------------------------------------------------------------

def test_add_at_positions_edits_one_position_per_row(lm):
    model, tok = lm
    windows = _windows(len(tok), W=2, S=10)
    clean = model(input_ids=windows).logits
    delta = torch.randn(2, model.config.n_embd)
    with add_at_positions(model, LAYER, torch.tensor([3, 6]), delta):
        patched = model(input_ids=windows).logits
    assert torch.equal(clean[0, :3], patched[0, :3]) and torch.equal(clean[1, :6], patched[1, :6])
    assert not torch.allclose(clean[0, 3], patched[0, 3]) and not torch.allclose(clean[1, 6], patched[1, 6])


def test_ablation_record_gives_sparsities_in_range_for_latents_and_channels(lm):
    model, tok = lm
    sae = _sae(model.config.n_embd)
    spec = {"horizon": 4, "pairs": 20, "batch": 8, "atol": 1e-6, "seed": 0}
    rec = ablation_record(model, LAYER, sae, _windows(len(tok)), spec)
    V = len(tok)
    for unit in ("latents", "channels"):
        assert rec[unit]["n_pairs"] == 20
        assert 1 / (V * 4) <= rec[unit]["mean"] <= 1
        assert sum(rec[unit]["histogram"]["counts"]) == 20 - rec[unit]["n_no_effect"]
    assert rec["horizon"] == 4 and rec["vocab"] == V


def test_geometry_record_counts_duplicated_directions_and_fits_the_frequency_curve():
    W_dec = torch.randn(256, 16)
    W_dec[1] = W_dec[0]
    counts = np.round(1e5 * np.arange(1, 257, dtype=float) ** -1.0)
    counts[-10:] = 0  # ten dead latents
    rec = geometry_record(W_dec, counts, 100_000, {"rank_range": None, "seed": 0})
    assert rec["nn"]["thresholds"]["0.97"]["count"] >= 2
    assert rec["frequency_fit"]["flagged"] and rec["frequency_fit"]["rank_range"][0] == 32
    assert rec["frequency_fit"]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert rec["nn_random"]["mean"] == pytest.approx(rec["nn_random"]["expected_mean"], abs=0.03)


# ---- interpret -------------------------------------------------------------------------------------

def test_act_fn_on_a_whole_prefix_reproduces_the_in_context_activation(lm):
    model, tok = lm
    sae = _sae(model.config.n_embd, n=16, k=4)
    windows = _windows(len(tok), W=3, S=12)
    with torch.no_grad():
        acts = sae.encode(normalize(_resid(model, windows).reshape(-1, model.config.n_embd))[0]).dense(16)
    acts = acts.reshape(3, 12, 16)
    w, p = torch.meshgrid(torch.arange(3), torch.arange(12), indexing="ij")
    w, p = w.reshape(-1), p.reshape(-1)
    latent = acts[w, p].argmax(-1)  # the strongest latent at every position
    got = make_act_fn(model, LAYER, sae, torch.device("cpu"))(windows[w], p + 1, latent)
    assert torch.allclose(got, acts[w, p, latent], atol=1e-4)


def _codes(W=30, S=10, n=6, seed=0) -> Codes:
    rng = np.random.default_rng(seed)
    dense = rng.random((W * S, n)) * (rng.random((W * S, n)) < 0.2)
    dense[:, 5] = 0  # a dead latent
    return Codes(rng.integers(0, 50, size=(W, S)), sp.csc_matrix(dense.astype(np.float32)))


def test_n2g_examples_take_the_top_half_and_keep_holdout_disjoint():
    """The released code's variant (interpret.sampling: top_and_random); the default is tested in test_n2g.py."""
    codes = _codes()
    build, holdout = n2g_examples(codes, 2, 8, 8, np.random.default_rng(0), sampling="top_and_random")
    key = {(int(np.flatnonzero((codes.windows == b[0]).all(1))[0]), b[1]) for b in build}
    assert not key & {(int(np.flatnonzero((codes.windows == h[0]).all(1))[0]), h[1]) for h in holdout}
    col = codes.acts[:, 2].toarray().ravel()
    top4 = np.sort(col)[::-1][:4]
    assert sorted(b[2] for b in build)[::-1][:4] == pytest.approx(top4.tolist())
    assert all(b[2] > 0 for b in build + holdout)


def test_latent_cards_hold_positive_top_examples_and_silent_negatives():
    codes = _codes()
    assert 5 not in sample_latents(codes.acts, 10, 0)
    card = latent_card(codes, 1, str, 4, (3, 1), np.random.default_rng(0))
    assert card["frequency"] == pytest.approx(codes.acts[:, 1].nnz / codes.windows.size)
    tops = [e["activation"] for e in card["top_examples"]]
    assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(card["max_activation"], abs=1e-4)
    for e in card["top_examples"]:
        assert e["acts"][e["center"]] == e["activation"] and len(e["tokens"]) == len(e["acts"]) <= 5
    assert all(max(e["acts"]) == 0 for e in card["negative_examples"])
    assert sum(card["histogram"]["counts"]) == codes.acts[:, 1].nnz
    wide = latent_card(codes, 1, str, 4, (30, 2), np.random.default_rng(0))  # context longer than a window
    assert all(len(e["tokens"]) <= codes.windows.shape[1] for e in wide["negative_examples"])


def test_logit_lens_ranks_the_tokens_a_direction_raises(lm):
    model, tok = lm
    W_U = model.get_output_embeddings().weight.detach()
    W_dec = torch.zeros(2, W_U.shape[1])
    W_dec[0], W_dec[1] = W_U[7], -W_U[7]
    lens = logit_lens(model, W_dec, np.array([0, 1]), lambda t: str(t))
    assert lens[0]["up"][0][0] == "7" and lens[1]["down"][0][0] == "7"


def test_explanation_reconstruction_with_exact_explanations_matches_the_sae(lm):
    """A latent that fires on token 5 by construction, explained by the pattern (5,): N2G-simulated codes
    equal the true ones, so their delta CE equals the SAE's own, and c = 1."""
    model, tok = lm
    d = model.config.n_embd
    sae = SparseAutoencoder(d, 2, "relu", 2).eval()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[0, 0] = 1.0
    windows = _windows(len(tok), W=6, S=12).numpy()
    acts = (windows.reshape(-1) == 5).astype(np.float32) * 2.0
    train = Codes(windows, sp.csc_matrix(np.stack([acts, np.zeros_like(acts)], 1)))
    expl = {0: Explanation([Pattern((5,), False, 2.0)])}

    def true_codes(x_norm, tokens):
        return (tokens.reshape(-1, 1) == 5).float() * torch.tensor([[2.0, 0.0]]) @ sae.W_dec + sae.b_pre

    out = explanation_reconstruction(model, LAYER, sae, expl, train, windows, 3, torch.device("cpu"))
    ref = downstream_metrics(model, LAYER, sae, windows, 3, torch.device("cpu"), reconstruct=true_codes)
    assert out["n2g"]["delta_ce"] == pytest.approx(ref["delta_ce"], abs=1e-5)
    assert out["bigram"]["delta_ce"] == pytest.approx(ref["delta_ce"], abs=1e-5)  # a unigram trigger is a bigram too
    assert out["latents_explained"] == 1


def test_pad_token_is_the_configured_single_token_or_a_fallback(lm):
    from saescale.interpret.stage import pad_token_id

    _, tok = lm
    auto = pad_token_id(tok, None)
    assert len(tok.decode([auto])) >= 1
    assert pad_token_id(tok, tok.decode([auto])) == auto
    with pytest.raises(ValueError, match="config.interpret.pad_token"):
        pad_token_id(tok, "a long string of many tokens")


def test_user_task_from_a_json_dataset_is_probed_per_text(lm, tmp_path):
    import json

    from saescale.evaluate.probes import load_user_task, text_resids

    model, tok = lm
    rows = [{"text": f"def f{i}(x): return x" if i % 2 else f"The fox {i} jumps.", "label": "code" if i % 2 else "prose"}
            for i in range(40)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = {"task": "is_code", "path": "json", "name": None, "data_files": str(path), "split": "train",
          "text_field": "text", "label_field": "label", "positive": "code", "pool": "mean", "max_examples": 30}
    ids, labels = load_user_task(ds, tok, ctx_len=16)
    assert len(ids) == 30 and set(labels) == {0.0, 1.0} and max(len(t) for t in ids) <= 16
    texts = [tok.decode(t) for t in ids]
    assert all((lab == 1.0) == text.startswith("def") for text, lab in zip(texts, labels))
    sae = _sae(model.config.n_embd)
    spec = {"activations": ["pre"], "builtin_tasks": False, "iters": 25, "candidates": None}
    resid = text_resids(model, LAYER, ids, torch.device("cpu"))
    rec = probe_record(sae, torch.zeros(0, model.config.n_embd), np.zeros((0, 4), int), {}, spec,
                       {"is_code": (resid, labels, "mean")})
    assert rec["user_tasks"] == ["is_code"] and set(rec["feature_sets"]) == {"pre", "resid"}
    assert rec["feature_sets"]["resid"]["tasks"]["is_code"]["loss"] < 0.3  # code vs prose is easy from the residual
    with pytest.raises(ValueError, match="label_field"):
        load_user_task({**ds, "label_field": "nope"}, tok, 16)


def test_codes_reach_the_host_as_exactly_their_nonzeros():
    """encode_split keeps a code as CSR built where it lives: for a TopK code from its (index, value) pairs,
    dropping selected latents whose ReLU is 0; for a dense code from its nonzeros; both equal the dense matrix."""
    from saescale.interpret.examples import _sparse_rows
    from saescale.sae.activations import Latents

    gen = torch.Generator().manual_seed(0)
    n, k = 64, 5
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(7)])
    values = torch.rand(7, k, generator=gen) + 0.1
    values[:, 0] = 0.0
    sparse = Latents(values, indices)
    dense = sparse.dense(n)
    for code in (sparse, Latents(dense)):
        got = _sparse_rows(code, n)
        assert got.shape == (7, n) and got.nnz == 7 * (k - 1)
        assert np.array_equal(got.toarray(), dense.numpy())
    assert (_sparse_rows(sparse, n) != sp.csr_matrix(dense.numpy())).nnz == 0
