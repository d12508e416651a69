"""Every arch's forward semantics and custom gradients against the formulas (method §A.5, B.1-B.6)."""

import numpy as np
import pytest
import torch

from saescale.sae.activations import (JumpReLUFunction, Latents, ProLUFunction, StepFunction, batch_topk, rectangle,
                                      topk)
from saescale.sae.archs import ARCHS
from saescale.sae.losses import auxk_loss, normalized_mse
from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import PenaltyController, TrainSpec, auxk_latents, train_sae
from saescale.store import InMemoryBatches

from test_ground_truth import max_cosines, synthetic


def make(arch, d=16, n=48, k=4, dtype=torch.float32, **params):
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, n, arch, k, params or None).to(dtype)
    sae.init_from_data_(torch.zeros(d, dtype=dtype))
    return sae


def mse_of(x):
    return lambda x_hat: normalized_mse(x_hat, x, 1.0)


def test_schema_lists_every_arch():
    from saescale.config import schema
    enum = schema()["properties"]["sweep"]["properties"]["variants"]["additionalProperties"]["properties"]["arch"]
    assert set(enum["enum"]) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shapes_and_nonnegative_codes(arch):
    sae = make(arch)
    x = torch.randn(32, 16)
    x_hat, lat = sae(x)
    assert x_hat.shape == x.shape
    assert torch.allclose(sae.decode(lat), lat.dense(48) @ sae.W_dec + sae.b_pre, atol=1e-5)
    assert (lat.dense(48) >= 0).all()
    out = sae.family.forward_train(sae, x, mse_of(x), torch.zeros(48, dtype=torch.bool))
    assert out.x_hat.shape == x.shape and out.pre_acts.shape == (32, 48)
    loss = normalized_mse(out.x_hat, x, 1.0) + sum(out.terms.values())
    loss.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


def test_unknown_arch_param_is_refused():
    with pytest.raises(ValueError, match="penalty_inti"):
        SparseAutoencoder(8, 16, "relu", 2, {"penalty_inti": 1.0})


def test_batch_topk_keeps_batch_times_k_and_mean_l0_is_k():
    acts = torch.rand(64, 100) + 0.01  # all positive
    lat, kept_min = batch_topk(acts, 5)
    assert int((lat.values > 0).sum()) == 64 * 5
    assert float(lat.l0().float().mean()) == 5.0
    assert lat.l0().float().std() > 0  # per-token L0 varies
    # the kept entries are the 320 largest of the batch, and kept_min is the smallest of them
    assert torch.equal(lat.values[lat.values > 0].sort().values, acts.flatten().topk(320).values.sort().values)
    assert float(kept_min) == float(acts.flatten().topk(320).values.min())


def test_batch_topk_inference_uses_the_estimated_threshold():
    sae = make("batchtopk", k=4)
    x = torch.randn(256, 16)
    for _ in range(3):
        sae.family.forward_train(sae, x, mse_of(x), torch.zeros(48, dtype=torch.bool))
    theta = float(sae.family.threshold)
    assert theta > 0
    pre = torch.relu(sae.pre_acts(x))
    assert torch.equal(sae.encode(x).values, pre * (pre > theta))
    # the threshold reproduces the training L0 on the batch it was estimated from
    assert abs(float(sae.encode(x).l0().float().mean()) - 4) < 1.0


def test_jumprelu_encodes_by_threshold():
    sae = make("jumprelu")
    x = torch.randn(20, 16)
    pre = sae.pre_acts(x)
    theta = sae.family.threshold()
    assert torch.equal(sae.encode(x).values, pre * (pre > theta))


