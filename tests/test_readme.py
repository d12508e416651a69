"""Every command in README.md is exercised, extracted from the README itself so that none can go stale.

Extracted: each line of a ```bash block (`\\` continuations joined, comments and blank lines dropped, `&&` chains
split) and each inline `code span` that starts with `snakemake `, `saescale `, `python ` or `pip `. Each command
must match exactly one entry of REGISTRY, which says how it is exercised:

- "run": executed as written (in a scratch folder, with the inputs the README presumes staged there), where that
  is cheap: `--help` pages, `snakemake --lint`, `snakemake --unlock`, the SAE export and import, the config check;
- "dry": an expensive `snakemake` command, planned with `-n` added, in a scratch folder (`--directory`,
  `--snakefile <repo>/Snakefile`, relative config paths made absolute); the job count is checked where the
  README states one (STATED_JOBS);
- "covered:<tests/file.py::test_name>": another test runs the same thing (the end-to-end run that the report
  bundle needs, the SLURM cluster, the model servers' OpenAI API); the test must exist and its source must name
  what the entry says it exercises.

A README command without an entry fails, naming the command; an entry that matches no README command fails too.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIXES = ("snakemake ", "saescale ", "python ", "pip ")

pytestmark = pytest.mark.slow  # ~40 dry runs and CLI starts: over 30 s on 2 cores


# ---------------------------------------------------------------- extraction

def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_and(command: str) -> list[str]:
    """`a && b` as [a, b], `&&` inside quotes left alone."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith("&&", i):
            parts.append(command[start:i].strip())
            start = i = i + 2
            continue
        i += 1
    return [p for p in [*parts, command[start:].strip()] if p]


FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def bash_commands(text: str) -> list[str]:
    out = []
    for block in FENCE.finditer(text):
        if block["lang"] != "bash":
            continue
        joined, pending = [], ""
        for raw in block["body"].splitlines():
            line = raw.strip()
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            joined.append(pending + line)
            pending = ""
        for line in joined:
            line = _strip_comment(line.strip())
            if line:
                out += _split_and(line)
    return out


def inline_commands(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    out = []
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        code = " ".join(span[1].split())
        if code.startswith(PREFIXES):
            out += _split_and(code)
    return out


def readme_commands(text: str) -> list[str]:
    return list(dict.fromkeys(bash_commands(text) + inline_commands(text)))


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Entry:
    pattern: str
    how: str                      # "run", "dry" or "covered:tests/x.py::test_y"
    setup: str = ""               # for "run": what to stage (see run_command)
    names: tuple[str, ...] = ()   # for "covered": strings the covering test's source must contain
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "regex", re.compile(self.pattern))


