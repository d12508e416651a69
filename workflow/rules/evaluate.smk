# Evaluate one SAE on the held-out windows: FVU, L0, dead fraction, and delta CE / KL by splicing (method §C).


# the settings and code of `saescale evaluate`, shared with evaluate_imported (imported.smk)
EVALUATE_SPEC = spec(stage_specs.evaluate_spec(CFG))
EVALUATE_CODE = code_version(
    "evaluate", "evaluate/reconstruction.py", "evaluate/downstream.py", "sae", "normalize.py", "subject.py", "store.py"
)


rule evaluate:
    input:
        unpack(
            lambda wc: {
                "weights": paths.fmt(paths.SAE_WEIGHTS, **wc),
                "cfg": paths.fmt(paths.SAE_CFG, **wc),
                "activations": paths.fmt(paths.ACTIVATIONS, subject=wc.subject),
                "model": model_input(wc),
            }
        ),
    output:
        paths.EVAL,
    log:
        log_path("evaluate", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("evaluate", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        model=model_path,
        revision=revision_option,
        sae_dir=lambda wc, input: str(Path(input.cfg).parent),
        spec=EVALUATE_SPEC,
        code=EVALUATE_CODE,
    shell:
        "saescale evaluate --sae-dir {params.sae_dir} --activations {input.activations}"
        " --model {params.model:q} {params.revision} --layer {wildcards.layer} --spec {params.spec:q}"
        " --out {output} --log {log}"
