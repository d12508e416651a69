"""Config validation: defaults are filled, and every error names the key to fix."""

from pathlib import Path

import pytest

from saescale.config import ConfigError, load_config, train_packs, validate

MINIMAL = {"subjects": {"tiny": {"model": "builtin", "layers": [2]}}}


def test_defaults_are_filled_from_the_schema():
    cfg = validate(MINIMAL)
    assert cfg["subjects"]["tiny"]["ctx_len"] == 64
    assert cfg["subjects"]["tiny"]["dataset"]["path"] == "builtin"
    assert cfg["subjects"]["tiny"]["builtin"]["n_layer"] == 4
    assert cfg["train"]["adam_eps"] == 6.25e-10 and cfg["sweep"]["archs"] == ["topk"]


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"sweep": {"k": [8, "x"]}}, "config.sweep.k[1]"),
        ({"trian": {}}, "config: Additional properties"),
        ({"train": {"lr": -1}}, "config.train.lr"),
        ({"sweep": {"n": [64], "k": [128]}}, "config.sweep.k[0]"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [9]}}}, "config.subjects.tiny.layers[0]"),
        ({"subjects": {"tiny": {"model": "builtin"}}}, "config.subjects.tiny: 'layers' is a required property"),
        ({"subjects": {"tiny": {"model": "gpt2", "layers": [8], "ctx_len": 1}}}, "config.subjects.tiny.ctx_len"),
        ({"train": {"pack": ["layer"]}}, "config.train.pack[0]"),
        ({"sweep": {"variants": {"v": {"arch": "topk", "train": {"pack": ["k"]}}}}}, "config.sweep.variants.v.train.pack"),
        # k <= 0, empty grids, wrong types
        ({"sweep": {"k": [0]}}, "config.sweep.k[0]: 0 is less than the minimum of 1"),
        ({"sweep": {"k": [-4]}}, "config.sweep.k[0]: -4 is less than the minimum of 1"),
        ({"sweep": {"n": []}}, "config.sweep.n: [] should be non-empty"),
        ({"sweep": {"archs": []}}, "config.sweep.archs: [] should be non-empty"),
        ({"sweep": {"n": [64.5]}}, "config.sweep.n[0]: 64.5 is not of type 'integer'"),
        ({"sweep": {"k": [True]}}, "config.sweep.k[0]: True is not of type 'integer'"),
        ({"train": {"tokens": "1e6"}}, "config.train.tokens: '1e6' is not of type 'integer' (YAML reads 1e6 as text"),
        ({"train": {"lr": "auto"}}, "config.train.lr: 'auto' is not of type"),
        ({"train": {"precision": "fp8"}}, "config.train.precision: 'fp8' is not one of"),
        ({"train": {"tokens": 2048, "batch_size": 4096}}, "config.train.batch_size: 4096 exceeds the token budget"),
        # subjects
        ({"subjects": {}}, "config.subjects: {} should be non-empty"),
        ({"subjects": {"a/b": {"model": "builtin", "layers": [1]}}}, "config.subjects: 'a/b' does not match"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [2], "ctxlen": 64}}},
         "config.subjects.tiny: Additional properties are not allowed ('ctxlen' was unexpected) (check the spelling"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": "2"}}}, "config.subjects.tiny.layers: '2' is not of type"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [-1]}}}, "config.subjects.tiny.layers[0]: -1 is less"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1, 1]}}}, "config.subjects.tiny.layers: [1, 1] has non-unique"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "dtype": "bfloat16"}}}, "config.subjects.tiny.dtype"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "ctx_len": 128, "eval_tokens": 64}}},
         "config.subjects.tiny.eval_tokens: 64 is less than one window"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "builtin": {"n_embd": 64, "n_head": 5}}}},
         "config.subjects.tiny.builtin.n_head: 5 does not divide n_embd=64"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "dataset": {"split": "train"}}}},
         "config.subjects.tiny.dataset: 'path' is a required property"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "dataset": {"path": "builtin", "max_tokens": 0}}}},
         "config.subjects.tiny.dataset.max_tokens: 0 is less than the minimum of 1"),
        # files that must exist on this machine
        ({"subjects": {"tiny": {"model": "./models/not-here", "layers": [0]}}},
         "config.subjects.tiny.model: the local model folder ./models/not-here does not exist"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1],
                                "dataset": {"path": "text", "data_files": ["/no/such/dir/*.txt"]}}}},
         "config.subjects.tiny.dataset.data_files: no file matches '/no/such/dir/*.txt'"),
        ({"subjects": {"tiny": {"model": "builtin", "layers": [1], "dataset": {"path": "/no/such/folder"}}}},
         "config.subjects.tiny.dataset.path: /no/such/folder does not exist"),
        # selectors and stages
        ({"evaluate": {"probes": {"archs": ["topkk"]}}}, "config.evaluate.probes.archs[0]: 'topkk' is neither an arch"),
        ({"analysis": {"progressive": {"archs": ["zzz"]}}}, "config.analysis.progressive.archs[0]: 'zzz'"),
        ({"scaling": {"lr_sweep": {"enabled": True, "arch": "nope"}}}, "config.scaling.lr_sweep.arch: 'nope'"),
        ({"interpret": {"autointerp": {"backend": "openai", "model": "m"}}},
         "config.interpret.autointerp.base_url: required for backend openai"),
        ({"interpret": {"autointerp": {"backend": "transformers"}}},
         "config.interpret.autointerp.model: required for backend transformers"),
        # SAEs trained elsewhere
        ({"imported": {"x": {"path": "/tmp", "format": "saelens", "subject": "other", "layer": 2}}},
         "config.imported.x.subject: 'other' is not a subject of this config"),
        ({"imported": {"x": {"path": "/tmp", "format": "saelens", "subject": "tiny", "layer": 1}}},
         "config.imported.x.layer: 1 is not one of subjects.tiny.layers [2]"),
        ({"imported": {"x": {"path": "/no/such/sae", "format": "saelens", "subject": "tiny", "layer": 2}}},
         "config.imported.x.path: /no/such/sae does not exist"),
        ({"imported": {"x": {"path": "/tmp", "format": "safetensors", "subject": "tiny", "layer": 2}}},
         "config.imported.x.format: 'safetensors' is not one of"),
    ],
)
def test_malformed_config_names_the_key(patch, key):
    with pytest.raises(ConfigError) as err:
        validate({**MINIMAL, **patch})
    assert key in str(err.value)


