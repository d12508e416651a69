# Helpers shared by the rules: the grid, per-subject inputs, code versions for rerun triggers, and job sizes.
import ast
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

from snakemake.resources import Resources
from snakemake.settings.types import DeploymentMethod

from saescale import hardware, stage_specs
from saescale.config import k_aux_for, layout
from saescale.hardware import gpu_present
from saescale.files import file_digest
from saescale.provenance import EXTRACT_MODULES, TRAIN_MODULES, code_version

HAS_CUDA = gpu_present()  # without importing torch: ~1 s of every snakemake start
# The most threads a rule may ask for. Snakemake scales a rule's threads down to --cores, so this means "all
# the cores the run was given"; `workflow.cores` itself cannot be read when no --cores is set, which broke
# `snakemake --unlock` and `snakemake --report`.
ALL_CPUS = len(os.sched_getaffinity(0))
# the report appends docs/method.md and docs/metrics.md: editing either re-renders it
METHOD_DOC_VERSION = file_digest([workflow.source_path(f"../../docs/{name}.md") for name in ("method", "metrics")])
TRAIN_GPUS = 1 if HAS_CUDA or CFG["train"]["device"] == "cuda" else 0


def profile_resource(rule, name):
    """What --set-resources (a profile's set-resources) gives `rule` for resource `name`, as written; None if
    nothing. Training reads two such settings that size its jobs (train_resources)."""
    given = workflow.resource_settings.overwrite_resources.get(rule) or {}
    if name not in given:
        return None
    raw = getattr(given[name], "raw", given[name])
    try:  # the command line quotes strings: train:gpu_constraints="'80:a100_80gb'"
        return ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError):
        return raw


# A cluster profile may give `train` GPUs where this host has none to see (a login node)
TRAIN_ON_GPU = TRAIN_GPUS > 0 or int(profile_resource("train", "gpu") or 0) > 0
# GPUs per training process: what the profile gives `train`, else this host's. A train.distributed job runs
# data x latent processes and asks for that many times this (train_gpus), so the profile's fixed `gpu` for `train`
# is taken out of the overrides here, where it would otherwise replace that product.
GPUS_PER_PROCESS = int(profile_resource("train", "gpu") or TRAIN_GPUS)
if "train" in workflow.resource_settings.overwrite_resources:
    workflow.resource_settings.overwrite_resources["train"] = Resources(
        {key: v for key, v in workflow.resource_settings.overwrite_resources["train"].items() if key != "gpu"})


def inherit_train_resources(rule_name):
    """Give a pack's rule what --set-resources (a profile's `set-resources`) gives rule `train`, under what it
    gives the pack's own rule: those settings are keyed by rule name, and a pack's rule is named after its pack,
    so without this a cluster profile's GPU request for `train` would miss packed training."""
    overrides = workflow.resource_settings.overwrite_resources
    resources = workflow.get_rule(rule_name).resources
    for name in ("train", rule_name):
        resources.update(Resources.from_mapping(overrides.get(name, {})))


def train_resources(job):
    """Per-job resources of a training job, sized for what it holds (saescale.hardware): mem_mb for the host
    (the train split in RAM, or the streamed buffers), gpu_mem_gb for the GPU (the widest SAE at the batch size;
    0 on the CPU) and, where the profile lists cards by memory (`gpu_constraints` of `train`), the sbatch
    --constraint of the smallest card that holds the job. `job(wildcards)` gives the SAEs' widths and an arch
    whose train settings apply (a pack's members share their batch stream). They read the activation store's
    metadata, so they stay <TBD> until extraction has written it."""

    def size(wildcards, input):
        widths, arch = job(wildcards)
        settings = recipe(CFG, arch)[1]
        attrs = hardware.store_attrs(input.activations)
        act_bytes = hardware.forward_bytes(settings["precision"], "cuda" if TRAIN_ON_GPU else "cpu")
        d, distributed = attrs["d_model"], layout(settings)
        # a distributed SAE has a job of its own (never a pack), so its k is the job's wildcard
        slots = 0 if distributed == (1, 1) else gathered_slots(recipe(CFG, arch)[0], int(wildcards.k), max(widths),
                                                                 settings, d)
        gpu = hardware.train_gpu_gib(widths, d, settings["batch_size"], act_bytes, settings["microbatch"],
                                     distributed, slots)
        # a distributed job's processes on one node each hold what a single-device job holds on the host
        host = hardware.train_host_gib(attrs, widths, settings, TRAIN_ON_GPU) * procs_per_node(settings)
        return host, gpu if TRAIN_ON_GPU else 0

    def constraint(wildcards, input):
        tiers = profile_resource("train", "gpu_constraints")
        return hardware.gpu_constraint(tiers, size(wildcards, input)[1]) if TRAIN_ON_GPU and tiers else None

    return {
        "mem_mb": lambda wildcards, input: hardware.mem_mb(size(wildcards, input)[0]),
        "gpu_mem_gb": lambda wildcards, input: size(wildcards, input)[1],
        "constraint": constraint,
    }


