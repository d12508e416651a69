"""The validated configuration: one schema (schema/config.schema.yaml) holds every key and default.

`load_config` fills defaults, validates types against the schema, then checks what a schema cannot
(k <= n, layers inside the model, selectors naming known archs, local files that exist, ...). Every error
names the key, e.g. `config.sweep.k[2]: 900 is larger than the smallest n (512)`.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(str(resources.files("saescale") / "schema" / "config.schema.yaml"))


class ConfigError(ValueError):
    """A config value a person has to fix; the message names the key."""


def schema() -> dict:
    """A fresh copy of the schema: parsed once per process (it is read on every snakemake start)."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def _parsed_schema() -> dict:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _fill_defaults(node: Any, sch: dict) -> None:
    """Set schema defaults in place, recursing into `properties` and `additionalProperties` objects."""
    if not isinstance(node, dict):
        return
    for key, sub in sch.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub)
    extra = sch.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in sch.get("properties", {}):
                _fill_defaults(value, extra)


def _key_path(path: Any) -> str:
    out = "config"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate(cfg: dict, local_paths: bool = True) -> dict:
    """Return a copy of `cfg` with defaults filled, or raise ConfigError naming the offending key. `local_paths`:
    also check that local model folders, data files and imported SAEs exist (relative to the working directory)."""
    cfg = _unshared(cfg) if cfg is not None else {}
    sch = schema()
    _fill_defaults(cfg, sch)
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            msg = err.message
            if err.validator == "additionalProperties":
                msg += " (check the spelling; allowed keys are listed in workflow/schemas/config.schema.yaml)"
            elif err.validator == "type" and _number_as_text(err.instance):
                msg += f" (YAML reads {err.instance} as text: write the number out in full, e.g. 1000000 for 1e6)"
            lines.append(f"{_key_path(err.absolute_path)}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    _check_semantics(cfg)
    cfg = _expand_home(cfg)
    if local_paths:
        _check_local_paths(cfg)
    return cfg


def _expand_home(node: Any) -> Any:
    """`~/...` expanded in every string of the config, so every stage (and the job's shell) reads the same path
    the check above saw. No key takes text that starts with '~' for another reason."""
    if isinstance(node, dict):
        return {key: _expand_home(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand_home(value) for value in node]
    if isinstance(node, str) and (node == "~" or node.startswith("~/")):
        return str(Path(node).expanduser())
    return node


def _unshared(node: Any) -> Any:
    """A copy in which no two places share a dict or list. YAML anchors (`&a` ... `*a`) make sections share one
    mapping, and deepcopy keeps that sharing, so filling one section's defaults would fill the other's."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return copy.deepcopy(node)


def _number_as_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_semantics(cfg: dict) -> None:
    sweep = cfg["sweep"]
    arch_enum = schema()["properties"]["sweep"]["properties"]["variants"]["additionalProperties"]["properties"]["arch"]
    archs = set(arch_enum["enum"])
    for name, variant in sweep["variants"].items():
        if name in archs:
            raise ConfigError(f"config.sweep.variants.{name}: the name of a builtin arch; choose another name")
        _validate_train(deep_merge(cfg["train"], variant["train"]), f"config.sweep.variants.{name}.train")
        if "pack" in variant["train"]:
            raise ConfigError(f"config.sweep.variants.{name}.train.pack: packing is a workflow setting; "
                              "set it in the top-level train.pack")
    grids = [("config.sweep", sweep)] + [(f"config.sweep.extra[{i}]", g) for i, g in enumerate(sweep["extra"])]
    for where, grid in grids:
        for i, name in enumerate(grid["archs"]):
            if name not in archs and name not in sweep["variants"]:
                raise ConfigError(f"{where}.archs[{i}]: '{name}' is neither an arch ({', '.join(sorted(archs))}) "
                                  "nor a name under config.sweep.variants")
        for i, k in enumerate(grid["k"]):
            if k > min(grid["n"]):
                raise ConfigError(f"{where}.k[{i}]: {k} is larger than the smallest n ({min(grid['n'])}); "
                                  "an SAE needs k <= n latents")
    for name, subj in cfg["subjects"].items():
        where = f"config.subjects.{name}"
        if subj["model"] == "builtin":
            n_layer = subj["builtin"]["n_layer"]
            for i, layer in enumerate(subj["layers"]):
                if layer >= n_layer:
                    raise ConfigError(
                        f"{where}.layers[{i}]: block {layer} does not exist in the builtin model "
                        f"({n_layer} blocks, 0-indexed)"
                    )
            b = subj["builtin"]
            if b["n_embd"] % b["n_head"]:
                raise ConfigError(f"{where}.builtin.n_head: {b['n_head']} does not divide n_embd={b['n_embd']}")
        if subj["eval_tokens"] < subj["ctx_len"]:
            raise ConfigError(f"{where}.eval_tokens: {subj['eval_tokens']} is less than one window of ctx_len tokens")
    sw = cfg["scaling"]["lr_sweep"]
    if sw["enabled"]:
        if sw["arch"] not in archs and sw["arch"] not in sweep["variants"]:
            raise ConfigError(f"config.scaling.lr_sweep.arch: '{sw['arch']}' is neither an arch nor a sweep.variants name")
        ns = sw["n"] if sw["n"] is not None else sweep["n"]
        k = sw["k"] if sw["k"] is not None else min(sweep["k"])
        if k > min(ns):
            raise ConfigError(f"config.scaling.lr_sweep.k: {k} is larger than the smallest n ({min(ns)})")
    if cfg["train"]["batch_size"] > cfg["train"]["tokens"]:
        raise ConfigError(
            f"config.train.batch_size: {cfg['train']['batch_size']} exceeds the token budget train.tokens"
        )
    _check_selectors(cfg, archs | set(sweep["variants"]) | {job["arch"] for job in lr_sweep_jobs(cfg)})
    _check_distributed(cfg)
    for name, imp in cfg["imported"].items():
        where = f"config.imported.{name}"
        if imp["subject"] not in cfg["subjects"]:
            raise ConfigError(f"{where}.subject: '{imp['subject']}' is not a subject of this config "
                              f"({', '.join(cfg['subjects'])})")
        if imp["layer"] not in cfg["subjects"][imp["subject"]]["layers"]:
            raise ConfigError(f"{where}.layer: {imp['layer']} is not one of subjects.{imp['subject']}.layers "
                              f"{cfg['subjects'][imp['subject']]['layers']}: add it there so its activations are recorded")
    auto = cfg["interpret"]["autointerp"]
    needed = {"openai": ("base_url", "model"), "transformers": ("model",)}.get(auto["backend"], ())
    for key in needed:
        if not auto.get(key):
            raise ConfigError(f"config.interpret.autointerp.{key}: required for backend {auto['backend']}")


def layout(train: dict) -> tuple[int, int]:
    """(data, latent) of a train recipe's train.distributed; (1, 1) is one device."""
    dist = train.get("distributed") or {}
    return int(dist.get("data", 1)), int(dist.get("latent", 1))


def _check_distributed(cfg: dict) -> None:
    """train.distributed's layout fits every SAE it trains (method §A.7b): a TopK-family arch, shards that divide
    n, replicas that divide the batch, processes that divide over the nodes."""
    for job in trained_saes(cfg):
        arch, train = recipe(cfg, job["arch"])
        data, latent = layout(train)
        if data * latent == 1:
            continue
        where = ("config.train.distributed" if job["arch"] not in cfg["sweep"]["variants"]
                 else f"config.sweep.variants.{job['arch']}.train.distributed")
        sae = f"{job['arch']} n={job['n']} k={job['k']}"
        nodes = train["distributed"]["nodes"]
        if arch not in SHARDED_ARCHS:
            raise ConfigError(f"{where}: {sae} is a {arch} SAE; only {', '.join(SHARDED_ARCHS)} train distributed "
                              "(a fixed number of latents per token); set it in a sweep.variants entry of those")
        if job["n"] % latent:
            raise ConfigError(f"{where}.latent: {latent} does not divide n = {job['n']} of {sae}")
        if train["batch_size"] % data:
            raise ConfigError(f"{where}.data: {data} does not divide train.batch_size = {train['batch_size']}")
        if (data * latent) % nodes:
            raise ConfigError(f"{where}.nodes: {nodes} nodes cannot share data x latent = {data * latent} "
                              "processes evenly")


def _selector_stages(cfg: dict) -> list[tuple[str, dict]]:
    """The per-SAE stages whose `archs` select SAEs by arch wildcard (see `selected`)."""
    return ([(f"config.evaluate.{m}", cfg["evaluate"][m]) for m in ("probes", "ablation", "geometry")]
            + [("config.interpret", cfg["interpret"])]
            + [(f"config.analysis.{e}", cfg["analysis"][e]) for e in ("progressive", "refinement")])


def _check_selectors(cfg: dict, known: set[str]) -> None:
    """A misspelt arch in a selector would silently select nothing."""
    for where, stage in _selector_stages(cfg):
        for i, name in enumerate(stage["archs"] or []):
            if name not in known:
                raise ConfigError(f"{where}.archs[{i}]: '{name}' is neither an arch nor a name under "
                                  "config.sweep.variants (or a scaling.lr_sweep variant)")


def _looks_local(path: str) -> bool:
    """Paths the user means as files here; anything else may be a hub id ('gpt2', 'org/name')."""
    return path.startswith(("/", "./", "../", "~"))


def _check_local_paths(cfg: dict) -> None:
    """Local models, data files and imported SAEs must exist when the run starts, not fail an hour in.
    Relative paths are relative to the working directory (snakemake's --directory), as the jobs see them."""
    for name, subj in cfg["subjects"].items():
        where = f"config.subjects.{name}"
        model = subj["model"]
        if _looks_local(model) and not (Path(model).expanduser() / "config.json").is_file():
            what = "has no config.json" if Path(model).expanduser().is_dir() else "does not exist"
            raise ConfigError(f"{where}.model: the local model folder {model} {what}; give a folder written by "
                              "save_pretrained, a hub id, or 'builtin'")
        dataset = subj["dataset"]
        if _looks_local(dataset["path"]) and not Path(dataset["path"]).expanduser().exists():
            raise ConfigError(f"{where}.dataset.path: {dataset['path']} does not exist")
        for pattern in _data_file_patterns(dataset["data_files"]):
            if "://" in pattern:
                continue  # remote files are datasets' business
            if not glob.glob(str(Path(pattern).expanduser()), recursive=True):
                raise ConfigError(f"{where}.dataset.data_files: no file matches {pattern!r} (relative paths are "
                                  f"taken from the working directory {Path.cwd()})")
    for name, imp in cfg["imported"].items():
        if not Path(imp["path"]).expanduser().exists():
            raise ConfigError(f"config.imported.{name}.path: {imp['path']} does not exist (relative paths are taken "
                              f"from the working directory {Path.cwd()})")


def _data_file_patterns(data_files: Any) -> list[str]:
    """datasets' data_files as a flat list: a string, a list, or a {split: string | list} mapping."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _data_file_patterns(v)]
    return [p for v in data_files for p in _data_file_patterns(v)]


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _validate_train(train: dict, where: str) -> None:
    sub = schema()["properties"]["train"]
    errors = list(jsonschema.Draft202012Validator(sub).iter_errors(train))
    if errors:
        err = errors[0]
        path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise ConfigError(f"{path}: {err.message}")


def _read_mapping(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def read_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a run sees it, not yet validated: its own keys over those of the file its `base:` names
    (relative to the file's folder; bases may chain). A file without `base:` stands alone: it is the whole
    config, so a preset plans exactly what it declares and never inherits config.yaml's subjects or studies."""
    path = Path(path).expanduser().absolute()
    if path in _seen:
        raise ConfigError(f"config file {path}: its base: chain comes back to itself ({' -> '.join(map(str, _seen))})")
    raw = _read_mapping(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base: must be the path of another config file, got {base!r}")
    base_path = path.parent / Path(base).expanduser()
    if not base_path.exists():
        raise ConfigError(f"config file {path}: base: {base} does not exist (looked for {base_path}; the path is "
                          "relative to the file that names it)")
    return deep_merge(read_preset(base_path, (*_seen, path)), raw)


def workflow_config(default: str | Path, configfiles: list, overrides: dict) -> dict:
    """The raw config `snakemake` plans with. Without --configfile it is `default` (config.yaml in the working
    directory); with --configfile it is those files alone, later ones merged over earlier ones (each with its
    base:). `--config key=value` overrides merge last. Snakemake's own `configfile:` directive would instead
    merge every preset into config.yaml, and a preset could not drop the default's subject or studies."""
    files = list(configfiles) or [default]
    raw: dict = {}
    for path in files:
        raw = deep_merge(raw, read_preset(path))
    return deep_merge(raw, _plain(overrides))


def _plain(node: Any) -> Any:
    """--config values as a YAML file would give them. Snakemake reads `--config 'train={tokens: 4096}'` with
    YAML's BaseLoader, which leaves every nested scalar a string ('4096'), and wraps mappings immutably."""
    if hasattr(node, "items"):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    if isinstance(node, str):
        try:
            return yaml.safe_load(node) if node.strip() else node
        except yaml.YAMLError:
            return node
    return node


def load_config(path: str | Path, local_paths: bool = True) -> dict:
    """A config file (and its base:) validated, with defaults filled: what a run with --configfile plans."""
    return validate(read_preset(path), local_paths)


# ---- derived values: the one place that knows each rule of thumb --------------------------------


def lr_for(train: dict, n: int) -> float:
    """method §A.7: the largest converging lr scales with 1/sqrt(n), unless train.lr fixes it."""
    scale = float(train.get("lr_scale", 1.0))
    if train["lr"] is not None:
        return float(train["lr"]) * scale
    return float(train["lr_ref"] * math.sqrt(train["lr_ref_n"] / n)) * scale


def k_aux_for(train: dict, d_model: int) -> int:
    """method §A.5 (App. B.1): a power of two close to d_model / 2; rounded down, which gives the 256
    that openai/sparse_autoencoder uses for GPT-2's d_model = 768."""
    if train["k_aux"] is not None:
        return int(train["k_aux"])
    return int(2 ** math.floor(math.log2(max(d_model / 2, 1))))


# ---- the grid --------------------------------------------------------------------------------------


LR_VARIANT = re.compile(r"(?P<base>[a-z0-9_]+?)_lr(?P<multiple>\d+(?:p\d+)?)")


def lr_variant(arch: str, multiple: float) -> str:
    """The arch wildcard of an lr-sweep SAE: topk at 0.5x the lr rule is topk_lr0p5."""
    return f"{arch}_lr{format(float(multiple), 'g').replace('.', 'p')}"


def recipe(cfg: dict, name: str) -> tuple[str, dict]:
    """(arch, train settings) of a value of the arch wildcard: an arch with the shared `train`, a
    variant's base arch with its overrides merged in, or an lr-sweep name (lr_variant) of either."""
    match = LR_VARIANT.fullmatch(name)
    if match and name not in cfg["sweep"]["variants"]:
        arch, train = recipe(cfg, match["base"])
        scale = float(match["multiple"].replace("p", "."))
        # the sweep probes which lrs diverge: a diverging one stops and is recorded, it does not fail the run
        return arch, {**train, "lr_scale": train.get("lr_scale", 1.0) * scale, "on_divergence": "stop"}
    variant = cfg["sweep"]["variants"].get(name)
    if variant is None:
        return name, cfg["train"]
    return variant["arch"], deep_merge(cfg["train"], variant["train"])


def sae_jobs(cfg: dict) -> list[dict]:
    """Every (subject, layer, arch, n, k) the sweep trains, main grid first, without duplicates."""
    sweep = cfg["sweep"]
    grids = [sweep] + sweep["extra"]
    jobs: dict[tuple, dict] = {}
    for name, subj in cfg["subjects"].items():
        for layer in subj["layers"]:
            for grid in grids:
                for arch in grid["archs"]:
                    for n in grid["n"]:
                        for k in grid["k"]:
                            job = dict(subject=name, layer=layer, arch=arch, n=n, k=k)
                            jobs.setdefault(tuple(job.values()), job)
    return list(jobs.values())


def lr_sweep_jobs(cfg: dict) -> list[dict]:
    """The lr sweep's SAEs (scaling.lr_sweep), each with its `multiple`; multiple 1 is the main grid's SAE
    where the grid has it, else an <arch>_lr1 job."""
    sw = cfg["scaling"]["lr_sweep"]
    if not sw["enabled"]:
        return []
    k = sw["k"] if sw["k"] is not None else min(cfg["sweep"]["k"])
    ns = sw["n"] if sw["n"] is not None else cfg["sweep"]["n"]
    grid = {tuple(j.values()) for j in sae_jobs(cfg)}
    jobs = []
    for name, subj in cfg["subjects"].items():
        for layer in subj["layers"]:
            for n in ns:
                for m in sorted({1.0, *map(float, sw["multiples"])}):
                    arch = sw["arch"] if m == 1 and (name, layer, sw["arch"], n, k) in grid else lr_variant(sw["arch"], m)
                    jobs.append(dict(subject=name, layer=layer, arch=arch, n=n, k=k, multiple=m))
    return jobs


SHARDED_ARCHS = ("topk", "multitopk")  # train.distributed: a fixed number of latents per token
STREAM_KEYS = ("batch_size", "seed", "device", "in_memory_max_gb", "shuffle_chunks")  # decide the batch stream
RUN_ONLY_KEYS = ("threads", "pack")  # train settings that change how a job runs, never a weight


def sae_settings(cfg: dict, name: str) -> tuple[str, dict]:
    """(arch, train settings) one SAE's weights depend on: its recipe without RUN_ONLY_KEYS."""
    arch, train = recipe(cfg, name)
    return arch, {key: v for key, v in train.items() if key not in RUN_ONLY_KEYS}
PACK_KEYS = ("arch", "n", "k")


def trained_saes(cfg: dict) -> list[dict]:
    """Every (subject, layer, arch, n, k) the workflow trains: the grid and the lr sweep's extra SAEs."""
    jobs = {tuple(job.values()): job for job in sae_jobs(cfg)}
    for job in lr_sweep_jobs(cfg):
        job = {key: v for key, v in job.items() if key != "multiple"}
        jobs.setdefault(tuple(job.values()), job)
    return list(jobs.values())


def train_packs(cfg: dict) -> list[dict]:
    """The SAEs train.pack trains together, each pack {"name", "subject", "layer", "members"}: those of one
    (subject, layer) whose batch stream agrees (STREAM_KEYS) and which differ only in the grid keys
    train.pack spans. Packs are a function of the config alone, never of what exists on disk, so a pack's
    rule and its rerun triggers stay the same between runs. Only packs of two or more SAEs."""
    spans = cfg["train"]["pack"]
    if not spans:
        return []
    groups: dict[tuple, list[dict]] = {}
    for job in trained_saes(cfg):
        train = recipe(cfg, job["arch"])[1]
        if layout(train) != (1, 1):  # its own job, on its own processes
            continue
        stream = tuple(json.dumps(train[key]) for key in STREAM_KEYS)
        fixed = tuple(job[key] for key in PACK_KEYS if key not in spans)
        groups.setdefault((job["subject"], job["layer"], fixed, stream), []).append(job)
    packs, names = [], set()
    for (subject, layer, _, _), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        label = "_".join(f"{'' if key == 'arch' else key}{'all' if key in spans else first[key]}" for key in PACK_KEYS)
        name = base = f"{subject}_L{layer}_{label}"
        while name in names:  # the same grid keys under another batch stream (a variant's batch_size)
            name = f"{base}_{len(names)}"
        names.add(name)
        packs.append({"name": name, "subject": subject, "layer": layer, "members": members})
    return packs


def selected(stage: dict, job: dict) -> bool:
    """Whether a per-SAE stage with `archs` / `n` selectors (null: all) runs on this SAE."""
    return ((stage["archs"] is None or job["arch"] in stage["archs"])
            and (stage["n"] is None or job["n"] in stage["n"]))


def evaluated(cfg: dict, stage: str, job: dict) -> bool:
    """Whether a suite stage (probes, ablation, geometry, interpret) is on and runs on this SAE."""
    settings = cfg["interpret"] if stage == "interpret" else cfg["evaluate"][stage]
    return settings["enabled"] and selected(settings, job)


def analysed(cfg: dict, experiment: str, job: dict) -> bool:
    """Whether the analysis `experiment` (progressive, refinement) runs on this SAE."""
    return selected(cfg["analysis"][experiment], job)
