# Scaling: collect every eval JSON of a (subject, layer) into one table and fit the laws (REFERENCE D.1).


rule scaling:
    input:
        results_of,
    output:
        metrics=paths.METRICS,
        fits=paths.FITS,
    log:
        log_path("scaling", "{subject}_L{layer}"),
    benchmark:
        bench_path("scaling", "{subject}_L{layer}")
    conda:
        envs()
    params:
        evals=evals_of,
        code=code_version("scaling", "scaling"),
    shell:
        "saescale scaling --evals {params.evals} --out-metrics {output.metrics} --out-fits {output.fits} --log {log}"
