# Michaud, Gorton & McGrath (2025), the studies that need no subject model (method §F): the capacity-allocation
# model, toy feature manifolds, and SAEs trained on synthetic superposition with a known dictionary.


rule allocation:
    output:
        paths.TOY_ALLOCATION,
    log:
        log_path("toy", "allocation"),
    benchmark:
        bench_path("toy", "allocation")
    conda:
        envs()
    params:
        spec=lambda wc: spec(toy_spec("allocation")),
        code=code_version("toy", "scaling/allocation.py"),
    shell:
        "saescale toy --study allocation --spec {params.spec:q} --out {output} --log {log}"


rule toy_curve:
    output:
        paths.TOY_CURVE,
    log:
        log_path("toy", "{kind}_d{d}_{arch}"),
    benchmark:
        bench_path("toy", "{kind}_d{d}_{arch}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        spec=lambda wc: spec(toy_curve_spec(wc.kind)),
        code=code_version("toy", "toy/manifolds.py", "toy/settings.py", "sae"),
    shell:
        "saescale toy --study curve --kind {wildcards.kind} --d {wildcards.d} --arch {wildcards.arch}"
        " --spec {params.spec:q} --out {output} --log {log}"


rule toy_panels:
    output:
        paths.TOY_PANELS,
    log:
        log_path("toy", "circle_panels"),
    benchmark:
        bench_path("toy", "circle_panels")
    conda:
        envs()
    params:
        spec=lambda wc: spec(toy_curve_spec("circle", panels=True)),
        code=code_version("toy", "toy/manifolds.py", "toy/settings.py", "sae"),
    shell:
        "saescale toy --study panels --spec {params.spec:q} --out {output} --log {log}"


rule manifolds:
    input:
        curves=toy_curve_files,
        panels=paths.TOY_PANELS,
    output:
        paths.TOY_MANIFOLDS,
    log:
        log_path("toy", "manifolds"),
    conda:
        envs()
    params:
        spec=lambda wc: spec(toy_spec("manifolds")),
        code=code_version("toy", "toy/manifolds.py", "toy/settings.py"),
    shell:
        "saescale toy --study manifolds --curves {input.curves} --panels {input.panels} --spec {params.spec:q}"
        " --out {output} --log {log}"


rule groundtruth:
    output:
        paths.TOY_GROUNDTRUTH,
    log:
        log_path("toy", "groundtruth"),
    benchmark:
        bench_path("toy", "groundtruth")
    conda:
        envs()
    params:
        spec=lambda wc: spec(toy_spec("groundtruth")),
        code=code_version("toy", "toy/superposition.py", "sae", "normalize.py", "store.py"),
    shell:
        "saescale toy --study groundtruth --spec {params.spec:q} --out {output} --log {log}"


rule toy:
    """A target for the model-free studies alone: snakemake --cores all toy (no subject model is trained)."""
    input:
        toy_outputs,
