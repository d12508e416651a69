# saescale: reproduce "Scaling and evaluating sparse autoencoders" (Gao et al. 2024) as one workflow.
# The rules live in workflow/rules/ (one file per stage); all logic lives in the saescale package.
import json

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from saescale import paths
from saescale.config import (ConfigError, analysed, evaluated, lr_sweep_jobs, recipe, sae_jobs, sae_settings,
                             train_packs, validate, workflow_config)

min_version("9.0")


# No `configfile:` directive: it would merge every --configfile preset into config.yaml. config.yaml (in the
# working directory) is the config when no --configfile is given; a preset replaces it, or extends the file
# its `base:` key names; --config key=value overrides either (saescale.config.workflow_config).
try:
    _raw = workflow_config("config.yaml", workflow.config_settings.configfiles, workflow.config_settings.config)
    CFG = validate(_raw)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(_raw)


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
