"""Every stage that runs on the GPU, run through its CLI entry point as if on CUDA (tests/fake_cuda.py): a tiny
random GPT-2, its activation store and tiny SAEs, with `pick_device` answering cuda. A CPU tensor meeting a
CUDA one fails here as it would on a GPU, and `.numpy()` of a CUDA tensor too.

The mutation tests plant one tensor moved back to the CPU in a stage and check that the run fails: the check
is able to catch what it is for.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cuda import CUDA, fake_cuda
from helpers import tokenized_subject

import saescale.subject
from saescale.cli import build_parser
from saescale.config import validate
from saescale.files import read_json
from saescale.store import open_store

LAYER = 1
CTX = 16
# a pack of every architecture: each family's encoder, activation, loss and penalty code runs once
ARCHS = ("topk", "multitopk", "batchtopk", "relu", "relu_dn", "prolu", "gated", "jumprelu", "jumprelu_tanh")
CFG = validate({
    "subjects": {"s": {"model": "builtin", "layers": [0, LAYER], "dataset": {"path": "builtin"}}},
    "train": {"tokens": 2048, "batch_size": 256, "heldout_rows": 64, "log_every": 4, "ema_decay": 0.9,
              "dead_tokens": 512, "checkpoint_seconds": 0},
    "evaluate": {"batch_size": 64, "downstream_windows": 4, "downstream_batch": 2,
                 "probes": {"windows": 16, "candidates": 8},
                 "ablation": {"windows": 4, "pairs": 8, "horizon": 4, "batch": 4}},
    "analysis": {"progressive": {"tokens": 256, "thresholds": 4},
                 "refinement": {"tokens": 128, "iters": 20, "downstream_windows": 2}},
    "interpret": {"latents": 4, "dashboard_latents": 2, "example_windows": 16, "eval_windows": 8, "examples": 4,
                  "holdout": 2, "top_examples": 2, "max_suffix": 3, "batch": 64, "reconstruction": {"windows": 2}},
})


def cli(*argv) -> None:
    args = build_parser().parse_args([str(a) for a in argv])
    args.fn(args)


def _stage(settings: dict, drop=()) -> str:
    """A per-SAE stage's spec as the rules pass it (common.smk stage_spec)."""
    return json.dumps({k: v for k, v in settings.items() if k not in ("enabled", "archs", "n", *drop)})


def _train_spec() -> dict:
    return {k: v for k, v in CFG["train"].items() if k not in ("threads", "pack")}