def test_shipped_configs_are_valid():
    """Each preset as a run reads it: alone, or over the file its base: names (tests/test_presets.py dry-runs them)."""
    for path in ["config.yaml", *sorted(Path("workflow/configs").glob("*.yaml"))]:
        load_config(path, local_paths=False)  # a preset's local model folder is made by its own script


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("subjects: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "sweep, key",
    [
        ({"archs": ["topk", "relux"]}, "config.sweep.archs[1]: 'relux' is neither an arch"),
        ({"extra": [{"archs": ["relu"], "n": [16], "k": [32]}]}, "config.sweep.extra[0].k[0]"),
        ({"variants": {"relu": {"arch": "topk"}}}, "config.sweep.variants.relu: the name of a builtin arch"),
        ({"variants": {"abl": {"arch": "topk", "train": {"auxk": "no"}}}}, "config.sweep.variants.abl.train.auxk"),
        ({"variants": {"abl": {"arch": "topk", "train": {"arch_params": {"relu": {"bad": 1}}}}}},
         "config.sweep.variants.abl.train.arch_params.relu"),
        ({"variants": {"abl": {"arch": "topkk"}}}, "config.sweep.variants.abl.arch"),
    ],
)
def test_malformed_grid_names_the_key(sweep, key):
    with pytest.raises(ConfigError) as err:
        validate({**MINIMAL, "sweep": sweep})
    assert key in str(err.value)


