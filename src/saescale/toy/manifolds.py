"""Michaud et al.'s toy feature-manifold SAE experiments (method §F.1; the paper's Figs 1, 3, 5, 6, App. C).

One SAE, the pipeline's `SparseAutoencoder` with arch `relu_dn` (ReLU, decoder-norm-weighted L1, B.2) or
`jumprelu_tanh` (Anthropic's Jan-2025 JumpReLU with the tanh penalty, B.5), reconstructs points of a single
manifold drawn fresh every step from a `torch.Generator`:

- `circle`: x = (cos t, sin t), t ~ U[0, 2 pi): S^1 in R^2 (Fig 1);
- `sphere`: x = g / |g|, g ~ N(0, I_d): the unit hypersphere S^(d-1) in R^d (Figs 3, 5, 6 left);
- `shell`: {0.5 < |x| < 2}, uniform direction times a radius r ~ U(0.5, 2) [I], or with `radius="volume"`
  r drawn with density proportional to r^(d-1) (volume-uniform; the sensitivity check) (Figs 3, 6 right).

Dimension convention [I]: d is always the AMBIENT dimension, so `sphere` at d = 2 is the circle.

The loss is |x - x_hat|^2 summed over dimensions, averaged over the batch, plus the arch's own sparsity term
with lambda FIXED (`sae.family.penalty` is set once and never calibrated): relu_dn lambda * sum_i f_i |d_i|
(lambda = 0.1); jumprelu_tanh lambda_s * sum_i tanh(c f_i |d_i|) with c = 0.1, lambda_s = 1. The arch rescales
its tanh constant by sqrt(d) (for the pipeline's unit-norm LM inputs), so we pass tanh_scale = c / sqrt(d) to
get the paper's c on these unit-scale points. L(n) = the final TOTAL loss (MSE + sparsity) on fresh samples.

Choices the paper leaves open [I]:
- init: decoder rows random unit directions, W_enc = W_dec, b_enc = b_pre = 0. Our SAE subtracts b_pre
  before encoding; with a free b_enc that is a reparametrization of the paper's x_hat = W_d f + b_d.
- one Adam (betas (0.9, 0.999)) for every parameter, no warm-up, no clipping; `lr_decay` (default 0, the
  paper) optionally decays lr linearly to 0 over that final fraction of the run.
- JumpReLU: threshold init 0.1 and STE bandwidth 0.05 in input units (the arch's `bandwidth` param is
  0.05 sqrt(d)): unit-scale pre-activations, and a window wide enough that thresholds move from the first
  steps. Its dead-latent pre-activation term (lambda_P, arch default) acts on latents silent for 500 steps;
  it is an optimization aid, not part of L(n) (evaluation passes no dead latents, so the term is 0).
- the L(n) of each n is the min over seeds (closest to the optimum the allocation model assumes) and mean.

`ToySpec` (one SAE) defaults to the paper's recipe (12,000 steps, batch 2048, lr 1e-3). The study's
DEFAULTS are a reduced study that fits about 70 CPU-seconds: 2000 steps of batch 512 at lr 2e-2 (decayed
over the last half), n <= 64 on the circle, <= 256 on spheres, <= 24 on shells, beta fitted on [16, 256].
Measured with those settings: shells plateau at exactly n = 2d (d = 2: L(4) = 0.154, L(24) = 0.154;
d = 3: L(6) = 0.180, L(24) = 0.177), spheres keep improving (beta = 0.024 +/- 0.009 at d = 3,
0.101 +/- 0.024 at d = 6 on [16, 256]; the paper recipe gives L(256) = 0.129 at d = 6 against our 0.139).

Cost: CPU milliseconds per training step, batch 2048, one thread (torch 2.13, a busy 2-core x86 box;
`seconds_per_step`; a step is sampling + forward + backward + fused Adam), relu_dn / jumprelu_tanh:

    d \\ n      4           32          256          1024          4096
    2       0.63 / 1.1   0.99 / 2.6   5.3 / 18    38 / 93     251 / 747
    3       0.64 / 1.3   0.96 / 3.4   5.4 / 16    36 / 79     251 / 773
    6       0.80 / 1.2   1.65 / 2.4   6.1 / 15    39 / 78     251 / 786
    8       0.71 / 1.2   1.19 / 2.8   6.2 / 17    39 / 83     263 / 848

d hardly matters: elementwise work on the [batch, n] code dominates, and below n ~ 64 a step is ~0.6 ms
of per-op overhead whatever the batch (batch 512: 0.8 ms at n = 8, 1.9 ms at n = 256). Beyond n = 1024 the
[batch, n] tensors leave the cache (relu_dn: 83 ms at n = 2048, 0.50 s at 8192, 1.06 s at 16384).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from saescale.evaluate.geometry import nearest_neighbour_cosines
from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import adam
from saescale.scaling.fits import loglog_slope

# re-exported: the settings live in a torch-free module so Snakemake can plan without importing torch
from saescale.toy.settings import (  # noqa: F401
    DEFAULTS,
    KINDS,
    RADII,
    TOY_ARCHS,
    check,
    study_curves,
    validate_settings,
)

log = logging.getLogger("saescale.toy")

SHELL_RADII = (0.5, 2.0)  # method §F.1: {x : 0.5 < |x| < 2}
PAPER_BETA_RANGE = (100, 10_000)  # method §F.1: slope of log L vs log n for n in [10^2, 10^4]
JUMPRELU_THETA_INIT = 0.1  # [I], see the module docstring
JUMPRELU_BANDWIDTH = 0.05  # [I] in input units
CPU_THREADS = 1  # toy ops are tiny: OpenMP hand-offs cost more than they save (2 threads on a busy 2-core
# box ran a small step 150x slower than 1)
DEAD_WINDOW_STEPS = 500  # jumprelu_tanh: silent this long => its pre-activation term applies
ARC_GRID = 3600  # angles at which circle latents are tested for firing (0.1 degree cells)
PANEL_POINTS = 200  # data / reconstruction points drawn per circle panel


# ---- data ------------------------------------------------------------------------------------------

def sample(kind: str, d: int, batch: int, generator: torch.Generator, radius: str = "uniform") -> torch.Tensor:
    """`batch` fresh points of the manifold `kind` in R^d [batch, d], on the generator's device."""
    device = generator.device
    if kind == "circle":
        if d != 2:
            raise ValueError(f"the circle lives in d = 2, got d = {d}")
        t = torch.rand(batch, generator=generator, device=device) * (2 * math.pi)
        return torch.stack((t.cos(), t.sin()), dim=1)
    if kind not in ("sphere", "shell"):
        raise ValueError(f"unknown manifold kind '{kind}'; known: {list(KINDS)}")
    g = torch.randn(batch, d, generator=generator, device=device)
    x = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if kind == "sphere":
        return x
    lo, hi = SHELL_RADII
    u = torch.rand(batch, 1, generator=generator, device=device)
    if radius == "uniform":
        r = lo + (hi - lo) * u
    elif radius == "volume":  # inverse CDF of the density proportional to r^(d-1) on [lo, hi]
        r = (lo**d + u * (hi**d - lo**d)) ** (1.0 / d)
    else:
        raise ValueError(f"unknown shell radius distribution '{radius}'; known: {list(RADII)}")
    return x * r