def test_jumprelu_pseudo_derivatives_match_the_rectangle_kernel_formulas():
    eps = 0.1
    pre = torch.tensor([[0.48, 0.52, 0.56, 0.9, 0.2]], requires_grad=True)
    theta = torch.full((5,), 0.5, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    JumpReLUFunction.apply(pre, theta, eps, False).backward(g)
    K = rectangle((pre.detach() - 0.5) / eps)
    assert K.tolist() == [[1, 1, 0, 0, 0]]
    assert torch.allclose(theta.grad, -(0.5 / eps) * (g * K)[0])  # -(theta/eps) K((pre-theta)/eps)
    assert torch.equal(pre.grad, g * (pre.detach() > 0.5))  # H(pre - theta)

    pre.grad = theta.grad = None
    StepFunction.apply(pre, theta, eps).backward(g)
    assert torch.allclose(theta.grad, -(1 / eps) * (g * K)[0])
    assert pre.grad is None  # the L0 penalty moves thresholds only


def test_tanh_variant_passes_the_kernel_to_the_input():
    eps = 0.1
    pre = torch.tensor([[0.48, 0.9]], requires_grad=True)
    theta = torch.full((2,), 0.5, requires_grad=True)
    JumpReLUFunction.apply(pre, theta, eps, True).sum().backward()
    assert torch.allclose(pre.grad, torch.tensor([[0.5 / eps, 1.0]]))


def test_prolu_bias_only_gates_and_gets_the_ste_gradient():
    m = torch.tensor([[0.3, 0.3, -0.2, 0.8]], requires_grad=True)
    b = torch.tensor([0.0, -0.5, 1.0, -0.1], requires_grad=True)
    z = ProLUFunction.apply(m, b)
    active = torch.tensor([[True, False, False, True]])
    assert torch.equal(z.detach(), m.detach() * active)  # magnitudes are m, never m + b
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    z.backward(g)
    assert torch.equal(m.grad, g * active)
    assert torch.allclose(b.grad, (g * m.detach() * active)[0])  # ProLU_STE: dz/db := m 1[active]


def test_gated_auxiliary_loss_does_not_move_the_decoder():
    sae = make("gated")
    x = torch.randn(32, 16)
    out = sae.family.forward_train(sae, x, mse_of(x), torch.zeros(48, dtype=torch.bool))
    out.terms["gate_aux"].backward()
    assert sae.W_dec.grad is None or float(sae.W_dec.grad.abs().max()) == 0.0
    assert float(sae.W_enc.grad.abs().max()) > 0  # it trains the gate path


@pytest.mark.parametrize("arch", ["topk", "multitopk", "relu", "relu_dn", "gated"])
def test_smooth_parts_match_finite_differences(arch):
    """Away from selection boundaries these losses are smooth in the weights: autograd = finite differences."""
    sae = make(arch, d=6, n=10, k=3, dtype=torch.float64)
    x = torch.randn(8, 6, dtype=torch.float64)
    if sae.family.penalized:
        sae.family.penalty.fill_(0.1)

    def loss(W_enc, W_dec):  # the loss as a function of plain tensors standing in for the parameters
        saved = sae.W_enc, sae.W_dec
        del sae._parameters["W_enc"], sae._parameters["W_dec"]
        sae.W_enc, sae.W_dec = W_enc, W_dec
        try:
            out = sae.family.forward_train(sae, x, mse_of(x), torch.zeros(10, dtype=torch.bool))
            # gate_aux stops the gradient into W_dec by design (tested above), so finite differences differ there
            terms = [v for name, v in out.terms.items() if name != "gate_aux"]
            return normalized_mse(out.x_hat, x, 1.0).double() + sum(terms)
        finally:
            sae._parameters["W_enc"], sae._parameters["W_dec"] = saved

    W_enc = sae.W_enc.detach().clone().requires_grad_()
    W_dec = sae.W_dec.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (W_enc, W_dec), eps=1e-7, atol=1e-5)


PRECISIONS = {  # parameter dtype, autocast, tolerance of the sparse path against the dense one
    "float64": (torch.float64, None, {"rtol": 1e-9, "atol": 1e-12}),
    "float32": (torch.float32, None, {"rtol": 2e-4, "atol": 1e-6}),
    # train.precision: bf16 (CPU autocast here, CUDA's in training): both paths round to bf16, in different orders
    "bf16-autocast": (torch.float32, torch.bfloat16, None),
}


