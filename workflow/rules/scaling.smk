# Scaling: collect every eval JSON of a (subject, layer) into one table, fit the laws (method §D.1), and run
# the section-3 studies on the training logs: L(C), tokens to convergence, lr vs n (scaling.lr_sweep).


rule scaling:
    input:
        results=results_of,
        logs=grid_logs_of,
        lr_sweep=lr_sweep_files_of,
    output:
        metrics=report(paths.METRICS, caption="../report/metrics.rst", category="Data",
                       subcategory="{subject} L{layer}"),
        fits=report(paths.FITS, caption="../report/fits.rst", category="Data", subcategory="{subject} L{layer}"),
        studies=paths.STUDIES,
    log:
        log_path("scaling", "{subject}_L{layer}"),
    benchmark:
        bench_path("scaling", "{subject}_L{layer}")
    conda:
        envs()
    params:
        evals=evals_of,
        spec=lambda wc: spec({"settings": CFG["scaling"], "lr_jobs": lr_sweep_of(wc)}),
        code=code_version("scaling", "scaling"),
    shell:
        "saescale scaling --evals {params.evals} --out-metrics {output.metrics} --out-fits {output.fits}"
        " --out-studies {output.studies} --spec {params.spec:q} --log {log}"
