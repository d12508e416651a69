# saescale: reproduce "Scaling and evaluating sparse autoencoders" (Gao et al. 2024) as one workflow.
# The rules live in workflow/rules/ (one file per stage); all logic lives in the saescale package.
import json

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from saescale import paths
from saescale.config import (ConfigError, analysed, evaluated, lr_sweep_jobs, recipe, sae_jobs, sae_settings,
                             train_packs, validate)

min_version("9.0")


configfile: "config.yaml"


try:
    CFG = validate(config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


report: "workflow/report/workflow.rst"


wildcard_constraints:
    subject=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    layer=r"\d+",
    arch=r"[a-z0-9_]+",
    n=r"\d+",
    k=r"\d+",
    experiment=r"progressive|refinement",
    metric=r"probes|ablation|geometry",
    kind=r"circle|sphere|shell",
    d=r"\d+",
    name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


include: "workflow/rules/common.smk"
include: "workflow/rules/subject.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/normalize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/imported.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/interpret.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    scaling,
    report,
    dashboard,
    manifolds,
    toy,


rule all:
    default_target: True
    input:
        paths.REPORT,
