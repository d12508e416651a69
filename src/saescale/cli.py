"""`saescale <stage> ...`: one subcommand per pipeline stage. A thin adapter: parse arguments, load
inputs, call the stage's module, write outputs. Rules call it; people can too.

Stage settings arrive as one JSON object (`--spec`), the slice of the validated config the rule passes
as a Snakemake param, so a config change reruns exactly the jobs whose slice changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from saescale.files import file_digest, read_json, setup_logging, terminal, write_json_atomic
from saescale import paths
from saescale.config import ConfigError
from saescale.launch import is_worker
from saescale.stage_specs import BY_HAND, MODEL_OPTION_KEYS


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("saescale", "torch", "transformers", "tokenizers", "datasets", "zarr", "snakemake", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cmd_corpus(a) -> None:
    from saescale.corpus import build_builtin_corpus

    build_builtin_corpus(a.out_jsonl, a.out_info)


def cmd_tokenizer(a) -> None:
    from saescale.subject import train_tokenizer

    train_tokenizer(a.corpus, a.spec["vocab_size"], a.out)


def cmd_lm(a) -> None:
    import torch

    from saescale.subject import train_builtin_lm

    torch.set_num_threads(a.threads)
    train_builtin_lm(a.tokens, a.tokenizer, a.spec, a.out)


def cmd_tokenize(a) -> None:
    from saescale.corpus import tokenize

    s = a.spec
    tokenize(s["dataset"], a.tokenizer, s["ctx_len"], s["eval_tokens"], a.out, a.corpus,
             where=f"config.subjects.{a.subject}", prepend_bos=s.get("prepend_bos", False),
             revision=s.get("revision"), trust_remote_code=s.get("trust_remote_code", False))


def model_digest(path: str, model, revision: str | None) -> str:
    """Identifies the weights a partial extraction was made with: file contents for a local folder, the hub
    commit otherwise."""
    folder = Path(path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        return file_digest(files)
    return f"{path}@{revision or 'main'}:{getattr(model.config, '_commit_hash', None)}"


def cmd_extract(a) -> None:
    import torch

    from saescale.provenance import EXTRACT_MODULES, code_version
    from saescale.store import extract
    from saescale.subject import load_model, pick_device

    torch.set_num_threads(a.threads)
    s = a.spec
    device = pick_device("auto")
    model = load_model(a.model, s.get("revision"), device, where=f"config.subjects.{a.subject}",
                       **model_options(s))
    extract(model, a.tokens, s["layers"], s["train_tokens"], s["dtype"], s["batch_windows"], s["chunk_windows"],
            a.out, model_name=s["model"], device=device, model_digest=model_digest(a.model, model, s.get("revision")),
            where=f"config.subjects.{a.subject}", code=code_version("extract", *EXTRACT_MODULES))


def cmd_normalize(a) -> None:
    from saescale.normalize import layer_stats
    from saescale.store import iter_chunks, open_store

    root = open_store(a.activations)
    stats = {"site": root.attrs["site"], "layers": {}}
    for layer in root.attrs["layers"]:
        chunks = iter_chunks(root, layer, "train")
        stats["layers"][str(layer)] = layer_stats(chunks, root.attrs["n_train"], seed=a.seed,
                                                  what=f"normalize layer {layer}")
    write_json_atomic(a.out, stats)


def cmd_train(a) -> None:
    """Train one SAE, or with --members several on one activation stream (train.pack): the store is read
    and each batch normalized once for all of them, and each ends with the weights it would reach alone."""
    import numpy as np
    import torch

    from saescale.config import STREAM_KEYS, layout
    from saescale.normalize import normalize
    from saescale.provenance import TRAIN_MODULES, code_version
    from saescale.sae.train import SELECTION_ROWS, Trainer, train_together
    from saescale.scaling.convergence import stopping_rows
    from saescale.store import batch_stream, open_store, read_rows, split_rows
    from saescale.subject import pick_device

    members = a.members if a.members is not None else [
        {"arch": a.arch, "name": a.name or a.arch, "n": a.n, "k": a.k, "spec": a.spec, "out_dir": a.out_dir}]
    if a.members is None and None in (a.arch, a.n, a.k, a.spec, a.out_dir):
        raise SystemExit("saescale train: give --arch, --n, --k, --spec and --out-dir, or --members")
    for m in members:
        if m["k"] > m["n"]:
            raise SystemExit(f"{m['name']}: k={m['k']} is larger than n={m['n']}: an SAE needs k <= n latents")
    streams = {json.dumps([m["spec"][key] for key in STREAM_KEYS]) for m in members}
    if len(streams) > 1:
        raise SystemExit(f"saescale train --members: the SAEs must share one batch stream (train.{STREAM_KEYS}); "
                         f"got {sorted(streams)}")
    first = members[0]["spec"]
    data, latent = layout(first)
    if data * latent > 1 and len(members) > 1:
        raise SystemExit("saescale train --members: an SAE with train.distributed trains alone, never packed")
    from saescale.launch import launch

    if data * latent > 1 and not is_worker():  # this process starts the data x latent that train
        use_gpus = first["device"] != "cpu" and torch.cuda.device_count() > 0  # NVML: CUDA stays uninitialised
        launch(data * latent, first["distributed"].get("nodes", 1), a.argv, a.threads, use_gpus)
        return
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share its threads
    torch.set_num_threads(max(1, a.threads // procs))
    root = open_store(a.activations)
    stats = read_json(a.norm)["layers"][str(a.layer)]
    device = pick_device(first["device"])
    mesh = None
    if data * latent > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from saescale.sae.distributed import mesh_from_env

        if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        mesh = mesh_from_env(data, latent, device)
    stream = batch_stream(root, a.layer, first["batch_size"], first["seed"], first["in_memory_max_gb"],
                          first["shuffle_chunks"])
    rows_cache: dict[tuple[str, int], np.ndarray] = {}

    def rows(split: str, count: int) -> np.ndarray:  # normalized, read once per pack
        if (split, count) not in rows_cache:
            if split == "heldout":  # the eval split's tail, which the final evaluation leaves out
                tail = stopping_rows(split_rows(root, "eval"), count, root.attrs["ctx_len"])
                raw = torch.from_numpy(root[f"L{a.layer}/x"][tail].astype(np.float32))
            else:
                raw = torch.from_numpy(read_rows(root, a.layer, split, count).astype(np.float32))
            rows_cache[split, count] = normalize(raw)[0].numpy()
        return rows_cache[split, count]

    # what a checkpoint may resume from: the same activations, statistics and batch stream (batch order)
    data = f"{root.attrs['fingerprint']}:{file_digest([a.norm])}:L{a.layer}:{next(iter(streams))}"
    code = code_version("train", *TRAIN_MODULES)  # train.smk's TRAIN_CODE
    trainers, member_of = [], {}
    for m in members:
        spec = _train_spec(m, stats["d_model"], str(device), data, code)
        out = Path(m["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        heldout = rows("heldout", m["spec"]["heldout_rows"]) if m["spec"]["heldout_rows"] else None
        tag = f"{m['name']} n={m['n']} k={m['k']}" if len(members) > 1 else ""
        setup = (np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, out / "checkpoint.pt",
                rows("train", SELECTION_ROWS), heldout)
        if mesh is not None:
            from saescale.sae.train_distributed import ShardedTrainer

            trainer = ShardedTrainer(mesh, *setup)
        else:
            trainer = Trainer(*setup, name=tag)
        trainers.append(trainer)
        member_of[id(trainer)] = m

    def finished(trainer) -> None:
        if len(members) > 1:  # a later member's failure deletes this job's outputs: its rerun resumes from here
            trainer.save_checkpoint()
        _write_trained_sae(a, member_of[id(trainer)], trainer, root, stream.in_memory, len(members))

    train_together(stream, trainers, finished)
    for trainer in trainers:
        trainer.remove_checkpoint()
    if mesh is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _train_spec(member: dict, d_model: int, device: str, data: str, code: str = ""):
    from saescale.config import k_aux_for, layout, lr_for
    from saescale.sae.train import TrainSpec
    from saescale.scaling.convergence import token_cap

    t, n = member["spec"], member["n"]
    return TrainSpec(arch=member["arch"], n=n, k=member["k"], d_model=d_model, lr=lr_for(t, n),
                     batch_size=t["batch_size"], tokens=token_cap(t, n), adam_eps=t["adam_eps"],
                     adam_betas=tuple(t["adam_betas"]), auxk_coef=t["auxk_coef"],
                     k_aux=min(k_aux_for(t, d_model), n), dead_tokens=t["dead_tokens"], ema_decay=t["ema_decay"],
                     log_every=t["log_every"], checkpoint_seconds=t["checkpoint_seconds"], seed=t["seed"],
                     device=device, data=data, code=code, auxk=t["auxk"], tied_init=t["tied_init"],
                     arch_params=t["arch_params"].get(member["arch"], {}),
                     calibrate_fraction=t["calibration"]["fraction"], calibrate_rate=t["calibration"]["rate"],
                     convergence_tolerance=t["convergence"]["tolerance"],
                     convergence_smoothing=t["convergence"]["smoothing"], precision=t["precision"],
                     microbatch=t.get("microbatch"), stop_on_divergence=t.get("on_divergence") == "stop",
                     distributed=layout(t))


def _write_trained_sae(a, member: dict, trainer, root, in_memory: bool, pack_size: int) -> None:
    import pandas as pd

    from saescale import normalize as normalization
    from saescale.files import write_text_atomic
    from saescale.sae.train import LOG_COLUMNS

    sae, rows, summary = trainer.finish()
    if sae is None:  # a rank other than 0 of a distributed run: rank 0 writes the consolidated SAE
        return
    out = Path(member["out_dir"])
    sae.save(out / paths.WEIGHTS_FILE)
    write_text_atomic(out / "train_log.csv", pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(index=False))
    cfg = {**sae.config(), "name": member["name"], "subject": a.subject, "layer": a.layer,
           "site": root.attrs["site"],
           "normalization": normalization.DESCRIPTION,
           "train_spec": {**trainer.spec.__dict__, "data_in_memory": in_memory},
           # a packed SAE's seconds are its job's wall time, shared with the pack_size - 1 others
           "train": {**summary, "pack_size": pack_size, "stopping_rows": member["spec"]["heldout_rows"]},
           "versions": versions()}
    write_json_atomic(out / paths.CFG_FILE, cfg)  # written last: its presence marks a finished SAE


def cmd_export(a) -> None:
    from saescale.interop import InteropError, export_sae

    try:
        out = export_sae(Path(a.sae_dir), a.format, Path(a.out))
    except InteropError as exc:
        raise SystemExit(f"saescale export: {exc}") from None
    print(out)


def cmd_import(a) -> None:
    from saescale.interop import InteropError, import_sae, write_imported

    try:
        sae = import_sae(Path(a.src), a.format, a.inputs_normalized)
    except InteropError as exc:
        raise SystemExit(f"saescale import {a.src}: {exc}") from None
    write_imported(sae, Path(a.out), str(a.src), a.format, a.layer, a.subject)
    print(a.out)


def _trained_sae(a):
    """(device, cfg, sae, store) for the stages that read one trained SAE and the activation store."""
    import torch

    from saescale.sae.model import SparseAutoencoder, sae_folder
    from saescale.store import open_store
    from saescale.subject import pick_device

    torch.set_num_threads(a.threads)
    device = pick_device("auto")
    sae_dir = Path(a.sae_dir)
    cfg, weights = sae_folder(sae_dir)
    sae = SparseAutoencoder.from_config(cfg, weights, device).eval()
    root = open_store(a.activations)
    if root.attrs["d_model"] != cfg["d_model"]:
        raise ValueError(f"{sae_dir}: an SAE of d_model {cfg['d_model']}, but {a.activations} holds activations of "
                         f"width {root.attrs['d_model']}: it was trained on another model (check its subject)")
    return device, cfg, sae, root


def cmd_evaluate(a) -> None:
    from saescale.evaluate.downstream import downstream_metrics
    from saescale.evaluate.reconstruction import reconstruction_metrics
    from saescale.subject import load_model

    from saescale.scaling.convergence import final_eval_rows
    from saescale.store import split_rows

    s = a.spec
    device, cfg, sae, root = _trained_sae(a)
    # without the rows training may stop on (train.heldout_rows): the stopping decision never sees the rows the
    # reported metrics use, and every SAE of the layer (imported ones too) is measured on the same rows
    trained_on = (cfg.get("train") or {}).get("stopping_rows") or 0
    left_out = s.get("stopping_rows", trained_on)
    if trained_on > left_out:
        raise ValueError(f"{a.sae_dir} stopped training on the last {trained_on} eval rows, more than the "
                         f"{left_out} the evaluation leaves out; raise train.heldout_rows to match")
    rows = final_eval_rows(split_rows(root, "eval"), left_out, root.attrs["ctx_len"])
    recon = reconstruction_metrics(sae, root, a.layer, s["batch_size"], device, rows=rows)
    recon.pop("latent_firing_counts")
    model = load_model(a.model, a.revision, device, _where(cfg), **model_options(a.model_options))
    down = downstream_metrics(model, a.layer, sae, eval_windows(root, s["downstream_windows"]),
                              s["downstream_batch"], device)
    logging.getLogger("saescale.evaluate").info(
        "FVU %.4f, L0 %.1f, dead %.1f%%, delta CE %.4f nats, KL %.4f", recon["fvu"], recon["l0"],
        100 * recon["dead_fraction"], down["delta_ce"], down["kl_div_with_sae"])
    # an imported SAE (config.imported) has no training record here; where it came from instead
    origin = {"imported_from": cfg["imported_from"]} if "imported_from" in cfg else {}
    write_json_atomic(a.out, _result(cfg, a.layer, device, d_model=cfg["d_model"], **recon, downstream=down,
                                     train=cfg.get("train"), lr=cfg.get("train_spec", {}).get("lr"), **origin))


def _where(cfg: dict) -> str:
    """The config key of the SAE's subject, for error messages about its model."""
    return f"config.subjects.{cfg.get('subject', '<name>')}"


