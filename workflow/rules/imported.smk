# SAEs trained elsewhere (config.imported): read into saescale's format, then evaluated on their subject's
# held-out activations by the same command as the sweep's SAEs. They are compared in the report, never fitted.


rule import_sae:
    input:
        lambda wc: imported(wc)["path"],
    output:
        weights=paths.IMPORTED_WEIGHTS,
        cfg=paths.IMPORTED_CFG,
    log:
        log_path("import", "{name}"),
    conda:
        envs()
    params:
        out=lambda wc: paths.fmt(paths.IMPORTED_DIR, name=wc.name),
        format=lambda wc: imported(wc)["format"],
        where=lambda wc: f"--subject {imported(wc)['subject']} --layer {imported(wc)['layer']}",
        normalized=lambda wc: "--inputs-normalized" if imported(wc)["inputs_normalized"] else "",
        code=code_version("import", "interop.py", "sae", "normalize.py"),
    shell:
        "saescale import --src {input:q} --format {params.format} {params.where} {params.normalized}"
        " --out {params.out} --log {log}"


rule evaluate_imported:
    input:
        unpack(
            lambda wc: {
                "weights": paths.fmt(paths.IMPORTED_WEIGHTS, name=wc.name),
                "cfg": paths.fmt(paths.IMPORTED_CFG, name=wc.name),
                "activations": paths.fmt(paths.ACTIVATIONS, subject=imported(wc)["subject"]),
                "model": model_input(imported_subject(wc)),
            }
        ),
    output:
        paths.IMPORTED_EVAL,
    log:
        log_path("evaluate", "imported_{name}"),
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        model=lambda wc: model_path(imported_subject(wc)),
        revision=lambda wc: revision_option(imported_subject(wc)),
        sae_dir=lambda wc, input: str(Path(input.cfg).parent),
        layer=lambda wc: imported(wc)["layer"],
        spec=EVALUATE_SPEC,
        code=EVALUATE_CODE,
    shell:
        "saescale evaluate --sae-dir {params.sae_dir} --activations {input.activations}"
        " --model {params.model:q} {params.revision} --layer {params.layer} --spec {params.spec:q}"
        " --out {output} --log {log}"
