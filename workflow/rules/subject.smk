# Subject: the builtin tiny GPT-2 (corpus -> tokenizer -> LM), saved in Hugging Face format.
# A hub id or local path in `model:` skips these rules: later stages call from_pretrained on it.


rule corpus:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    output:
        jsonl=paths.CORPUS,
        info=paths.CORPUS_INFO,
    log:
        log_path("corpus", "builtin"),
    benchmark:
        bench_path("corpus", "builtin")
    conda:
        envs()
    params:
        code=code_version("corpus", "corpus.py"),
    shell:
        "saescale corpus --out-jsonl {output.jsonl} --out-info {output.info} --log {log}"


rule tokenizer:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    input:
        paths.CORPUS,
    output:
        directory(paths.TOKENIZER),
    log:
        log_path("tokenizer", "{subject}"),
    benchmark:
        bench_path("tokenizer", "{subject}")
    conda:
        envs()
    params:
        spec=lambda wc: spec({"vocab_size": subject(wc)["builtin"]["vocab_size"]}),
        code=code_version("tokenizer", "subject.py"),
    shell:
        "saescale tokenizer --corpus {input} --spec {params.spec:q} --out {output} --log {log}"


rule lm:
    # the subject chain is the critical path: run it before the model-free toy studies
    priority: 10
    input:
        tokens=paths.TOKENS,
        tokenizer=paths.TOKENIZER,
    output:
        directory(paths.MODEL),
    log:
        log_path("lm", "{subject}"),
    benchmark:
        bench_path("lm", "{subject}")
    conda:
        envs()
    threads: ALL_CPUS
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        spec=lambda wc: spec(subject(wc)["builtin"]),
        code=code_version("lm", "subject.py"),
    shell:
        "saescale lm --tokens {input.tokens} --tokenizer {input.tokenizer} --threads {threads} --spec {params.spec:q}"
        " --out {output} --log {log}"
