"""Synthetic superposition with ground truth: the generator follows its law, the matcher counts what it
should, a pipeline SAE recovers an easy dictionary, and the study is validated, JSON-ready and drawable."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from saescale.report.groundtruth_figures import discovered_vs_latents, manifold_latents
from saescale.sae.archs import ARCHS
from saescale.toy.superposition import (
    DEFAULT_SETTINGS,
    SyntheticSpec,
    build_dictionary,
    frequency_rank_of_found,
    generate,
    groundtruth_study,
    iter_chunks,
    match_features,
    sample_chunk,
    train_synthetic_sae,
    validate_settings,
    zipf_frequencies,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # toy-sized matmuls: a second torch thread on busy cores is many times slower, not faster
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(with_threads)


def draw(spec: SyntheticSpec, rows: int, seed: int = 0):
    dic = build_dictionary(spec)
    x, code = sample_chunk(dic, rows, np.random.default_rng(seed))
    return dic, x, code


# ---- the generator -------------------------------------------------------------------------------------


def test_frequencies_are_zipfian_and_sum_to_the_mean_l0():
    p = zipf_frequencies(512, 0.5, 1.0)
    assert p.sum() == pytest.approx(1.0)
    assert np.allclose(p[1:] / p[:-1], (np.arange(2, 513) / np.arange(1, 512)) ** -1.5)


def test_frequencies_clip_at_one_and_still_sum_to_the_mean_l0():
    p = zipf_frequencies(64, 0.5, 6.0)  # unclipped, p_1 would be 6 / 2.4 > 1
    assert p.max() == 1.0 and (p <= 1.0).all()
    assert p.sum() == pytest.approx(6.0)
    assert np.array_equal(zipf_frequencies(8, 1.0, 8.0), np.ones(8))


def test_empirical_rank_frequency_slope_is_minus_one_plus_alpha():
    spec = SyntheticSpec(d=16, m=256, alpha=0.5, mean_active=1.0)
    rows = 1 << 18
    dic, _, code = draw(spec, rows)
    freq = np.bincount(code.feature, minlength=spec.m) / rows
    resolvable = dic.p * rows >= 200  # ranks seen often enough for a relative error under ~7%
    rank = np.arange(1, spec.m + 1)[resolvable]
    slope = np.polyfit(np.log(rank), np.log(freq[resolvable]), 1)[0]
    assert resolvable.sum() >= 30
    assert slope == pytest.approx(-1.5, abs=0.05)
    assert np.allclose(freq[:5], dic.p[:5], rtol=0.03)


def test_mean_active_count_matches_the_spec():
    spec = SyntheticSpec(d=16, m=128, alpha=0.3, mean_active=3.0)
    rows = 1 << 16
    _, _, code = draw(spec, rows)
    assert len(code.feature) / rows == pytest.approx(3.0, rel=0.02)
    pairs = code.row * spec.m + code.feature
    assert len(np.unique(pairs)) == len(pairs)  # a feature is active at most once per row


def test_discrete_rows_are_the_sum_of_their_atoms_times_magnitudes():
    spec = SyntheticSpec(d=12, m=40, alpha=0.5, mean_active=2.0)
    dic, x, code = draw(spec, 2048)
    expected = np.zeros_like(x, dtype=np.float64)
    np.add.at(expected, code.row, code.magnitude[:, None] * dic.atoms[code.feature])
    assert np.allclose(x, expected, atol=1e-5)
    assert ((code.magnitude >= 0.5) & (code.magnitude <= 1.5)).all()


def test_manifold_features_lie_exactly_in_their_subspace_on_the_unit_sphere():
    spec = SyntheticSpec(d=16, m=64, alpha=0.5, mean_active=1.5, manifold_ranks=(1, 3), manifold_dim=3,
                         magnitude="constant")
    dic, x, code = draw(spec, 4096)
    for basis in dic.subspaces.values():
        assert basis.shape == (16, 3)
        assert np.allclose(basis.T @ basis, np.eye(3), atol=1e-10)  # orthonormal
        assert np.allclose(basis.sum(axis=0), 0, atol=1e-10)  # centred: normalization keeps the subspace
    discrete = ~dic.is_manifold[code.feature]
    residual = x.astype(np.float64)
    np.subtract.at(residual, code.row[discrete], code.magnitude[discrete, None] * dic.atoms[code.feature[discrete]])
    active = {i: set(code.row[code.feature == i]) for i in dic.subspaces}
    only_first = np.array(sorted(active[0] - active[2]))
    assert len(only_first) > 100
    basis = dic.subspaces[0]
    coords = residual[only_first] @ basis  # f_1 in the subspace's coordinates
    assert np.allclose(np.linalg.norm(coords, axis=1), 1.0, atol=1e-5)  # on S^2, magnitude 1
    assert np.allclose(residual[only_first], coords @ basis.T, atol=1e-5)  # nothing outside span(S_1)
    neither = np.setdiff1d(np.arange(len(x)), np.array(sorted(active[0] | active[2])))
    assert np.allclose(residual[neither], 0, atol=1e-5)


def test_rows_are_centred_so_normalization_only_rescales_them():
    spec = SyntheticSpec(d=16, m=64, manifold_ranks=(1,), manifold_dim=4)
    x = generate(build_dictionary(spec), 1000)
    assert np.allclose(x.mean(axis=1), 0, atol=1e-6)


def test_generation_is_deterministic_under_a_seed():
    spec = SyntheticSpec(d=8, m=32, manifold_ranks=(2,), manifold_dim=2, magnitude="exponential", seed=3)
    a = generate(build_dictionary(spec), 3000, chunk_rows=1024)
    b = generate(build_dictionary(spec), 3000, chunk_rows=1024)
    assert a.dtype == np.float32 and a.shape == (3000, 8)
    assert np.array_equal(a, b)
    other_seed = generate(build_dictionary(dataclasses.replace(spec, seed=4)), 3000, chunk_rows=1024)
    held_out = generate(build_dictionary(spec), 3000, stream=1, chunk_rows=1024)
    assert not np.allclose(a, other_seed) and not np.allclose(a, held_out)
    chunks = [x for x, _ in iter_chunks(build_dictionary(spec), 3000, chunk_rows=1024)]
    assert [len(c) for c in chunks] == [1024, 1024, 952]


@pytest.mark.parametrize("kwargs, key", [({"m": 4, "mean_active": 5.0}, "mean_active"),
                                         ({"manifold_ranks": (0,)}, "manifold_ranks"),
                                         ({"manifold_ranks": (1,), "manifold_dim": 1}, "manifold_dim"),
                                         ({"magnitude": "gamma"}, "magnitude")])
def test_spec_rejects_impossible_values_naming_the_field(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SyntheticSpec(**kwargs)


# ---- the matcher ---------------------------------------------------------------------------------------


def test_the_dictionary_itself_finds_every_feature():
    dic = build_dictionary(SyntheticSpec(d=32, m=256))
    match = match_features(dic.atoms * 3.0, dic)  # scale is irrelevant: rows are unit-normalized
    assert match.discovered == 256 and match.unmatched_latents == 0
    assert np.allclose(match.best_score, 1.0)
    assert frequency_rank_of_found(match, 256) == {"rarest_found_rank": 256, "median_found_rank": 128.5,
                                                   "top_n_found_fraction": 1.0}


def test_random_directions_find_almost_nothing():
    dic = build_dictionary(SyntheticSpec(d=32, m=256))
    match = match_features(np.random.default_rng(0).normal(size=(512, 32)), dic)
    assert match.discovered <= 1
    assert match.unmatched_latents >= 510
    assert frequency_rank_of_found(match_features(np.zeros((0, 32)), dic), 0)["rarest_found_rank"] is None


def test_anti_parallel_directions_do_not_count():
    dic = build_dictionary(SyntheticSpec(d=16, m=20))
    assert match_features(-dic.atoms, dic).discovered == 0


def test_latents_in_a_manifold_subspace_are_counted_for_it():
    dic = build_dictionary(SyntheticSpec(d=32, m=64, manifold_ranks=(1,), manifold_dim=3))
    basis = dic.subspaces[0]
    rng = np.random.default_rng(1)
    tiles = rng.normal(size=(5, 3)) @ basis.T  # 5 latents tiling the manifold
    outside = rng.normal(size=32)
    outside -= basis @ (basis.T @ outside)
    outside /= np.linalg.norm(outside)
    inside = basis[:, 0]
    tilted = 0.8 * inside + 0.6 * outside  # projection norm 0.8 < 0.9: not in the subspace
    planted = np.vstack([tiles, dic.atoms[[1, 2, 9]], tilted, rng.normal(size=(2, 32))])
    match = match_features(planted, dic)
    assert match.latents_on_manifolds == 5
    assert match.latents_per_feature[0] == 5
    assert match.found[[0, 1, 2, 9]].all()
    assert match.discovered == 4 and match.discrete_found == 3
    assert match.unmatched_latents == 3
    assert match.best_score[0] == pytest.approx(1.0)
    # the threshold is the caller's: at 0.75 the tilted latent lies in the subspace too
    assert match_features(planted, dic, threshold=0.75).latents_on_manifolds == 6


# ---- an SAE of the pipeline on generated rows -----------------------------------------------------------


def test_a_topk_sae_finds_most_features_of_an_easy_dictionary():
    # 16 equally frequent features in d = 32, n = 4m latents: 6 dictionaries x 2 training seeds found >= 15
    dic = build_dictionary(SyntheticSpec(d=32, m=16, alpha=0.0, mean_active=1.0, seed=1))
    train, held_out = generate(dic, 1 << 15), generate(dic, 4096, stream=1)
    run = train_synthetic_sae(train, held_out, n=64, k=3, tokens=1 << 16, batch=256, lr=1e-2)
    match = match_features(run.sae.W_dec.detach().numpy(), dic)
    assert match.discovered >= 0.8 * dic.m, f"found {match.discovered}/16; best cosines {np.sort(match.best_score)}"
    assert run.fvu < 0.05
    assert run.summary["steps"] == 256


def test_an_untrained_sae_does_not_pass_the_recovery_check():
    dic = build_dictionary(SyntheticSpec(d=32, m=16, alpha=0.0, mean_active=1.0, seed=1))
    train, held_out = generate(dic, 4096), generate(dic, 1024, stream=1)
    run = train_synthetic_sae(train, held_out, n=64, k=3, tokens=256, batch=256, lr=1e-2)
    assert match_features(run.sae.W_dec.detach().numpy(), dic).discovered < 0.5 * dic.m


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_of_the_pipeline_trains_on_generated_rows(arch):
    dic = build_dictionary(SyntheticSpec(d=8, m=12, alpha=0.0, mean_active=1.0))
    run = train_synthetic_sae(generate(dic, 2048), generate(dic, 256, stream=1), n=16, k=2, arch=arch,
                              tokens=1024, batch=128)
    assert run.sae.arch == arch and run.sae.W_dec.shape == (16, 8)
    assert np.isfinite(run.fvu) and run.summary["steps"] == 8


def test_an_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        train_synthetic_sae(np.zeros((8, 4), np.float32), np.zeros((8, 4), np.float32), n=4, k=1, arch="nope")


# ---- the study ------------------------------------------------------------------------------------------

TINY = {"d": 8, "m": 24, "alpha": 0.5, "mean_active": 1.0, "manifold_ranks": [1], "manifold_dim": 2,
        "n": [8, 16], "k": 2, "tokens": 2048, "batch": 256, "rows": 2048, "eval_rows": 256}


def test_the_study_is_json_ready_with_one_row_per_dictionary_and_n():
    torch.set_num_threads(2)
    study = groundtruth_study(TINY)
    assert torch.get_num_threads() == 2  # the study's one thread is restored afterwards
    json.dumps(study, allow_nan=False)
    assert [d["name"] for d in study["dictionaries"]] == ["discrete", "manifolds"]
    discrete, manifolds = study["dictionaries"]
    assert [r["n"] for r in discrete["runs"]] == [8, 16]
    assert manifolds["manifold_ranks"] == [1] and discrete["manifold_ranks"] == []
    for r in discrete["runs"]:
        assert r["latents_on_manifolds"] == 0 and r["D_pred"] == r["D_pred_given_manifolds"] == r["n"]
        assert 0 <= r["D"] <= r["n"] and r["arch"] == "topk" and r["k"] == 2
    for r in manifolds["runs"]:
        assert len(r["latents_per_manifold"]) == 1
        assert r["D_pred_given_manifolds"] <= r["n"]


@pytest.mark.parametrize("override, key", [
    ({"k": 0}, "config.toy.groundtruth.k"),
    ({"n": [1, 16]}, r"config.toy.groundtruth.n\[0\]"),
    ({"n": []}, "config.toy.groundtruth.n"),
    ({"manifold_ranks": [1, 99]}, r"config.toy.groundtruth.manifold_ranks\[1\]"),
    ({"manifold_ranks": []}, "config.toy.groundtruth.manifold_ranks"),
    ({"manifold_dim": 8}, "config.toy.groundtruth.manifold_dim"),
    ({"arch": "lstm"}, "config.toy.groundtruth.arch"),
    ({"threshold": 1.5}, "config.toy.groundtruth.threshold"),
    ({"mean_active": 0}, "config.toy.groundtruth.mean_active"),
    ({"tokens": 100}, "config.toy.groundtruth.batch"),
    ({"lr": "fast"}, "config.toy.groundtruth.lr"),
    ({"d": True}, "config.toy.groundtruth.d"),
    ({"widht": 3}, "config.toy.groundtruth.widht"),
])
def test_settings_validation_names_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        validate_settings({**TINY, **override})


def test_default_settings_are_valid():
    s = validate_settings(None)
    assert s == {**DEFAULT_SETTINGS, "n": sorted(DEFAULT_SETTINGS["n"])}


# ---- figures --------------------------------------------------------------------------------------------

FAKE = {"m": 64, "threshold": 0.9, "dictionaries": [
    {"name": "discrete", "manifold_ranks": [], "manifold_dim": None,
     "runs": [{"n": 8, "D": 6, "D_pred_given_manifolds": 8, "latents_on_manifolds": 0, "latents_per_manifold": []},
              {"n": 16, "D": 12, "D_pred_given_manifolds": 16, "latents_on_manifolds": 0,
               "latents_per_manifold": []}]},
    {"name": "manifolds", "manifold_ranks": [1, 2], "manifold_dim": 3,
     "runs": [{"n": 8, "D": 3, "D_pred_given_manifolds": 5, "latents_on_manifolds": 4, "latents_per_manifold": [3, 1]},
              {"n": 16, "D": 7, "D_pred_given_manifolds": 10, "latents_on_manifolds": 7,
               "latents_per_manifold": [4, 3]}]}]}


@pytest.mark.parametrize("figure", [discovered_vs_latents, manifold_latents])
def test_figures_draw_a_study_and_return_none_for_an_empty_one(figure):
    png = figure(FAKE)
    assert isinstance(png, str) and len(png) > 1000
    assert figure({}) is None and figure(None) is None and figure({"dictionaries": []}) is None
    no_values = {"dictionaries": [{"name": "manifolds", "manifold_ranks": [1],
                                   "runs": [{"n": 8, "D": None, "latents_on_manifolds": None}]}]}
    assert figure(no_values) is None


def test_manifold_figure_needs_a_dictionary_with_manifolds():
    assert manifold_latents({"dictionaries": FAKE["dictionaries"][:1]}) is None
