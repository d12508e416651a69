# Train one SAE per (subject, layer, arch, n, k) with the paper's recipe (method §A.3-A.7); `arch` is an
# arch of sae/archs.py or a named variant (sweep.variants), whose train overrides only rerun its own jobs.
# With train.distributed (data x latent > 1) the same command starts data x latent processes under torchrun
# (saescale.launch), one GPU each: the job asks for that many GPUs, over train.distributed.nodes nodes.

TRAIN_CODE = code_version("train", *TRAIN_MODULES)


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
        gpu=train_gpus,
        nodes=train_nodes,
        **train_resources(lambda wc: ([int(wc.n)], wc.arch)),
    params:
        spec=lambda wc: spec(sae_settings(CFG, wc.arch)[1]),
        arch=lambda wc: train_recipe(wc)[0],
        out_dir=lambda wc, output: str(Path(output.cfg).parent),
        code=TRAIN_CODE,
    shell:
        "saescale train --activations {input.activations} --norm {input.norm} --subject {wildcards.subject}"
        " --layer {wildcards.layer} --arch {params.arch} --name {wildcards.arch} --n {wildcards.n} --k {wildcards.k}"
        " --threads {threads} --spec {params.spec:q} --out-dir {params.out_dir} --log {log}"


# train.pack: several SAEs sharing one activation stream train in one job that reads it once. A pack's rule
# names its outputs without wildcards, so Snakemake prefers it to `train` for those SAEs (no ruleorder
# needed); the same command runs, with --members instead of one SAE's flags.
for pack in train_packs(CFG):

    rule:
        name:
            f"train_pack_{pack['name']}"
        input:
            activations=paths.fmt(paths.ACTIVATIONS, subject=pack["subject"]),
            norm=paths.fmt(paths.NORM, subject=pack["subject"]),
        output:
            [paths.fmt(p, **job) for job in pack["members"] for p in (paths.SAE_WEIGHTS, paths.SAE_CFG, paths.SAE_LOG)],
        log:
            log_path("train", f"pack_{pack['name']}"),
        benchmark:
            bench_path("train", f"pack_{pack['name']}")
        conda:
            envs()
        threads: max(recipe(CFG, job["arch"])[1]["threads"] for job in pack["members"])
        resources:
            gpu=GPUS_PER_PROCESS,
            **train_resources(lambda wc, jobs=pack["members"]: ([job["n"] for job in jobs], jobs[0]["arch"])),
        params:
            members=spec(pack_members(pack)),
            subject=pack["subject"],
            layer=pack["layer"],
            code=TRAIN_CODE,
        shell:
            "saescale train --activations {input.activations} --norm {input.norm} --subject {params.subject}"
            " --layer {params.layer} --threads {threads} --members {params.members:q} --log {log}"

    inherit_train_resources(f"train_pack_{pack['name']}")
