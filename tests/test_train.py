"""The training loop: resuming a killed job, several SAEs on one stream, logging, and the lr / k_aux rules."""

import numpy as np
import pytest
import torch

from saescale.config import k_aux_for, lr_for
from saescale.normalize import layer_stats
from saescale.sae.train import Trainer, TrainSpec, train_sae, train_together
from saescale.store import InMemoryBatches

from test_ground_truth import synthetic


class Killed(Exception):
    pass


class DiesAt:
    """Batches from `source`, but the job 'dies' when step `die_at` is requested."""

    def __init__(self, source, die_at):
        self.source, self.die_at = source, die_at

    def device_batches(self, start_step=0, device="cpu"):
        for step, batch in enumerate(self.source.device_batches(start_step, device), start=start_step):
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


def pack_specs(spec):
    """Three SAEs one stream can feed: another arch (a penalty one), another n and k, a shorter budget."""
    return [spec, TrainSpec(**{**spec.__dict__, "arch": "relu", "n": 32, "k": 4}),
            TrainSpec(**{**spec.__dict__, "n": 48, "k": 2, "tokens": 30 * 256, "lr": 1e-3})]


def assert_same_weights(a, b):
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_saes_trained_together_equal_saes_trained_alone(tmp_path):
    x, stats, spec, sel = setup()
    specs = pack_specs(spec)
    alone = [run(InMemoryBatches(x, 256, 0), stats, s, tmp_path / f"alone{i}.pt", sel) for i, s in enumerate(specs)]
    trainers = [Trainer(np.asarray(stats["geometric_median"]), stats["baseline_mse"], s, tmp_path / f"pack{i}.pt", sel)
                for i, s in enumerate(specs)]
    order = []
    train_together(InMemoryBatches(x, 256, 0), trainers, lambda t: order.append(trainers.index(t)))
    assert order == [2, 0, 1]  # reported as each finishes: the short budget first
    for (sae, rows, summary), trainer in zip(alone, trainers):
        packed, packed_rows, packed_summary = trainer.finish()
        assert_same_weights(sae, packed)
        assert [r["loss"] for r in rows] == [r["loss"] for r in packed_rows]
        assert packed_summary["steps"] == summary["steps"] and packed_summary["weights"] == summary["weights"]
    assert trainers[2].step == 30 and trainers[0].step == 64


def test_a_killed_pack_resumes_every_member_to_the_uninterrupted_weights(tmp_path):
    """Killed at step 40: the short member (30 steps) had finished and kept its final checkpoint, as
    `saescale train --members` does; the others resume from their timed checkpoints."""
    x, stats, spec, sel = setup()
    specs = pack_specs(spec)
    make = lambda: [Trainer(np.asarray(stats["geometric_median"]), stats["baseline_mse"], s, tmp_path / f"m{i}.pt", sel)
                    for i, s in enumerate(specs)]
    with pytest.raises(Killed):
        train_together(DiesAt(InMemoryBatches(x, 256, 0), 40), make(), lambda t: t.save_checkpoint())
    resumed = make()
    assert [t.step for t in resumed] == [40, 40, 30]
    finished = []
    train_together(InMemoryBatches(x, 256, 0), resumed, finished.append)
    assert finished[0] is resumed[2]  # already complete: finished without a step
    for s, trainer in zip(specs, resumed):
        ref, _, _ = run(InMemoryBatches(x, 256, 0), stats, s, tmp_path / f"ref{trainer.spec.n}.pt", sel)
        assert_same_weights(ref, trainer.finish()[0])


def test_log_rows_and_loss_decrease(tmp_path):
    x, stats, spec, sel = setup()
    _, rows, summary = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "d.pt", sel)
    assert set(rows[0]) >= {"tokens", "loss", "fvu", "l0", "dead_fraction", "lr", "elapsed_s"}
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert all(r["l0"] <= 3 for r in rows)
    assert summary["device"] == "cpu" and summary["weights"] in ("ema", "raw")


def test_bf16_precision_trains_on_cpu_as_well_as_float32(tmp_path):
    """train.precision: bf16 runs the forward under bf16 autocast on CPU too; the weights stay float32 and
    the run ends within a few percent of float32's FVU."""
    x, stats, spec, sel = setup()
    _, ref_rows, ref = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "f.pt", sel)
    bf16 = TrainSpec(**{**spec.__dict__, "precision": "bf16"})
    sae, rows, summary = run(InMemoryBatches(x, 256, 0), stats, bf16, tmp_path / "b.pt", sel)
    assert summary["dtype"] == "bf16-autocast" and ref["dtype"] == "float32"
    assert sae.W_enc.dtype == torch.float32
    assert rows[-1]["fvu"] < 0.7 * rows[0]["fvu"]
    assert rows[-1]["fvu"] == pytest.approx(ref_rows[-1]["fvu"], rel=0.05)
    assert rows[-1]["fvu"] != ref_rows[-1]["fvu"]  # it did run in another precision


def test_lr_follows_inverse_sqrt_n_unless_fixed():
    train = {"lr": None, "lr_ref": 1e-4, "lr_ref_n": 32768}
    assert lr_for(train, 32768) == pytest.approx(1e-4)
    assert lr_for(train, 8192) == pytest.approx(2e-4)
    assert lr_for({**train, "lr": 5e-4}, 8192) == 5e-4


def test_k_aux_is_a_power_of_two_near_half_d():
    assert k_aux_for({"k_aux": None}, 768) == 256  # method §A.5: openai/sparse_autoencoder for GPT-2
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