def test_grid_is_the_union_of_grids_and_variants_merge_their_train_overrides():
    from saescale.config import analysed, recipe, sae_jobs

    cfg = validate({**MINIMAL, "sweep": {
        "archs": ["topk"], "n": [64, 128], "k": [4],
        "extra": [{"archs": ["relu", "topk", "noaux"], "n": [128], "k": [4, 8]}],
        "variants": {"noaux": {"arch": "topk", "train": {"auxk": False, "calibration": {"fraction": 0.5}}}}}})
    jobs = [(j["arch"], j["n"], j["k"]) for j in sae_jobs(cfg)]
    assert jobs == [("topk", 64, 4), ("topk", 128, 4), ("relu", 128, 4), ("relu", 128, 8), ("topk", 128, 8),
                    ("noaux", 128, 4), ("noaux", 128, 8)]  # (topk, 128, 4) once
    arch, train = recipe(cfg, "noaux")
    assert arch == "topk" and train["auxk"] is False and train["calibration"] == {"fraction": 0.5, "rate": None}
    assert recipe(cfg, "relu") == ("relu", cfg["train"])
    assert analysed(cfg, "progressive", {"arch": "relu", "n": 128}) and not analysed(cfg, "refinement", {"arch": "gated", "n": 128})


def pack_members(cfg):
    return {p["name"]: sorted((m["arch"], m["n"], m["k"]) for m in p["members"]) for p in train_packs(validate(cfg))}


def test_packs_span_the_grid_keys_train_pack_names_and_never_mix_batch_streams():
    grid = {"archs": ["topk", "relu", "big_batch"], "n": [64, 128], "k": [4, 8],
            "variants": {"big_batch": {"arch": "topk", "train": {"batch_size": 8192}}}}
    base = {**MINIMAL, "sweep": grid, "scaling": {"lr_sweep": {"enabled": False}}}
    assert pack_members(base) == {}  # the default: one SAE per job
    by_k = pack_members({**base, "train": {"pack": ["k"]}})
    assert len(by_k) == 6 and by_k["tiny_L2_relu_n64_kall"] == [("relu", 64, 4), ("relu", 64, 8)]
    by_layer = pack_members({**base, "train": {"pack": ["arch", "n", "k"]}})
    # the variant's batch size makes another stream: its 4 SAEs get a pack of their own
    assert sorted(len(m) for m in by_layer.values()) == [4, 8]
    assert all(len({a == "big_batch" for a, _, _ in m}) == 1 for m in by_layer.values())
    assert len(set(by_layer)) == 2


def test_local_files_that_exist_pass_relative_to_the_working_directory(tmp_path, monkeypatch):
    """The file checks raise no false alarm: relative paths are taken from the run's working directory."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    subject = {"model": "./model", "layers": [0], "dataset": {"path": "text", "data_files": {"train": "texts/*.txt"}}}
    validate({"subjects": {"tiny": subject}})
    (tmp_path / "model" / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.subjects.tiny.model: the local model folder ./model has no config"):
        validate({"subjects": {"tiny": subject}})


def test_yaml_anchors_shared_between_sections_are_filled_separately(tmp_path):
    """`&defaults` reused by two probes sections: each gets its own defaults, not the other's keys."""
    (tmp_path / "c.yaml").write_text(
        "subjects: {tiny: {model: builtin, layers: [2]}}\n"
        "evaluate:\n  probes: &sel {archs: [topk], n: [64]}\n  ablation: *sel\n  geometry: *sel\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg["evaluate"]["probes"]["archs"] == cfg["evaluate"]["ablation"]["archs"] == ["topk"]
    assert "pairs" in cfg["evaluate"]["ablation"] and "pairs" not in cfg["evaluate"]["probes"]


def test_home_paths_are_expanded_for_every_stage(tmp_path, monkeypatch):
    """`~/...` reaches the jobs expanded: model folders, data files and imported SAEs (no shell expands it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello\n")
    subject = {"model": "~/model", "layers": [0],
               "dataset": {"path": "text", "data_files": {"train": ["~/texts/*.txt"]}}}
    cfg = validate({"subjects": {"tiny": subject}})
    assert cfg["subjects"]["tiny"]["model"] == str(tmp_path / "model")
    assert cfg["subjects"]["tiny"]["dataset"]["data_files"]["train"] == [str(tmp_path / "texts/*.txt")]
