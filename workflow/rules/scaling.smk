# Scaling: collect every eval JSON of a (subject, layer) into one table and fit the laws (REFERENCE D.1).


def evals_of(wc):
    return [
        paths.fmt(paths.EVAL, **job)
        for job in sae_grid()
        if job["subject"] == wc.subject and str(job["layer"]) == wc.layer
    ]


rule scaling:
    input:
        evals_of,
    output:
        metrics=paths.METRICS,
        fits=paths.FITS,
    log:
        log_path("scaling", "{subject}_L{layer}"),
    conda:
        envs()
    params:
        code=code_version("scaling"),
    shell:
        "saescale scaling --evals {input} --out-metrics {output.metrics} --out-fits {output.fits} --log {log}"
