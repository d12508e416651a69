"""Round trips through the real packages: a saescale SAE exported and loaded by SAELens / sparsify gives the
same reconstruction as saescale on the same inputs, and an SAE made and saved by them, imported, gives
theirs. The peers live in a venv of their own (they pin packages saescale does not want), built once with
`--system-site-packages` so it reuses this environment's torch: ~30 s with PyPI reachable. Set
SAESCALE_PEERS_PYTHON to use an existing one (benchmarks/.venv-peers/bin/python has both packages)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saescale.interop import export_sae, import_sae, write_imported
from saescale.normalize import normalize

from helpers import side_venv
from test_interop import D, K, N, ours, raw_activations, trained_like

pytestmark = pytest.mark.slow

PEERS = "sae-lens==6.54.12", "eai-sparsify==1.3.3"  # the versions peers.md section 3 and the benchmarks read
VENV = Path(os.environ.get("SAESCALE_PEERS_VENV", Path.home() / ".cache/saescale/peers-venv"))

# Runs in the peers' venv: make or load an SAE with the package's own code, reconstruct x, save the result.
PEER = r'''
import sys, torch
from safetensors.torch import load_file, save_file
action, folder, x_path, out_path = sys.argv[1:5]
x = load_file(x_path)["x"]
torch.manual_seed(0)
if action.startswith("saelens"):
    from sae_lens import SAE, TopKSAE, TopKSAEConfig
    if action == "saelens-load":
        sae = SAE.load_from_disk(folder)
    else:
        d, n, k = (int(v) for v in sys.argv[5:8])
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, normalize_activations="layer_norm",
                                    rescale_acts_by_decoder_norm=False))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        sae.save_model(folder)
    with torch.no_grad():
        y = sae(x)
else:
    from sparsify import SparseCoder, SparseCoderConfig
    if action == "sparsify-load":
        sae = SparseCoder.load_from_disk(folder)
    else:
        d, n, k = (int(v) for v in sys.argv[5:8])
        sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        sae.save_to_disk(folder)
    with torch.no_grad():
        y = sae(x).sae_out
save_file({"y": y.float().contiguous()}, out_path)
'''


@pytest.fixture(scope="module")
def peer_python() -> str:
    return side_venv(VENV, PEERS, "sae_lens, sparsify", "SAESCALE_PEERS_PYTHON")


def peer(python: str, tmp_path: Path, action: str, folder: Path, x: torch.Tensor, *shape: int) -> torch.Tensor:
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "y.safetensors"
    res = subprocess.run([python, "-c", PEER, action, str(folder), str(tmp_path / "x.safetensors"), str(out),
                          *map(str, shape)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out))["y"]


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_saelens_loads_our_export_and_reconstructs_raw_activations_as_we_do(peer_python, tmp_path, arch):
    sae = trained_like(arch)
    write_imported(sae, tmp_path / "ours", "test", "saelens", layer=1)
    export_sae(tmp_path / "ours", "saelens", tmp_path / "sl")
    x = raw_activations()
    theirs = peer(peer_python, tmp_path, "saelens-load", tmp_path / "sl", x)
    assert (ours(sae, x) - x).abs().max() > 0.1
    torch.testing.assert_close(theirs, ours(sae, x), rtol=1e-4, atol=1e-4)


def test_sparsify_loads_our_export_and_reconstructs_as_we_do(peer_python, tmp_path):
    sae = trained_like("topk")
    write_imported(sae, tmp_path / "ours", "test", "sparsify")
    export_sae(tmp_path / "ours", "sparsify", tmp_path / "sp")
    x_n = normalize(raw_activations())[0]
    theirs = peer(peer_python, tmp_path, "sparsify-load", tmp_path / "sp", x_n)
    torch.testing.assert_close(theirs, sae(x_n)[0].detach(), rtol=1e-5, atol=1e-5)


def test_an_saelens_sae_imported_reconstructs_as_saelens_does(peer_python, tmp_path):
    x = raw_activations()
    theirs = peer(peer_python, tmp_path, "saelens-make", tmp_path / "made", x, D, N, K)
    sae = import_sae(tmp_path / "made", "saelens")
    torch.testing.assert_close(ours(sae, x), theirs, rtol=1e-4, atol=1e-4)


def test_a_sparsify_sae_imported_reconstructs_as_sparsify_does(peer_python, tmp_path):
    x_n = normalize(raw_activations())[0]
    theirs = peer(peer_python, tmp_path, "sparsify-make", tmp_path / "made", x_n, D, N, K)
    sae = import_sae(tmp_path / "made", "sparsify", inputs_normalized=True)
    torch.testing.assert_close(sae(x_n)[0].detach(), theirs, rtol=1e-5, atol=1e-5)
