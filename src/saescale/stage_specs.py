"""The settings each stage runs with (its `--spec`), derived from a validated config.

One function per stage, used both by the workflow's rules (a rule's `spec` param) and by `saescale <stage>` run
by hand, so a stage runs the same way from either. Each spec holds exactly what the stage's outputs depend on:
on/off switches and SAE selectors are left out, so widening a selection adds jobs without rerunning others.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from saescale import paths
from saescale.config import ConfigError, deep_merge, sae_settings, validate

TOKENIZE_KEYS = ("dataset", "ctx_len", "eval_tokens", "prepend_bos", "revision", "trust_remote_code")
# how the subject model is loaded: extract's spec, and --model-options of every later stage that loads it
MODEL_OPTION_KEYS = ("torch_dtype", "device_map", "trust_remote_code")
EXTRACT_KEYS = ("model", "revision", "layers", "train_tokens", "dtype", "batch_windows", "chunk_windows",
                *MODEL_OPTION_KEYS)


def selection_free(settings: dict, drop: tuple[str, ...] = ()) -> dict:
    """A per-SAE stage's settings without its on/off switch and SAE selectors (`enabled`, `archs`, `n`)."""
    return {key: v for key, v in settings.items() if key not in ("enabled", "archs", "n", *drop)}


def tokenizer_spec(cfg: dict, subject: str) -> dict:
    return {"vocab_size": cfg["subjects"][subject]["builtin"]["vocab_size"]}


def lm_spec(cfg: dict, subject: str) -> dict:
    return cfg["subjects"][subject]["builtin"]


def tokenize_spec(cfg: dict, subject: str) -> dict:
    subj = cfg["subjects"][subject]
    return {key: subj[key] for key in TOKENIZE_KEYS if key in subj}


def extract_spec(cfg: dict, subject: str) -> dict:
    subj = cfg["subjects"][subject]
    return {key: subj[key] for key in EXTRACT_KEYS if key in subj}


def evaluate_spec(cfg: dict) -> dict:
    """`saescale evaluate`'s settings: config.evaluate without the suite metrics' own sections, and how many rows
    at the end of the eval split training may stop on (the most any recipe logs, train.heldout_rows), which every
    SAE's final evaluation leaves out, imported ones too, so all are measured on the same rows."""
    recipes = [cfg["train"], *(v.get("train", {}) for v in cfg["sweep"]["variants"].values())]
    stopping = max(int(r.get("heldout_rows", cfg["train"]["heldout_rows"])) for r in recipes)
    return {**{key: v for key, v in cfg["evaluate"].items() if key not in paths.METRIC_NAMES},
            "stopping_rows": stopping}


def metric_spec(cfg: dict, metric: str) -> dict:
    out = selection_free(cfg["evaluate"][metric])
    if metric == "geometry":
        out["batch_size"] = cfg["evaluate"]["batch_size"]
    return out


def analysis_spec(cfg: dict, experiment: str) -> dict:
    """An analysis job's settings; which SAEs are analysed (archs, n) is not one of them."""
    settings = {key: v for key, v in cfg["analysis"][experiment].items() if key not in ("archs", "n")}
    return {**settings, "downstream_batch": cfg["evaluate"]["downstream_batch"]}


def interpret_spec(cfg: dict, n: int | None = None) -> dict:
    """The interpret settings of one SAE of width n: whether it runs the explanation reconstruction (method §C.6)
    is decided here, so changing interpret.reconstruction.n reruns only the SAEs it adds or removes."""
    settings = cfg["interpret"]
    recon = settings["reconstruction"]
    on = recon["n"] is None or (n is not None and int(n) in recon["n"])
    return {**selection_free(settings, drop=("autointerp", "reconstruction")),
            "reconstruction": on, "reconstruction_windows": recon["windows"]}


def autointerp_spec(cfg: dict) -> dict:
    return cfg["interpret"]["autointerp"]


def toy_spec(cfg: dict, study: str) -> dict:
    """A toy study's settings without its on/off switch."""
    return {key: v for key, v in cfg["toy"][study].items() if key != "enabled"}


