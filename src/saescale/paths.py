"""Where every stage writes: the one place that knows the output path patterns (DESIGN.md, 'Files on disk').

Patterns use Snakemake wildcard syntax so the rules use them as-is; `fmt` fills them from Python.
"""

from __future__ import annotations

CORPUS = "data/corpus/builtin.jsonl"
CORPUS_INFO = "data/corpus/builtin.json"
TOKENIZER = "data/subjects/{subject}/tokenizer"
MODEL = "data/subjects/{subject}/model"
MODEL_TRAINING = MODEL + "/training.json"
TOKENS = "data/tokens/{subject}.zarr"
ACTIVATIONS = "data/activations/{subject}.zarr"
NORM = "data/activations/{subject}.norm.json"
SAE_DIR = "data/saes/{subject}/L{layer}/{arch}/n{n}_k{k}"
# saescale's own SAE folder: file names no peer uses (sparsify writes cfg.json + sae.safetensors, SAELens
# cfg.json + sae_weights.safetensors, each with other tensors), so no library loads one by mistake;
# `saescale export` writes the peers' layouts
WEIGHTS_FILE = "saescale_sae.safetensors"
CFG_FILE = "saescale_sae.json"
SAE_WEIGHTS = f"{SAE_DIR}/{WEIGHTS_FILE}"
SAE_CFG = f"{SAE_DIR}/{CFG_FILE}"
SAE_LOG = SAE_DIR + "/train_log.csv"
EVAL = "data/eval/{subject}/L{layer}/{arch}/n{n}_k{k}.json"
METRIC = "data/eval/{subject}/L{layer}/{arch}/n{n}_k{k}.{metric}.json"  # probes, ablation, geometry
INTERPRET = "data/interpret/{subject}/L{layer}/{arch}/n{n}_k{k}.json"
INTERPRET_RECORDS = "data/interpret/{subject}/L{layer}/{arch}/n{n}_k{k}.jsonl"
AUTOINTERP = "data/interpret/{subject}/L{layer}/{arch}/n{n}_k{k}.autointerp.json"
AUTOINTERP_RECORDS = "data/interpret/{subject}/L{layer}/{arch}/n{n}_k{k}.autointerp.jsonl"
AUTOINTERP_CACHE = "data/interpret/cache"  # responses by prompt hash, shared by every SAE and run
DASHBOARD = "reports/latents/{subject}/L{layer}/{arch}/n{n}_k{k}.html"
ANALYSIS = "data/analysis/{subject}/L{layer}/{arch}/n{n}_k{k}/{experiment}.json"
METRIC_NAMES = ("probes", "ablation", "geometry")
METRICS = "data/scaling/{subject}/L{layer}/metrics.csv"
FITS = "data/scaling/{subject}/L{layer}/fits.json"
STUDIES = "data/scaling/{subject}/L{layer}/studies.json"
TOY_ALLOCATION = "data/toy/allocation.json"
TOY_MANIFOLDS = "data/toy/manifolds.json"
TOY_CURVE = "data/toy/manifolds/{kind}_d{d}_{arch}.json"
TOY_PANELS = "data/toy/manifolds/circle_panels.json"
TOY_GROUNDTRUTH = "data/toy/groundtruth.json"
IMPORTED_DIR = "data/imported/{name}"  # an SAE trained elsewhere (config.imported), as a saescale SAE folder
IMPORTED_CFG = f"{IMPORTED_DIR}/{CFG_FILE}"
IMPORTED_WEIGHTS = f"{IMPORTED_DIR}/{WEIGHTS_FILE}"
IMPORTED_EVAL = IMPORTED_DIR + "/eval.json"
REPORT = "reports/report.html"
REPORT_FIGURES = "reports/figures"
LOGS = "logs/{rule}/{name}.log"
BENCH = "benchmarks/results/{rule}/{name}.tsv"


def fmt(pattern: str, **wildcards: object) -> str:
    return pattern.format(**wildcards)