@pytest.mark.parametrize("arch", ["topk", "multitopk"])
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_selected_latent_backward_equals_the_dense_backward(arch, precision):
    """method §A.9: the TopK family backpropagates through the selected latents only. On fresh random inputs
    every parameter's gradient of the whole loss (main, Multi-TopK and AuxK terms) equals autograd through
    all n pre-activations, and the forward is unchanged; under bf16 autocast too, to bf16's precision."""
    dtype, autocast_dtype, tol = PRECISIONS[precision]
    autocast = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    d, n, k, k_aux = 24, 200, 6, 16
    for seed in range(3):
        sae = make(arch, d=d, n=n, k=k, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.b_enc.copy_(0.1 * torch.randn(n, generator=gen))
            sae.b_pre.copy_(torch.randn(d, generator=gen))
        x = (torch.randn(300, d, generator=gen) + 0.5).to(dtype)
        dead = torch.rand(n, generator=gen) < 0.3
        params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]

        def total(x_hat, terms, aux_lat, residual):
            aux = auxk_loss(residual(aux_lat), x - x_hat.detach())
            return normalized_mse(x_hat, x, 1.0) + sum(terms.values()) + aux / 32

        with autocast:
            out = sae.family.forward_train(sae, x, mse_of(x), dead)
            assert not out.pre_acts.requires_grad and out.take is not None  # no graph through all n latents
            sparse_loss = total(out.x_hat, out.terms, auxk_latents(out.pre_acts, dead, k_aux, out.take),
                                sae.decode_residual)
        sparse = torch.autograd.grad(sparse_loss, params)

        # the reference: the same selections read from a graph over every latent, decoded by a dense matmul
        def dense_residual(lat):
            return lat.dense(n) @ sae.W_dec

        with autocast:
            pre = sae.pre_acts(x)
            k_big = sae.family.params["multiple"] * k if arch == "multitopk" else k
            values, indices = pre.topk(k_big, dim=-1, sorted=True)
            values = torch.relu(values)
            x_hat = dense_residual(Latents(values[:, :k], indices[:, :k])) + sae.b_pre
            terms = {"multitopk": sae.family.params["coef"] * mse_of(x)(dense_residual(Latents(values, indices))
                                                                        + sae.b_pre)} if arch == "multitopk" else {}
            dense_loss = total(x_hat, terms, auxk_latents(pre, dead, k_aux), dense_residual)
        dense = torch.autograd.grad(dense_loss, params)

        assert torch.equal(out.latents.indices.sort(-1).values, indices[:, :k].sort(-1).values)  # same selection
        for name, a, b in zip(["x_hat", "W_enc", "b_enc", "W_dec", "b_pre"], [out.x_hat, *sparse], [x_hat, *dense]):
            assert b.abs().max() > 0, name
            if tol is None:  # bf16: elementwise closeness fails on tiny entries; the error relative to the norm
                a, b = a.detach().float(), b.detach().float()
                assert float((a - b).norm() / b.norm()) < 1e-2, name  # measured 0.1-0.35%
            else:
                torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_sparse_decode_and_its_products_equal_dense_ones():
    """SparseDecode's gradients (method §A.9) against a dense matmul, with latents repeated across tokens and
    within one token's slots (they must add), in float64, for one bag per token and for three (main, extra,
    AuxK slots decoded in one pass); and scatter_rows_t, both kernels, against S^T @ dense."""
    from saescale.sae.activations import Selection, SparseDecode, scatter_rows_t

    gen = torch.Generator().manual_seed(0)
    batch, n, k, d = 37, 11, 7, 5
    idx = torch.randint(0, n, (batch, k), generator=gen)
    idx[0] = 3  # every slot of token 0 on one latent
    values = torch.rand(batch, k, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    for bounds in [(), (2, 5)]:
        edges = [0, *bounds, k]
        codes = []
        for lo, hi in zip(edges, edges[1:]):
            rows = torch.arange(batch)[:, None].expand(-1, hi - lo)
            codes.append(torch.zeros(batch, n, dtype=torch.float64).index_put((rows, idx[:, lo:hi]), values[:, lo:hi],
                                                                              accumulate=True))
        dense_out = torch.stack([c @ weight for c in codes], 1)  # [batch, bags, d]
        sel = Selection(idx, n, bounds)
        out = SparseDecode.apply(values, weight, sel)
        if not bounds:
            dense_out = dense_out[:, 0]
        torch.testing.assert_close(out, dense_out)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        ref = torch.autograd.grad((dense_out * g).sum(), (values, weight))
        got = torch.autograd.grad((out * g).sum(), (values, weight))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda v, w, sel=sel: SparseDecode.apply(v, w, sel), (values, weight))
        gb = g.reshape(-1, d)
        s_t = torch.cat([c.detach().T for c in codes], 1).view(n, len(codes), batch).transpose(1, 2).reshape(n, -1)
        for method in ("bag", "csr"):
            torch.testing.assert_close(scatter_rows_t(sel, values.detach(), gb, by_bag=True, method=method), s_t @ gb)
            torch.testing.assert_close(scatter_rows_t(sel, values.detach(), gb[:batch], method=method),
                                       sum(codes).detach().T @ gb[:batch])


