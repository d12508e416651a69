"""benchmarks/h100_model.py and benchmarks/gpu_check.py run end to end on CPU at tiny shapes (--cpu-smoke) and
write what their READMEs promise: the modeled stage table with its assumptions, the GPU check's JSON and table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["tokenize", "extract", "normalize", "train (per SAE, AuxK idle)", "train (per SAE, AuxK active: 1% dead)",
          "evaluate", "probes", "ablation", "geometry", "interpret", "analyze", "scaling / dashboard / report"]


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--cpu-smoke", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_h100_model_smoke_writes_every_stage_of_the_gpt2_preset_with_its_assumptions(tmp_path):
    out = tmp_path / "h100_model.json"
    text = run("h100_model.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["stages"]][:len(STAGES)] == STAGES
    jobs = {r["stage"]: r["jobs"] for r in result["stages"]}
    assert jobs["train (per SAE, AuxK active: 1% dead)"] == 42  # 7 n x 6 k of the preset, read as a whole config
    assert jobs["evaluate"] == 42
    for row in result["stages"]:
        lo, hi = row["per_job_s"]
        assert 0 < lo <= hi and row["total_s"] >= lo, row
    totals = result["totals"]
    assert totals["total_h"] >= totals["train_h"] > totals["train_gpu_only_h"] > 0
    assert result["assumptions"]["bf16_tflops"] > result["assumptions"]["fp32_tflops"]
    assert result["measured"]["loader"]["rows_per_s"] > 0 and result["measured"]["mode"] == "smoke"
    assert "| **total** |" in text and "MODELED, not measured on a GPU" in text and "ASSUMED" in text


def test_gpu_check_smoke_times_the_real_step_h2d_and_loader(tmp_path):
    out = tmp_path / "gpu_check.json"
    text = run("gpu_check.py", "--out", str(out), "--rehearsal", str(tmp_path / "no-run"))
    result = json.loads(out.read_text())
    steps = {r["dead_fraction"]: r for r in result["steps"]}
    assert set(steps) == {0.0, 0.5} and all(r["ms_per_step"] > 0 for r in steps.values())
    assert set(result["h2d"]) == {"float32_pageable", "float32_pinned", "float16_pinned"}
    assert result["h2d"]["float16_pinned"]["bytes"] * 2 == result["h2d"]["float32_pageable"]["bytes"]
    assert result["loader"]["loop_s_per_batch"] > 0 and result["loader"]["bound"] in ("loader", "step")
    assert "skipped" in result["rehearsal"]
    assert out.with_suffix(".md").read_text().startswith("# GPU check") and "| 1024 | 8 | 50% |" in text


def test_calibration_benchmark_plans_the_penalty_grid_on_the_run_config_and_flags_misses(tmp_path):
    import importlib.util

    import yaml

    from saescale.config import load_config

    spec = importlib.util.spec_from_file_location("calibration", ROOT / "benchmarks" / "calibration.py")
    calibration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibration)
    preset = tmp_path / "calibration.yaml"
    preset.write_text(yaml.safe_dump(calibration.calibration_config(ROOT / "config.yaml", ["relu", "gated"], 512,
                                                                    [2, 128])))
    cfg = load_config(preset, local_paths=False)
    assert cfg["sweep"]["archs"] == ["relu", "gated"] and cfg["sweep"]["k"] == [2, 128] and not cfg["sweep"]["extra"]
    assert not cfg["interpret"]["enabled"] and not cfg["scaling"]["lr_sweep"]["enabled"]
    assert cfg["subjects"] == load_config(ROOT / "config.yaml", local_paths=False)["subjects"]  # the run's own subject
    md = calibration.table({("relu", 2): 1.6, ("relu", 128): 126.0}, ["relu", "gated"], [2, 128])
    assert "| relu | 0.80 ⚠ | 0.98 |" in md and "| gated |  |  |" in md
