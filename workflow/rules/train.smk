# Train one SAE per (subject, layer, arch, n, k) with the paper's recipe (REFERENCE A.3-A.7); `arch` is an
# arch of sae/archs.py or a named variant (sweep.variants), whose train overrides only rerun its own jobs.


rule train:
    input:
        activations=paths.ACTIVATIONS,
        norm=paths.NORM,
    output:
        weights=paths.SAE_WEIGHTS,
        cfg=paths.SAE_CFG,
        log_csv=paths.SAE_LOG,
    log:
        log_path("train", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("train", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    threads: CFG["train"]["threads"]
    resources:
        gpu=1 if HAS_CUDA or CFG["train"]["device"] == "cuda" else 0,
    params:
        spec=lambda wc: spec({key: v for key, v in train_recipe(wc)[1].items() if key != "threads"}),
        arch=lambda wc: train_recipe(wc)[0],
        out_dir=lambda wc, output: str(Path(output.cfg).parent),
        code=code_version("train", "sae", "store.py", "normalize.py"),
    shell:
        "saescale train --activations {input.activations} --norm {input.norm} --subject {wildcards.subject}"
        " --layer {wildcards.layer} --arch {params.arch} --name {wildcards.arch} --n {wildcards.n} --k {wildcards.k}"
        " --threads {threads} --spec {params.spec:q} --out-dir {params.out_dir} --log {log}"
