"""train.distributed when things go wrong: a killed run resumes from its sharded checkpoint, a rank that dies
fails the run and the rerun resumes, a checkpoint of another layout is ignored; the launcher's commands; the
communication model against what a step's collectives see. CPU processes, gloo, torchrun
(tests/distributed_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import launch
from saescale.sae.distributed import step_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """An S = 2 run to the end; checkpointing at every log step changes no weight."""
    return launch(tmp_path_factory.mktemp("uninterrupted"), 1, 2)


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
    assert not list(out.glob("checkpoint*")), "the other layout's shard files are cleared with the finished run's"


BENCH = Path(__file__).parents[1] / "benchmarks/bench_distributed.py"


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