def toy_curve_spec(cfg: dict, kind: str, panels: bool = False) -> dict:
    """The settings one toy-manifold curve depends on: not which other kinds, dims and archs run, and the grid
    and seeds of its own kind only."""
    settings = toy_spec(cfg, "manifolds")
    out = {key: v for key, v in settings.items() if key not in ("kinds", "dims", "archs", "circle_panels")}
    for key in ("n", "seeds"):
        if isinstance(out[key], dict):
            out[key] = out[key].get(kind, out[key])
    if panels:
        out.update(circle_panels=settings["circle_panels"], archs=settings["archs"][:1], kinds=["circle"])
    return out


def train_spec(cfg: dict, arch: str) -> dict:
    return sae_settings(cfg, arch)[1]


# ---- `saescale <stage>` by hand ----------------------------------------------------------------------

# stage -> (the config section its settings come from, for messages; the spec from a config and the CLI args)
BY_HAND: dict[str, tuple[str, Callable[[dict, Any], dict]]] = {
    "tokenizer": ("subjects.<subject>.builtin", lambda cfg, a: tokenizer_spec(cfg, a.subject)),
    "lm": ("subjects.<subject>.builtin", lambda cfg, a: lm_spec(cfg, a.subject)),
    "tokenize": ("subjects.<subject>", lambda cfg, a: tokenize_spec(cfg, a.subject)),
    "extract": ("subjects.<subject>", lambda cfg, a: extract_spec(cfg, a.subject)),
    "evaluate": ("evaluate", lambda cfg, a: evaluate_spec(cfg)),
    "analyze": ("analysis.<experiment>", lambda cfg, a: analysis_spec(cfg, a.experiment)),
    "probes": ("evaluate.probes", lambda cfg, a: metric_spec(cfg, "probes")),
    "ablation": ("evaluate.ablation", lambda cfg, a: metric_spec(cfg, "ablation")),
    "geometry": ("evaluate.geometry", lambda cfg, a: metric_spec(cfg, "geometry")),
    "interpret": ("interpret", lambda cfg, a: interpret_spec(cfg, _sae_width(a))),
    "autointerp": ("interpret.autointerp", lambda cfg, a: autointerp_spec(cfg)),
    "scaling": ("scaling", lambda cfg, a: {"settings": cfg["scaling"], "lr_jobs": []}),
    "toy": ("toy.<study>", lambda cfg, a: _toy_by_hand(cfg, a)),
    "report": ("(the whole config)", lambda cfg, a: cfg),
    "train": ("train", lambda cfg, a: train_spec(cfg, a.name or a.arch)),
}


def _sae_width(a: Any) -> int | None:
    from pathlib import Path

    from saescale.files import read_json

    cfg_path = Path(getattr(a, "sae_dir", "") or "") / paths.CFG_FILE
    return read_json(cfg_path).get("n_latents") if cfg_path.is_file() else None


def _toy_by_hand(cfg: dict, a: Any) -> dict:
    if a.study in ("curve", "panels"):
        return toy_curve_spec(cfg, a.kind or "circle", panels=a.study == "panels")
    return toy_spec(cfg, a.study)


def parse_set(items: list[str]) -> dict:
    """`--set a.b=value` pairs as one nested dict; values are read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write key=value with a dotted config key, e.g. evaluate.batch_size=64")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return out


def config_for_hand_run(config: dict | None, overrides: dict, subject: str, model: str | None) -> dict:
    """The validated config a stage run by hand takes its settings from: the user's config file (or only the
    schema's defaults), `--set` overrides on top; validated by the workflow's schema, so errors name the key."""
    cfg = copy.deepcopy(config) if config else {}
    if not cfg.get("subjects"):  # no stage's settings depend on the layer: block 0 exists in every model
        cfg["subjects"] = {subject: {"model": model or "builtin", "layers": [0]}}
    return validate(deep_merge(cfg, overrides), local_paths=False)


def merge_spec(defaults: dict, given: dict, where: str) -> dict:
    """A hand-written `--spec` over the stage's defaults: every key must be one the stage has, with a value of
    the default's type, so a misspelt or mistyped setting is an error naming it rather than ignored."""
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(f"--spec.{key}: not a setting of this stage (from config.{where}); known: "
                              f"{', '.join(sorted(defaults))}")
        default = defaults[key]
        if default is not None and value is not None and not _same_kind(default, value):
            raise ConfigError(f"--spec.{key}: expected {type(default).__name__} like the default {default!r}, "
                              f"got {value!r}")
        out[key] = deep_merge(default, value) if isinstance(default, dict) and isinstance(value, dict) else value
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default)) or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
