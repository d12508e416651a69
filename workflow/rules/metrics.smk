# The paper's evaluation suite beyond reconstruction, one rule per metric per SAE, each writing a file
# beside the SAE's eval record (data/eval/.../n{n}_k{k}.{metric}.json) that the scaling rule merges:
# probe loss (method §C.4), ablation sparsity (C.7), frequency-rank and decoder geometry (F.3, F.4).


rule probes:
    input:
        unpack(lambda wc: sae_inputs(wc, model=bool(CFG["evaluate"]["probes"]["datasets"]), tokenizer=True)),
    output:
        paths.METRIC.replace("{metric}", "probes"),
    log:
        log_path("probes", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("probes", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        args=sae_args,
        spec=spec(stage_specs.metric_spec(CFG, "probes")),
        code=code_version("probes", "evaluate/probes.py", "evaluate/probe_tasks.py", "sae", "normalize.py", "subject.py", "store.py"),
    shell:
        "saescale probes {params.args} --spec {params.spec:q} --out {output} --log {log}"


rule ablation:
    input:
        unpack(lambda wc: sae_inputs(wc, model=True)),
    output:
        paths.METRIC.replace("{metric}", "ablation"),
    log:
        log_path("ablation", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("ablation", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        args=sae_args,
        spec=spec(stage_specs.metric_spec(CFG, "ablation")),
        code=code_version("ablation", "evaluate/ablation.py", "sae", "normalize.py", "subject.py", "store.py"),
    shell:
        "saescale ablation {params.args} --spec {params.spec:q} --out {output} --log {log}"


rule geometry:
    input:
        unpack(sae_inputs),
    output:
        paths.METRIC.replace("{metric}", "geometry"),
    log:
        log_path("geometry", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("geometry", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        args=sae_args,
        spec=spec(stage_specs.metric_spec(CFG, "geometry")),
        code=code_version("geometry", "evaluate/geometry.py", "evaluate/reconstruction.py", "sae", "normalize.py", "store.py"),
    shell:
        "saescale geometry {params.args} --spec {params.spec:q} --out {output} --log {log}"
