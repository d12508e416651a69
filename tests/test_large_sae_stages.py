"""The stages after training on an SAE too wide for one forward over a whole batch (a 2^20-latent SAE
trained across GPUs, consolidated, then evaluated on one device): every SAE forward runs in row blocks of at
most FORWARD_ELEMENTS pre-activations, codes are kept as slots, and the results are those of one forward.

Blocks are forced here by lowering FORWARD_ELEMENTS on a small SAE; peaks are measured by counting the bytes
of the tensors each stage creates (a TorchDispatchMode), which is what a GPU's allocator would hold.
"""

import weakref

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_gpt2, write_text_files
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from saescale.evaluate import memory
from saescale.evaluate.ablation import ablation_record, sample_pairs
from saescale.evaluate.analyses import progressive, refinement
from saescale.evaluate.downstream import sae_reconstruction
from saescale.evaluate.geometry import nearest_neighbour_cosines, random_reference
from saescale.evaluate.memory import (FORWARD_BYTES, encode_slots, forward_rows, slot_code, stage_bytes,
                                      weight_bytes)
from saescale.evaluate.probes import CodeColumns, best_probes, pooled_codes, probe_record
from saescale.evaluate.progressive import progressive_curves
from saescale.evaluate.reconstruction import reconstruction_metrics
from saescale.interpret.stage import _decode_from, make_act_fn
from saescale.normalize import normalize
from saescale.sae.activations import Latents
from saescale.sae.model import SparseAutoencoder
from saescale.subject import load_model

GIB = 2**30
LAYER = 0


class PeakBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


class RowSpy:
    """Records the rows of every pre-activation the SAE computes (its arch's `scores`)."""

    def __init__(self, sae: SparseAutoencoder):
        self.rows: list[int] = []
        scores = sae.family.scores

        def spy(s, x):
            self.rows.append(len(x))
            return scores(s, x)

        sae.family.scores = spy


@pytest.fixture
def rows_per_forward(monkeypatch):
    """Sets FORWARD_ELEMENTS so that an SAE of n latents takes `rows` rows per forward."""

    def set_rows(n: int, rows: int) -> None:
        monkeypatch.setattr(memory, "FORWARD_ELEMENTS", n * rows)

    return set_rows


def _sae(arch: str = "topk", d: int = 16, n: int = 64, k: int = 4) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, n, arch, k)
    sae.init_from_data_(torch.zeros(d))
    if arch in ("relu", "jumprelu"):  # a sparse dense code: about a quarter of the latents fire
        with torch.no_grad():
            sae.b_enc.fill_(-0.15)
    return sae.eval()


def _rows(count: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return normalize(torch.randn(count, d, generator=torch.Generator().manual_seed(seed)))[0]


# ---- the row budget and the slot layout -----------------------------------------------------------------

def test_default_batches_stay_whole_up_to_n_2_17_and_shrink_beyond():
    assert forward_rows(2**17, 8192) == 8192  # evaluate.batch_size, unchanged for today's SAEs
    assert forward_rows(2**20, 8192) == 1024  # [1024, 2^20] float32 = 4 GiB
    assert forward_rows(2**20, 100) == 100
    assert forward_rows(2**31, 8192) == 1


def test_slot_code_lists_each_rows_nonzeros_in_latent_order_padded_with_zeros():
    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0, 3.0], [0.0] * 5, [5.0, 0.0, 0.0, 0.0, 0.0]])
    slots = slot_code(Latents(dense))
    # padding slots (value 0) take the smallest latents the row does not use: no latent twice in a row
    assert slots.indices.tolist() == [[1, 3, 4], [0, 1, 2], [0, 1, 2]]
    assert slots.values.tolist() == [[2.0, 1.0, 3.0], [0.0] * 3, [5.0, 0.0, 0.0]]
    assert torch.equal(slots.dense(5), dense)
    other = slot_code(Latents(torch.tensor([[0.0, 0.0, 7.0, 0.0], [1.0, 2.0, 3.0, 0.0]])))
    assert other.indices.tolist() == [[2, 0, 1], [0, 1, 2]]
    topk = Latents(torch.rand(3, 2), torch.tensor([[4, 1], [0, 2], [3, 4]]))
    assert slot_code(topk) is topk  # TopK codes are slots already
    assert slot_code(Latents(torch.zeros(2, 5))).values.shape == (2, 1)  # nothing fires: one empty slot


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_encode_slots_in_row_blocks_is_the_code_of_one_forward(arch, rows_per_forward):
    sae, x = _sae(arch), _rows(300)
    with torch.no_grad():
        whole = sae.encode(x).dense(64)
    rows_per_forward(64, 32)
    spy = RowSpy(sae)
    slots = encode_slots(sae, x)
    assert max(spy.rows) == 32 and sum(spy.rows) == 300
    assert torch.equal(slots.dense(64), whole)
    assert slots.values.shape[1] == int((whole != 0).sum(1).max())


