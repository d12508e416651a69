"""The full-shape rehearsal (workflow/configs/rehearsal.yaml, benchmarks/rehearsal.py) at a size a test
affords: the subject builder, the preset's plan and shapes, and one real run of the preset cut down."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET_TEXT = (ROOT / "workflow/configs/rehearsal.yaml").read_text()
PRESET = yaml.safe_load(PRESET_TEXT)
GPT2_SMALL = yaml.safe_load((ROOT / "workflow/configs/gpt2-small.yaml").read_text())


def _load_script():
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "benchmarks/rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rehearsal = _load_script()
# block 8 needs 9 blocks; the width is cut, the vocabulary is GPT-2's
CUT_SHAPE = {"n_layer": 9, "n_embd": 32, "n_head": 2, "n_positions": 64}


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """The preset's subject folder built once at the cut shape (GPT-2's vocabulary, a 32-wide model)."""
    folder = tmp_path_factory.mktemp("subject") / "gpt2-random"
    built = rehearsal.build_subject(folder, **CUT_SHAPE)
    assert built["vocab_size"] == rehearsal.GPT2_VOCAB and built["n_layer"] == 9
    return folder


def workdir(path: Path, subject: Path, config: str | dict) -> Path:
    """A working directory holding `config` as config.yaml and the subject where its model: key points."""
    cfg = rehearsal.prepare(path, config)
    link = rehearsal.subject_folder(cfg, path)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(subject, target_is_directory=True)
    assert rehearsal.ensure_subject(cfg, path, **CUT_SHAPE) is None  # present: not built again
    return path


def test_subject_folder_loads_model_and_gpt2_sized_tokenizer_with_from_pretrained(subject, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert rehearsal.subject_folder(PRESET, tmp_path) == tmp_path / "rehearsal/gpt2-random"
    tok, cfg = AutoTokenizer.from_pretrained(subject), AutoConfig.from_pretrained(subject)
    assert len(tok) == cfg.vocab_size == 50257
    assert cfg.n_layer == 9 and cfg.eos_token_id == tok.eos_token_id
    ids = tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "def f(x):\n    return x"


def test_preset_keeps_the_paper_presets_shapes():
    from saescale.config import schema

    assert "base" not in PRESET  # a complete config: nothing comes from config.yaml
    (subject,) = PRESET["subjects"].values()
    (paper,) = GPT2_SMALL["subjects"].values()
    for key in ("layers", "ctx_len", "dtype", "batch_windows", "chunk_windows"):
        assert subject[key] == paper[key], key
    assert subject["model"] == "./rehearsal/gpt2-random" and subject["dataset"]["path"] == "builtin"
    largest = max(GPT2_SMALL["sweep"]["n"])
    assert largest == 2**17 and largest in PRESET["sweep"]["n"]
    assert PRESET["train"]["precision"] == "bf16"
    for metric in ("probes", "geometry", "ablation"):
        assert PRESET["evaluate"][metric]["n"] == [largest]
    assert PRESET["interpret"]["n"] == [largest]
    assert PRESET["interpret"]["latents"] == GPT2_SMALL["interpret"]["latents"] == 1024
    assert PRESET["evaluate"]["downstream_batch"] == GPT2_SMALL["evaluate"]["downstream_batch"]
    toy = schema()["properties"]["toy"]["properties"]
    assert {study: PRESET["toy"][study]["enabled"] for study in toy} == dict.fromkeys(toy, False)


def test_preset_plans_every_stage_once(subject, tmp_path):
    jobs = rehearsal.planned_jobs(workdir(tmp_path, subject, PRESET_TEXT))
    assert jobs == {"corpus": 1, "tokenize": 1, "extract": 1, "normalize": 1, "train": 2, "evaluate": 2,
                    "probes": 1, "ablation": 1, "geometry": 1, "interpret": 1, "dashboard": 1, "analyze": 2,
                    "scaling": 1, "report": 1, "all": 1}


def cut(cfg: dict) -> dict:
    """The preset at test size: every stage still runs, on a 32-wide model, one SAE (n = 256), few windows."""
    cfg = copy.deepcopy(cfg)
    subject = next(iter(cfg["subjects"].values()))
    subject.update(train_tokens=2048, eval_tokens=1024, batch_windows=32, chunk_windows=16)
    subject["dataset"]["max_tokens"] = 8192
    cfg["sweep"].update(n=[256], k=[8])
    cfg["train"].update(tokens=2048, batch_size=512, dead_tokens=1024, in_memory_max_gb=0.0001,
                        heldout_rows=256)
    ev = cfg["evaluate"]
    ev.update(batch_size=1024, downstream_windows=4, downstream_batch=4)
    ev["probes"].update(n=[256], windows=8)
    ev["ablation"].update(n=[256], windows=4, pairs=4, batch=4)
    ev["geometry"].update(n=[256])
    for experiment in ("progressive", "refinement"):
        cfg["analysis"][experiment].update(n=[256], tokens=128)
    cfg["analysis"]["refinement"].update(downstream_windows=2, iters=10)
    cfg["interpret"].update(n=[256], latents=8, dashboard_latents=2, example_windows=8, eval_windows=4,
                            max_suffix=2)
    cfg["scaling"]["compute"] = {"bootstrap": 10}
    return cfg


@pytest.mark.slow
def test_cut_preset_runs_end_to_end_and_every_stage_is_timed(subject, tmp_path):
    wdir = workdir(tmp_path, subject, cut(PRESET))
    run = rehearsal.run_workflow(wdir, cores=2, max_rss_gb=8, log_path=wdir / "rehearsal.log")
    assert run["returncode"] == 0, (wdir / "rehearsal.log").read_text()[-4000:]
    assert not run["killed_for_memory"] and run["load_1min"]["max"] >= 0
    assert (wdir / "reports/report.html").is_file()
    rows = rehearsal.read_benchmarks(wdir)
    per_rule = {}
    for r in rows:
        per_rule[r["rule"]] = per_rule.get(r["rule"], 0) + 1
        assert r["wall_s"] > 0 and (r["max_rss_mb"] is None or r["max_rss_mb"] > 0)
    assert per_rule == {"corpus": 1, "tokenize": 1, "extract": 1, "normalize": 1, "train": 1, "evaluate": 1,
                        "probes": 1, "ablation": 1, "geometry": 1, "interpret": 1, "dashboard": 1, "analyze": 2,
                        "scaling": 1, "report": 1}
    ablation = json.loads(next((wdir / "data/eval").rglob("*.ablation.json")).read_text())
    assert ablation["vocab"] == 50257  # the full vocabulary's logits, even at the cut width
    result = {"preset": "cut", "date": "today", "machine": rehearsal.machine(), "subject": None, "run": run,
              "jobs": rehearsal.ordered(rows)}
    table = rehearsal.markdown(result)
    assert table.count("\n| ") == len(rows) + 1 and "| extract | gpt2 |" in table


EXIT_WHILE_PRODUCING = """
import sys, torch
from saescale.loader import prefetch
def items():  # every item is a native call that releases the GIL (a chunk read, a gather)
    while True:
        a = torch.randn(1500, 1500)
        yield a @ a
it = prefetch(items(), depth=1)
next(it)
if sys.argv[1] == "close":
    it.close()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("how", ["close", "keep"])
def test_a_process_exits_cleanly_while_the_prefetch_thread_is_inside_a_native_call(how):
    """Found by the rehearsal: `train` finished its SAE, then died with SIGABRT ("terminate called without
    an active exception"): the streamed loader's daemon thread was inside a torch op at interpreter exit."""
    res = subprocess.run([sys.executable, "-c", EXIT_WHILE_PRODUCING, how], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "exiting", res.stderr[-2000:]
