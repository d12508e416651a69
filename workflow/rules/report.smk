# Report: one self-contained HTML file (figures inline), also embedded by `snakemake --report`.


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


rule report:
    input:
        report_inputs,
    output:
        html=report(paths.REPORT, caption="../report/report.rst", category="Report"),
        figures=report(
            directory(paths.REPORT_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{name}"},
        ),
    log:
        log_path("report", "report"),
    conda:
        envs()
    params:
        spec=spec(CFG),
        code=code_version("report", "scaling"),
    shell:
        "saescale report --spec {params.spec:q} --out {output.html} --figures-dir {output.figures} --log {log}"
