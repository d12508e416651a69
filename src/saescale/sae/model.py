"""The sparse autoencoder (method §A.3): z = act(W_enc (x - b_pre) + b_enc), x_hat = W_dec^T z + b_pre.

Decoder directions are the rows of W_dec [n, d] (SAELens' orientation), at unit norm unless the arch
weights its penalty by their norms. A TopK code decodes by gathering only its k rows (`embedding_bag`, with
sparse gradients: `SparseDecode`), O(batch * k * d); codes of varying support (ReLU, JumpReLU, ...) are dense
and decode with one matmul.
The arch (`sae.family`, sae/archs.py) supplies the activation and the sparsity objective.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from saescale import paths
from safetensors.torch import load_file, save_file
from torch import nn

from saescale.files import replace_when_done
from saescale.sae.activations import Latents, SelectedPreActs, Selection, SparseDecode, gather_dtype, topk
from saescale.sae.archs import ARCHS

ENCODER_RESCALE_SAMPLES = 256  # method §A.4: openai init_from_data_ uses 256 random unit inputs


class SparseAutoencoder(nn.Module):
    def __init__(self, d_model: int, n_latents: int, arch: str = "topk", k: int = 32,
                 arch_params: dict | None = None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch '{arch}'; known: {sorted(ARCHS)}")
        self.d_model, self.n_latents, self.arch, self.k = d_model, n_latents, arch, k
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_model))  # [n, d]
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_model))  # [n, d], rows = decoder directions
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        nn.init.kaiming_uniform_(self.W_enc, a=5**0.5)  # nn.Linear's default: U(-1/sqrt(d), 1/sqrt(d))
        self.family = ARCHS[arch](n_latents, d_model, k, arch_params)
        self._rows: torch.Tensor | None = None  # decoder_rows' copy of W_dec, and what it was copied from
        self._rows_key: tuple | None = None

    # ---- the forward pass, in the paper's words ---------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_pre, self.W_enc, self.b_enc)  # [batch, n]

    def selectable_pre_acts(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        """The pre-activations without a graph, and `take(sel, values=None)`: pre[b, sel.indices[b]] with
        gradients to W_enc, b_enc and b_pre through the selected latents only (`values`: those entries, when the
        selection already read them). For codes that keep a few latents per token (TopK), this leaves the
        encoder forward as the one dense product of a training step (Gao et al. 2024's kernels)."""
        with torch.no_grad():
            pre = F.linear(x - self.b_pre, self.W_enc, self.b_enc)

        rows_dtype = gather_dtype(x.device.type)

        def take(sel: Selection, values: torch.Tensor | None = None) -> torch.Tensor:
            if values is None:
                values = pre.gather(1, sel.indices)
            return SelectedPreActs.apply(values, x, self.b_pre, self.W_enc, self.b_enc, sel, rows_dtype)

        return pre, take

    def encode(self, x: torch.Tensor) -> Latents:
        return self.family.encode(self, x)

    def decode(self, latents: Latents) -> torch.Tensor:
        return self.decode_residual(latents) + self.b_pre

    def decode_residual(self, latents: Latents) -> torch.Tensor:
        """W_dec^T z without the pre-bias (AuxK reconstructs the error with it)."""
        if latents.indices is None:
            return latents.values.to(self.W_dec.dtype) @ self.W_dec
        return self.decode_selection(latents.values, Selection(latents.indices, self.n_latents))

    def decode_selection(self, values: torch.Tensor, sel: Selection) -> torch.Tensor:
        """W_dec^T z of each bag of a slot code, one pass over the decoder: [batch, d], or [batch, bags, d].
        Under bf16 autocast the pass gathers a bf16 copy of W_dec's rows (`decoder_rows`) and returns bf16."""
        low = gather_dtype(self.W_dec.device.type)
        rows = None if low is None else self.decoder_rows(low)
        return SparseDecode.apply(values.to(self.W_dec.dtype if low is None else low), self.W_dec, sel, rows)

    def decoder_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """A copy of W_dec in `dtype` for the sparse passes to gather from, made once per change of W_dec: the
        training step drops it after its optimizer step (`drop_decoder_rows`; fused Adam writes W_dec without
        bumping its version counter), and any other in-place change bumps the version the copy is keyed on. A
        new tensor each time, so a graph that saved the old one keeps it intact."""
        w = self.W_dec
        key = (dtype, w.device, w.data_ptr(), w._version)
        if self._rows is None or self._rows_key != key:
            self._rows, self._rows_key = w.detach().to(dtype), key
        return self._rows

    def drop_decoder_rows(self) -> None:
        """W_dec changed (an optimizer step): the next decoder_rows copies it again."""
        self._rows = self._rows_key = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Latents]:
        latents = self.encode(x)
        return self.decode(latents), latents

    # ---- initialization (method §A.4) -----------------------------------------------------------
    @torch.no_grad()
    def init_from_data_(self, b_pre: torch.Tensor, generator: torch.Generator | None = None,
                        tied: bool = True) -> None:
        """b_pre at the geometric median; decoder = encoder directions at unit norm ("tied" init, only at
        init; `tied=False` draws independent directions, the A.8 ablation); TopK-family encoders scaled so
        TopK reconstructions of unit inputs have unit norm (A.4 (4))."""
        self.b_pre.copy_(b_pre)
        if tied:
            self.W_dec.copy_(self.W_enc)
        else:
            self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator).to(self.W_dec.device))
        self.normalize_decoder_()
        if not self.family.rescale_encoder:
            return
        u = torch.randn(ENCODER_RESCALE_SAMPLES, self.d_model, generator=generator, device=self.W_enc.device)
        u = u / u.norm(dim=1, keepdim=True)
        # per-token TopK even for BatchTopK: the rescale must not touch its threshold estimate
        x_hat = self.decode(topk(self.pre_acts(u + self.b_pre), self.k))
        r = (x_hat - self.b_pre).norm(dim=1).mean()
        self.W_enc.div_(r.clamp_min(1e-12))

    # ---- decoder constraint (method §A.6) --------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row: Adam then only rotates rows."""
        if self.W_dec.grad is None:
            return
        # row-wise dot products and one in-place update: no [n, d] temporaries (two fewer passes over memory)
        parallel = torch.bmm(self.W_dec.grad.unsqueeze(1), self.W_dec.unsqueeze(2)).squeeze(2)  # [n, 1]
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)

    # ---- save / load ------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"d_model": self.d_model, "n_latents": self.n_latents, "arch": self.arch, "k": self.k,
                "arch_params": dict(self.family.params)}

    def like(self) -> "SparseAutoencoder":
        """A fresh SAE of the same shape and arch, on the same device (weights to be loaded)."""
        return type(self)(self.d_model, self.n_latents, self.arch, self.k, self.family.params).to(self.W_enc.device)

    def save(self, weights_path: str | Path) -> None:
        """Write safetensors under a temporary name, then rename: a killed job leaves no half file."""
        with replace_when_done(weights_path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))

    @classmethod
    def load(cls, weights_path: str | Path, cfg_path: str | Path | None = None,
             device: str | torch.device = "cpu") -> "SparseAutoencoder":
        weights_path = Path(weights_path)
        cfg = json.loads(Path(cfg_path or weights_path.with_name(paths.CFG_FILE)).read_text())
        return cls.from_config(cfg, weights_path, device)

    @classmethod
    def from_config(cls, cfg: dict, weights_path: str | Path,
                    device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """The SAE a saescale_sae.json describes, with weights from `weights_path`. Built on the meta device and
        given the file's tensors (assign): the host holds the weights once, not also a random init of their size
        (16 GiB each at n = 2^20, d = 4096)."""
        with torch.device("meta"):
            sae = cls(cfg["d_model"], cfg["n_latents"], cfg["arch"], cfg["k"], cfg.get("arch_params"))
        sae.load_state_dict(read_weights(weights_path, sae.state_dict()), assign=True)
        return sae.to(device)


def read_weights(weights_path: str | Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the names and shapes its saescale_sae.json implies, so a
    damaged file or one from another SAE is refused by name instead of failing inside load_state_dict."""
    from safetensors import SafetensorError

    redo = "delete the SAE folder and rerun snakemake to train it again (or re-import it)"
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc}); {redo}") from exc
    problems = [f"{name}: missing" for name in expected if name not in tensors]
    problems += [f"{name}: not expected" for name in tensors if name not in expected]
    problems += [f"{name}: shape {tuple(t.shape)}, saescale_sae.json implies {tuple(expected[name].shape)}"
                 for name, t in tensors.items() if name in expected and t.shape != expected[name].shape]
    if problems:
        raise ValueError(f"{weights_path} does not match its saescale_sae.json ({'; '.join(problems)}); {redo}")
    return tensors


def sae_folder(sae_dir: str | Path) -> tuple[dict, Path]:
    """(config, weights path) of a saescale SAE folder. A folder in a peer's layout (cfg.json beside
    sae.safetensors or sae_weights.safetensors), or one written by saescale before its own names, is refused with
    the command that brings it in."""
    folder = Path(sae_dir)
    cfg_path, weights = folder / paths.CFG_FILE, folder / paths.WEIGHTS_FILE
    if not cfg_path.is_file():
        if (folder / "cfg.json").is_file():
            fmt = "saelens" if (folder / "sae_weights.safetensors").is_file() else "sparsify"
            raise FileNotFoundError(
                f"{folder}: no {paths.CFG_FILE}, but a cfg.json: a {fmt} SAE folder (or one saescale wrote before "
                f"it named its files {paths.CFG_FILE} and {paths.WEIGHTS_FILE}); read it with `saescale import "
                f"--src {folder} --format {fmt} --out <folder>`")
        raise FileNotFoundError(f"{folder}: no {paths.CFG_FILE}; not a saescale SAE folder (or a killed job's: "
                                "the config is written last)")
    return json.loads(cfg_path.read_text()), weights

