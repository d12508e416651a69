"""Every preset plans exactly what it declares.

`snakemake --configfile workflow/configs/<preset>.yaml` is dry-run for each preset (a glob, so a new preset is
covered the day it lands), and its planned jobs per rule are checked against counts derived here from the
preset's own grid: subjects x layers x (archs, n, k) of the sweep and its extras, the lr sweep, the selectors of
the suite stages and analyses, the toy studies. A preset without `base:` must not inherit config.yaml's subject,
lr sweep or studies (it once planned 628 jobs and two subjects for gpt2-small's 42 SAEs).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from saescale.config import ConfigError, load_config, read_preset, train_packs, validate, workflow_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "workflow/configs").glob("*.yaml"))


def dry_run(wdir: Path, *args: str) -> dict[str, int]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wdir),
           "--cores", "2", "--workflow-profile", "none", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"dry run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    text = res.stdout + res.stderr
    assert "is extended by" not in text, "Snakemake merged a config file into another"
    table = text.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m[1] != "total"}


def stage_local_inputs(cfg: dict, wdir: Path) -> None:
    """A dry run checks that local model folders and data files exist; give it stand-ins (nothing is loaded)."""
    for subj in cfg["subjects"].values():
        if subj["model"].startswith(("./", "../")):
            (wdir / subj["model"]).mkdir(parents=True, exist_ok=True)
            (wdir / subj["model"] / "config.json").write_text("{}")
        files = subj["dataset"].get("data_files") or []
        for pattern in [files] if isinstance(files, str) else files:
            if "://" not in pattern and not pattern.startswith("/"):
                target = wdir / pattern.replace("*", "x")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("")


def expected_jobs(cfg: dict) -> dict[str, int]:
    """Jobs per rule from the validated config, counted from its declared grid (not from the Snakefile's
    helpers, so a planning bug there cannot agree with itself)."""
    sweep, subjects = cfg["sweep"], cfg["subjects"]
    grid = {(s, layer, arch, n, k)
            for s, subj in subjects.items() for layer in subj["layers"]
            for g in [sweep, *sweep["extra"]] for arch in g["archs"] for n in g["n"] for k in g["k"]}
    trained = set(grid)
    sw = cfg["scaling"]["lr_sweep"]
    if sw["enabled"]:
        k = sw["k"] if sw["k"] is not None else min(sweep["k"])
        for s, subj in subjects.items():
            for layer in subj["layers"]:
                for n in sw["n"] if sw["n"] is not None else sweep["n"]:
                    for m in {1.0, *map(float, sw["multiples"])}:
                        name = sw["arch"] if m == 1 and (s, layer, sw["arch"], n, k) in grid else \
                            f"{sw['arch']}_lr{format(m, 'g').replace('.', 'p')}"
                        trained.add((s, layer, name, n, k))

    def picked(stage: dict) -> int:
        return sum((stage["archs"] is None or a in stage["archs"]) and (stage["n"] is None or n in stage["n"])
                   for _, _, a, n, _ in grid)

    ev, interp = cfg["evaluate"], cfg["interpret"]
    builtin = [s for s, subj in subjects.items() if subj["model"] == "builtin"]
    out = {"tokenize": len(subjects), "extract": len(subjects), "normalize": len(subjects),
           "train": len(trained), "evaluate": len(grid),
           "scaling": sum(len(subj["layers"]) for subj in subjects.values()), "report": 1, "all": 1,
           "analyze": picked(cfg["analysis"]["progressive"]) + picked(cfg["analysis"]["refinement"])}
    if builtin:
        out |= {"corpus": 1, "tokenizer": len(builtin), "lm": len(builtin)}
    elif any(subj["dataset"]["path"] == "builtin" for subj in subjects.values()):
        out["corpus"] = 1
    for metric in ("probes", "ablation", "geometry"):
        if ev[metric]["enabled"]:
            out[metric] = picked(ev[metric])
    if interp["enabled"]:
        out["interpret"] = out["dashboard"] = picked(interp)
        if interp["autointerp"]["backend"] != "none":
            out["autointerp"] = picked(interp)
    if cfg["imported"]:
        out["import_sae"] = out["evaluate_imported"] = len(cfg["imported"])
    toy = cfg["toy"]
    if toy["allocation"]["enabled"]:
        out["allocation"] = 1
    if toy["groundtruth"]["enabled"]:
        out["groundtruth"] = 1
    man = toy["manifolds"]
    if man["enabled"]:
        dims = {"circle": [2], **man["dims"]}
        out["toy_curve"] = sum(len(dims[kind]) for kind in man["kinds"]) * len(man["archs"])
        out["toy_panels"] = out["manifolds"] = 1
    return {rule: count for rule, count in out.items() if count}


def test_every_preset_is_checked():
    names = {p.name for p in PRESETS}
    assert {"gpt2-small.yaml", "quick.yaml", "archs.yaml", "lr-sweep.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_plans_exactly_its_own_grid(preset, tmp_path):
    cfg = load_config(preset, local_paths=False)
    stage_local_inputs(cfg, tmp_path)
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())  # as in a checkout: it must stay out
    planned = dry_run(tmp_path, "--configfile", str(preset))
    expected = expected_jobs(cfg)
    for pack in train_packs(cfg):  # a pack's rule trains its members in one job, instead of `train`
        expected[f"train_pack_{pack['name']}"] = 1
        expected["train"] -= len(pack["members"])
    assert planned == {rule: count for rule, count in expected.items() if count}


def test_gpt2_small_plans_the_paper_grid_alone(tmp_path):
    """The audit's case: 42 TopK SAEs on gpt2 block 8, no builtin subject, no lr sweep, analyses on one n."""
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    planned = dry_run(tmp_path, "--configfile", str(ROOT / "workflow/configs/gpt2-small.yaml"))
    packs = {rule: count for rule, count in planned.items() if rule.startswith("train_pack_")}
    assert len(packs) == 7 and "train" not in planned  # train.pack: [k], one job per n
    assert planned["evaluate"] == 42 and planned["analyze"] == 2 * 6
    assert not {"corpus", "tokenizer", "lm"} & set(planned)
    assert planned["tokenize"] == planned["extract"] == planned["scaling"] == 1


