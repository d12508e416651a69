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
    """Every (subject, layer, arch, n, k) the sweep trains."""
    sw = CFG["sweep"]
    for name, subj in CFG["subjects"].items():
        for layer in subj["layers"]:
            for arch in sw["archs"]:
                for n in sw["n"]:
                    for k in sw["k"]:
                        yield dict(subject=name, layer=layer, arch=arch, n=n, k=k)


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
    return sorted(set(files))