SNAKEMAKE_ELSEWHERE = r"(?!-n$)(?!.*(?:--report|--unlock|--lint|profiles/slurm))"  # the entries below
REGISTRY: list[Entry] = [
    Entry(r"^saescale --help$", "run"),
    Entry(r"^saescale --version$", "run"),
    Entry(r"^saescale <stage> --help$", "run", setup="every-stage"),
    Entry(r"^saescale export --sae-dir data/saes/tiny/L2/topk/n512_k8 --format (saelens|sparsify) --out \S+$", "run",
          setup="sae"),
    Entry(r"^saescale import --src path/to/saelens_folder --format saelens --out \S+$", "run", setup="sae"),
    Entry(r"^snakemake --lint$", "run", setup="repo"),
    Entry(r"^snakemake --unlock$", "run", setup="workdir"),
    Entry(r"""^python -c "from saescale\.config import load_config; load_config\('my\.yaml'\)"$""", "run",
          setup="my.yaml"),
    Entry(r"""^python -c "from transformers import .*from_pretrained\('gpt2'\).*"$""", "run", setup="hf-cache"),
    Entry(rf"^snakemake {SNAKEMAKE_ELSEWHERE}", "dry"),
    Entry(r"^snakemake -n$", "covered:tests/test_workflow.py::test_second_dry_run_has_nothing_to_do",
          names=('"-n"',)),
    Entry(r"^snakemake --report reports/bundle\.(zip|html)$",
          "covered:tests/test_workflow.py::test_report_zip_and_unlock_work_as_the_readme_writes_them",
          names=("--report", "bundle.zip")),
    Entry(r"^snakemake --workflow-profile profiles/slurm( |$)",
          "covered:tests/test_slurm.py::test_the_cut_quick_preset_runs_through_sbatch_and_renders_the_report",
          names=("slurm_run",)),
    Entry(r"^python -m pytest$", "covered:tests/test_readme.py::test_ci_runs_the_quick_start_as_written",
          names=("python -m pytest",)),
    Entry(r"^pip install ", "covered:tests/test_readme.py::test_every_pip_install_names_what_exists",
          names=("pip install",)),
    Entry(r"""^python -c "import datasets; .*openwebtext.*"$""",
          "covered:tests/test_presets.py::test_gpt2_small_dataset_block_streams_parquet_offline",
          names=("load_dataset",)),
    Entry(r"^python benchmarks/rehearsal\.py$",
          "covered:tests/test_rehearsal.py::test_cut_preset_runs_end_to_end_and_every_stage_is_timed",
          names=("rehearsal.run_workflow",)),
    # Its training and evaluation are the workflow's own jobs; the test checks the grid it plans and the table.
    Entry(r"^python benchmarks/calibration\.py$",
          "covered:tests/test_benchmarks_smoke.py::test_calibration_benchmark_plans_the_penalty_grid_on_the_run_config_and_flags_misses",
          names=("calibration_config", "calibration.table")),
    Entry(r"^python benchmarks/gpu_check\.py$",
          "covered:tests/test_benchmarks_smoke.py::test_gpu_check_smoke_times_the_real_step_h2d_and_loader",
          names=("gpu_check",)),
    # Third-party OpenAI-compatible servers (need their packages and, for vLLM, a GPU): the test drives the same
    # `backend: openai` client against a local HTTP endpoint speaking the same API, 429/Retry-After included.
    Entry(r"^(vllm|transformers) serve \S+$",
          "covered:tests/test_autointerp.py::test_429_with_retry_after_then_200_is_waited_out_through_the_openai_client",
          names=("OpenAIBackend", "base_url")),
]

# Job counts the README states for a command; a dry run must plan exactly these, and the README must say them.
STATED_JOBS = {
    "snakemake --cores all": 135,
    "snakemake --cores all --configfile workflow/configs/gpt2-small.yaml --resources gpu=1": 286,
}


def commands() -> list[str]:
    return readme_commands(README.read_text())


def entries_for(command: str) -> list[Entry]:
    return [e for e in REGISTRY if e.regex.search(command)]


# ---------------------------------------------------------------- the registry's own checks

def test_extraction_finds_fenced_inline_continued_and_chained_commands():
    text = ("Run `snakemake --cores all` or `saescale\n --help`; not `snakemake` or `config.yaml`.\n\n"
            "  ```bash\n  pip install x && snakemake \\\n    --lint   # lint\n  # a comment\n\n  vllm serve m\n  ```\n"
            "```yaml\nkey: `python no`\n```\n```text\nsaescale x failed\n```\n")
    assert readme_commands(text) == ["pip install x", "snakemake --lint", "vllm serve m",
                                     "snakemake --cores all", "saescale --help"]
    assert _strip_comment("""python -c "a # b" # c""") == 'python -c "a # b"'


def test_every_readme_command_has_exactly_one_registry_entry():
    found = commands()
    assert len(found) >= 20, found  # the extraction still sees the README's commands
    unmatched = [c for c in found if not entries_for(c)]
    ambiguous = {c: [e.pattern for e in entries_for(c)] for c in found if len(entries_for(c)) > 1}
    assert not unmatched, "README commands no test exercises (add a REGISTRY entry):\n" + "\n".join(unmatched)
    assert not ambiguous, f"README commands matching several entries: {ambiguous}"


def test_every_registry_entry_matches_a_readme_command():
    found = commands()
    dead = [e.pattern for e in REGISTRY if not any(e.regex.search(c) for c in found)]
    assert not dead, f"registry entries no README command uses (remove them): {dead}"
    missing = [c for c in STATED_JOBS if c not in found]
    assert not missing, f"STATED_JOBS names commands the README no longer has: {missing}"


