"""One SAE on data x latent processes (train.distributed, method §A.7) equals the single-device run: the same
latents selected at every step (main code and AuxK), the same weights up to float summation order, a sharded
checkpoint that resumes, shards consolidated into one ordinary SAE. CPU processes with the gloo backend, launched
by torchrun as the workflow launches them (tests/distributed_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import BATCH, make_spec
from saescale.config import ConfigError, validate
from saescale.sae.distributed import Mesh, owned, selection_slots, step_bytes
from saescale.sae.train_distributed import draw_shard_rows

WORKER = Path(__file__).with_name("distributed_worker.py")
# measured: 1.2e-7 (S = 2, D = 2, D = S = 2; 30 steps, weights of magnitude 0.3-0.4); float32 summation order only
WEIGHT_ATOL = 1e-5


def launch(out: Path, data: int = 1, latent: int = 1, *extra: str, check: bool = True) -> Path:
    """Run the worker: directly for the single-process reference, else under torchrun with data x latent
    processes (standalone rendezvous on a free port)."""
    procs = data * latent
    args = [str(WORKER), "--out", str(out), "--data", str(data), "--latent", str(latent), *extra]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert (proc.returncode == 0) == check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """An S = 2 run to the end; checkpointing at every log step changes no weight."""
    return launch(tmp_path_factory.mktemp("uninterrupted"), 1, 2)


@pytest.fixture(scope="module")
def reference_multitopk(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("single_multitopk"), 1, 1, "--arch", "multitopk")


def selections(out: Path, rank: int) -> list:
    return torch.load(out / f"selections.rank{rank}.pt")["selections"]


def same_latents(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)


def live_slots(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """AuxK's slots that hold a dead latent (the rest are live latents at -inf, zeroed by ReLU)."""
    return torch.where(torch.isfinite(values), indices, torch.full_like(indices, -1))


