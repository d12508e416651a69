# Helpers shared by the rules: the grid, per-subject inputs, and code versions for rerun triggers.
import hashlib
from pathlib import Path

import saescale
import torch

PKG = Path(saescale.__file__).parent
HAS_CUDA = torch.cuda.is_available()


SHARED_MODULES = ("cli.py", "config.py", "files.py", "paths.py")  # every stage runs through these


def code_version(*modules):
    """Hash of the package sources a rule runs: Snakemake does not track imported code (notes/snakemake.md
    section 0.7), so this param makes a code change rerun its stage and what depends on it."""
    h = hashlib.sha256()
    for mod in SHARED_MODULES + modules:
        p = PKG / mod
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def spec(obj):
    """A stage's settings as one canonical JSON string: a Snakemake param, so changes rerun only its jobs."""
    return json.dumps(obj, sort_keys=True)


def subject(wc):
    return CFG["subjects"][wc.subject]


def is_builtin(wc):
    return subject(wc)["model"] == "builtin"


def model_path(wc):
    """Where from_pretrained loads the subject: the pipeline's own model directory, or a hub id / path."""
    return paths.fmt(paths.MODEL, subject=wc.subject) if is_builtin(wc) else subject(wc)["model"]


def model_input(wc):
    return [paths.fmt(paths.MODEL, subject=wc.subject)] if is_builtin(wc) else []


def sae_grid():
    """Every (subject, layer, arch, n, k) the sweep trains (saescale.config.sae_jobs)."""
    return sae_jobs(CFG)


def train_recipe(wc):
    """(arch, train settings) of the arch wildcard, which may name a variant (sweep.variants)."""
    return recipe(CFG, wc.arch)


def analysis_spec(experiment):
    """The settings an analysis job runs with; which SAEs are analysed (archs, n) is not one of them, so
    widening that selection adds jobs without rerunning the others."""
    settings = {key: v for key, v in CFG["analysis"][experiment].items() if key not in ("archs", "n")}
    return {**settings, "downstream_batch": CFG["evaluate"]["downstream_batch"]}


def analyses():
    """Every (experiment, SAE) the analyze rule runs (config.analysis)."""
    return [
        dict(job, experiment=experiment)
        for job in sae_grid()
        for experiment in ("progressive", "refinement")
        if analysed(CFG, experiment, job)
    ]


def log_path(rule, name):
    return paths.fmt(paths.LOGS, rule=rule, name=name)


def bench_path(rule, name):
    return paths.fmt(paths.BENCH, rule=rule, name=name)


def envs():
    return "../../envs/saescale.yaml"


def tokenize_inputs(wc):
    subj = subject(wc)
    out = {}
    if subj["model"] == "builtin":
        out["tokenizer"] = paths.fmt(paths.TOKENIZER, subject=wc.subject)
    if subj["dataset"]["path"] == "builtin":
        out["corpus"] = paths.CORPUS
    return out


def tokenizer_path(wc):
    return paths.fmt(paths.TOKENIZER, subject=wc.subject) if is_builtin(wc) else subject(wc)["model"]


def evals_of(wc):
    return [
        paths.fmt(paths.EVAL, **job)
        for job in sae_grid()
        if job["subject"] == wc.subject and str(job["layer"]) == wc.layer
    ]


def report_inputs(wildcards):
    files = []
    for name, subj in CFG["subjects"].items():
        files += [paths.fmt(p, subject=name) for p in (paths.NORM, paths.TOKENS, paths.ACTIVATIONS)]
        if subj["model"] == "builtin":
            files.append(paths.fmt(paths.MODEL, subject=name))
        if subj["dataset"]["path"] == "builtin":
            files.append(paths.CORPUS_INFO)
        for layer in subj["layers"]:
            files += [paths.fmt(paths.METRICS, subject=name, layer=layer), paths.fmt(paths.FITS, subject=name, layer=layer)]
    for job in sae_grid():
        files += [paths.fmt(p, **job) for p in (paths.SAE_LOG, paths.SAE_CFG, paths.EVAL)]
    files += [paths.fmt(paths.ANALYSIS, **job) for job in analyses()]
    return sorted(set(files))