def _members(root: Path, archs, k: int = 4) -> str:
    return json.dumps([{"arch": a, "name": a, "n": 64, "k": k, "spec": _train_spec(), "out_dir": str(root / a)}
                       for a in archs])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny subject on the CPU: model, token store, activations of two layers, statistics, two SAEs."""
    root = tmp_path_factory.mktemp("fake_cuda")
    model_dir, _, tokens = tokenized_subject(root, ctx_len=CTX, eval_tokens=256)
    extract_spec = {"model": "test", "revision": None, "layers": [0, LAYER], "train_tokens": 1024,
                    "dtype": "float32", "batch_windows": 8, "chunk_windows": 16}
    cli("extract", "--model", model_dir, "--tokens", tokens, "--spec", json.dumps(extract_spec),
        "--out", root / "acts.zarr")
    cli("normalize", "--activations", root / "acts.zarr", "--out", root / "norm.json")
    cli("train", "--activations", root / "acts.zarr", "--norm", root / "norm.json", "--subject", "s",
        "--layer", LAYER, "--members", _members(root / "sae", ("topk", "relu")))
    return {"root": root, "model": model_dir, "tokens": tokens, "extract_spec": extract_spec,
            "acts": root / "acts.zarr", "norm": root / "norm.json"}


@pytest.fixture
def cuda(monkeypatch):
    """Inside: pick_device answers cuda and tensors carry logical devices (fake_cuda)."""
    monkeypatch.setattr(saescale.subject, "pick_device", lambda *args, **kwargs: torch.device("cuda"))
    with fake_cuda():
        yield


def _sae_args(run, arch: str = "topk", model: bool = True) -> list:
    args = ["--sae-dir", run["root"] / "sae" / arch, "--activations", run["acts"], "--layer", LAYER]
    return args + (["--model", run["model"], "--tokenizer", run["model"]] if model else [])


# ---- the mode itself ----------------------------------------------------------------------------------

def test_fake_cuda_refuses_mixed_devices_and_allows_what_cuda_allows():
    with fake_cuda():
        x = torch.randn(3, 4, device="cuda")
        assert x.device == CUDA and x.is_cuda and (x * 2).device == CUDA and x.view(12).device == CUDA
        with pytest.raises(RuntimeError, match="same device.*cuda:0 and cpu"):
            x + torch.ones(4)
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(2, 3) @ x
        assert (x + torch.tensor(2.0)).device == CUDA                  # a 0-dim cpu scalar is allowed
        assert x[torch.tensor([0, 2])].device == CUDA                  # so is a cpu index tensor
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            torch.zeros(3)[torch.tensor([0], device="cuda")]
        assert torch.zeros(2, device=x.device).device == CUDA and torch.zeros_like(x).device == CUDA
        assert x.cpu().device.type == "cpu" and x.to("cpu").numpy().shape == (3, 4)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(x)
        assert isinstance(x.sum().item(), float) and len(x.tolist()) == 3
        module = torch.nn.Linear(4, 2).to("cuda")
        assert module.weight.device == CUDA and module(x).device == CUDA
        with pytest.raises(RuntimeError, match="same device"):
            module(torch.ones(1, 4))
        gen = torch.Generator(device="cuda").manual_seed(0)
        assert torch.randn(2, generator=gen, device="cuda").device == CUDA
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(2, generator=torch.Generator().manual_seed(0), device="cuda")
    assert not torch.cuda.is_available() and torch.randn(2).device.type == "cpu"   # all undone on exit


def test_fake_cuda_gradients_and_optimizer_state_stay_on_the_device():
    with fake_cuda():
        module = torch.nn.Linear(4, 2).to("cuda")
        opt = torch.optim.Adam(module.parameters())
        (module(torch.randn(5, 4, device="cuda")) ** 2).sum().backward()
        opt.step()
        assert module.weight.grad.device == CUDA and module.weight.device == CUDA
        assert opt.state[module.weight]["exp_avg"].device == CUDA


# ---- each GPU stage as if on CUDA ---------------------------------------------------------------------

def test_extract_on_cuda_records_the_cpu_activations(run, cuda):
    out = run["root"] / "acts_cuda.zarr"
    cli("extract", "--model", run["model"], "--tokens", run["tokens"], "--spec", json.dumps(run["extract_spec"]),
        "--out", out)
    assert np.allclose(open_store(out)[f"L{LAYER}/x"][:], open_store(run["acts"])[f"L{LAYER}/x"][:], atol=1e-5)


def test_train_a_pack_of_every_arch_on_cuda(run, cuda, tmp_path):
    cli("train", "--activations", run["acts"], "--norm", run["norm"], "--subject", "s", "--layer", LAYER,
        "--members", _members(tmp_path, ARCHS))
    for arch in ARCHS:
        cfg = read_json(tmp_path / arch / "saescale_sae.json")
        assert cfg["train"]["device"] == "cuda" and np.isfinite(cfg["train"]["final_heldout_fvu"]), arch


def test_train_one_sae_on_cuda(run, cuda, tmp_path):
    cli("train", "--activations", run["acts"], "--norm", run["norm"], "--subject", "s", "--layer", LAYER,
        "--arch", "topk", "--n", 64, "--k", 4, "--spec", json.dumps(_train_spec()), "--out-dir", tmp_path)
    assert read_json(tmp_path / "saescale_sae.json")["train"]["device"] == "cuda"


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_evaluate_on_cuda(run, cuda, tmp_path, arch):
    spec = json.dumps({k: v for k, v in CFG["evaluate"].items() if k not in ("probes", "ablation", "geometry")})
    cli("evaluate", *_sae_args(run, arch, model=False), "--model", run["model"], "--spec", spec,
        "--out", tmp_path / "eval.json")
    result = read_json(tmp_path / "eval.json")
    assert result["device"] == "cuda" and np.isfinite(result["downstream"]["delta_ce"]) and 0 < result["fvu"]


@pytest.mark.parametrize("experiment", ["progressive", "refinement"])
def test_analyze_on_cuda(run, cuda, tmp_path, experiment):
    settings = {k: v for k, v in CFG["analysis"][experiment].items() if k not in ("archs", "n")}
    spec = json.dumps({**settings, "downstream_batch": CFG["evaluate"]["downstream_batch"]})
    cli("analyze", "--experiment", experiment, *_sae_args(run, "relu", model=False), "--model", run["model"],
        "--spec", spec, "--out", tmp_path / "a.json")
    assert read_json(tmp_path / "a.json")["device"] == "cuda"


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_probes_on_cuda(run, cuda, tmp_path, arch):
    """The builtin tasks, and a user task whose texts the model reads on the device (text_resids)."""
    rows = [{"text": f"def f{i}(x): return x" if i % 2 else f"The fox {i} jumps.", "code": i % 2}
            for i in range(12)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    user = {"task": "is_code", "path": "json", "name": None, "data_files": str(tmp_path / "task.jsonl"),
            "split": "train", "text_field": "text", "label_field": "code", "positive": None, "pool": "last",
            "max_examples": 12}
    spec = _stage({**CFG["evaluate"]["probes"], "datasets": [user]})
    cli("probes", *_sae_args(run, arch), "--spec", spec, "--out", tmp_path / "p.json")
    result = read_json(tmp_path / "p.json")
    assert result["device"] == "cuda" and result["user_tasks"] == ["is_code"]
    assert all(fs["n_tasks"] > 1 for fs in result["feature_sets"].values())
    assert result["task_set"] == "prose" and "sentence_end" in result["positive_rate"]   # auto: a text dataset


def test_probes_with_candidates_null_fit_every_column_on_cuda(run, cuda, tmp_path):
    spec = _stage({**CFG["evaluate"]["probes"], "candidates": None, "activations": ["pre"]})
    cli("probes", *_sae_args(run), "--spec", spec, "--out", tmp_path / "p.json")
    assert read_json(tmp_path / "p.json")["feature_sets"]["pre"]["n_tasks"] > 0


def test_ablation_on_cuda(run, cuda, tmp_path):
    cli("ablation", *_sae_args(run), "--spec", _stage(CFG["evaluate"]["ablation"]), "--out", tmp_path / "a.json")
    assert read_json(tmp_path / "a.json")["latents"]["n_pairs"] > 0


def test_geometry_on_cuda(run, cuda, tmp_path):
    spec = json.dumps({**json.loads(_stage(CFG["evaluate"]["geometry"])), "batch_size": 64})
    cli("geometry", *_sae_args(run, model=False), "--spec", spec, "--out", tmp_path / "g.json")
    assert read_json(tmp_path / "g.json")["nn"]["n"] == 64


def test_interpret_on_cuda(run, cuda, tmp_path):
    settings = CFG["interpret"]
    spec = {**json.loads(_stage(settings, drop=("autointerp", "reconstruction"))), "reconstruction": True,
            "reconstruction_windows": settings["reconstruction"]["windows"]}
    cli("interpret", *_sae_args(run), "--spec", json.dumps(spec), "--out", tmp_path / "i.json",
        "--out-records", tmp_path / "records.jsonl")
    summary = read_json(tmp_path / "i.json")
    assert summary["latents_sampled"] > 0 and np.isfinite(summary["reconstruction"]["n2g"]["delta_ce"])


# ---- the check can fail -------------------------------------------------------------------------------

def _to_cpu(fn):
    """fn, with its tensor results moved back to the CPU: the bug a stage would have."""

    def planted(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()

    return planted


def test_a_cpu_tensor_planted_in_probes_fails(run, cuda, tmp_path, monkeypatch):
    from saescale.evaluate import probes

    monkeypatch.setattr(probes, "_block", _to_cpu(probes._block))
    with pytest.raises(RuntimeError, match="same device"):
        cli("probes", *_sae_args(run), "--spec", _stage(CFG["evaluate"]["probes"]), "--out", tmp_path / "p.json")


def test_a_cpu_tensor_planted_in_evaluate_fails(run, cuda, tmp_path, monkeypatch):
    from saescale.evaluate import reconstruction

    monkeypatch.setattr(reconstruction, "normalize", _to_cpu(reconstruction.normalize))
    spec = json.dumps({k: v for k, v in CFG["evaluate"].items() if k not in ("probes", "ablation", "geometry")})
    with pytest.raises(RuntimeError, match="same device"):
        cli("evaluate", *_sae_args(run, model=False), "--model", run["model"], "--spec", spec,
            "--out", tmp_path / "e.json")


def test_a_cpu_tensor_planted_in_training_fails(run, cuda, tmp_path, monkeypatch):
    from saescale.sae import train

    monkeypatch.setattr(train, "normalize", _to_cpu(train.normalize))
    with pytest.raises(RuntimeError, match="same device"):
        cli("train", "--activations", run["acts"], "--norm", run["norm"], "--subject", "s", "--layer", LAYER,
            "--arch", "topk", "--n", 64, "--k", 4, "--spec", json.dumps(_train_spec()), "--out-dir", tmp_path)


def test_a_cuda_tensor_read_as_numpy_fails(run, cuda, tmp_path, monkeypatch):
    from saescale.evaluate import analyses

    # progressive's threshold grid reads the scores on the host; without its .cpu(), numpy() must fail
    original = analyses.threshold_grid
    monkeypatch.setattr(analyses, "threshold_grid",
                        lambda scores, targets: original(torch.from_numpy(scores.numpy()), targets))
    settings = {k: v for k, v in CFG["analysis"]["progressive"].items() if k not in ("archs", "n")}
    with pytest.raises(TypeError, match="numpy"):
        cli("analyze", "--experiment", "progressive", *_sae_args(run, model=False),
            "--spec", json.dumps(settings), "--out", tmp_path / "a.json")