def assert_same_run(ref: Path, run: Path, data: int, latent: int) -> None:
    rows = BATCH // data
    expected = selections(ref, 0)
    auxk_steps = 0
    for rank in range(data * latent):
        got = selections(run, rank)
        assert len(got) == len(expected)
        part = slice((rank // latent) * rows, (rank // latent + 1) * rows)
        for step, ((main, aux), (main_d, aux_d)) in enumerate(zip(expected, got)):
            assert same_latents(main[part], main_d), f"rank {rank} step {step}: another main selection"
            assert (aux is None) == (aux_d is None), f"rank {rank} step {step}: AuxK ran on one side only"
            if aux is not None:
                assert same_latents(live_slots(*aux)[part], live_slots(*aux_d)), f"rank {rank} step {step}: AuxK"
                auxk_steps += bool(torch.isfinite(aux[0]).any())
    assert auxk_steps > 0, "no step selected a dead latent: the AuxK path was not exercised"
    single, dist = torch.load(ref / "result.pt"), torch.load(run / "result.pt")
    assert dist["state"].keys() == single["state"].keys()
    for name, t in single["state"].items():
        assert dist["state"][name].shape == t.shape, name  # consolidated to the whole SAE
        torch.testing.assert_close(dist["state"][name], t, atol=WEIGHT_ATOL, rtol=0, msg=name)
    for a, b in zip(single["rows"], dist["rows"]):
        for key in ("fvu", "heldout_fvu", "auxk_loss", "l0", "dead_fraction", "heldout_fvu_ema"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert dist["summary"]["weights"] == single["summary"]["weights"]
    assert dist["summary"]["distributed"] == {"data": data, "latent": latent}
    whole = torch.load(ref / "held.rank0.pt")["held_bytes"]
    for rank in range(data * latent):
        # each shard holds 1/S of W_enc, b_enc, W_dec with their Adam moments and EMA; b_pre (d floats x 4) is copied
        assert torch.load(run / f"held.rank{rank}.pt")["held_bytes"] == pytest.approx(whole / latent, rel=0.02)


CHUNKED = ("--gather-bytes", "4096", "--spec", '{"microbatch": 24}')


@pytest.mark.parametrize("data, latent, extra", [(1, 2, ()), (2, 1, ()), (2, 2, CHUNKED)],
                         ids=["S2", "D2", "D2xS2-microbatch-chunked-gathers"])
def test_a_distributed_run_selects_and_learns_what_one_process_does(reference, tmp_path, data, latent, extra):
    """D2xS2 also steps each replica's 64 rows in train.microbatch blocks of 24 and gathers the shards'
    candidates 10 rows at a time (global_topk's chunks)."""
    assert_same_run(reference, launch(tmp_path / "run", data, latent, *extra), data, latent)


def test_multitopk_shards_its_sorted_selection_and_two_bags(reference_multitopk, tmp_path):
    assert_same_run(reference_multitopk, launch(tmp_path / "run", 1, 2, "--arch", "multitopk"), 1, 2)




def test_a_killed_sharded_run_resumes_from_its_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    launch(out, 1, 2, "--stop-after", "12")
    manifest = json.loads((out / "checkpoint.json").read_text())
    assert manifest["step"] == 12 and manifest["layout"] == {"data": 1, "latent": 2}
    assert sorted(p.name for p in out.glob("checkpoint.shard*")) == ["checkpoint.shard0of2.step12.pt",
                                                                     "checkpoint.shard1of2.step12.pt"]
    launch(out, 1, 2)
    assert torch.load(out / "selections.rank0.pt")["first_step"] == 12  # resumed, not restarted
    a, b = torch.load(uninterrupted / "result.pt"), torch.load(out / "result.pt")
    for name, t in a["state"].items():
        torch.testing.assert_close(b["state"][name], t, atol=0, rtol=0, msg=name)  # resuming changes nothing
    assert [r["fvu"] for r in a["rows"]] == [r["fvu"] for r in b["rows"]]
    assert not list(out.glob("checkpoint*")), "the finished run leaves no checkpoint behind"


def test_a_rank_that_dies_fails_the_run_and_the_rerun_resumes(uninterrupted, tmp_path):
    """Rank 1 of 2 exits mid-run without a word (a lost GPU): torchrun stops rank 0, which is waiting in a
    collective, and fails; the rerun resumes from the last complete checkpoint (every log step, 5) to the
    uninterrupted weights."""
    every_log_step = ("--spec", '{"checkpoint_seconds": 1e-06}')
    out = tmp_path / "crashed"
    launch(out, 1, 2, *every_log_step, "--crash", "1:17", check=False)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 15
    assert not (out / "result.pt").exists()
    launch(out, 1, 2, *every_log_step)
    assert torch.load(out / "selections.rank0.pt")["first_step"] == 15
    a, b = torch.load(uninterrupted / "result.pt"), torch.load(out / "result.pt")
    for name, t in a["state"].items():
        torch.testing.assert_close(b["state"][name], t, atol=0, rtol=0, msg=name)


def test_the_launcher_starts_torchrun_on_one_node_and_srun_across_nodes(monkeypatch):
    from saescale import launch as launcher

    one = launcher.torchrun_command(4, 1, {})
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one
    assert one[one.index("--nproc-per-node") + 1] == "4" and one[-2:] == ["-m", "saescale.launch"]
    with pytest.raises(ValueError, match="need a SLURM allocation"):
        launcher.torchrun_command(8, 2, {})
    monkeypatch.setattr(launcher, "_first_host", lambda nodelist: "node-a")
    cmd = launcher.torchrun_command(8, 2, {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]"})
    assert cmd[:5] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", "--ntasks=2"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4" and cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == f"node-a:{launcher.RDZV_PORT_BASE + 4242}"
    with pytest.raises(ValueError, match="3 nodes cannot share 8"):
        launcher.torchrun_command(8, 3, {"SLURM_JOB_ID": "1"})


def test_a_checkpoint_of_another_layout_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    launch(out, 1, 2, "--stop-after", "10")
    launch(out, 2, 1)
    assert torch.load(out / "selections.rank0.pt")["first_step"] == 0


BENCH = WORKER.parents[1] / "benchmarks/bench_distributed.py"


@pytest.mark.parametrize("data, latent", [(1, 2), (2, 1)], ids=["S2", "D2"])
def test_the_communication_model_is_what_a_step_hands_to_collectives(tmp_path, data, latent):
    """sae.distributed.step_bytes (the README's communication table) against the bytes the benchmark's
    instrumented collectives saw per training step, with AuxK on every step."""
    d, n, batch = 64, 1024, 256
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(data * latent),
           str(BENCH), "--worker", "--layout", f"{data},{latent}", "--out", str(out), "--threads", "1", "--width", str(d),
           "--latents", str(n), "--batch", str(batch), "--steps", "3", "--warmup", "2", "--dead"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(out.read_text())["ranks"][0]["collective_bytes"]
    modeled = step_bytes(n, d, batch, data, latent, slots=32, act_bytes=4, auxk_slots=512)
    assert sum(measured.values()) == sum(modeled.values())


# ---- pieces, without processes -------------------------------------------------------------------------
@pytest.mark.parametrize("latent", [2, 4])
def test_shard_draws_are_the_rows_of_one_draw(latent):
    """Initialization draws every shard's block in turn from one generator: W_enc (uniform) and the untied
    W_dec (normal) are the single device's rows."""
    n, d = 64, 24
    gen = torch.Generator().manual_seed(5)
    whole = torch.randn(n, d, generator=gen)
    torch.manual_seed(5)
    uniform = torch.nn.init.kaiming_uniform_(torch.empty(n, d), a=5**0.5)
    for shard in range(latent):
        mesh = Mesh(1, latent, shard)
        start, stop = mesh.latents(n)
        gen = torch.Generator().manual_seed(5)
        assert torch.equal(draw_shard_rows(lambda rows: torch.randn(rows, d, generator=gen), n, mesh),
                           whole[start:stop])
        torch.manual_seed(5)
        drawn = draw_shard_rows(lambda rows: torch.nn.init.kaiming_uniform_(torch.empty(rows, d), a=5**0.5), n, mesh)
        assert torch.equal(drawn, uniform[start:stop])


def test_owned_slots_point_home_and_the_rest_at_zero():
    local, mine = owned(torch.tensor([[0, 5, 9, 12]]), start=4, n_local=4)
    assert mine.tolist() == [[False, True, False, False]]
    assert local.tolist() == [[0, 1, 0, 0]]


def test_the_mesh_refuses_layouts_that_do_not_divide():
    with pytest.raises(ValueError, match="latent: 3 does not divide n = 64"):
        Mesh(1, 3, 0).latents(64)
    with pytest.raises(ValueError, match="data: 3 does not divide train.batch_size = 128"):
        Mesh(3, 1, 0).rows(128)
    with pytest.raises(ValueError, match="supports the archs"):
        selection_slots("relu", 4, 64, {})


def base_config(**train) -> dict:
    return {"subjects": {"s": {"model": "builtin", "layers": [1]}}, "sweep": {"archs": ["topk"], "n": [512],
            "k": [8]}, "train": train}


@pytest.mark.parametrize("train, sweep, message", [
    ({"distributed": {"latent": 3}}, {}, r"train.distributed.latent: 3 does not divide n = 512"),
    ({"distributed": {"data": 3}}, {}, r"train.distributed.data: 3 does not divide train.batch_size"),
    ({"distributed": {"latent": 2}}, {"archs": ["relu"]}, r"only topk, multitopk train distributed"),
    ({"distributed": {"latent": 2, "nodes": 3}}, {}, r"nodes: 3 nodes cannot share"),
    ({"distributed": {"replicas": 2}}, {}, r"train.distributed: Additional properties"),
])
def test_a_layout_that_cannot_train_is_refused_by_key(train, sweep, message):
    cfg = base_config(**train)
    cfg["sweep"].update(sweep)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, local_paths=False)


def test_a_distributed_variant_is_never_packed():
    from saescale.config import train_packs

    cfg = base_config(pack=["n"])
    cfg["sweep"].update({"n": [512, 1024], "archs": ["topk", "wide"]})
    cfg["sweep"]["variants"] = {"wide": {"arch": "topk", "train": {"distributed": {"latent": 2}}}}
    packs = train_packs(validate(cfg, local_paths=False))
    packed = {m["arch"] for p in packs for m in p["members"]}
    assert packed == {"topk"}