# ---- evaluate ----------------------------------------------------------------------------------------------

def _store(tmp_path, rows: int = 1000, d: int = 16):
    import zarr

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    data = np.random.default_rng(0).normal(size=(rows, d)).astype(np.float32)
    root.create_array("L0/x", data=data, chunks=(256, d))
    root.attrs.update(n_train=0, n_eval=rows)
    return root


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_reconstruction_metrics_in_row_blocks_match_one_forward(arch, tmp_path, rows_per_forward):
    sae, root = _sae(arch), _store(tmp_path)
    whole = reconstruction_metrics(sae, root, 0, 500, torch.device("cpu"))
    rows_per_forward(64, 48)
    spy = RowSpy(sae)
    blocked = reconstruction_metrics(sae, root, 0, 500, torch.device("cpu"))
    assert max(spy.rows) == 48 and sum(spy.rows) == 1000
    assert np.array_equal(blocked.pop("latent_firing_counts"), whole.pop("latent_firing_counts"))
    assert blocked.pop("fvu") == pytest.approx(whole.pop("fvu"), rel=1e-6)
    assert blocked.pop("mse") == pytest.approx(whole.pop("mse"), rel=1e-6)
    assert blocked == whole  # L0, dead latents, token counts: exactly


def test_downstream_reconstruction_in_row_blocks_matches_the_sae(rows_per_forward):
    sae, x = _sae(), _rows(200)
    with torch.no_grad():
        whole = sae(x)[0]
        rows_per_forward(64, 30)
        spy = RowSpy(sae)
        blocked = sae_reconstruction(sae)(x, None)
    assert max(spy.rows) == 30
    assert torch.allclose(blocked, whole, atol=1e-6)


# ---- probes ------------------------------------------------------------------------------------------------