def test_the_readme_states_the_job_counts_the_dry_runs_check():
    text = " ".join(README.read_text().split())
    for count in STATED_JOBS.values():
        assert f"{count} jobs" in text, count


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return ({slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
            | set(re.findall(r'<a id="([^"]+)"></a>', text)))


def test_the_readmes_links_resolve():
    """The table of contents and every link to a section or a file of the repository lead somewhere."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", README.read_text())):
        if target.startswith(("http://", "https://")):
            continue
        file, _, fragment = target.partition("#")
        path = ROOT / file if file else README
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)
    assert not broken, f"README links that lead nowhere: {broken}"


def _test_source(ref: str) -> str | None:
    path, name = ref.split("::")
    file = ROOT / path
    if not file.is_file():
        return None
    tree = ast.parse(file.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(file.read_text(), node)
    return None


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.how.startswith("covered:")], ids=lambda e: e.pattern)
def test_covering_tests_exist_and_run_the_command(entry):
    ref = entry.how.removeprefix("covered:")
    source = _test_source(ref)
    assert source is not None, f"{ref} does not exist"
    for name in entry.names:
        assert name in source, f"{ref} no longer uses {name!r}"


# ---------------------------------------------------------------- running and dry-running the commands

def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def _bash(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, env=_env(**env),
                          timeout=300)


def _ok(res: subprocess.CompletedProcess, command: str) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"`{command}` failed ({res.returncode}):\n{out[-3000:]}"
    return out


def _readme_yaml(after: str) -> dict:
    """The first ```yaml block after the heading `after` in the README."""
    text = README.read_text()
    start = text.index(after)
    block = next(b for b in FENCE.finditer(text, start) if b["lang"] == "yaml")
    return yaml.safe_load(block["body"])


def _stage_my_yaml(wdir: Path) -> None:
    """Bring your own model's example as my.yaml, with stand-ins for the local folders and files it names."""
    cfg = _readme_yaml("## Bring your own model")
    (wdir / "my.yaml").write_text(yaml.safe_dump(cfg))
    for subject in cfg["subjects"].values():
        if subject["model"].startswith(("./", "../")):
            folder = wdir / subject["model"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
        files = subject["dataset"].get("data_files") or []
        for pattern in [files] if isinstance(files, str) else files:
            target = wdir / pattern.replace("*", "x")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("some text\n")


def _stage_sae(wdir: Path) -> None:
    """The SAE folder the export commands name, and a SAELens folder for the import command."""
    import torch

    from saescale.interop import export_sae, write_imported
    from saescale.sae.model import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 512, "topk", 8)
    sae.init_from_data_(torch.randn(16) * 0.1)
    folder = wdir / "data/saes/tiny/L2/topk/n512_k8"
    write_imported(sae, folder, "readme", "saelens", layer=2, subject="tiny")
    export_sae(folder, "saelens", wdir / "path/to/saelens_folder")


def _stage_hf_cache(wdir: Path) -> dict[str, str]:
    """An offline Hugging Face cache holding a tiny random 'gpt2', so the download command runs as written."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_gpt2, write_text_files

    snapshot = wdir / "hf/hub/models--gpt2/snapshots" / ("0" * 40)
    random_gpt2(snapshot, write_text_files(wdir / "text", copies=5))
    (wdir / "hf/hub/models--gpt2/refs").mkdir(parents=True)
    (wdir / "hf/hub/models--gpt2/refs/main").write_text("0" * 40)
    return {"HF_HOME": str(wdir / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _stages() -> list[str]:
    out = _ok(_bash("saescale --help", ROOT), "saescale --help")
    return re.search(r"\{([a-z,_]+)\}", out)[1].split(",")


def run_command(entry: Entry, command: str, wdir: Path) -> None:
    if entry.setup == "every-stage":
        for stage in _stages():
            line = command.replace("<stage>", stage)
            assert "example:" in _ok(_bash(line, wdir), line), line
        return
    env: dict[str, str] = {}
    cwd = wdir
    if entry.setup == "repo":
        cwd = ROOT
    elif entry.setup == "workdir":
        shutil.copy(ROOT / "config.yaml", wdir / "config.yaml")
        command += f" --snakefile {shlex.quote(str(ROOT / 'Snakefile'))} --directory {shlex.quote(str(wdir))}"
    elif entry.setup == "my.yaml":
        _stage_my_yaml(wdir)
    elif entry.setup == "sae":
        _stage_sae(wdir)
    elif entry.setup == "hf-cache":
        env = _stage_hf_cache(wdir)
    out = _ok(_bash(command, cwd, **env), command)
    if command.startswith("saescale export"):
        dest = wdir / shlex.split(command)[-1]
        assert (dest / "cfg.json").is_file(), out
    if command.startswith("saescale import"):
        dest = wdir / shlex.split(command)[-1]
        assert (dest / "saescale_sae.json").is_file() and (dest / "saescale_sae.safetensors").is_file(), out


def _absolute(token: str) -> str:
    """A repository path in a command (workflow/configs/..., profiles/...), made absolute."""
    for prefix in ("workflow/", "profiles/"):
        if token.startswith(prefix) or f"={prefix}" in token:
            return token.replace(prefix, f"{ROOT}/{prefix}", 1)
    return token


def dry_run(command: str, wdir: Path) -> None:
    tokens = shlex.split(command)
    assert tokens[0] == "snakemake"
    if "--configfile" not in tokens:
        shutil.copy(ROOT / "config.yaml", wdir / "config.yaml")  # the README's "config.yaml in the working dir"
    if "my.yaml" in tokens:
        _stage_my_yaml(wdir)
    args = [_absolute(t) for t in tokens[1:]]
    cmd = [sys.executable, "-m", "snakemake", *args, "-n", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(wdir)]
    res = subprocess.run(cmd, cwd=wdir, capture_output=True, text=True, env=_env(), timeout=300)
    out = _ok(res, command)
    planned = re.search(r"^total\s+(\d+)\s*$", out, re.M)
    assert planned, f"`{command}` planned no jobs:\n{out[-2000:]}"
    if command in STATED_JOBS:
        assert int(planned[1]) == STATED_JOBS[command], (command, planned[1])


EXECUTED = [(c, entries_for(c)[0]) for c in commands() if len(entries_for(c)) == 1
            and entries_for(c)[0].how in ("run", "dry")]


@pytest.mark.parametrize("command,entry", EXECUTED, ids=[c for c, _ in EXECUTED])
def test_readme_command(command, entry, tmp_path):
    if entry.how == "run":
        run_command(entry, command, tmp_path)
    else:
        dry_run(command, tmp_path)


# ---------------------------------------------------------------- the commands other tests cannot run

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ci_runs_the_quick_start_as_written():
    """CI (.ci/run) installs with the quick start's own pip command and runs the README's test command, so the
    whole suite (this file included) is what `python -m pytest` runs."""
    quick = bash_commands(README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0])
    assert quick[:3] == ['pip install torch==2.13.0 -e ".[test]"', "snakemake --cores all", "python -m pytest"], quick
    ci = [_strip_comment(line) for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert quick[0] in ci
    assert any(re.fullmatch(r"(\w+=\S+ )*python -m pytest", line) for line in ci), ci


def test_every_pip_install_names_what_exists():
    """Each README `pip install`: local extras are declared in pyproject.toml, pins satisfy its requirements,
    third-party extras exist in the installed package's metadata, and a package that is no requirement of ours
    is one that saescale's own error messages tell the user to install."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    declared = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    for group in extras.values():
        declared |= {Requirement(r).name: Requirement(r) for r in group}
    source = "\n".join(p.read_text() for p in (ROOT / "src/saescale").rglob("*.py"))
    source = re.sub(r'"\s*\n\s*[rbf]*"', "", source)  # string literals continued on the next line, joined
    pips = [c for c in commands() if c.startswith("pip install ")]
    assert pips, "the README has no pip command"
    for command in pips:
        tokens = shlex.split(command)[2:]
        for token in tokens:
            if token == "-e":
                continue
            if token.startswith("."):
                wanted = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", token)
                assert wanted, (command, token)
                for extra in filter(None, (wanted[1] or "").split(",")):
                    assert extra in extras, f"`{command}`: pyproject.toml has no extra {extra!r}"
                continue
            req = Requirement(token)
            if req.name == "saescale":
                assert set(req.extras) <= set(extras), (command, req.extras)
            elif req.name in declared:
                for pin in req.specifier:
                    if pin.operator == "==":
                        assert declared[req.name].specifier.contains(pin.version), (command, declared[req.name])
                for extra in req.extras:
                    provided = metadata.metadata(req.name).get_all("Provides-Extra") or []
                    assert extra in provided, f"`{command}`: {req.name} has no extra {extra!r}"
            else:
                assert f"pip install {req.name}" in source, f"`{command}`: {req.name} is neither a requirement " \
                    "nor named by saescale's errors"
