"""Probe loss: recover known binary features with 1-D logistic probes (method §C.4).

For each task and each column i of an activation matrix (SAE pre-activation latents, or the raw
residual channels for the baseline) a logistic regression on that single column is fit with Newton's
method; the task's probe loss is the held-out binary cross-entropy of the best column.

The paper's 61 tasks were not recovered (method §C.4, gap); the builtin tasks, defined over the text of
each window for Python source or for prose, are in `saescale.evaluate.probe_tasks`.

Labels arrive as numpy arrays and are moved to the device of the columns they meet (`_labels`), so the fits
run where the activations are: on the GPU when `cmd_probes` put them there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from saescale.evaluate.memory import encode_slots
from saescale.evaluate.probe_tasks import window_task_labels

# Elements of one [rows, columns] float64 block; a chunk of columns holds about this many, so a
# handful of temporaries stay around 128 MiB each whatever N is.
_BLOCK_ELEMENTS = 2 ** 24
_STEP_TOL = 1e-9     # Newton step (standardized units) below which a column counts as converged
_MAX_STEP = 10.0     # clamp on one Newton step: keeps separable columns from jumping to |w| ~ 1/l2


# --------------------------------------------------------------------------- 1-D logistic regression

def _standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Columns to zero mean / unit std with the train statistics; constant columns become 0."""
    constant = std <= 1e-12 * (mean.abs() + 1e-30)
    return torch.where(constant, 0.0, (x - mean) / torch.where(constant, 1.0, std))


def _column_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0, correction=0)


def _bce_with_logits(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -y log s(z) - (1-y) log(1-s(z)) = softplus(z) - y z, stable for any |z|."""
    return (torch.nn.functional.softplus(z) - y * z).mean(0)


def _newton(x: torch.Tensor, y: torch.Tensor, iters: int, l2: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit sigmoid(w x_j + b) to y for every column j of standardized x at once.

    x: [N, C] float64, standardized; y: [N] float64 in {0, 1}. Minimizes
    mean BCE + l2/2 (w^2 + b^2) with exact 2x2 Newton steps per column. The step is damped by a lazy
    line search: each pass evaluates the objective at the proposed point, and a column whose objective
    went up is sent back halfway to its last accepted point. With separable data (a planted feature)
    the optimum has |w| ~ log(1/l2), reached through clamped steps.
    Returns (w [C], b [C], train BCE [C]) at the last accepted point.
    """
    c = x.shape[1]
    yc = y[:, None]
    rate = float(y.mean().clamp(1e-6, 1 - 1e-6))
    w = torch.zeros(c, dtype=x.dtype, device=x.device)
    b = torch.full((c,), math.log(rate / (1 - rate)), dtype=x.dtype, device=x.device)   # exact optimum at w = 0
    w_acc, b_acc = w.clone(), b.clone()
    obj_acc = torch.full((c,), math.inf, dtype=x.dtype, device=x.device)
    bce_acc = obj_acc.clone()
    active = torch.arange(c, device=x.device)   # columns still moving; converged ones leave the [N, C] work
    xa = x
    for it in range(iters):
        wa, ba = w[active], b[active]
        z = xa * wa + ba                                                    # [N, active]
        bce = _bce_with_logits(z, yc)
        obj = bce + 0.5 * l2 * (wa * wa + ba * ba)
        accept = obj <= obj_acc[active]
        w_acc[active] = torch.where(accept, wa, w_acc[active])
        b_acc[active] = torch.where(accept, ba, b_acc[active])
        obj_acc[active] = torch.where(accept, obj, obj_acc[active])
        bce_acc[active] = torch.where(accept, bce, bce_acc[active])
        if it == iters - 1:
            break
        p = torch.sigmoid(z)
        r = p - yc                                                          # dBCE/dz
        s = p * (1 - p)                                                     # d2BCE/dz2
        sx = s * xa
        g_w, g_b = (r * xa).mean(0) + l2 * wa, r.mean(0) + l2 * ba
        h_ww, h_wb, h_bb = (sx * xa).mean(0) + l2, sx.mean(0), s.mean(0) + l2
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-300)
        d_w = ((-h_bb * g_w + h_wb * g_b) / det).nan_to_num(0.0).clamp(-_MAX_STEP, _MAX_STEP)
        d_b = ((-h_ww * g_b + h_wb * g_w) / det).nan_to_num(0.0).clamp(-_MAX_STEP, _MAX_STEP)
        # Accepted columns step from the new point; rejected ones halve their step from the last good one.
        wa_acc, ba_acc = w_acc[active], b_acc[active]
        w_next = torch.where(accept, wa + d_w, wa_acc + 0.5 * (wa - wa_acc))
        b_next = torch.where(accept, ba + d_b, ba_acc + 0.5 * (ba - ba_acc))
        w[active], b[active] = w_next, b_next
        moving = (w_next - wa_acc).abs() + (b_next - ba_acc).abs() >= _STEP_TOL
        if not bool(moving.all()):
            active, xa = active[moving], xa[:, moving]
            if len(active) == 0:
                break
    return w_acc, b_acc, bce_acc


