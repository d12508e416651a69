"""Export to SAELens / sparsify and import from SAELens, sparsify and openai: the formats' own forward passes
(written out from peers.md section 3 and the packages' code) reconstruct raw activations as saescale does;
round trips give back the same SAE; what cannot map exactly is refused with the reason. The real packages
run the same checks in tests/test_interop_peers.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from saescale.interop import (InteropError, export_sae, from_openai, import_sae, to_saelens, to_sparsify,
                              write_imported)
from saescale.normalize import denormalize, normalize
from saescale.sae.model import SparseAutoencoder

D, N, K = 24, 96, 5


def trained_like(arch: str, seed: int = 0) -> SparseAutoencoder:
    """An SAE with every parameter away from its init, so a dropped or transposed tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(D, N, arch, K)
    with torch.no_grad():
        sae.init_from_data_(torch.randn(D, generator=gen) * 0.1, generator=gen)
        sae.b_enc.copy_(torch.randn(N, generator=gen) * 0.05)
        if arch == "jumprelu":
            sae.family.log_threshold.copy_(torch.rand(N, generator=gen).mul(0.1).add(0.01).log())
        if arch == "batchtopk":
            sae.family.threshold.fill_(0.07)
    return sae


def raw_activations(rows: int = 64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, D, generator=gen) * 3 + torch.randn(D, generator=gen)  # an offset, a scale


