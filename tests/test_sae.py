"""The TopK SAE's math (method §A.3-A.6), checked on small hand-made cases."""

import torch

from saescale.sae.activations import topk
from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import TrainSpec, auxk_latents, training_step, update_dead
from saescale.sae.losses import auxk_loss, normalized_mse
import contextlib


def make_sae(d=16, n=64, k=4):
    sae = SparseAutoencoder(d, n, "topk", k)
    sae.init_from_data_(torch.zeros(d))
    return sae


def spec(**kw):
    base = dict(arch="topk", n=64, k=4, d_model=16, lr=1e-2, batch_size=32, tokens=320, adam_eps=6.25e-10,
                adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=8, dead_tokens=64, ema_decay=0.9, log_every=1,
                checkpoint_seconds=0, seed=0, device="cpu")
    base.update(kw)
    return TrainSpec(**base)


def test_topk_keeps_exactly_k_latents():
    pre = torch.randn(50, 200) + 5.0  # all positive: ReLU after TopK removes nothing
    lat = topk(pre, 7)
    dense = lat.dense(200)
    assert ((dense != 0).sum(dim=1) == 7).all()
    # the kept ones are the 7 largest of each row
    assert torch.equal(dense.topk(7, dim=1).values.sort(dim=1).values, pre.topk(7, dim=1).values.sort(dim=1).values)


def test_topk_relu_drops_negative_selections():
    pre = torch.tensor([[3.0, -1.0, -2.0, -4.0]])
    lat = topk(pre, 2)
    assert (lat.dense(4) > 0).sum() == 1  # L0 <= k: the second selected value is negative


def test_decode_matches_dense_matmul():
    sae = make_sae()
    x = torch.randn(10, 16)
    lat = sae.encode(x)
    expected = lat.dense(64) @ sae.W_dec + sae.b_pre
    assert torch.allclose(sae.decode(lat), expected, atol=1e-5)


def test_init_decoder_unit_norm_and_reconstruction_norm_matches_input():
    sae = make_sae(d=32, n=256, k=8)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
    u = torch.randn(512, 32)
    u = u / u.norm(dim=1, keepdim=True)
    r = (sae(u)[0] - sae.b_pre).norm(dim=1).mean()
    assert abs(float(r) - 1.0) < 0.1  # method §A.4: encoder rescaled so ||x_hat - b_pre|| ~ ||u||


def test_decoder_columns_stay_unit_norm_after_a_step():
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    x = torch.randn(32, 16)
    training_step(sae, opt, x, 1.0, torch.zeros(64, dtype=torch.bool), spec(lr=0.1), contextlib.nullcontext())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_projected_gradient_is_orthogonal_to_each_decoder_row():
    sae = make_sae()
    x = torch.randn(32, 16)
    normalized_mse(sae(x)[0], x, 1.0).backward()
    assert sae.W_dec.grad.abs().max() > 0
    before = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max()
    sae.project_decoder_grad_()
    after = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max()
    assert before > 1e-4 and after < 1e-6


def test_auxk_selects_only_dead_latents():
    """Fixed shapes (no host sync): k_aux slots always; beyond the dead latents they hold zeros."""
    pre = torch.randn(20, 10) + 1.0
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 5, 7]] = True
    lat = auxk_latents(pre, dead, 2)
    assert set(lat.indices.unique().tolist()) <= {2, 5, 7}
    ref = torch.relu(pre[:, [2, 5, 7]].topk(2, dim=1).values)
    assert torch.equal(lat.values.sort(1).values, ref.sort(1).values)
    wide = auxk_latents(pre, dead, 5)  # more slots than dead latents: the others are zero
    assert ((wide.values > 0) <= dead[wide.indices]).all() and int((wide.values > 0).sum(1).max()) <= 3
    assert auxk_latents(pre, torch.zeros(10, dtype=torch.bool), 2).values.abs().max() == 0


def test_auxk_only_trains_dead_latents():
    sae = make_sae()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    pre = sae.pre_acts(x)
    x_hat = sae.decode(topk(pre, sae.k))
    aux = auxk_loss(sae.decode_residual(auxk_latents(pre, dead, 8)), x - x_hat.detach())
    aux.backward()
    assert sae.W_dec.grad[:10].abs().sum() > 0 and sae.W_enc.grad[:10].abs().sum() > 0
    assert sae.W_dec.grad[10:].abs().max() == 0 and sae.W_enc.grad[10:].abs().max() == 0
    assert sae.b_enc.grad[10:].abs().max() == 0


def test_dead_counter_resets_on_firing():
    counter = torch.zeros(6, dtype=torch.long)
    lat = topk(torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0]] * 3), 2)
    update_dead(counter, lat)
    assert counter.tolist() == [0, 0, 3, 3, 3, 3]


def test_save_and_load_roundtrip(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "saescale_sae.safetensors")
    import json
    (tmp_path / "saescale_sae.json").write_text(json.dumps(sae.config()))
    loaded = SparseAutoencoder.load(tmp_path / "saescale_sae.safetensors")
    x = torch.randn(5, 16)
    assert torch.equal(sae(x)[0], loaded(x)[0])