def test_command_line_overrides_one_key_of_a_preset(tmp_path):
    """--config merges over the preset, typed as in a YAML file (Snakemake hands nested values over as text)."""
    preset = str(ROOT / "workflow/configs/gpt2-small.yaml")
    planned = dry_run(tmp_path, "--configfile", preset, "--config", "sweep={k: [32]}", "train={tokens: 131072}")
    assert planned["train"] == 7 and planned["evaluate"] == 7  # one k: nothing left to pack
    cfg = validate(workflow_config("config.yaml", [preset], {"sweep": {"k": ["32"]}}))
    assert cfg["sweep"]["k"] == [32] and cfg["sweep"]["n"][-1] == 131072 and list(cfg["subjects"]) == ["gpt2"]


def test_without_configfile_the_default_runs_and_overrides_apply(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    default = load_config(ROOT / "config.yaml")
    assert dry_run(tmp_path) == expected_jobs(default)
    narrowed = dry_run(tmp_path, "--config", "sweep={n: [128, 256], k: [4]}")
    assert narrowed["evaluate"] == 2


def test_presets_run_in_the_default_directory_agree_on_every_sae_they_share():
    """convergence.yaml, lr-sweep.yaml, archs.yaml ... extend config.yaml and run in its directory, so an SAE folder
    (subject, layer, arch name, n, k) two of them plan must have one recipe: else each run retrains what the other
    wrote (convergence.yaml and lr-sweep.yaml both define a variant topk_conv, with different token caps: the lr
    sweep's own 1x SAEs are topk_conv_lr1, so they do not collide)."""
    from saescale.config import sae_settings, trained_saes

    seen: dict[tuple, tuple[str, dict, str]] = {}
    default = ROOT / "config.yaml"
    shared = [default] + [p for p in PRESETS if (yaml.safe_load(p.read_text()) or {}).get("base") == "../../config.yaml"]
    assert len(shared) >= 4  # the default, archs, convergence, lr-sweep, manifolds
    for path in shared:
        cfg = load_config(path, local_paths=False)
        for sae in trained_saes(cfg):
            key = (sae["subject"], sae["layer"], sae["arch"], sae["n"], sae["k"])
            settings = sae_settings(cfg, sae["arch"])
            if key in seen:
                assert seen[key][:2] == settings, f"{path.name} and {seen[key][2]} train {key} with different recipes"
            else:
                seen[key] = (*settings, path.name)


def test_base_extends_another_file_and_the_preset_wins(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"subjects": {"a": {"model": "gpt2", "layers": [1]}},
                                                        "sweep": {"archs": ["topk"], "n": [64], "k": [4]}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/preset.yaml").write_text("base: ../base.yaml\nsweep: {n: [128]}\n")
    raw = read_preset(tmp_path / "sub/preset.yaml")
    assert raw["sweep"] == {"archs": ["topk"], "n": [128], "k": [4]} and "base" not in raw
    assert list(raw["subjects"]) == ["a"]


def test_bad_base_is_named(tmp_path):
    (tmp_path / "p.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base: nowhere.yaml does not exist"):
        read_preset(tmp_path / "p.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        read_preset(tmp_path / "loop.yaml")


OWT_PREFIX = "hf://datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet/"


@pytest.mark.parametrize("split_dir", ["train", "partial-train"])
def test_gpt2_small_dataset_block_streams_parquet_offline(tmp_path, split_dir):
    """The preset's dataset block exactly, with only the hub prefix swapped for a local folder laid out as the
    hub's parquet conversion (plain_text/<split>/NNNN.parquet, one `text` column), through the load_dataset call
    the tokenize rule makes. The conversion names a split truncated for size `partial-train`: both must match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saescale.corpus import load_texts, token_stream_windows
    from saescale.subject import load_tokenizer, train_tokenizer

    block = load_config(ROOT / "workflow/configs/gpt2-small.yaml", local_paths=False)["subjects"]["gpt2"]["dataset"]
    assert block["path"] == "parquet" and block["streaming"] and block["data_files"].startswith(OWT_PREFIX)
    docs = [f"Document {i}: the {'quick' if i % 2 else 'lazy'} fox wrote {i * 7} words." for i in range(300)]
    shards = tmp_path / "owt/plain_text" / split_dir
    shards.mkdir(parents=True)
    for j in range(3):  # three shards, read in name order
        pq.write_table(pa.table({"text": docs[j * 100:(j + 1) * 100]}), shards / f"{j:04d}.parquet")
    local = {**block, "data_files": f"{tmp_path}/owt/" + block["data_files"][len(OWT_PREFIX):]}
    texts = load_texts(local, where="config.subjects.gpt2")
    assert list(texts) == docs
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    train_tokenizer(str(corpus), 300, str(tmp_path / "tok"))
    windows = token_stream_windows(load_texts(local), load_tokenizer(str(tmp_path / "tok")), 16, max_tokens=512)
    assert windows.shape == (32, 16)  # max_tokens stops the stream: the rest of the shards is never read
