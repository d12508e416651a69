# Extract: one forward pass per batch of windows records resid_post of every configured layer (Zarr v3).


rule extract:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    input:
        unpack(lambda wc: {"tokens": paths.fmt(paths.TOKENS, subject=wc.subject), "model": model_input(wc)}),
    output:
        directory(paths.ACTIVATIONS),
    log:
        log_path("extract", "{subject}"),
    benchmark:
        bench_path("extract", "{subject}")
    conda:
        envs()
    threads: 2
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        model=model_path,
        spec=lambda wc: spec(stage_specs.extract_spec(CFG, wc.subject)),
        code=code_version("extract", *EXTRACT_MODULES),
    shell:
        "saescale extract --model {params.model:q} --tokens {input.tokens} --subject {wildcards.subject} --threads {threads}"
        " --spec {params.spec:q} --out {output} --log {log}"
