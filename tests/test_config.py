"""Config validation: defaults are filled, and every error names the key to fix."""

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
    ],
)
def test_malformed_config_names_the_key(patch, key):
    with pytest.raises(ConfigError) as err:
        validate({**MINIMAL, **patch})
    assert key in str(err.value)


def test_shipped_configs_are_valid():
    for path in ["config.yaml", "workflow/configs/quick.yaml", "workflow/configs/gpt2-small.yaml",
                 "workflow/configs/subject-size.yaml"]:
        load_config(path)
    # presets on top of config.yaml, as `snakemake --configfile` merges them
    import yaml

    from saescale.config import deep_merge

    for path in ["workflow/configs/archs.yaml", "workflow/configs/manifolds.yaml", "workflow/configs/convergence.yaml",
                 "workflow/configs/lr-sweep.yaml"]:
        with open("config.yaml") as base, open(path) as preset:
            validate(deep_merge(yaml.safe_load(base), yaml.safe_load(preset)))


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
