"""The conda environment (`snakemake --sdm conda`) stays what pyproject.toml installs, and every job uses it."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pip_requirements(env: dict) -> list[str]:
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def normalized(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_the_conda_env_pins_exactly_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "envs/saescale.yaml").read_text())
    assert sorted(map(normalized, pip_requirements(env))) == sorted(map(normalized, project["dependencies"]))
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=" + python.split("=")[1]


def rule_blocks(text: str) -> dict[str, str]:
    """Each `rule name:` of a rule file with its body (up to the next top-level statement)."""
    blocks = re.split(r"^(?=\S)", text, flags=re.M)
    return {m[1]: b for b in blocks if (m := re.match(r"rule (\w+):", b))}


def test_every_rule_that_runs_a_command_declares_the_conda_env():
    rules = {name: body for f in sorted((ROOT / "workflow/rules").glob("*.smk"))
             for name, body in rule_blocks(f.read_text()).items()}
    # the pack rules are defined in a loop (`rule:` with a name= argument) and carry the same directives
    loop = re.search(r"^\s+rule:\n(.*?)(?=^\S|\Z)", (ROOT / "workflow/rules/train.smk").read_text(), re.M | re.S)
    rules["train_pack_*"] = loop[1]
    commands = {name: body for name, body in rules.items() if re.search(r"^\s+(shell|run|script):", body, re.M)}
    assert len(commands) >= 20
    missing = [name for name, body in commands.items() if not re.search(r"^\s+conda:\s*\n\s+envs\(\)", body, re.M)]
    assert not missing, f"rules without `conda: envs()`: {missing}"
    env_path = re.search(r'return "([^"]+)"', (ROOT / "workflow/rules/common.smk").read_text().split("def envs")[1])
    assert (ROOT / "workflow/rules" / env_path[1]).resolve() == (ROOT / "envs/saescale.yaml").resolve()
