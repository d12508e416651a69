"""Config validation: defaults are filled, and every error names the key to fix."""

import pytest

from saescale.config import ConfigError, load_config, validate

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
    ],
)
def test_malformed_config_names_the_key(patch, key):
    with pytest.raises(ConfigError) as err:
        validate({**MINIMAL, **patch})
    assert key in str(err.value)


def test_shipped_configs_are_valid():
    for path in ["config.yaml", "workflow/configs/quick.yaml", "workflow/configs/gpt2-small.yaml"]:
        load_config(path)


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("subjects: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