def test_penalty_controller_moves_lambda_towards_the_target_and_freezes():
    sae = make("relu", k=4)
    ctl = PenaltyController(sae, steps=10, fraction=0.5, rate=0.1)
    before = float(sae.family.penalty)
    dense = torch.ones(2, 48)  # L0 48 > 4: more penalty
    from saescale.sae.activations import Latents
    ctl.update(0, Latents(dense))
    assert float(sae.family.penalty) == pytest.approx(before * np.exp(0.1))  # error clamped to 1
    ctl.update(5, Latents(dense))  # frozen from step ceil(10 * 0.5)
    assert float(sae.family.penalty) == pytest.approx(before * np.exp(0.1))
    ctl.update(1, Latents(torch.zeros(2, 48)))  # L0 below target: less penalty
    assert float(sae.family.penalty) < before * np.exp(0.1)


# ---- trained on planted dictionaries -----------------------------------------------------------------

def train(x, arch, n, k, tokens, seed=0, tmp=None, **kw):
    from saescale.normalize import layer_stats
    stats = layer_stats([x], len(x))
    spec = TrainSpec(arch=arch, n=n, k=k, d_model=x.shape[1], lr=kw.pop("lr", 3e-3), batch_size=512, tokens=tokens,
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=8192,
                     ema_decay=0.0, log_every=50, checkpoint_seconds=0, seed=seed, device="cpu", **kw)
    unit = x[:2048] / np.linalg.norm(x[:2048], axis=1, keepdims=True)
    sae, rows, summary = train_sae(InMemoryBatches(x, 512, seed), np.asarray(stats["geometric_median"]),
                                   stats["baseline_mse"], spec, tmp / f"{arch}.pt", unit)
    return sae, rows, summary


def heldout_fvu(sae, x, k_prime):
    from saescale.normalize import normalize
    xn = normalize(torch.from_numpy(x))[0]
    with torch.no_grad():
        x_hat = sae.decode(topk(sae.family.scores(sae, xn), k_prime))
    return float(((x_hat - xn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum())


def test_multitopk_beats_topk_at_four_times_k_on_heldout_data(tmp_path):
    _, x = synthetic(n_atoms=96, d=32, active=8, rows=40000, seed=1)
    train_x, test_x = x[:32768], x[32768:]
    plain, _, _ = train(train_x, "topk", 128, 2, 150_000, tmp=tmp_path)
    multi, _, _ = train(train_x, "multitopk", 128, 2, 150_000, tmp=tmp_path)
    assert heldout_fvu(multi, test_x, 8) < heldout_fvu(plain, test_x, 8)
    # and the price at k itself is small
    assert heldout_fvu(multi, test_x, 2) < 1.1 * heldout_fvu(plain, test_x, 2)


TANH_SHORTFALL = pytest.mark.xfail(
    strict=True, reason="at this budget the tanh variant reaches FVU 0.31 and recovers 39% of atoms (README)")


@pytest.mark.parametrize("arch", ["multitopk", "batchtopk", "relu", "relu_dn", "prolu", "gated", "jumprelu",
                                  pytest.param("jumprelu_tanh", marks=TANH_SHORTFALL)])
def test_every_arch_recovers_a_planted_dictionary(arch, tmp_path):
    """Each family (TopK-style, L1-penalised, L0-penalised) finds the atoms, at an L0 near the truth."""
    atoms, x = synthetic()
    sae, rows, summary = train(x, arch, 128, 3, 400_000, tmp=tmp_path)
    cos = max_cosines(atoms, sae)
    assert (cos > 0.9).mean() >= 0.8, f"{arch}: recovered {(cos > 0.9).mean():.2f}; {np.sort(cos)[:8]}"
    assert rows[-1]["l0"] == pytest.approx(3, rel=0.5)