def _probe_inputs(sae: SparseAutoencoder):
    W, S = 40, 8
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 10, size=(W, S))
    strings = {i: ("1" if i == 3 else "a") for i in range(10)}  # the `digit` task: token 3
    x = torch.randn(W * S, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    x[windows.reshape(-1) == 3] += 5 * sae.W_enc[5].detach()
    return x, windows, strings


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_probe_record_in_row_blocks_matches_one_forward(arch, rows_per_forward):
    sae = _sae(arch)
    x, windows, strings = _probe_inputs(sae)
    spec = {"activations": ["pre", "post"], "builtin_tasks": True, "iters": 25, "candidates": 8}
    whole = probe_record(sae, x, windows, strings, spec)
    rows_per_forward(64, 16)
    spy = RowSpy(sae)
    blocked = probe_record(sae, x, windows, strings, spec)
    assert spy.rows and max(spy.rows) == 16
    for name, feats in whole["feature_sets"].items():
        for task, best in feats["tasks"].items():
            got = blocked["feature_sets"][name]["tasks"][task]
            assert got["column"] == best["column"] and got["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_post_columns_of_a_dense_code_are_its_dense_columns():
    sae, x = _sae("relu"), _rows(100)
    with torch.no_grad():
        dense = sae.encode(x).values
    cols = CodeColumns(sae, x, "post")
    assert cols._latents.indices is not None  # kept as slots, not as [rows, n]
    assert torch.equal(torch.cat([cols[:, i:i + 24] for i in range(0, 64, 24)], 1), dense)


def test_user_tasks_pool_fit_and_test_texts_apart_with_the_same_probes():
    sae = _sae()
    gen = torch.Generator().manual_seed(2)
    resid = [torch.randn(int(t), 16, generator=gen) for t in torch.randint(3, 9, (30,), generator=gen)]
    y = (np.arange(30) % 3 == 0).astype(np.float64)
    spec = {"activations": ["pre", "post"], "builtin_tasks": False, "iters": 25, "candidates": None}
    rec = probe_record(sae, torch.zeros(0, 16), np.zeros((0, 4), int), {}, spec, {"t": (resid, y, "mean")})
    fit = np.arange(30) % 2 == 0
    for name in ("pre", "post", "resid"):
        X = pooled_codes(sae, resid, name, "mean")  # all texts at once, as before
        want = best_probes(X[fit], {"t": y[fit]}, X[~fit], {"t": y[~fit]}, iters=25)["t"]
        got = rec["feature_sets"][name]["tasks"]["t"]
        assert got["column"] == want["column"] and got["loss"] == pytest.approx(want["loss"], rel=1e-9)


# ---- ablation ----------------------------------------------------------------------------------------------

def test_pairs_drawn_from_slots_are_the_pairs_of_the_dense_code():
    """ablation_record keeps a dense code as slots in latent order; the uniform draw over active pairs walks
    them in the same order, so the same generator draws the same (window, position, latent, value)."""
    sae, x = _sae("relu"), _rows(8 * 12)
    with torch.no_grad():
        dense = sae.encode(x).values.reshape(8, 12, 64)
    slots = encode_slots(sae, x)
    want = sample_pairs(dense, 40, torch.Generator().manual_seed(3), horizon=4)
    got = sample_pairs((slots.values.reshape(8, 12, -1), slots.indices.reshape(8, 12, -1)), 40,
                       torch.Generator().manual_seed(3), horizon=4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    return load_model(random_gpt2(folder / "model", write_text_files(folder / "text")))


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_ablation_record_in_row_blocks_matches_one_forward(arch, lm, rows_per_forward):
    d = lm.config.n_embd
    sae = _sae(arch, d=d)
    windows = torch.from_numpy(np.random.default_rng(0).integers(0, lm.config.vocab_size, size=(6, 16)))
    spec = {"horizon": 4, "pairs": 12, "batch": 4, "atol": 1e-6, "seed": 0}
    whole = ablation_record(lm, LAYER, sae, windows, spec)
    rows_per_forward(64, 20)
    spy = RowSpy(sae)
    blocked = ablation_record(lm, LAYER, sae, windows, spec)
    assert max(spy.rows) == 20
    for unit in ("latents", "channels"):
        hist, want_hist = blocked[unit].pop("histogram"), whole[unit].pop("histogram")
        assert blocked[unit] == pytest.approx(whole[unit], rel=1e-6, nan_ok=True) and hist == want_hist


# ---- geometry ----------------------------------------------------------------------------------------------

def test_random_reference_normalizes_in_place_holding_one_copy_of_the_directions():
    n, d, block = 2048, 64, 2**16
    got = random_reference(n, d, torch.Generator().manual_seed(0), max_block_elements=block)
    directions = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    want = nearest_neighbour_cosines(directions.clone(), block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with PeakBytes() as m:
        random_reference(n, d, torch.Generator().manual_seed(0), max_block_elements=block)
    # the drawn directions, normalized in place, and two blocks of cosines: no second [n, d] copy
    assert m.peak <= 4 * n * d + 2 * 4 * block + 64 * n
    with PeakBytes() as m:
        nearest_neighbour_cosines(directions, block)  # the SAE's decoder: a unit-norm copy beside it
    assert 4 * n * d <= m.peak <= 4 * n * d + 2 * 4 * block + 64 * n


# ---- analyses ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_progressive_in_row_blocks_matches_one_pass(arch, rows_per_forward):
    sae, x = _sae(arch), _rows(6000)
    spec = {"k_factors": [0.5, 1, 4], "thresholds": 4}
    whole = progressive(sae, x, spec)
    rows_per_forward(64, 1000)
    spy = RowSpy(sae)
    blocked = progressive(sae, x, spec)
    assert spy.rows[0] == 2048 and max(spy.rows[1:]) == 1000  # the thresholds' sample, then the curves
    assert blocked["trained"] == pytest.approx(whole["trained"], rel=1e-6)
    for kind in ("topk", "jumprelu"):
        for a, b in zip(blocked["curves"][kind], whole["curves"][kind]):
            assert a == pytest.approx(b, rel=1e-6)


def test_refinement_in_row_blocks_matches_one_pass(rows_per_forward):
    """The supports are the same; the solver stops per batch of tokens (and draws its power-iteration start
    per batch), so refined values agree to its tolerance, not bit for bit, as with any REFINE_BATCH."""
    sae, x = _sae("relu"), _rows(600)
    whole = refinement(sae, x, {"iters": 300})
    rows_per_forward(64, 128)
    spy = RowSpy(sae)
    blocked = refinement(sae, x, {"iters": 300})
    assert max(spy.rows) == 128
    assert sum(blocked.pop("log2_ratio_hist")["counts"]) == sum(whole.pop("log2_ratio_hist")["counts"])
    assert blocked.pop("fvu_before") == pytest.approx(whole.pop("fvu_before"), rel=1e-6)
    assert blocked == pytest.approx(whole, rel=1e-5)


# ---- interpret ---------------------------------------------------------------------------------------------

def test_act_fn_in_row_blocks_matches_one_forward(lm, rows_per_forward):
    sae = _sae("relu", d=lm.config.n_embd)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, lm.config.vocab_size, (50, 7), generator=gen)
    lengths, latents = torch.randint(1, 8, (50,), generator=gen), torch.randint(0, 64, (50,), generator=gen)
    act_fn = make_act_fn(lm, LAYER, sae, torch.device("cpu"))
    whole = act_fn(tokens, lengths, latents)
    rows_per_forward(64, 8)
    spy = RowSpy(sae)
    assert torch.allclose(act_fn(tokens, lengths, latents), whole, atol=1e-6)
    assert max(spy.rows) == 8 and (whole > 0).any()


class DenseRows(sp.csr_matrix):
    """A CSR matrix that records the rows of every dense copy made of it (or of its row slices)."""

    copies: list[int] = []

    def toarray(self, *args, **kwargs):
        DenseRows.copies.append(self.shape[0])
        return super().toarray(*args, **kwargs)


def test_simulated_codes_decode_in_row_blocks_as_one_product(rows_per_forward):
    """Explanation reconstruction (method §C.6) decodes N2G-simulated codes: dense [rows, n] blocks of at most
    FORWARD_ELEMENTS, never the whole batch's [windows * ctx_len, n]."""
    sae = _sae()
    rng = np.random.default_rng(0)
    codes = DenseRows(sp.random(120, 64, density=0.05, format="csr", random_state=rng, dtype=np.float32))
    x_norm, tokens = torch.zeros(120, 16), torch.zeros(10, 12, dtype=torch.long)
    whole = torch.from_numpy(codes.toarray()) @ sae.W_dec.detach() + sae.b_pre.detach()
    rows_per_forward(64, 25)
    DenseRows.copies.clear()
    with torch.no_grad():
        blocked = _decode_from(lambda _windows: codes, sae)(x_norm, tokens)
    assert DenseRows.copies == [25, 25, 25, 25, 20]
    assert torch.allclose(blocked, whole, atol=1e-6)


# ---- the memory model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(FORWARD_BYTES))
def test_forward_bytes_are_the_measured_peak_of_the_reconstruction_metrics(arch, tmp_path, rows_per_forward):
    n, rows = 8192, 512
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, n, arch, 8).eval()
    if arch == "batchtopk":
        sae.family.threshold.fill_(0.3)
    root = _store(tmp_path, rows=1024)
    rows_per_forward(n, rows)
    with PeakBytes() as m:
        reconstruction_metrics(sae, root, 0, 1024, torch.device("cpu"))
    assert 0.9 <= m.peak / (FORWARD_BYTES[arch] * rows * n) <= 1.0


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_progressive_peak_is_its_formula(arch, rows_per_forward):
    n, d, rows = 4096, 16, 1024  # enough rows that the curves' blocks, not the thresholds' sample, peak
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, n, arch, 8).eval()
    x = _rows(2048)
    rows_per_forward(n, rows)
    with torch.no_grad(), PeakBytes() as m:
        progressive_curves(sae, x, [4, 8, 16], np.array([0.05, 0.1]), x.mean(0))
    formula = stage_bytes(n, d, arch)["progressive"] - weight_bytes(n, d)
    assert 0.9 <= m.peak / formula <= 1.1


def test_stage_bytes_use_the_schemas_defaults():
    import inspect

    from saescale.config import schema

    props = schema()["properties"]
    ev, interp = props["evaluate"]["properties"], props["interpret"]["properties"]
    schema_defaults = {
        "ctx_len": props["subjects"]["additionalProperties"]["properties"]["ctx_len"]["default"],
        "batch_size": ev["batch_size"]["default"],
        "downstream_batch": ev["downstream_batch"]["default"],
        "probe_windows": ev["probes"]["properties"]["windows"]["default"],
        "ablation_windows": ev["ablation"]["properties"]["windows"]["default"],
        "interpret_batch": interp["batch"]["default"],
    }
    params = inspect.signature(stage_bytes).parameters
    assert {key: params[key].default for key in schema_defaults} == schema_defaults


def test_a_2_20_latent_sae_at_d_4096_fits_one_80_gb_gpu_and_a_2_24_one_fits_none():
    """The README's table: with the consolidated float32 weights (32 GiB) every stage stays under 50 GiB at
    n = 2^20, d = 4096 (TopK, default settings), leaving room for the subject model; at n = 2^24 the weights
    alone are 512 GiB."""
    at_2_20 = stage_bytes(2**20, 4096)
    assert weight_bytes(2**20, 4096) / GIB == pytest.approx(32, rel=1e-3)
    assert all(v < 50 * GIB for v in at_2_20.values())
    assert weight_bytes(2**24, 4096) > 500 * GIB
