"""Ground truth: a TopK SAE trained with the pipeline's loop recovers a planted dictionary."""

import numpy as np

from saescale.normalize import layer_stats
from saescale.sae.train import TrainSpec, train_sae
from saescale.store import InMemoryBatches


def synthetic(n_atoms=64, d=32, active=3, rows=65536, seed=0):
    """Each sample is a sparse positive combination of `active` random atoms. Atoms are centred over d so the
    pipeline's per-token normalization (subtract the mean over d, unit norm) leaves their directions intact."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms -= atoms.mean(axis=1, keepdims=True)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, size=active, replace=False) for _ in range(rows)])
    coef = rng.uniform(0.5, 1.5, size=(rows, active))
    x = np.einsum("ra,rad->rd", coef, atoms[idx]).astype(np.float32)
    return atoms, x


def train_on(x, n, k, tokens, seed=0, tmp=None):
    stats = layer_stats([x], len(x))
    spec = TrainSpec(arch="topk", n=n, k=k, d_model=x.shape[1], lr=3e-3, batch_size=512, tokens=tokens,
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=8192,
                     ema_decay=0.0, log_every=50, checkpoint_seconds=0, seed=seed, device="cpu")
    sae, rows, _ = train_sae(InMemoryBatches(x, 512, seed), np.asarray(stats["geometric_median"]),
                             stats["baseline_mse"], spec, tmp / "ck.pt", x[:2048] / np.linalg.norm(x[:2048], axis=1, keepdims=True))
    return sae, rows


def max_cosines(atoms, sae):
    dec = sae.W_dec.detach().numpy()
    dec = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    return (atoms @ dec.T).max(axis=1)


def test_topk_sae_recovers_planted_dictionary(tmp_path):
    atoms, x = synthetic()
    sae, rows = train_on(x, n=128, k=3, tokens=400_000, tmp=tmp_path)
    cos = max_cosines(atoms, sae)
    assert (cos > 0.9).mean() >= 0.9, f"recovered {(cos > 0.9).mean():.2f} of atoms; cosines {np.sort(cos)[:10]}"
    assert rows[-1]["fvu"] < 0.1


def test_an_untrained_sae_does_not_pass_the_recovery_check(tmp_path):
    # the check can fail: a few steps of training leave the random init far from the atoms
    atoms, x = synthetic()
    sae, _ = train_on(x, n=128, k=3, tokens=1024, tmp=tmp_path)
    assert (max_cosines(atoms, sae) > 0.9).mean() < 0.5
