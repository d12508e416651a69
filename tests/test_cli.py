"""`saescale <stage>` on its own: defaults from the workflow's schema, errors that name the option or key, help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from saescale import cli
from saescale.stage_specs import BY_HAND

PROBES = ["probes", "--sae-dir", ".", "--activations", ".", "--out", "o.json", "--layer", "1"]


def resolved(argv: list[str]) -> dict:
    args = cli.build_parser().parse_args(argv)
    cli.resolve_spec(args)
    return args.spec


def test_a_stage_without_spec_takes_the_schema_defaults_and_set_overrides_them():
    assert resolved(PROBES)["windows"] > 0
    assert resolved(PROBES + ["--set", "evaluate.probes.windows=17"])["windows"] == 17
    assert resolved(PROBES + ["--spec", '{"iters": 3}'])["iters"] == 3


def test_a_config_file_gives_the_settings_the_workflow_would(tmp_path):
    (tmp_path / "c.yaml").write_text("subjects: {s: {model: builtin, layers: [1]}}\nevaluate: {probes: {windows: 9}}\n")
    assert resolved(PROBES + ["--config", str(tmp_path / "c.yaml")])["windows"] == 9


@pytest.mark.parametrize("extra, message", [
    (["--spec", '{"bogus": 1}'], "--spec.bogus: not a setting of this stage"),
    (["--spec", '{"windows": "many"}'], "--spec.windows: expected int"),
    (["--set", "evaluate.probes.windows=many"], "config.evaluate.probes.windows: 'many' is not of type 'integer'"),
    (["--set", "windows"], "--set 'windows': write key=value"),
    (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
])
def test_bad_settings_are_refused_naming_them(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(PROBES + extra)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_input_is_named_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--sae-dir", str(tmp_path / "nope"), "--activations", ".", "--model", "m",
                  "--layer", "1", "--out", "o.json", "--spec", "{}"])
    assert f"--sae-dir {tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err


def test_every_stage_has_an_example_and_every_option_a_help():
    parser = cli.build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sp in stages.items():
        assert name in cli.EXAMPLES, name
        assert cli.EXAMPLES[name].startswith(f"saescale {name} "), name
        for action in sp._actions:
            assert action.help, (name, action.option_strings)


def test_every_spec_stage_derives_its_defaults():
    """Each stage's settings come out of a schema-default config (no KeyError for any stage)."""
    parser = cli.build_parser()
    for stage in BY_HAND:
        args = parser.parse_args([stage, *REQUIRED.get(stage, [])])
        cli.resolve_spec(args)
        assert isinstance(args.spec, dict) and args.spec, stage


REQUIRED = {
    "tokenizer": ["--corpus", "c", "--out", "o"],
    "lm": ["--tokens", "t", "--tokenizer", "t", "--out", "o"],
    "tokenize": ["--tokenizer", "t", "--out", "o"],
    "extract": ["--model", "m", "--tokens", "t", "--out", "o"],
    "evaluate": ["--sae-dir", "s", "--activations", "a", "--model", "m", "--out", "o", "--layer", "1"],
    "analyze": ["--experiment", "progressive", "--sae-dir", "s", "--activations", "a", "--out", "o", "--layer", "1"],
    "probes": PROBES[1:], "ablation": PROBES[1:], "geometry": PROBES[1:],
    "interpret": PROBES[1:] + ["--out-records", "r"],
    "autointerp": ["--records", "r", "--cache", "c", "--out", "o", "--out-records", "r"],
    "scaling": ["--evals", "e", "--out-metrics", "m", "--out-fits", "f", "--out-studies", "s"],
    "toy": ["--study", "allocation", "--out", "o"],
    "report": ["--out", "o"],
    "train": ["--activations", "a", "--norm", "n", "--subject", "s", "--layer", "1", "--arch", "topk", "--n", "64",
              "--k", "4", "--out-dir", "o"],
}


def test_train_takes_a_variants_settings_from_a_config(tmp_path):
    (tmp_path / "c.yaml").write_text("subjects: {s: {model: builtin, layers: [1]}}\n"
                                     "sweep: {variants: {slow: {arch: topk, train: {lr_scale: 0.5}}}}\n")
    argv = ["train", *REQUIRED["train"], "--name", "slow", "--config", str(tmp_path / "c.yaml")]
    spec = resolved(argv)
    assert spec["lr_scale"] == 0.5
    assert resolved(argv + ["--set", "train.tokens=4096"])["tokens"] == 4096


def test_version():
    out = subprocess.run([sys.executable, "-m", "saescale.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("saescale ")