def model_options(settings: dict | None) -> dict:
    """The subject's model-loading keys (torch_dtype, device_map, trust_remote_code) as load_model takes them:
    from the extract spec, or from --model-options of the stages that load the model again."""
    settings = settings or {}
    return {"torch_dtype": settings.get("torch_dtype") or "auto", "device_map": settings.get("device_map"),
            "trust_remote_code": bool(settings.get("trust_remote_code", False))}


def _sae_identity(cfg: dict, layer: int) -> dict:
    """The keys that name an SAE in every result file; `arch` is the wildcard (maybe a variant's name)."""
    return {"subject": cfg["subject"], "layer": layer, "arch": cfg.get("name", cfg["arch"]),
            "base_arch": cfg["arch"], "n": cfg["n_latents"], "k": cfg["k"]}


def _result(cfg: dict, layer: int, device, **fields) -> dict:
    """A per-SAE result file: the SAE's identity, the stage's fields, the device and package versions."""
    return {**_sae_identity(cfg, layer), **fields, "device": str(device), "versions": versions()}


def eval_rows(root, count: int) -> slice:
    """Store rows of the first `count` whole windows of the eval split (fewer if the split is smaller)."""
    from saescale.store import split_rows

    ctx = root.attrs["ctx_len"]
    rows = split_rows(root, "eval")
    n_win = min(count, (rows.stop - rows.start) // ctx)
    return slice(rows.start, rows.start + n_win * ctx)


def eval_windows(root, count: int) -> np.ndarray:
    """The token ids of those windows, [windows, ctx_len]."""
    return root["token"][eval_rows(root, count)].reshape(-1, root.attrs["ctx_len"])


def cmd_analyze(a) -> None:
    from saescale.evaluate.analyses import eval_sample, progressive, refinement
    from saescale.subject import load_model

    s = a.spec
    device, cfg, sae, root = _trained_sae(a)
    x, mean = (t.to(device) for t in eval_sample(root, a.layer, s["tokens"]))
    if a.experiment == "progressive":
        result = progressive(sae, x, s, mean)
    else:
        model = load_model(a.model, a.revision, device, _where(cfg), **model_options(a.model_options))
        result = refinement(sae, x, s, model, a.layer, eval_windows(root, s["downstream_windows"]),
                            s["downstream_batch"], device, mean)
    write_json_atomic(a.out, _result(cfg, a.layer, device, experiment=a.experiment, **result))


def cmd_probes(a) -> None:
    import torch

    from saescale.evaluate.probe_tasks import resolve_task_set, token_strings
    from saescale.evaluate.probes import load_user_task, probe_record, text_resids
    from saescale.subject import load_model, load_tokenizer

    device, cfg, sae, root = _trained_sae(a)
    s = {**a.spec, "task_set": resolve_task_set(a.spec.get("task_set", "auto"), root.attrs.get("dataset"))}
    windows = eval_windows(root, s["windows"])
    x = torch.from_numpy(root[f"L{a.layer}/x"][eval_rows(root, s["windows"])].astype("float32")).to(device)
    tokenizer = load_tokenizer(a.tokenizer, a.revision, _where(cfg),
                               trust_remote_code=model_options(a.model_options)["trust_remote_code"])
    user = {}
    if s["datasets"]:
        model = load_model(a.model, a.revision, device, _where(cfg), **model_options(a.model_options))
        for ds in s["datasets"]:
            ids, labels = load_user_task(ds, tokenizer, root.attrs["ctx_len"])
            user[ds["task"]] = ([r.to(device) for r in text_resids(model, a.layer, ids, device)], labels, ds["pool"])
    with torch.no_grad():
        record = probe_record(sae, x, windows, token_strings(tokenizer, windows), s, user)
    write_json_atomic(a.out, _result(cfg, a.layer, device, metric="probes", **record))


def cmd_ablation(a) -> None:
    import torch

    from saescale.evaluate.ablation import ablation_record
    from saescale.subject import load_model

    s = a.spec
    device, cfg, sae, root = _trained_sae(a)
    model = load_model(a.model, a.revision, device, _where(cfg), **model_options(a.model_options))
    windows = torch.from_numpy(eval_windows(root, s["windows"])).long().to(device)
    record = ablation_record(model, a.layer, sae, windows, s)
    write_json_atomic(a.out, _result(cfg, a.layer, device, metric="ablation", **record))


def cmd_geometry(a) -> None:
    from saescale.evaluate.geometry import geometry_record
    from saescale.evaluate.reconstruction import reconstruction_metrics

    s = a.spec
    device, cfg, sae, root = _trained_sae(a)
    recon = reconstruction_metrics(sae, root, a.layer, s["batch_size"], device)
    record = geometry_record(sae.W_dec.detach(), recon["latent_firing_counts"], recon["eval_tokens"], s)
    write_json_atomic(a.out, _result(cfg, a.layer, device, metric="geometry", **record))


def cmd_interpret(a) -> None:
    import json as _json

    from saescale.files import write_text_atomic
    from saescale.interpret.stage import interpret_sae
    from saescale.subject import load_model, load_tokenizer

    device, cfg, sae, root = _trained_sae(a)
    model = load_model(a.model, a.revision, device, _where(cfg), **model_options(a.model_options))
    tokenizer = load_tokenizer(a.tokenizer, a.revision, _where(cfg),
                               trust_remote_code=model_options(a.model_options)["trust_remote_code"])
    records, summary = interpret_sae(model, a.layer, sae, root, tokenizer, a.spec, device)
    identity = _sae_identity(cfg, a.layer)
    write_text_atomic(a.out_records, "".join(_json.dumps({**identity, **r}) + "\n" for r in records))
    write_json_atomic(a.out, _result(cfg, a.layer, device, metric="interpret", **summary))


def cmd_autointerp(a) -> None:
    import json as _json

    from saescale.files import write_text_atomic
    from saescale.interpret.autointerp import Cache, make_backend, run_autointerp, summarize

    records = [_json.loads(line) for line in Path(a.records).read_text().splitlines() if line.strip()]
    results = run_autointerp(records, make_backend(a.spec), Cache(a.cache), a.spec)
    write_text_atomic(a.out_records, "".join(_json.dumps(r) + "\n" for r in results))
    identity = {key: records[0][key] for key in ("subject", "layer", "arch", "n", "k")} if records else {}
    write_json_atomic(a.out, {**identity, "metric": "autointerp", **summarize(results), "round": a.round,
                              "backend": {key: a.spec.get(key) for key in ("backend", "model", "base_url")}})


def cmd_dashboard(a) -> None:
    from saescale.report.dashboard import load_records, merge_autointerp, write_dashboard

    records = [r for r in load_records(a.records) if r.get("dashboard", True)]
    if a.autointerp:
        records = merge_autointerp(records, load_records(a.autointerp))
    summary = read_json(a.summary)
    identity = {key: summary[key] for key in ("subject", "layer", "arch", "n", "k")}
    write_dashboard(a.out, identity, records, summary=summary, autointerp_enabled=bool(a.autointerp),
                    back_link=a.back_link)


def cmd_scaling(a) -> None:
    from saescale.scaling.collect import collect, write_scaling

    table = collect(a.evals)
    grid = [{key: row[key] for key in ("subject", "layer", "arch", "n", "k")} for _, row in table.iterrows()]
    write_scaling(table, a.out_metrics, a.out_fits, a.out_studies, grid, a.spec["lr_jobs"], a.spec["settings"])


def cmd_toy(a) -> None:
    """One of Michaud et al.'s model-free studies, written whole: the allocation model, one toy-manifold curve,
    the circle panels, the toy study assembled from those, or SAEs on synthetic superposition."""
    import torch

    torch.set_num_threads(a.threads)
    if a.study == "allocation":
        from saescale.scaling.allocation import allocation_study

        out = allocation_study(a.spec)
    elif a.study == "groundtruth":
        from saescale.toy.superposition import groundtruth_study

        out = groundtruth_study(a.spec)
    else:
        from saescale.toy import manifolds as toy

        if a.study == "curve":
            one = {"kinds": [a.kind], "archs": [a.arch], "circle_panels": []}
            if a.kind != "circle":
                one["dims"] = {a.kind: [a.d]}
            out = toy.toy_curve_entry({**a.spec, **one}, a.kind, a.d, a.arch)
        elif a.study == "panels":
            out = toy.circle_panels(a.spec["circle_panels"], a.spec) if a.spec["circle_panels"] else []
        else:
            out = toy.assemble_study(a.spec, [read_json(p) for p in a.curves], read_json(a.panels))
    write_json_atomic(a.out, out)


def cmd_report(a) -> None:
    from saescale.report.render import render_report

    render_report(config=a.spec, out=a.out, figures_dir=a.figures_dir)


def _json_arg(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--spec is not valid JSON: {exc}") from exc




def _model_options_arg(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    unknown = sorted(set(options) - set(MODEL_OPTION_KEYS)) if isinstance(options, dict) else None
    if unknown is None or unknown:
        raise argparse.ArgumentTypeError(f"a JSON object with the keys {', '.join(MODEL_OPTION_KEYS)} "
                                         f"(got {'unknown keys ' + str(unknown) if unknown else text})")
    return options


MODEL_OPTIONS_HELP = ('how to load the subject model, as JSON: the subject\'s torch_dtype, device_map, '
                      'trust_remote_code, e.g. \'{"torch_dtype": "bfloat16"}\'')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saescale", description=__doc__.split("\n\n")[0],
                                epilog="`saescale <stage> --help` lists a stage's options, with an example.")
    p.add_argument("--version", action="version", version=f"saescale {_version()}")
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name: str, fn, help: str, spec: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=_example(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("--log", help="write log lines, warnings and any traceback to this file (the terminal then "
                                      "gets one line on failure)")
        if spec:
            where = BY_HAND[name][0] if name in BY_HAND else "config"
            sp.add_argument("--spec", type=_json_arg,
                            help=f"settings as JSON, as the workflow passes them (config.{where}); keys left out "
                                 "take their defaults")
            sp.add_argument("--config", help="a workflow config (YAML) to take the settings from, validated by the "
                                             "workflow's schema; without it, the schema's defaults")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override one config key (dotted, e.g. {_set_example(name)}); repeatable")
        return sp

    sp = stage("corpus", cmd_corpus, "write the builtin CPython-stdlib corpus", spec=False)
    sp.add_argument("--out-jsonl", required=True)
    sp.add_argument("--out-info", required=True)

    sp = stage("tokenizer", cmd_tokenizer, "train the builtin byte-level BPE tokenizer")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--out", required=True)

    sp = stage("lm", cmd_lm, "train the builtin tiny GPT-2")
    sp.add_argument("--tokens", required=True)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--out", required=True)

    sp = stage("tokenize", cmd_tokenize, "tokenize a dataset into fixed windows (Zarr)")
    sp.add_argument("--tokenizer", required=True, help="HF id or local path")
    sp.add_argument("--corpus", help="builtin corpus JSONL (dataset path 'builtin')")
    sp.add_argument("--subject", default="subject", help="config name, for error messages")
    sp.add_argument("--out", required=True)

    sp = stage("extract", cmd_extract, "record resid_post activations into a Zarr store")
    sp.add_argument("--subject", default="subject", help="config name, for error messages")
    sp.add_argument("--model", required=True, help="HF id or local path")
    sp.add_argument("--tokens", required=True)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--out", required=True)

    sp = stage("normalize", cmd_normalize, "per-layer statistics (mean, geometric median)", spec=False)
    sp.add_argument("--activations", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True)

    sp = stage("train", cmd_train, "train one SAE, or several sharing one activation stream")
    sp.add_argument("--threads", type=int, default=1)
    for name in ("activations", "norm", "subject"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--layer", type=int, required=True)
    sp.add_argument("--arch")
    sp.add_argument("--out-dir")
    sp.add_argument("--name", help="the arch wildcard when it names a variant of --arch (sweep.variants)")
    for name in ("n", "k"):
        sp.add_argument(f"--{name}", type=int)
    sp.add_argument("--members", type=_json_arg,
                    help="instead of one SAE's flags: a JSON list of {arch, name, n, k, spec, out_dir} to train "
                         "together on one activation stream (train.pack)")

    sp = stage("export", cmd_export, "write a trained SAE in SAELens or sparsify layout", spec=False)
    sp.add_argument("--sae-dir", required=True, help="a saescale SAE folder (saescale_sae.json, saescale_sae.safetensors)")
    sp.add_argument("--format", choices=("saelens", "sparsify"), required=True)
    sp.add_argument("--out", required=True, help="the folder to write (SAELens: one sae_id folder; sparsify: "
                                                   "one hookpoint folder)")

    sp = stage("import", cmd_import, "read a SAELens, sparsify or openai SAE into a saescale SAE folder", spec=False)
    sp.add_argument("--src", required=True, help="a SAELens or sparsify SAE folder, or an openai .pt state dict")
    sp.add_argument("--format", choices=("saelens", "sparsify", "openai"), required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--layer", type=int, help="recorded in saescale_sae.json")
    sp.add_argument("--subject", help="recorded in saescale_sae.json")
    sp.add_argument("--inputs-normalized", action="store_true",
                    help="sparsify: the SAE was trained on saescale-normalized activations (sparsify cannot say)")

    sp = stage("evaluate", cmd_evaluate, "evaluate one SAE on the held-out split")
    for name in ("sae-dir", "activations", "model", "out"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--layer", type=int, required=True)
    sp.add_argument("--revision")
    sp.add_argument("--model-options", type=_model_options_arg, help=MODEL_OPTIONS_HELP)
    sp.add_argument("--threads", type=int, default=1)

    sp = stage("analyze", cmd_analyze, "progressive recovery or refinement of one SAE (method §C.8, C.9)")
    sp.add_argument("--experiment", choices=["progressive", "refinement"], required=True)
    for name in ("sae-dir", "activations", "out"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--model", help="HF id or local path (refinement's delta CE)")
    sp.add_argument("--layer", type=int, required=True)
    sp.add_argument("--revision")
    sp.add_argument("--model-options", type=_model_options_arg, help=MODEL_OPTIONS_HELP)
    sp.add_argument("--threads", type=int, default=1)

    for name, fn, help in (("probes", cmd_probes, "probe loss of one SAE (method §C.4)"),
                           ("ablation", cmd_ablation, "ablation sparsity of one SAE (method §C.7)"),
                           ("geometry", cmd_geometry, "frequency-rank and decoder cosines (method §F.3, F.4)"),
                           ("interpret", cmd_interpret, "N2G explanations and latent records (method §C.5, C.6)")):
        sp = stage(name, fn, help)
        for arg in ("sae-dir", "activations", "out"):
            sp.add_argument(f"--{arg}", required=True)
        sp.add_argument("--model", help="HF id or local path of the subject LM")
        sp.add_argument("--tokenizer", help="HF id or local path of its tokenizer")
        sp.add_argument("--layer", type=int, required=True)
        sp.add_argument("--revision")
        sp.add_argument("--model-options", type=_model_options_arg, help=MODEL_OPTIONS_HELP)
        sp.add_argument("--threads", type=int, default=1)
        if name == "interpret":
            sp.add_argument("--out-records", required=True, help="per-latent records (JSONL)")

    sp = stage("autointerp", cmd_autointerp, "LLM explanations and detection scores for sampled latents")
    for arg in ("records", "cache", "out", "out-records"):
        sp.add_argument(f"--{arg}", required=True)
    sp.add_argument("--round", type=int, default=0,
                    help="written to --out; the workflow passes one more while failed latents are left to retry, "
                         "so Snakemake reruns the job (saescale.interpret.autointerp.next_round)")

    sp = stage("dashboard", cmd_dashboard, "feature dashboard page of one SAE", spec=False)
    for arg in ("records", "summary", "out"):
        sp.add_argument(f"--{arg}", required=True)
    sp.add_argument("--autointerp", help="autointerp results (JSONL), when run")
    sp.add_argument("--back-link", help="link from the page back to the report")

    sp = stage("scaling", cmd_scaling, "collect eval JSONs into a table, fit the scaling laws, run the studies")
    sp.add_argument("--evals", nargs="+", required=True)
    sp.add_argument("--out-metrics", required=True)
    sp.add_argument("--out-fits", required=True)
    sp.add_argument("--out-studies", required=True, help="L(C), tokens to convergence, lr vs n, joint law vs GPT-4")

    sp = stage("toy", cmd_toy, "a model-free study of Michaud et al.: allocation model, toy manifolds, ground truth")
    sp.add_argument("--study", choices=("allocation", "curve", "panels", "manifolds", "groundtruth"), required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--kind", help="curve: circle, sphere or shell")
    sp.add_argument("--d", type=int, help="curve: ambient dimension")
    sp.add_argument("--arch", help="curve: relu_dn or jumprelu_tanh")
    sp.add_argument("--curves", nargs="*", default=[], help="manifolds: the curve files to assemble")
    sp.add_argument("--panels", help="manifolds: the circle panels file")

    sp = stage("report", cmd_report, "render reports/report.html")
    sp.add_argument("--out", required=True)
    sp.add_argument("--figures-dir", help="also write every figure as a PNG file here")
    _fill_help(p)
    return p


EXAMPLES = {
    "tokenize": "saescale tokenize --tokenizer gpt2 --out data/tokens/gpt2.zarr --set subjects.gpt2.ctx_len=64",
    "extract": "saescale extract --model gpt2 --tokens data/tokens/gpt2.zarr --out data/activations/gpt2.zarr "
               "--config my.yaml --subject gpt2",
    "normalize": "saescale normalize --activations data/activations/tiny.zarr --out data/activations/tiny.norm.json",
    "train": "saescale train --activations data/activations/tiny.zarr --norm data/activations/tiny.norm.json "
             "--subject tiny --layer 2 --arch topk --n 512 --k 8 --out-dir my_sae",
    "evaluate": "saescale evaluate --sae-dir my_sae --activations data/activations/tiny.zarr "
                "--model data/subjects/tiny/model --layer 2 --out eval.json --set evaluate.batch_size=1024",
    "probes": "saescale probes --sae-dir my_sae --activations data/activations/tiny.zarr "
              "--model data/subjects/tiny/model --layer 2 --out probes.json",
    "interpret": "saescale interpret --sae-dir my_sae --activations data/activations/tiny.zarr "
                 "--model data/subjects/tiny/model --layer 2 --out n2g.json --out-records records.jsonl",
    "export": "saescale export --sae-dir data/saes/tiny/L2/topk/n512_k8 --format saelens --out exported/topk",
    "import": "saescale import --src path/to/saelens_folder --format saelens --out imported/sae",
    "report": "saescale report --out reports/report.html --config config.yaml",
    "corpus": "saescale corpus --out-jsonl data/corpus/builtin.jsonl --out-info data/corpus/builtin.json",
    "tokenizer": "saescale tokenizer --corpus data/corpus/builtin.jsonl --out data/subjects/tiny/tokenizer",
    "lm": "saescale lm --tokens data/tokens/tiny.zarr --tokenizer data/subjects/tiny/tokenizer --threads 2 "
          "--out data/subjects/tiny/model",
    "analyze": "saescale analyze --experiment progressive --sae-dir my_sae --activations data/activations/tiny.zarr "
               "--layer 2 --out progressive.json",
    "ablation": "saescale ablation --sae-dir my_sae --activations data/activations/tiny.zarr "
                "--model data/subjects/tiny/model --layer 2 --out ablation.json",
    "geometry": "saescale geometry --sae-dir my_sae --activations data/activations/tiny.zarr --layer 2 "
                "--out geometry.json",
    "autointerp": "saescale autointerp --records records.jsonl --cache autointerp_cache --out autointerp.json "
                  "--out-records autointerp.jsonl --set interpret.autointerp.backend=openai "
                  "--set interpret.autointerp.base_url=http://localhost:8000/v1 --set interpret.autointerp.model=m",
    "dashboard": "saescale dashboard --records records.jsonl --summary n2g.json --out dashboard.html",
    "scaling": "saescale scaling --evals data/eval/tiny/L2/*/*.json --out-metrics metrics.csv --out-fits fits.json "
               "--out-studies studies.json",
    "toy": "saescale toy --study allocation --out allocation.json",
}
SET_EXAMPLES = {"train": "train.tokens=1048576", "evaluate": "evaluate.batch_size=1024", "probes": "evaluate.probes.windows=64",
                "interpret": "interpret.latents=32", "autointerp": "interpret.autointerp.latents=10"}


def _example(name: str) -> str:
    return f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else ""


def _set_example(name: str) -> str:
    return SET_EXAMPLES.get(name, "evaluate.batch_size=1024")


# what an option means wherever a stage has it and says nothing more specific
OPTION_HELP = {
    "out": "the file or folder to write (written whole, or not at all)",
    "activations": "the activation store written by `saescale extract` (data/activations/<subject>.zarr)",
    "tokens": "the token store written by `saescale tokenize` (data/tokens/<subject>.zarr)",
    "norm": "the normalization statistics written by `saescale normalize`",
    "sae-dir": "a saescale SAE folder (saescale_sae.json and saescale_sae.safetensors)",
    "layer": "the residual-stream layer (block index) of the SAE",
    "threads": "CPU threads for torch",
    "revision": "the model's hub revision (branch, tag or commit)",
    "corpus": "the builtin corpus JSONL written by `saescale corpus`",
    "records": "per-latent records (JSONL) written by `saescale interpret`",
    "cache": "a JSONL cache of LLM answers, reused across runs",
    "summary": "the interpret summary JSON",
    "seed": "random seed",
    "out-records": "per-latent records (JSONL)",
    "out-jsonl": "the corpus as JSONL, one document per line",
    "out-info": "a JSON summary of the corpus (Python version, file count, sha256)",
    "out-dir": "the SAE folder to write",
    "arch": "the SAE architecture (topk, relu, gated, ...)",
    "n": "the number of latents",
    "k": "the number of active latents (TopK) or the target L0 (penalty archs)",
    "tokenizer": "a Hugging Face tokenizer id or local folder",
    "model": "a Hugging Face model id or local folder",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    """Every option of every stage says what it is: the specific help where given, else OPTION_HELP's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _fill_help(sp)
        elif action.help is None and action.option_strings:
            action.help = OPTION_HELP.get(action.option_strings[0].lstrip("-"), action.dest.replace("_", " "))


def resolve_spec(a) -> None:
    """Fill `a.spec` for a stage: from --config (or the schema's defaults) with --set on top, by the same
    derivation the workflow's rules use (`saescale.stage_specs`), then --spec merged over it. The workflow
    passes a complete --spec, which this leaves as it is; by hand, any key may be left out."""
    import yaml

    from saescale.config import validate
    from saescale.stage_specs import config_for_hand_run, merge_spec, parse_set

    if a.stage not in BY_HAND or getattr(a, "members", None) is not None:
        return
    if a.stage == "train" and a.arch is None:
        raise ConfigError("--arch: give the SAE's arch (with --n, --k and --out-dir), or --members")
    if a.stage == "report" and a.spec is not None:
        a.spec = validate(a.spec, local_paths=False)
        return
    where, derive = BY_HAND[a.stage]
    config = None
    if a.config:
        path = Path(a.config).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {a.config}: no such file")
        config = yaml.safe_load(path.read_text()) or {}
    subject = _subject(a, config)
    a.subject = subject
    cfg = config_for_hand_run(config, parse_set(a.set), subject, getattr(a, "model", None))
    if subject not in cfg["subjects"]:
        raise ConfigError(f"--subject {subject}: not a subject of {a.config} ({', '.join(cfg['subjects'])})")
    a.spec = cfg if a.stage == "report" else merge_spec(derive(cfg, a), a.spec or {}, where)


def _subject(a, config: dict | None) -> str:
    """The subject a hand run takes its settings from: --subject, else the config's first, else 'subject'."""
    given = getattr(a, "subject", None)
    if given and given != "subject":
        return given
    return next(iter((config or {}).get("subjects") or {}), "subject")


INPUT_OPTIONS = ("sae_dir", "activations", "tokens", "norm", "records", "summary", "corpus", "src")


def _check_inputs(a) -> None:
    """Inputs a stage reads must exist: say which option names a missing one, before any work starts."""
    for dest in INPUT_OPTIONS:
        value = getattr(a, dest, None)
        if isinstance(value, str) and not Path(value).expanduser().exists():
            raise ConfigError(f"--{dest.replace('_', '-')} {value}: no such file or folder")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saescale")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a distributed train re-runs under torchrun
    try:
        _check_inputs(args)
        resolve_spec(args)
    except ConfigError as exc:
        parser.exit(2, f"saescale {args.stage}: {exc}\n")
    log = setup_logging(args.log)
    log.info("saescale %s %s", args.stage, " ".join(sys.argv[2:])[:500])
    t0 = time.time()
    try:
        args.fn(args)
    except Exception as exc:
        if not args.log:
            raise  # Python prints the traceback, once
        log.exception("saescale %s failed", args.stage)
        # the traceback is in the log; the terminal gets the message once
        message = str(exc).strip() or type(exc).__name__
        print(f"saescale {args.stage} failed: {message}\n  (traceback in {args.log})", file=terminal())
        return 1
    seconds = time.time() - t0
    log.info("saescale %s done in %.1f s", args.stage, seconds)
    if args.log and not is_worker():  # a workflow job: one line in the terminal names what it made
        print(f"saescale {args.stage}: {_job_label(args)} ({seconds:.0f} s)", file=terminal())
    return 0


def _job_label(args) -> str:
    """What a job made, for its one terminal line: its output folder or file, or a pack's size."""
    if getattr(args, "members", None):
        return f"{len(args.members)} SAEs of one pack ({Path(args.members[0]['out_dir']).parent} ...)"
    for key in ("out_dir", "out", "sae_dir", "out_jsonl"):
        if getattr(args, key, None):
            return str(getattr(args, key))
    return "done"


if __name__ == "__main__":
    sys.exit(main())
