# Section 5 experiments on trained SAEs (config.analysis): progressive recovery under test-time TopK(k') /
# JumpReLU(theta) (method §C.8) and refinement of the nonzero values on a fixed support (method §C.9).


rule analyze:
    input:
        unpack(
            lambda wc: {
                "weights": paths.fmt(paths.SAE_WEIGHTS, **wc),
                "cfg": paths.fmt(paths.SAE_CFG, **wc),
                "activations": paths.fmt(paths.ACTIVATIONS, subject=wc.subject),
                "model": model_input(wc) if wc.experiment == "refinement" else [],
            }
        ),
    output:
        paths.ANALYSIS,
    log:
        log_path("analyze", "{subject}_L{layer}_{arch}_n{n}_k{k}_{experiment}"),
    benchmark:
        bench_path("analyze", "{subject}_L{layer}_{arch}_n{n}_k{k}_{experiment}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        model=lambda wc: option("--model", model_path(wc)) if wc.experiment == "refinement" else "",
        revision=revision_option,
        sae_dir=lambda wc, input: str(Path(input.cfg).parent),
        spec=lambda wc: spec(analysis_spec(wc.experiment)),
        code=code_version("analyze", "evaluate", "sae", "normalize.py", "subject.py", "store.py"),
    shell:
        "saescale analyze --experiment {wildcards.experiment} --sae-dir {params.sae_dir}"
        " --activations {input.activations} {params.model} {params.revision} --layer {wildcards.layer}"
        " --spec {params.spec:q} --out {output} --log {log}"
