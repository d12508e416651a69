# Report: one self-contained HTML file (figures inline), also embedded by `snakemake --report`.


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
    benchmark:
        bench_path("report", "report")
    conda:
        envs()
    params:
        spec=spec(CFG),
        code=code_version("report", "report", "scaling"),
        method=METHOD_DOC_VERSION,  # the report appends docs/method.md: editing it re-renders the report
    shell:
        "saescale report --spec {params.spec:q} --out {output.html} --figures-dir {output.figures} --log {log}"
