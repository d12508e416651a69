"""The training step on the GPU path (issue 18): no host sync, AuxK folded into the main sparse pass,
microbatching that bounds memory and changes nothing but float summation order."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saescale.normalize import layer_stats
from saescale.sae.activations import SelectedPreActs, Selection
from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import Trainer, TrainSpec, training_step
from saescale.store import InMemoryBatches

from test_ground_truth import synthetic

aten = torch.ops.aten
# ops that read a device value on the host, or whose output shape depends on the data (both sync a GPU)
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.unique_dim.default, aten._unique2.default, aten.unique_consecutive.default,
           aten.repeat_interleave.Tensor, aten.bincount.default, aten.item.default, aten.is_nonzero.default}


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or func.overloadpacket in {aten.nonzero, aten.masked_select, aten._local_scalar_dense}:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def setup(arch="topk", batch=256, **overrides):
    _, x = synthetic(rows=4096)
    stats = layer_stats([x], len(x))
    spec = TrainSpec(arch=arch, n=64, k=3, d_model=32, lr=3e-3, batch_size=batch, tokens=8 * batch,
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=batch,
                     ema_decay=0.9, log_every=1000, checkpoint_seconds=0, seed=0, device="cpu")
    sel = x[:512] / np.linalg.norm(x[:512], axis=1, keepdims=True)
    return x, stats, dataclasses.replace(spec, **overrides), sel


def trainer(stats, spec, sel, tmp_path, name="ck.pt"):
    """A Trainer whose first 16 latents never win a top-k (their encoder bias is far below), so they die
    after one batch and AuxK has work."""
    t = Trainer(np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, tmp_path / name, sel)
    with torch.no_grad():
        t.sae.b_enc[:16] -= 3.0
    return t


@pytest.mark.parametrize("arch", ["topk", "multitopk", "batchtopk"])
def test_a_training_step_reads_nothing_back_from_the_device(arch, tmp_path):
    """Every step but the logging one runs without an op that syncs a GPU, once latents are dead (AuxK on)
    as before; a mutant that reads the dead count is caught."""
    x, stats, spec, sel = setup(arch)
    t = trainer(stats, spec, sel, tmp_path)
    batches = InMemoryBatches(x, spec.batch_size, 0).batches(0)
    t.train_step(torch.from_numpy(next(batches)))  # counters start at 0: AuxK is skipped on the host's word
    for _ in range(t.steps - 2):
        with RecordSyncs() as rec:
            t.train_step(torch.from_numpy(next(batches)))
        assert rec.seen == [], rec.seen
    assert t.step >= t.dead_possible_at and bool((t.tokens_since_fired >= spec.dead_tokens).any())
    with RecordSyncs() as rec:  # the mutant: today's dead.nonzero()
        (t.tokens_since_fired >= spec.dead_tokens).nonzero()
    assert rec.seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_passes_sync_debug_mode_error(tmp_path):
    x, stats, spec, sel = setup(device="cuda")
    t = trainer(stats, spec, sel, tmp_path)
    batches = InMemoryBatches(x, spec.batch_size, 0).batches(0)
    rows = [torch.from_numpy(next(batches)).cuda() for _ in range(4)]
    for xb in rows[:2]:
        t.train_step(xb)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for xb in rows[2:]:
            t.train_step(xb)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("arch", ["topk", "multitopk"])
def test_microbatched_training_equals_whole_batch_training(arch, tmp_path):
    """train.microbatch splits the encoder and the selection over row blocks; dead-latent tracking, the AuxK
    normalization and the losses stay per full batch, so the weights after several steps (AuxK active) match
    the whole-batch run to float summation order."""
    x, stats, spec, sel = setup(arch)
    runs = []
    for micro in (None, 96):  # 96 does not divide 256: uneven blocks are weighted by their rows
        t = trainer(stats, dataclasses.replace(spec, microbatch=micro), sel, tmp_path, f"{micro}.pt")
        batches = InMemoryBatches(x, spec.batch_size, 0).batches(0)
        for _ in range(t.steps):
            t.train_step(torch.from_numpy(next(batches)))
        runs.append(t)
    whole, micro = runs
    assert bool((whole.tokens_since_fired >= spec.dead_tokens).any())  # AuxK had dead latents to train
    assert torch.equal(whole.tokens_since_fired, micro.tokens_since_fired)
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(micro.sae.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert whole.rows[-1]["auxk_loss"] == pytest.approx(micro.rows[-1]["auxk_loss"], rel=1e-4)
    assert whole.rows[-1]["auxk_loss"] > 0


def test_microbatch_is_refused_for_an_arch_with_a_dense_backward(tmp_path):
    _, stats, spec, sel = setup("relu", microbatch=64)
    with pytest.raises(ValueError, match="train.microbatch: 64 .* relu"):
        trainer(stats, spec, sel, tmp_path)


def test_auxk_with_no_dead_latent_changes_nothing():
    """Sync-free AuxK runs over whatever `dead` holds; with no latent dead its loss and gradients are zero, so
    the step equals one that skipped it."""
    x, stats, spec, _ = setup()
    xb = torch.from_numpy(x[:256] / np.linalg.norm(x[:256], axis=1, keepdims=True))
    out = []
    for auxk in (True, False):
        torch.manual_seed(0)
        sae = SparseAutoencoder(32, 64, "topk", 3)
        sae.init_from_data_(torch.zeros(32))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        metrics, _ = training_step(sae, opt, xb, 1.0, torch.zeros(64, dtype=torch.bool), spec,
                                   torch.autocast("cpu", enabled=False), auxk=auxk)
        out.append((metrics, sae.state_dict()))
    assert float(out[0][0]["auxk_loss"]) == 0.0 and float(out[0][0]["loss"]) == float(out[1][0]["loss"])
    for name, value in out[1][1].items():
        assert torch.equal(out[0][1][name], value), name


def test_selected_pre_acts_gradients_equal_autograd_with_the_b_pre_gradient_reduced_first():
    """d/d b_pre = -(sum over the batch of the scattered gradient) @ W_enc (Gao et al. 2024's kernels), in float64
    against autograd through the dense pre-activations, with repeated latents in a row."""
    gen = torch.Generator().manual_seed(1)
    batch, n, m, d = 29, 13, 6, 5
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    b_pre = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, n, (batch, m), generator=gen)
    idx[0] = 4
    g = torch.randn(batch, m, generator=gen, dtype=torch.float64)
    dense = ((x - b_pre) @ w.T + b).gather(1, idx)
    ref = torch.autograd.grad((dense * g).sum(), (b_pre, w, b))
    sel = Selection(idx, n, (2,))
    got = SelectedPreActs.apply(dense.detach(), x, b_pre, w, b, sel)
    torch.testing.assert_close(got, dense.detach())
    for a, r in zip(torch.autograd.grad((got * g).sum(), (b_pre, w, b)), ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def dead_now(stats, spec, sel, tmp_path, name):
    """A Trainer whose first 16 latents have gone dead_tokens without firing (their pre-activations are as
    trained, so AuxK has positive values to work with), with its bound on AuxK's slots read again."""
    t = Trainer(np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, tmp_path / name, sel)
    t.tokens_since_fired[:16] = spec.dead_tokens
    t._bound_dead()
    return t


def test_auxk_selects_only_as_many_slots_as_latents_can_be_dead_and_trains_the_same(tmp_path):
    """The trainer bounds AuxK's slots by the latents that can be dead before it next reads the counters
    (log steps): few dead latents, few slots gathered. The selected latents are the same as with all k_aux
    slots, so the weights agree with a run that always takes k_aux (float summation order aside)."""
    x, stats, spec, sel = setup(dead_tokens=4 * 256, log_every=1, k_aux=32)
    fresh = Trainer(np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, tmp_path / "c.pt", sel)
    assert fresh.aux_slots == 0 and fresh.dead_possible_at == 4  # nothing can die in the first 3 steps
    bounded, full = dead_now(stats, spec, sel, tmp_path, "a.pt"), dead_now(stats, spec, sel, tmp_path, "b.pt")
    assert bounded.aux_slots == 16 and bounded.dead_possible_at == 0
    stream = InMemoryBatches(x, spec.batch_size, 0).batches(0)
    seen = []
    for _ in range(4):
        xb = torch.from_numpy(next(stream))
        bounded.train_step(xb)
        seen.append(bounded.aux_slots)
        full.aux_slots = spec.k_aux  # as before the bound: every slot, every step
        full.train_step(xb)
    possible = int((bounded.tokens_since_fired >= spec.dead_tokens - spec.log_every * spec.batch_size).sum())
    assert seen[-1] == min(spec.k_aux, possible) and max(seen) < spec.k_aux
    assert max(float(row["auxk_loss"]) for row in bounded.rows) > 0  # AuxK did work
    for a, b in zip(bounded.sae.parameters(), full.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_bound_too_small_would_change_the_result(tmp_path):
    """The check above can fail: with fewer slots than dead latents AuxK trains other weights."""
    x, stats, spec, sel = setup(dead_tokens=4 * 256, log_every=1, k_aux=32)
    a, b = dead_now(stats, spec, sel, tmp_path, "a.pt"), dead_now(stats, spec, sel, tmp_path, "b.pt")
    stream = InMemoryBatches(x, spec.batch_size, 0).batches(0)
    for _ in range(4):
        xb = torch.from_numpy(next(stream))
        a.train_step(xb)
        b.aux_slots = 4  # fewer than the 16 dead latents
        b.train_step(xb)
    assert not torch.allclose(a.sae.W_dec, b.sae.W_dec, rtol=1e-5, atol=1e-6)


# ---- bf16 row gathers (train.precision: bf16) ----------------------------------------------------------

def grads_of_a_step(sae, x, dead, autocast, k_aux=16):
    """Every parameter's gradient of the training loss (main MSE + AuxK), as training_step builds it."""
    from saescale.sae.losses import auxk_loss, normalized_mse

    with autocast:
        out = sae.family.forward_train_auxk(sae, x, lambda x_hat: normalized_mse(x_hat, x, 1.0), dead, k_aux)
        main = normalized_mse(out.x_hat, x, 1.0)
        loss = main + auxk_loss(out.aux_x_hat, x - out.x_hat.detach()) / 32
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]
    return dict(zip(["W_enc", "b_enc", "W_dec", "b_pre"], torch.autograd.grad(loss, params))), out


@pytest.mark.parametrize("arch", ["topk", "multitopk"])
def test_bf16_steps_gather_bf16_rows_and_keep_the_gradients_to_bf16_precision(arch, monkeypatch):
    """Under bf16 autocast the sparse passes gather bf16 rows (a copy of W_dec, x - b_pre, the output
    gradient): half the bytes, float32 accumulation. Every parameter's gradient (main, Multi-TopK and AuxK
    terms) matches the same autocast step with float32 gathers to 0.5% of its norm (measured 0.08-0.22%), and
    the float32 sparse path to 3% (measured 0.3-1.9%: mostly autocast's bf16 encoder product, which moves
    near-tied selections, not the gathers); a gather of the wrong rows is off by O(1)."""
    import saescale.sae.model as model

    gen = torch.Generator().manual_seed(3)
    d, n, k = 48, 512, 8
    sae = SparseAutoencoder(d, n, arch, k)
    sae.init_from_data_(torch.zeros(d), generator=gen)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=gen))
        sae.b_pre.copy_(0.1 * torch.randn(d, generator=gen))
    x = torch.randn(1024, d, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    dead = torch.rand(n, generator=gen) < 0.3
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    fp32, _ = grads_of_a_step(sae, x, dead, torch.autocast("cpu", enabled=False))
    assert sae._rows is None  # float32 gathers read W_dec itself
    got, out = grads_of_a_step(sae, x, dead, bf16)
    assert sae._rows.dtype == torch.bfloat16 and out.aux_x_hat.dtype == torch.bfloat16  # the bf16 path ran
    with monkeypatch.context() as m:
        m.setattr(model, "gather_dtype", lambda device_type: None)
        wide, out_wide = grads_of_a_step(sae, x, dead, bf16)  # autocast with float32 gathers, as before
    assert out_wide.aux_x_hat.dtype == torch.float32

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for name, ref in fp32.items():
        assert got[name].dtype == torch.float32, name
        assert rel(got[name], wide[name]) < 5e-3, name
        assert rel(got[name], ref) < 3e-2, name
    # the mutant: a copy of the wrong rows (rolled by one latent) is caught
    sae._rows = sae.W_dec.detach().roll(1, 0).to(torch.bfloat16)
    wrong, _ = grads_of_a_step(sae, x, dead, bf16)
    assert rel(wrong["W_dec"], wide["W_dec"]) > 0.1


def test_a_bf16_step_gathers_this_steps_decoder_not_a_stale_copy(tmp_path):
    """The bf16 copy of W_dec is made afresh after every optimizer step (fused Adam changes W_dec without a
    version bump), so each step decodes with the weights it updates."""
    x, stats, spec, sel = setup(precision="bf16")
    t = trainer(stats, spec, sel, tmp_path)
    batches = InMemoryBatches(x, spec.batch_size, 0).batches(0)
    for _ in range(3):
        t.train_step(torch.from_numpy(next(batches)))
        assert torch.equal(t.sae.decoder_rows(torch.bfloat16), t.sae.W_dec.detach().to(torch.bfloat16))
    before = t.sae.decoder_rows(torch.bfloat16)
    t.opt.step()  # fused Adam: W_dec moves (its gradient is still there) ...
    assert not torch.equal(before, t.sae.W_dec.detach().to(torch.bfloat16))
    t.sae.drop_decoder_rows()  # ... which training_step follows with this
    assert torch.equal(t.sae.decoder_rows(torch.bfloat16), t.sae.W_dec.detach().to(torch.bfloat16))
