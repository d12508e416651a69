# Normalize: per-layer statistics written once (dataset mean for the FVU baseline, geometric median for b_pre).


rule normalize:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    input:
        paths.ACTIVATIONS,
    output:
        paths.NORM,
    log:
        log_path("normalize", "{subject}"),
    benchmark:
        bench_path("normalize", "{subject}")
    conda:
        envs()
    params:
        code=code_version("normalize", "normalize.py", "store.py"),
    shell:
        "saescale normalize --activations {input} --out {output} --log {log}"