def fit_logistic_1d_batched(X, y, iters: int = 25, l2: float = 1e-6
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent 1-D logistic regressions of y on each column of X: P(y=1) = sigmoid(w_j X_j + b_j).

    X: [N, F]; y: [N] bool or 0/1. Newton's method in float64 on each column standardized to zero
    mean / unit std (so `l2`, applied to the standardized weight and bias, is scale-free); the
    returned (w [F], b [F]) are in the units of X. Constant columns get w = 0.
    """
    x = torch.as_tensor(X).to(torch.float64)
    mean, std = _column_stats(x)
    w_s, b_s, _ = _newton(_standardize(x, mean, std), _labels(y, x.device), iters, l2)
    constant = std <= 1e-12 * (mean.abs() + 1e-30)
    w = torch.where(constant, 0.0, w_s / torch.where(constant, 1.0, std))
    return w, b_s - w * mean


def fit_logistic_1d(x, y, iters: int = 25, l2: float = 1e-6) -> tuple[float, float]:
    """One 1-D logistic regression P(y=1) = sigmoid(w x + b); see `fit_logistic_1d_batched`."""
    w, b = fit_logistic_1d_batched(torch.as_tensor(x).reshape(-1, 1), y, iters, l2)
    return float(w[0]), float(b[0])


def _labels(y, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels as float64 0/1 on `device`, the device of the columns they meet (the CPU for numpy or Zarr X)."""
    return torch.as_tensor(y).reshape(-1).to(device, torch.float64)


def _data_device(X) -> torch.device:
    """Where X's column blocks come out: a tensor's (or CodeColumns') device, else the CPU."""
    return X.device if isinstance(X, (torch.Tensor, CodeColumns)) else torch.device("cpu")


# --------------------------------------------------------------------------- probe losses

def _auto_chunk(n_rows: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _BLOCK_ELEMENTS // max(n_rows, 1))


def _column_blocks(X_train, X_test, chunk: int | None, progress: bool
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first column, train block [N, C], test block [M, C]) standardized with the train statistics.

    X_train / X_test only need shape and column slicing (`X[:, i:j]`), so torch tensors, numpy arrays
    and Zarr arrays all work and only one block is in memory at a time.
    """
    n_cols = X_train.shape[1]
    if X_test.shape[1] != n_cols:
        raise ValueError(f"probe: train has {n_cols} columns but test has {X_test.shape[1]}")
    step = _auto_chunk(X_train.shape[0], chunk)
    for start in tqdm(range(0, n_cols, step), desc="probe columns", unit="chunk", disable=not progress):
        train, test = _block(X_train, start, step), _block(X_test, start, step)
        mean, std = _column_stats(train)
        yield start, _standardize(train, mean, std), _standardize(test, mean, std)


def _block(X, start: int, width: int) -> torch.Tensor:
    block = X[:, start:start + width]
    block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))
    return block.to(torch.float64)


def probe_losses(X_train, y_train, X_test, y_test, chunk: int | None = None, iters: int = 25,
                 l2: float = 1e-6, progress: bool = False) -> torch.Tensor:
    """Held-out mean BCE of each column's 1-D probe, fit on the train rows: [F] float64.

    chunk: columns fit together (memory ~ 6 x N x chunk float64); None picks ~2^24 / N.
    """
    yt, ye = _labels(y_train, _data_device(X_train)), _labels(y_test, _data_device(X_test))
    _check_rows("probe", X_train, yt, X_test, ye)
    out = []
    for _, train, test in _column_blocks(X_train, X_test, chunk, progress):
        w, b, _ = _newton(train, yt, iters, l2)
        out.append(_bce_with_logits(test * w + b, ye[:, None]))
    return torch.cat(out)


def _check_rows(what: str, X_train, y_train: torch.Tensor, X_test, y_test: torch.Tensor) -> None:
    if len(y_train) != X_train.shape[0] or len(y_test) != X_test.shape[0]:
        raise ValueError(f"{what}: {len(y_train)}/{len(y_test)} labels for "
                         f"{X_train.shape[0]}/{X_test.shape[0]} train/test rows")


def _entropy_baseline(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test BCE of always predicting the train base rate: what a probe must beat."""
    q = float(y_train.mean().clamp(1e-6, 1 - 1e-6))
    return float(-(y_test * math.log(q) + (1 - y_test) * math.log(1 - q)).mean())


def _screen(X_train, ys: Mapping[str, tuple[torch.Tensor, torch.Tensor]], chunk: int | None, keep: int
            ) -> dict[str, torch.Tensor]:
    """{task: the `keep` columns with the largest |correlation| with the train labels}, sorted.

    N corr(x, y)^2 is the score-test statistic of a 1-D logistic fit at w = 0, a cheap and close proxy for
    how much a column's probe can lower the loss; only these columns get the full Newton fit.
    """
    Y = torch.stack([yt - yt.mean() for yt, _ in ys.values()], 1)  # [N, tasks], on the columns' device
    best = {t: (Y.new_empty(0), torch.empty(0, dtype=torch.long, device=Y.device)) for t in ys}
    step = _auto_chunk(X_train.shape[0], chunk)
    for start in range(0, X_train.shape[1], step):
        train = _block(X_train, start, step)
        train = _standardize(train, *_column_stats(train))
        corr = (train.T @ Y).abs()  # [C, tasks]
        cols = torch.arange(start, start + train.shape[1], device=Y.device)
        for j, task in enumerate(ys):
            score, idx = best[task]
            score, idx = torch.cat([score, corr[:, j]]), torch.cat([idx, cols])
            top = score.topk(min(keep, score.numel())).indices
            best[task] = (score[top], idx[top])
    return {t: idx.sort().values for t, (_, idx) in best.items()}


def best_probes(X_train, labels_train: Mapping[str, object], X_test, labels_test: Mapping[str, object],
                chunk: int | None = None, iters: int = 25, l2: float = 1e-6,
                progress: bool = False, candidates: int | None = None) -> dict[str, dict]:
    """Best single-column probe for every task: {task: {loss, column, train_loss, baseline}}.

    method §C.4: probe_loss(task) = min over (i, w, b) of the BCE of sigmoid(w z_i + b), with z_i
    the *pre-activation* latents for an SAE and the residual channels for the baseline; the paper
    reports the mean over tasks. The minimum over (w, b) is the Newton fit on the train rows; the
    minimum over i is also taken on the train rows, and `loss` is the held-out BCE of that column.
    Choosing i on the test rows would let the best of up to 2^17 noisy columns look like a feature;
    selecting on train and reporting test follows the SAEBench substitute in C.4 (fit and select on
    train, report test). `baseline` is the entropy of the train base rate on the test rows.

    candidates: fit only each task's columns most correlated with its labels (`_screen`), which makes
    wide SAEs affordable (n columns x tasks Newton fits otherwise); None fits every column.
    Columns are read in chunks and shared by all tasks, so Zarr-backed X is read once per pass.
    Tasks whose train or test labels hold one class only are left out of the result.
    """
    ys = {}
    train_device, test_device = _data_device(X_train), _data_device(X_test)
    for task, y in labels_train.items():
        yt, ye = _labels(y, train_device), _labels(labels_test[task], test_device)
        _check_rows(f"probe task {task!r}", X_train, yt, X_test, ye)
        if 0 < yt.mean() < 1 and 0 < ye.mean() < 1:
            ys[task] = (yt, ye)
    best = {t: {"loss": math.inf, "column": -1, "train_loss": math.inf,
                "baseline": _entropy_baseline(*ys[t])} for t in ys}
    screened = _screen(X_train, ys, chunk, candidates) if candidates is not None and ys else None
    for start, train, test in _column_blocks(X_train, X_test, chunk, progress):
        for task, (yt, ye) in ys.items():
            cols = torch.arange(train.shape[1], device=train.device)
            if screened is not None:
                cols = screened[task][(screened[task] >= start) & (screened[task] < start + train.shape[1])] - start
                if cols.numel() == 0:
                    continue
            w, b, train_bce = _newton(train[:, cols], yt, iters, l2)
            j = int(train_bce.argmin())
            if float(train_bce[j]) < best[task]["train_loss"]:
                test_bce = _bce_with_logits(test[:, cols[j]] * w[j] + b[j], ye)
                best[task].update(loss=float(test_bce), column=start + int(cols[j]), train_loss=float(train_bce[j]))
    return best


def best_probe(X_train, y_train, X_test, y_test, chunk: int | None = None, iters: int = 25,
               l2: float = 1e-6, progress: bool = False) -> dict:
    """{loss, column, train_loss, baseline} of the best single column for one task; see `best_probes`."""
    result = best_probes(X_train, {"task": y_train}, X_test, {"task": y_test}, chunk, iters, l2, progress)
    if "task" not in result:
        raise ValueError("probe: the labels need both classes in the train and in the test split")
    return result["task"]


# --------------------------------------------------------------------------- the probes rule

class CodeColumns:
    """Columns of an SAE code computed on demand, so `best_probes` never holds [N, n] at once.

    which='pre': the encoder's pre-activations (method §C.4 as recalled), a column block computed from that
    block's encoder rows; 'post': the sparse latents, encoded once in row blocks and kept as slots [N, L0]
    (memory.encode_slots), so neither ever holds [N, n] (64 GiB at N = 16384, n = 2^20).
    Supports the `X.shape` / `X[:, i:j]` protocol of `best_probes`.
    """

    def __init__(self, sae, x_norm: torch.Tensor, which: str):
        self.sae, self.x, self.which = sae, x_norm, which
        self.shape = (x_norm.shape[0], sae.n_latents)
        self.device = x_norm.device
        self._latents = encode_slots(sae, x_norm) if which == "post" else None

    @torch.no_grad()
    def __getitem__(self, key) -> torch.Tensor:
        cols = key[1]
        if self.which == "pre":
            sae = self.sae
            return torch.nn.functional.linear(self.x - sae.b_pre, sae.W_enc[cols], sae.b_enc[cols])
        lat = self._latents
        start, stop = cols.start, min(cols.stop, self.shape[1])
        inside = (lat.indices >= start) & (lat.indices < stop)
        out = torch.zeros(self.shape[0], stop - start, dtype=lat.values.dtype, device=lat.values.device)
        local = torch.where(inside, lat.indices - start, 0)
        return out.scatter_add_(1, local, torch.where(inside, lat.values, 0.0))


def _summary(per_task: dict[str, dict]) -> dict:
    losses = [r["loss"] for r in per_task.values()]
    return {"mean_loss": float(np.mean(losses)) if losses else float("nan"), "n_tasks": len(losses),
            "tasks": per_task}


def probe_suite(features: Mapping[str, tuple[object, object]], labels_train: Mapping[str, np.ndarray],
                labels_test: Mapping[str, np.ndarray], iters: int) -> dict[str, dict]:
    """{feature set: {mean_loss, n_tasks, tasks}} for each (train X, test X) feature set, e.g. the SAE's
    pre-activations, its latents and the residual channels (the baseline of method §C.4)."""
    return {name: _summary(best_probes(Xt, labels_train, Xe, labels_test, iters=iters))
            for name, (Xt, Xe) in features.items()}


def pooled_codes(sae, resid: list[torch.Tensor], which: str, pool: str) -> torch.Tensor:
    """[texts, n] one row per text: its tokens' codes (or raw channels, which='resid') averaged, or the
    last token's, for user tasks labelled per text (the SAEBench-style substitute of method §C.4)."""
    from saescale.normalize import normalize

    rows = []
    for r in resid:  # [tokens, d]
        codes = r if which == "resid" else CodeColumns(sae, normalize(r)[0], which)[:, 0:sae.n_latents]
        rows.append(codes.mean(0) if pool == "mean" else codes[-1])
    return torch.stack(rows)


@torch.no_grad()
def probe_record(sae, x_raw: torch.Tensor, windows: np.ndarray, strings: Mapping[int, str], spec: dict,
                 user_tasks: Mapping[str, tuple[list[torch.Tensor], np.ndarray, str]] = ()) -> dict:
    """Probe losses of one SAE for the builtin tasks on `windows` (rows of x_raw [W*S, d], row-major) and
    the user tasks ({task: (per-text resid [tokens, d], labels [texts], pool)}), per feature set.

    Even windows (texts) fit the probe and select the latent, odd ones report the loss, so the two never
    share a document. Feature sets: the configured SAE codes and `resid`, the raw channels (the baseline).
    """
    from saescale.normalize import normalize

    names = [*spec["activations"], "resid"]
    tasks: dict[str, dict[str, dict]] = {name: {} for name in names}
    positives: dict[str, float] = {}
    task_set = spec.get("task_set", "code")  # resolved by the caller (resolve_task_set), never "auto" here
    if spec["builtin_tasks"]:
        W, S = windows.shape
        train = torch.from_numpy(np.repeat(np.arange(W) % 2 == 0, S))
        labels = window_task_labels(windows, strings, task_set)
        positives.update({t: float(y.mean()) for t, y in labels.items()})
        x_norm = normalize(x_raw)[0]
        feats = {w: (CodeColumns(sae, x_norm[train], w), CodeColumns(sae, x_norm[~train], w))
                 for w in spec["activations"]}
        feats["resid"] = (x_raw[train], x_raw[~train])
        lt = {t: y[train.numpy()] for t, y in labels.items()}
        le = {t: y[~train.numpy()] for t, y in labels.items()}
        for name, (Xt, Xe) in feats.items():
            tasks[name].update(best_probes(Xt, lt, Xe, le, iters=spec["iters"], candidates=spec["candidates"]))
    for task, (resid, y, pool) in dict(user_tasks).items():
        positives[task] = float(np.mean(y))
        fit = np.arange(len(y)) % 2 == 0
        for name in names:
            # fit and test texts pooled apart: [texts, n] once, not again as X[fit] and X[~fit] copies
            Xf = pooled_codes(sae, [r for r, f in zip(resid, fit) if f], name, pool)
            Xt = pooled_codes(sae, [r for r, f in zip(resid, fit) if not f], name, pool)
            tasks[name].update(best_probes(Xf, {task: y[fit]}, Xt, {task: y[~fit]}, iters=spec["iters"],
                                           candidates=spec["candidates"]))
            del Xf, Xt
    return {"feature_sets": {name: _summary(t) for name, t in tasks.items()}, "positive_rate": positives,
            "windows": int(len(windows)), "task_set": task_set if spec["builtin_tasks"] else None,
            "user_tasks": sorted(dict(user_tasks))}


def load_user_task(ds: dict, tokenizer, ctx_len: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """(token ids per text, truncated to ctx_len; binary labels) of one `evaluate.probes.datasets` entry,
    through datasets.load_dataset, shuffled so that the alternating fit/test split is not label-sorted."""
    import datasets

    where = f"config.evaluate.probes.datasets[{ds['task']}]"
    kwargs = {"name": ds["name"], "split": ds["split"]}
    if ds["data_files"] is not None:
        kwargs["data_files"] = ds["data_files"]
    table = datasets.load_dataset(ds["path"], **kwargs)
    for field in ("text_field", "label_field"):
        if ds[field] not in table.column_names:
            raise ValueError(f"{where}.{field}: column '{ds[field]}' not in the dataset "
                             f"(columns: {table.column_names})")
    raw = table[ds["label_field"]]
    if ds["positive"] is not None:
        labels = np.array([v == ds["positive"] for v in raw])
    elif set(raw) <= {0, 1}:  # booleans too (True == 1)
        labels = np.array(raw, dtype=bool)
    else:
        raise ValueError(f"{where}.positive: labels {sorted(set(map(str, raw)))[:5]} are not 0/1; "
                         "name the positive label value")
    order = np.random.default_rng(seed).permutation(len(labels))[:ds["max_examples"]]
    texts = table[ds["text_field"]]
    ids = [tokenizer(texts[i], truncation=True, max_length=ctx_len)["input_ids"] for i in order]
    keep = [j for j, t in enumerate(ids) if t]
    labels = labels[order][keep]
    if labels.all() or not labels.any():
        raise ValueError(f"{where}: every example has the same label; a probe needs both classes")
    return [ids[j] for j in keep], labels.astype(np.float64)


@torch.no_grad()
def text_resids(model, layer: int, token_lists: list[list[int]], device) -> list[torch.Tensor]:
    """resid_post of `layer` for each text run on its own: [tokens, d] float32 per text, on the CPU."""
    from saescale.subject import record_resid, run_until_recorded

    out = []
    with record_resid(model, [layer], stop=True) as captured:
        for ids in token_lists:
            run_until_recorded(model, torch.tensor([ids], device=device))
            out.append(captured[layer][0].float().cpu())
    return out
