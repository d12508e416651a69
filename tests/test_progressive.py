"""Progressive recovery (method §C.8) on hand-made and trained SAEs, and the analysis glue."""

import numpy as np
import torch

from saescale.evaluate.analyses import progressive, refinement
from saescale.evaluate.progressive import k_grid, progressive_curves, threshold_grid
from saescale.sae.model import SparseAutoencoder


def make(arch="topk", d=16, n=64, k=4):
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, n, arch, k)
    sae.init_from_data_(torch.zeros(d))
    return sae.eval()


def test_k_grid_rounds_clips_and_dedupes():
    assert k_grid(8, [0.125, 0.25, 1, 8, 100], 100) == [1, 2, 8, 64, 100]
    assert k_grid(3, [0.1, 0.2], 10) == [1]


def test_thresholds_hit_their_target_l0():
    scores = torch.randn(4000, 50)
    theta = threshold_grid(scores, np.array([1.0, 5.0, 20.0]))
    l0 = [(scores > t).sum(dim=1).float().mean().item() for t in theta]
    assert np.allclose(l0, [1, 5, 20], rtol=0.05)


def test_topk_curve_at_the_training_k_is_the_trained_sae_and_more_latents_help_a_dense_code():
    sae = make()
    x = torch.randn(512, 16)
    x = x / x.norm(dim=1, keepdim=True)
    out = progressive_curves(sae, x, [1, 4, 16, 64], np.array([0.0, 0.1]), x.mean(0))
    at_k = next(p for p in out["curves"]["topk"] if p["k"] == 4)
    assert np.isclose(at_k["fvu"], out["trained"]["fvu"]) and np.isclose(at_k["l0"], out["trained"]["l0"])
    ks = [p["k"] for p in out["curves"]["topk"]]
    assert ks == [1, 4, 16, 64]
    # JumpReLU at theta = 0 keeps every positive score: the same code as TopK(n)
    all_pos = out["curves"]["jumprelu"][0]
    assert np.isclose(all_pos["fvu"], out["curves"]["topk"][-1]["fvu"], rtol=1e-5)
    # FVU against the rows' own mean: a perfect reconstruction would be 0, the mean predictor 1
    assert all(p["fvu"] >= 0 for p in out["curves"]["topk"])


def test_progressive_and_refinement_glue_produce_json_ready_results():
    sae = make("relu", n=32, k=4)
    x = torch.randn(600, 16)
    x = x / x.norm(dim=1, keepdim=True)
    prog = progressive(sae, x, {"k_factors": [0.5, 1, 2], "thresholds": 4})
    assert len(prog["curves"]["topk"]) == 3 and len(prog["curves"]["jumprelu"]) == 4
    ref = refinement(sae, x, {"iters": 100})
    # refinement can only lower the error on the same support
    assert ref["fvu_after"] <= ref["fvu_before"] + 1e-6
    assert sum(ref["log2_ratio_hist"]["counts"]) > 0 and 0 <= ref["fraction_zeroed"] <= 1


def test_eval_sample_spreads_over_the_split_and_uses_the_whole_split_mean(tmp_path):
    import zarr

    from saescale.evaluate.analyses import eval_sample
    from saescale.normalize import normalize

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1000, 8)).astype(np.float32)
    rows[700:] += 3.0 * np.arange(8)  # the split's last rows differ: a prefix sample would miss them
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    root.create_array("L0/x", data=rows, chunks=(64, 8))
    root.attrs.update(n_train=200, n_eval=800)
    x, mean = eval_sample(root, 0, 100)
    full = normalize(torch.from_numpy(rows[200:]))[0]
    assert x.shape == (100, 8) and torch.allclose(mean, full.mean(0), atol=1e-5)
    assert torch.allclose(x, full[::8][:100])  # every 8th row of the eval split, across chunk boundaries