def gathered_slots(arch, k, n, settings, d_model):
    """Latents per token a train.distributed step gathers from each shard: the arch's main selection (multitopk:
    its multiple of k, sae.distributed.selection_slots) and AuxK's k_aux. It imports torch, so only a job with
    train.distributed asks."""
    from saescale.sae.distributed import selection_slots

    main = selection_slots(arch, k, n, settings["arch_params"].get(arch, {}))[0]
    return main + k_aux_for(settings, d_model)


def procs_per_node(settings):
    """Training processes a job starts on each node: data x latent / nodes of train.distributed; 1 without."""
    data, latent = layout(settings)
    return data * latent // settings["distributed"]["nodes"]


def train_gpus(wc):
    """GPUs one training job asks for: one per process of train.distributed (data x latent), or one."""
    data, latent = layout(recipe(CFG, wc.arch)[1])
    return GPUS_PER_PROCESS * data * latent


def train_nodes(wc):
    return recipe(CFG, wc.arch)[1]["distributed"]["nodes"]


def spec(obj):
    """A stage's settings as one canonical JSON string: a Snakemake param, so changes rerun only its jobs. What
    goes in it comes from `saescale.stage_specs`, which `saescale <stage>` run by hand uses too."""
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


def pack_members(pack):
    """What `saescale train --members` reads for each SAE of a pack (config.train_packs)."""
    return [
        {"arch": arch, "name": job["arch"], "n": job["n"], "k": job["k"], "spec": settings,
         "out_dir": str(Path(paths.fmt(paths.SAE_CFG, **job)).parent)}
        for job in pack["members"]
        for arch, settings in [sae_settings(CFG, job["arch"])]
    ]


def analysis_spec(experiment):
    return stage_specs.analysis_spec(CFG, experiment)


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


def option(flag, value):
    """`flag value` for a shell command, the value quoted (model paths and revisions are user text); "" for none."""
    return f"{flag} {shlex.quote(str(value))}" if value not in (None, "") else ""


def revision_option(wc):
    """How a stage loads the subject model: its revision and loading keys (dtype, device_map, remote code),
    the same as extract used."""
    loading = {key: subject(wc)[key] for key in stage_specs.MODEL_OPTION_KEYS}
    return f'{option("--revision", subject(wc)["revision"])} {option("--model-options", json.dumps(loading))}'.strip()


def envs():
    return "../../envs/saescale.yaml"


if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    # envs/saescale.yaml holds the dependencies only: a path to this checkout inside it would be resolved from
    # the copy snakemake makes under .snakemake/conda/. So jobs run the `saescale` of this checkout, by path.
    shell.prefix(
        f'set -euo pipefail; export PYTHONPATH="{Path(workflow.basedir) / "src"}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; '
        'saescale() {{ python -m saescale.cli "$@"; }}; '
    )


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


def autointerp_enabled():
    return CFG["interpret"]["autointerp"]["backend"] != "none"


def sae_results(job):
    """Every per-SAE result file the scaling table merges: the eval record, the suite's metrics (those on
    for this SAE, config.evaluate.<metric>), its interpretation and autointerp."""
    files = [paths.fmt(paths.EVAL, **job)]
    files += [paths.fmt(paths.METRIC, metric=m, **job) for m in paths.METRIC_NAMES if evaluated(CFG, m, job)]
    if evaluated(CFG, "interpret", job):
        files.append(paths.fmt(paths.INTERPRET, **job))
        if autointerp_enabled():
            files.append(paths.fmt(paths.AUTOINTERP, **job))
    return files


def layer_jobs(wc):
    """The SAEs of one (subject, layer): what its scaling table collects."""
    return [job for job in sae_grid() if job["subject"] == wc.subject and str(job["layer"]) == wc.layer]


def evals_of(wc):
    return [paths.fmt(paths.EVAL, **job) for job in layer_jobs(wc)]


def results_of(wc):
    return [f for job in layer_jobs(wc) for f in sae_results(job)]


def grid_logs_of(wc):
    """The training logs L(C) and tokens to convergence are read from."""
    return [paths.fmt(paths.SAE_LOG, **job) for job in layer_jobs(wc)]


