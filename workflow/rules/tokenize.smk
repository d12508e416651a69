# Tokenize: datasets.load_dataset(...) -> fixed windows of ctx_len tokens, split train/eval by window.


rule tokenize:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    input:
        unpack(tokenize_inputs),
    output:
        directory(paths.TOKENS),
    log:
        log_path("tokenize", "{subject}"),
    benchmark:
        bench_path("tokenize", "{subject}")
    conda:
        envs()
    params:
        tokenizer=tokenizer_path,
        corpus=lambda wc: f"--corpus {paths.CORPUS}" if subject(wc)["dataset"]["path"] == "builtin" else "",
        spec=lambda wc: spec(stage_specs.tokenize_spec(CFG, wc.subject)),
        code=code_version("tokenize", "corpus.py"),
    shell:
        "saescale tokenize --tokenizer {params.tokenizer:q} {params.corpus} --subject {wildcards.subject}"
        " --spec {params.spec:q}"
        " --out {output} --log {log}"