def reference_loss(kind: str, d: int, radius: str = "uniform") -> float:
    """L(0) = E|x - E x|^2 = E|x|^2 (the manifolds are centred): the loss of an SAE with no latents."""
    if kind != "shell":
        return 1.0
    lo, hi = SHELL_RADII
    if radius == "uniform":
        return (hi**3 - lo**3) / (3 * (hi - lo))
    return d * (hi ** (d + 2) - lo ** (d + 2)) / ((d + 2) * (hi**d - lo**d))


# ---- one toy SAE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToySpec:
    kind: str
    d: int
    n: int
    arch: str = "relu_dn"
    steps: int = 12_000
    batch: int = 2048
    lr: float = 1e-3
    l1: float = 0.1
    tanh_c: float = 0.1
    tanh_lambda: float = 1.0
    seed: int = 0
    radius: str = "uniform"
    lr_decay: float = 0.0  # fraction of the run, at its end, over which lr decays linearly to 0

    @property
    def penalty(self) -> float:
        return self.l1 if self.arch == "relu_dn" else self.tanh_lambda

    def arch_params(self) -> dict:
        if self.arch == "relu_dn":
            return {"penalty_init": self.l1}
        root_d = math.sqrt(self.d)  # the arch multiplies tanh_scale and divides bandwidth by sqrt(d)
        return {"penalty_init": self.tanh_lambda, "tanh_scale": self.tanh_c / root_d,
                "bandwidth": JUMPRELU_BANDWIDTH * root_d, "theta_init": JUMPRELU_THETA_INIT}


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def init_toy_sae(spec: ToySpec, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """method §F.1 init [I]: decoder rows random unit directions, W_enc = W_dec, biases 0, lambda fixed."""
    if spec.arch not in TOY_ARCHS:
        raise ValueError(f"toy SAEs use the archs {list(TOY_ARCHS)}, got '{spec.arch}'")
    sae = SparseAutoencoder(spec.d, spec.n, spec.arch, arch_params=spec.arch_params()).to(device)
    gen = torch.Generator().manual_seed(_seed("init", spec.seed, spec.kind, spec.d, spec.n, spec.arch))
    rows = torch.randn(spec.n, spec.d, generator=gen)
    rows = rows / rows.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
        sae.family.penalty.fill_(spec.penalty)
    return sae


def _squared_error(x: torch.Tensor):
    return lambda x_hat: (x_hat - x).pow(2).sum(dim=-1).mean()  # summed over dims, mean over the batch


@contextlib.contextmanager
def _cpu_threads(device, threads: int = CPU_THREADS):
    """Run with `threads` intra-op threads on CPU, restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_toy_sae(spec: ToySpec, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Adam on fresh samples every step: loss = squared error + the arch's terms at the fixed lambda."""
    with _cpu_threads(device):
        return _train(spec, device)


def _train(spec: ToySpec, device: str | torch.device) -> SparseAutoencoder:
    sae = init_toy_sae(spec, device)
    gen = torch.Generator(device=device).manual_seed(_seed("data", spec.seed, spec.kind, spec.d, spec.n, spec.arch))
    opt = adam(sae.parameters(), spec.lr)  # fused: a fifth of a small toy step is per-op overhead
    decay_steps = round(spec.lr_decay * spec.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (spec.steps - step) / decay_steps) if decay_steps else 1.0)
    track_dead = spec.arch == "jumprelu_tanh"
    last_fired = torch.zeros(spec.n, dtype=torch.long, device=device)
    dead = torch.zeros(spec.n, device=device)
    for step in range(spec.steps):
        x = sample(spec.kind, spec.d, spec.batch, gen, spec.radius)
        mse_fn = _squared_error(x)
        out = sae.family.forward_train(sae, x, mse_fn, dead)
        loss = mse_fn(out.x_hat) + sum(out.terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if track_dead:
            with torch.no_grad():
                fired = (out.latents.values > 0).any(dim=0)
                last_fired = torch.where(fired, step, last_fired)
                dead = (step - last_fired >= DEAD_WINDOW_STEPS).float()
    return sae


def evaluate_toy_sae(sae: SparseAutoencoder, kind: str, d: int, samples: int = 1 << 16, seed: int = 0,
                     radius: str = "uniform") -> dict:
    """Total loss (MSE + sparsity) and its parts on `samples` fresh points, in batches: mean L0 and the
    fraction of latents that never fired. Auxiliary terms (JumpReLU's dead-latent pull) are not part of
    L(n): no latent is passed as dead, so they are 0."""
    with _cpu_threads(sae.W_dec.device), torch.no_grad():
        return _evaluate(sae, kind, d, samples, seed, radius)


def _evaluate(sae: SparseAutoencoder, kind: str, d: int, samples: int, seed: int, radius: str) -> dict:
    device = sae.W_dec.device
    gen = torch.Generator(device=device).manual_seed(_seed("eval", seed, kind, d))
    rows = max(256, min(8192, (1 << 23) // sae.n_latents))
    no_dead = torch.zeros(sae.n_latents, device=device)
    mse = sparsity = l0 = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    done = 0
    while done < samples:
        m = min(rows, samples - done)
        x = sample(kind, d, m, gen, radius)
        mse_fn = _squared_error(x)
        out = sae.family.forward_train(sae, x, mse_fn, no_dead)
        values = out.latents.dense(sae.n_latents)  # [m, n]
        mse += float(mse_fn(out.x_hat)) * m
        sparsity += float(out.terms.get("sparsity", torch.zeros(()))) * m
        l0 += float((values > 0).sum())
        fired |= (values > 0).any(dim=0)
        done += m
    mse, sparsity = mse / samples, sparsity / samples
    return {"loss": mse + sparsity, "mse": mse, "sparsity": sparsity, "l0": l0 / samples,
            "dead_fraction": 1.0 - float(fired.float().mean()), "alive": fired.cpu()}


def nn_cosine_means(sae: SparseAutoencoder, alive: torch.Tensor | None = None) -> dict:
    """Mean nearest-neighbour decoder cosine (method §F.4), over all latents and among alive ones only
    (dead latents keep their random init directions). None where fewer than 2 latents."""
    W = sae.W_dec.detach().float().cpu()
    out = {"nn_cos_mean": None, "nn_cos_mean_alive": None}
    if W.shape[0] >= 2:
        out["nn_cos_mean"] = float(nearest_neighbour_cosines(W)[0].mean())
    if alive is not None and int(alive.sum()) >= 2:
        out["nn_cos_mean_alive"] = float(nearest_neighbour_cosines(W[alive])[0].mean())
    return out


# ---- circle diagnostics ----------------------------------------------------------------------------

def _runs(mask: np.ndarray) -> list[list[float]]:
    """Circular runs of True in `mask` [grid] as [start, end] angles (cell edges; end may exceed 2 pi when
    the run wraps past angle 0)."""
    grid = mask.size
    h = 2 * math.pi / grid
    if mask.all():
        return [[0.0, 2 * math.pi]]
    if not mask.any():
        return []
    starts = np.flatnonzero(mask & ~np.roll(mask, 1))
    ends = np.flatnonzero(mask & ~np.roll(mask, -1))
    if ends[0] < starts[0]:  # the first run wraps: pair it with the last start
        ends = np.concatenate([ends[1:], [ends[0] + grid]])
    return [[float(s * h), float((e + 1) * h)] for s, e in zip(starts, ends)]


@torch.no_grad()
def firing_arcs(sae: SparseAutoencoder, grid: int = ARC_GRID) -> list[list[list[float]]]:
    """For a circle SAE, each latent's firing arcs: the angles t at which f_i((cos t, sin t)) > 0, as
    [start, end] arcs on a grid of `grid` cells (an empty list for a latent that never fires)."""
    t = (torch.arange(grid, dtype=torch.float64) + 0.5) * (2 * math.pi / grid)
    x = torch.stack((t.cos(), t.sin()), dim=1).float().to(sae.W_dec.device)
    fires = (sae.encode(x).dense(sae.n_latents) > 0).cpu().numpy()  # [grid, n]
    return [_runs(fires[:, i]) for i in range(sae.n_latents)]


def arc_summary(arcs: list[list[list[float]]]) -> dict:
    """Arc length per alive latent against the tiling value 2 pi / n, and how much of the circle is covered."""
    n = len(arcs)
    lengths = np.array([sum(e - s for s, e in a) for a in arcs])
    alive = np.array([bool(a) for a in arcs])
    covered = np.zeros(ARC_GRID, dtype=bool)
    h = 2 * math.pi / ARC_GRID
    for a in arcs:
        for s, e in a:
            idx = np.arange(round(s / h), round(e / h)) % ARC_GRID
            covered[idx] = True
    return {"arc_length_mean": float(lengths[alive].mean()) if alive.any() else None,
            "arc_length_sum": float(lengths.sum()), "arc_length_tiling": 2 * math.pi / n,
            "arc_coverage": float(covered.mean()), "n_alive_arcs": int(alive.sum())}


# ---- curves, fits --------------------------------------------------------------------------------

def fit_beta(ns, losses, n_min: float = PAPER_BETA_RANGE[0], n_max: float = PAPER_BETA_RANGE[1]) -> dict:
    """OLS slope of log L against log n over n in [n_min, n_max] (method §F.1, Fig 5): beta = -slope, its
    standard error and the points used. ok=False with a reason when fewer than 3 points lie in the range;
    `truncated` when the trained n do not cover the whole requested range."""
    ns, losses = np.asarray(ns, float), np.asarray(losses, float)
    good = np.isfinite(ns) & np.isfinite(losses) & (ns > 0) & (losses > 0)
    ns = ns[good]
    sel = (ns >= n_min) & (ns <= n_max)
    out = {"beta": None, "stderr": None, "intercept": None, "n_points": int(sel.sum()), "ok": False,
           "reason": None, "requested_range": [n_min, n_max],
           "range": [float(ns[sel].min()), float(ns[sel].max())] if sel.any() else None,
           "truncated": bool(ns.size == 0 or ns.min() > n_min or ns.max() < n_max)}
    fit = loglog_slope(ns, losses[good], n_min, n_max)
    if not fit["ok"]:
        return {**out, "reason": f"in [{n_min:g}, {n_max:g}]: {fit['reason']}"}
    return {**out, "beta": -fit["slope"], "stderr": fit["slope_err"], "intercept": fit["intercept"], "ok": True}


def plateau(ns, losses, d: int, tol: float = 0.05) -> dict:
    """Shell saturation (method §F.1): the smallest n whose loss is within `tol` (relative) of the
    curve's final value, against the +/- basis solution's 2d latents."""
    pairs = sorted((int(n), float(v)) for n, v in zip(ns, losses) if v is not None and math.isfinite(v))
    out = {"plateau_n": None, "two_d": 2 * d, "ratio": None, "final_n": None, "final_loss": None, "tol": tol}
    if not pairs:
        return out
    final_n, final = pairs[-1]
    n_plateau = next(n for n, v in pairs if v <= final * (1 + tol))
    return {**out, "plateau_n": n_plateau, "ratio": n_plateau / (2 * d), "final_n": final_n, "final_loss": final}


def _point(s: dict, kind: str, d: int, arch: str, n: int, device) -> tuple[dict, SparseAutoencoder]:
    """Train every seed of one (kind, d, arch, n); the record and the best seed's SAE."""
    runs = []
    t0 = time.perf_counter()
    for i in range(_per_kind(s, "seeds", kind)):
        spec = ToySpec(kind, d, n, arch, s["steps"], s["batch"], s["lr"], s["l1"], s["tanh_c"],
                       s["tanh_lambda"], s["seed"] + i, s["shell_radius"], s["lr_decay"])
        sae = train_toy_sae(spec, device)
        ev = evaluate_toy_sae(sae, kind, d, s["eval_samples"], s["seed"], s["shell_radius"])
        runs.append((ev, sae, spec.seed))
    seconds = time.perf_counter() - t0
    best, best_sae, _ = min(runs, key=lambda r: r[0]["loss"])
    losses = [r[0]["loss"] for r in runs]
    rec = {"n": n, "loss_min": min(losses), "loss_mean": float(np.mean(losses)),
           "seeds": [{"seed": sd, **{k: v for k, v in ev.items() if k != "alive"}} for ev, _, sd in runs],
           **{k: best[k] for k in ("mse", "sparsity", "l0", "dead_fraction")},
           **nn_cosine_means(best_sae, best["alive"]), "train_seconds": seconds}
    if kind == "circle" or (kind == "sphere" and d == 2):
        rec.update(arc_summary(firing_arcs(best_sae)))
    log.info("toy %s d=%d %s n=%d: L=%.5f (mse %.5f, L0 %.2f, dead %.2f) in %.1fs", kind, d, arch, n,
             rec["loss_min"], rec["mse"], rec["l0"], rec["dead_fraction"], seconds)
    return rec, best_sae


def _per_kind(s: dict, key: str, kind: str):
    """A setting given either as one value or as {kind: value} (the n grid, seeds)."""
    return s[key][kind] if isinstance(s[key], dict) else s[key]


def toy_curve(settings: dict, saes_out: dict | None = None) -> list[dict]:
    """L(n) over the n grid for one (kind, d, arch), given as the settings keys `kind`, `d` (not for the
    circle) and `arch`, the rest as in `toy_study`. One record per n: loss (min and mean over seeds), the
    best seed's parts, nearest-neighbour cosines and, on the circle, firing arcs. `saes_out`, when given,
    receives {n: the best seed's SAE}."""
    kind, arch = settings.get("kind"), settings.get("arch", "relu_dn")
    d = 2 if kind == "circle" else settings.get("d")
    check(kind in KINDS, "kind", f"unknown manifold kind {kind!r}; known: {list(KINDS)}")
    check(isinstance(d, int) and not isinstance(d, bool) and d >= 2, "d", f"needs an integer >= 2, got {d!r}")
    check(arch in TOY_ARCHS, "arch", f"unknown toy arch {arch!r}; known: {list(TOY_ARCHS)}")
    rest = {k: v for k, v in settings.items() if k not in ("kind", "d", "arch")}
    s = validate_settings({**rest, "kinds": [kind], "dims": {} if kind == "circle" else {kind: [d]},
                           "archs": [arch]})
    device = resolve_device(s["device"])
    points = []
    for n in sorted(set(_per_kind(s, "n", kind))):
        rec, sae = _point(s, kind, d, arch, n, device)
        points.append(rec)
        if saes_out is not None:
            saes_out[n] = sae
    return points


# ---- Fig 1 panels ---------------------------------------------------------------------------------

@torch.no_grad()
def circle_panel(sae: SparseAutoencoder, loss: float | None = None, points: int = PANEL_POINTS) -> dict:
    """Plain data for one Fig 1 panel: circle points, their reconstructions, decoder rows (arrows), arcs."""
    t = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)
    x = torch.stack((t.cos(), t.sin()), dim=1).float().to(sae.W_dec.device)
    x_hat, _ = sae(x)
    arcs = firing_arcs(sae)
    return {"n": sae.n_latents, "loss": loss, "points": x.cpu().tolist(), "reconstructions": x_hat.cpu().tolist(),
            "decoder": sae.W_dec.detach().cpu().tolist(), "decoder_norms": sae.W_dec.norm(dim=1).cpu().tolist(),
            "arcs": arcs, **arc_summary(arcs)}


def circle_panels(ns=(4, 8, 24), settings: dict | None = None, saes: dict | None = None) -> list[dict]:
    """Fig 1: one panel per n, from `saes` {n: circle SAE} where given, else trained with `settings`."""
    s = validate_settings({**(settings or {}), "kinds": ["circle"], "n": list(ns)})
    arch = s["archs"][0]
    device = resolve_device(s["device"])
    panels = []
    for n in ns:
        sae = (saes or {}).get(n)
        loss = None
        if sae is None:
            rec, sae = _point(s, "circle", 2, arch, n, device)
            loss = rec["loss_min"]
        else:
            loss = evaluate_toy_sae(sae, "circle", 2, s["eval_samples"], s["seed"])["loss"]
        panels.append({**circle_panel(sae, loss), "arch": sae.arch})
    return panels


# ---- the study --------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """The job's device through `pick_device`, so a toy curve on a several-GPU machine leases a GPU of its own."""
    from saescale.subject import pick_device

    return pick_device(device)


def _json_ready(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_ready(obj.item())
    return obj


def toy_curve_entry(settings: dict, kind: str, d: int, arch: str) -> dict:
    """One L(n) curve of the study with its beta fit (and, for shells, the plateau against 2d), JSON-ready:
    the unit the workflow runs as one job, so a long study resumes curve by curve."""
    s = validate_settings(settings)
    log.info("toy study: %s d=%d %s, n in %s", kind, d, arch, sorted(set(_per_kind(s, "n", kind))))
    points = toy_curve({**s, "kind": kind, "d": d, "arch": arch})
    ns, losses = [p["n"] for p in points], [p["loss_min"] for p in points]
    curve = {"kind": kind, "d": d, "arch": arch, "points": points,
             "radius": s["shell_radius"] if kind == "shell" else None,
             "reference_loss": reference_loss(kind, d, s["shell_radius"]),
             "beta_fit": {**fit_beta(ns, losses, *s["beta_range"]),
                          "paper_range": tuple(s["beta_range"]) == PAPER_BETA_RANGE}}
    if kind == "shell":
        curve["plateau"] = plateau(ns, losses, d, s["plateau_tol"])
    return _json_ready(curve)


def assemble_study(settings: dict, curves: list[dict], panels: list[dict], elapsed_s: float | None = None) -> dict:
    """The study file from its curves and circle panels."""
    s = validate_settings(settings)
    return _json_ready({
        "settings": s, "device": str(resolve_device(s["device"])), "curves": curves, "circle_panels": panels,
        "conventions": {"dimension": "ambient: a sphere of dimension d is S^(d-1) in R^d (d = 2 is the circle)",
                        "loss": "total = sum-over-dims squared error + sparsity term at fixed lambda; "
                                "min over seeds", "paper_beta_range": list(PAPER_BETA_RANGE)},
        "elapsed_s": elapsed_s,
    })


def toy_study(settings: dict) -> dict:
    """The whole toy study in one call, JSON-ready: every curve and the Fig 1 circle panels."""
    s = validate_settings(settings)
    t0 = time.perf_counter()
    curves = [toy_curve_entry(s, kind, d, arch) for kind, d, arch in study_curves(s)]
    panels = _json_ready(circle_panels(s["circle_panels"], s)) if s["circle_panels"] else []
    return assemble_study(s, curves, panels, time.perf_counter() - t0)


def seconds_per_step(d: int, n: int, arch: str = "relu_dn", batch: int = 2048, steps: int = 30,
                     device: str = "cpu") -> float:
    """CPU seconds (all threads: core-seconds, robust to other jobs on the box) per training step at this
    shape, after a warm-up run: the unit of the cost table. On CUDA use wall time instead."""
    train_toy_sae(ToySpec("sphere", d, n, arch, 2, batch), device)
    clock = time.perf_counter if str(device).startswith("cuda") else time.process_time
    t0 = clock()
    train_toy_sae(ToySpec("sphere", d, n, arch, steps, batch), device)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return (clock() - t0) / steps