def lr_sweep_of(wc):
    """The lr sweep's SAEs of one (subject, layer) (saescale.config.lr_sweep_jobs)."""
    return [job for job in lr_sweep_jobs(CFG) if job["subject"] == wc.subject and str(job["layer"]) == wc.layer]


def lr_sweep_files_of(wc):
    jobs = [{key: v for key, v in job.items() if key != "multiple"} for job in lr_sweep_of(wc)]
    return [paths.fmt(p, **job) for job in jobs for p in (paths.SAE_LOG, paths.SAE_CFG)]


def interpret_spec(wc):
    return stage_specs.interpret_spec(CFG, int(wc.n))


def dashboard_inputs(wc):
    out = {"records": paths.fmt(paths.INTERPRET_RECORDS, **wc), "summary": paths.fmt(paths.INTERPRET, **wc)}
    if autointerp_enabled():
        out["autointerp"] = paths.fmt(paths.AUTOINTERP_RECORDS, **wc)
    return out


TOY_OUTPUTS = {"allocation": paths.TOY_ALLOCATION, "manifolds": paths.TOY_MANIFOLDS,
               "groundtruth": paths.TOY_GROUNDTRUTH}


def toy_spec(study):
    return stage_specs.toy_spec(CFG, study)


def toy_curve_spec(kind, panels=False):
    return stage_specs.toy_curve_spec(CFG, kind, panels)


def toy_curve_files(wildcards):
    """One file per (kind, d, arch) curve of config.toy.manifolds."""
    from saescale.toy.settings import study_curves  # torch-free: planning never imports torch

    return [paths.fmt(paths.TOY_CURVE, kind=kind, d=d, arch=arch) for kind, d, arch in study_curves(toy_spec("manifolds"))]


def toy_outputs(wildcards=None):
    """The toy studies config.toy turns on."""
    return [path for study, path in TOY_OUTPUTS.items() if study in CFG["toy"] and CFG["toy"][study]["enabled"]]


def report_inputs(wildcards):
    files = toy_outputs()
    for name, subj in CFG["subjects"].items():
        files += [paths.fmt(p, subject=name) for p in (paths.NORM, paths.TOKENS, paths.ACTIVATIONS)]
        if subj["model"] == "builtin":
            files.append(paths.fmt(paths.MODEL, subject=name))
        if subj["dataset"]["path"] == "builtin":
            files.append(paths.CORPUS_INFO)
        for layer in subj["layers"]:
            files += [paths.fmt(p, subject=name, layer=layer) for p in (paths.METRICS, paths.FITS, paths.STUDIES)]
    for job in sae_grid():
        files += [paths.fmt(p, **job) for p in (paths.SAE_LOG, paths.SAE_CFG)] + sae_results(job)
        if evaluated(CFG, "interpret", job):
            files.append(paths.fmt(paths.DASHBOARD, **job))
    files += [paths.fmt(paths.ANALYSIS, **job) for job in analyses()]
    files += [paths.fmt(paths.IMPORTED_EVAL, name=name) for name in CFG["imported"]]
    return sorted(set(files))


# ---- per-SAE stages (metrics.smk, interpret.smk, analyze.smk) and imported SAEs (imported.smk)


def sae_inputs(wc, model=False, tokenizer=False):
    """The trained SAE and the activation store, plus the builtin model / tokenizer when the rule loads them."""
    out = {
        "weights": paths.fmt(paths.SAE_WEIGHTS, **wc),
        "cfg": paths.fmt(paths.SAE_CFG, **wc),
        "activations": paths.fmt(paths.ACTIVATIONS, subject=wc.subject),
    }
    if model:
        out["model"] = model_input(wc)
    if tokenizer and is_builtin(wc):
        out["tokenizer"] = paths.fmt(paths.TOKENIZER, subject=wc.subject)
    return out


def sae_args(wc):
    """The CLI arguments every per-SAE rule shares."""
    sae_dir = str(Path(paths.fmt(paths.SAE_CFG, **wc)).parent)
    return (f"--sae-dir {sae_dir} --activations {paths.fmt(paths.ACTIVATIONS, subject=wc.subject)} "
            f"{option('--model', model_path(wc))} {option('--tokenizer', tokenizer_path(wc))} --layer {wc.layer} "
            f"{revision_option(wc)}")


def imported(wc):
    return CFG["imported"][wc.name]


def imported_subject(wc):
    """The imported SAE's subject, as the wildcards object the subject helpers (model_path, ...) expect."""
    return SimpleNamespace(subject=imported(wc)["subject"])
