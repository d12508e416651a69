"""The training loop: resuming a killed job, logging, and the lr / k_aux rules."""

import numpy as np
import pytest
import torch

from saescale.config import k_aux_for, lr_for
from saescale.normalize import layer_stats
from saescale.sae.train import TrainSpec, train_sae
from saescale.store import InMemoryBatches

from test_ground_truth import synthetic


class Killed(Exception):
    pass


class DiesAt:
    """Batches from `source`, but the job 'dies' when step `die_at` is requested."""

    def __init__(self, source, die_at):
        self.source, self.die_at = source, die_at

    def batches(self, start_step=0):
        for step, batch in enumerate(self.source.batches(start_step), start=start_step):
            if step == self.die_at:
                raise Killed
            yield batch


def setup(tokens=64 * 256):
    _, x = synthetic(rows=4096)
    stats = layer_stats([x], len(x))
    spec = TrainSpec(arch="topk", n=64, k=3, d_model=32, lr=3e-3, batch_size=256, tokens=tokens, adam_eps=6.25e-10,
                     adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=1024, ema_decay=0.9,
                     log_every=4, checkpoint_seconds=1e-9, seed=0, device="cpu")
    sel = x[:512] / np.linalg.norm(x[:512], axis=1, keepdims=True)
    return x, stats, spec, sel


def run(source, stats, spec, ck, sel):
    return train_sae(source, np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, ck, sel)


def test_resume_matches_uninterrupted_run(tmp_path):
    x, stats, spec, sel = setup()
    ref, ref_rows, _ = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "a.pt", sel)
    with pytest.raises(Killed):
        run(DiesAt(InMemoryBatches(x, 256, 0), 37), stats, spec, tmp_path / "b.pt", sel)
    assert (tmp_path / "b.pt").exists()
    resumed, rows, _ = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "b.pt", sel)
    for name, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert np.allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows])


def test_checkpoint_of_a_different_spec_is_ignored(tmp_path):
    x, stats, spec, sel = setup()
    with pytest.raises(Killed):
        run(DiesAt(InMemoryBatches(x, 256, 0), 20), stats, spec, tmp_path / "c.pt", sel)
    other = TrainSpec(**{**spec.__dict__, "lr": 1e-3})
    _, rows, _ = run(InMemoryBatches(x, 256, 0), stats, other, tmp_path / "c.pt", sel)
    assert rows[0]["step"] == 4  # started from scratch


def test_log_rows_and_loss_decrease(tmp_path):
    x, stats, spec, sel = setup()
    _, rows, summary = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "d.pt", sel)
    assert set(rows[0]) >= {"tokens", "loss", "fvu", "l0", "dead_fraction", "lr", "elapsed_s"}
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert all(r["l0"] <= 3 for r in rows)
    assert summary["device"] == "cpu" and summary["weights"] in ("ema", "raw")


def test_lr_follows_inverse_sqrt_n_unless_fixed():
    train = {"lr": None, "lr_ref": 1e-4, "lr_ref_n": 32768}
    assert lr_for(train, 32768) == pytest.approx(1e-4)
    assert lr_for(train, 8192) == pytest.approx(2e-4)
    assert lr_for({**train, "lr": 5e-4}, 8192) == 5e-4


def test_k_aux_is_a_power_of_two_near_half_d():
    assert k_aux_for({"k_aux": None}, 768) == 256  # REFERENCE A.5: openai/sparse_autoencoder for GPT-2
    assert k_aux_for({"k_aux": None}, 128) == 64
    assert k_aux_for({"k_aux": 7}, 128) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_records_bf16_autocast(tmp_path):
    x, stats, spec, sel = setup()
    cuda = TrainSpec(**{**spec.__dict__, "device": "cuda"})
    sae, rows, summary = run(InMemoryBatches(x, 256, 0), stats, cuda, tmp_path / "g.pt", sel)
    assert summary["device"].startswith("cuda") and summary["dtype"] == "bf16-autocast"
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64, device=sae.W_dec.device), atol=1e-2)