def ours(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """saescale's reconstruction of raw activations: normalize, SAE, map back."""
    x_n, mu, scale = normalize(x)
    with torch.no_grad():
        return denormalize(sae(x_n)[0], mu, scale)


def saelens_forward(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's inference SAE, from its code: layer_norm in, encode, activation, decode, layer_norm out."""
    assert cfg["normalize_activations"] == "layer_norm" and cfg["apply_b_dec_to_input"]
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    x_ln = (x - mu) / (std + 1e-5)
    pre = (x_ln - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "topk":
        v, i = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
    elif cfg["architecture"] == "jumprelu":
        acts = pre.relu() * (pre > t["threshold"])
    else:
        acts = pre.relu()
    return (acts @ t["W_dec"] + t["b_dec"]) * std + mu


@pytest.mark.parametrize("arch", ["topk", "multitopk", "relu", "relu_dn", "jumprelu", "batchtopk"])
def test_saelens_export_reconstructs_raw_activations_like_saescale(arch):
    sae = trained_like(arch)
    x = raw_activations()
    cfg, tensors = to_saelens(sae)
    got, want = saelens_forward(cfg, tensors, x), ours(sae, x)
    assert (want - x).abs().max() > 0.1  # a lossy SAE: the check is not trivially x == x
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_saelens_round_trip_gives_back_the_sae(arch, tmp_path):
    sae = trained_like(arch)
    src = tmp_path / "ours"
    write_imported(sae, src, "test", "saelens")
    export_sae(src, "saelens", tmp_path / "sl")
    back = import_sae(tmp_path / "sl", "saelens")
    assert back.arch == arch
    for name, value in sae.state_dict().items():
        if name != "family.penalty":
            torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_sparsify_export_is_the_same_sae_in_normalized_space(tmp_path):
    sae = trained_like("topk")
    cfg, t = to_sparsify(sae)
    x_n = normalize(raw_activations())[0]
    pre = torch.relu((x_n - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify's encode
    v, i = pre.topk(cfg["k"], dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, i, v) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(x_hat, sae(x_n)[0].detach(), rtol=1e-5, atol=1e-6)
    write_imported(sae, tmp_path / "ours", "test", "sparsify")
    export_sae(tmp_path / "ours", "sparsify", tmp_path / "sp")
    assert json.loads((tmp_path / "sp/cfg.json").read_text())["saescale_input_normalization"].startswith("per-token")
    back = import_sae(tmp_path / "sp", "sparsify")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in sae.state_dict().items())


def openai_state(seed: int = 0) -> dict:
    """An openai/sparse_autoencoder TopK state dict (Autoencoder.state_dict layout)."""
    gen = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(N, D, generator=gen) / D**0.5, "latent_bias": torch.randn(N, generator=gen) * 0.1,
            "pre_bias": torch.randn(D, generator=gen) * 0.1, "decoder.weight": torch.randn(D, N, generator=gen) / D**0.5,
            "stats_last_nonzero": torch.zeros(N, dtype=torch.long), "activation": "TopK",
            "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}


def test_openai_import_reconstructs_raw_activations_like_their_autoencoder(tmp_path):
    state = openai_state()
    torch.save(state, tmp_path / "ae.pt")
    sae = import_sae(tmp_path / "ae.pt", "openai")  # read with weights_only=True
    x = raw_activations()
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    x_ln = (x - mu) / (std + 1e-5)  # their LN(x, eps=1e-5)
    pre = (x_ln - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    v, i = pre.topk(K, dim=-1)
    lat = torch.zeros_like(pre).scatter(-1, i, v.relu())
    theirs = (lat @ state["decoder.weight"].T + state["pre_bias"]) * std + mu
    torch.testing.assert_close(ours(sae, x), theirs, rtol=1e-4, atol=1e-4)


def test_what_does_not_map_exactly_is_refused_with_the_reason(tmp_path):
    with pytest.raises(InteropError, match="no SAELens equivalent"):
        to_saelens(trained_like("prolu"))
    with pytest.raises(InteropError, match="TopK SAEs only"):
        to_sparsify(trained_like("relu"))
    cfg, tensors = to_saelens(trained_like("topk"))
    from saescale.interop import from_saelens, from_sparsify
    with pytest.raises(InteropError, match="normalize_activations 'none'"):
        from_saelens({**cfg, "normalize_activations": "none"}, tensors)
    with pytest.raises(InteropError, match="W_enc has shape"):
        from_saelens({**cfg, "d_sae": N + 1}, tensors)
    with pytest.raises(InteropError, match="no saescale_input_normalization"):
        from_sparsify({"activation": "topk", "d_in": D, "num_latents": N, "k": K}, {})
    with pytest.raises(InteropError, match="not found"):
        import_sae(tmp_path / "missing", "saelens")
    with pytest.raises(InteropError, match="only TopK"):
        from_openai({**openai_state(), "activation": "ReLU"})


def test_cli_export_and_import(tmp_path):
    write_imported(trained_like("topk"), tmp_path / "ours", "test", "saelens", layer=3, subject="tiny")
    run = lambda *args: subprocess.run([sys.executable, "-m", "saescale.cli", *args], capture_output=True, text=True)
    res = run("export", "--sae-dir", str(tmp_path / "ours"), "--format", "saelens", "--out", str(tmp_path / "sl"))
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "sl/cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["architecture"] == "topk"
    res = run("import", "--src", str(tmp_path / "sl"), "--format", "saelens", "--out", str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    back = SparseAutoencoder.load(tmp_path / "back/saescale_sae.safetensors")
    assert back.k == K and json.loads((tmp_path / "back/saescale_sae.json").read_text())["imported_from"]["format"] == "saelens"
    write_imported(trained_like("gated"), tmp_path / "gated", "test", "saelens")
    res = run("export", "--sae-dir", str(tmp_path / "gated"), "--format", "sparsify", "--out", str(tmp_path / "x"))
    assert res.returncode != 0 and "no sparsify equivalent" in res.stderr


def test_no_torch_load_can_unpickle_code():
    """Weights come through safetensors; the two torch files read (our checkpoints, openai's state dicts)
    are loaded with weights_only=True, which refuses pickled code."""
    import re
    from pathlib import Path

    import saescale

    calls = [(path, line) for path in Path(saescale.__file__).parent.rglob("*.py")
             for line in path.read_text().splitlines() if "torch.load(" in line]
    assert len(calls) >= 2
    assert all(re.search(r"weights_only=True", line) for _, line in calls), calls
