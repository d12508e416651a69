# Interpretation of one SAE: N2G explanations with precision / recall and the explanation-reconstruction
# delta CE (method §C.5, C.6), latent records (examples, logit lens); optional LLM autointerp; and the
# feature dashboard page the report links to.


rule interpret:
    input:
        unpack(lambda wc: sae_inputs(wc, model=True, tokenizer=True)),
    output:
        summary=paths.INTERPRET,
        records=paths.INTERPRET_RECORDS,
    log:
        log_path("interpret", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("interpret", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    resources:
        gpu=1 if HAS_CUDA else 0,
    params:
        args=sae_args,
        spec=lambda wc: spec(interpret_spec(wc)),
        code=code_version("interpret", "interpret/examples.py", "interpret/n2g.py", "interpret/stage.py",
                          "evaluate/downstream.py", "sae", "normalize.py", "subject.py", "store.py"),
    shell:
        "saescale interpret {params.args} --spec {params.spec:q} --out {output.summary}"
        " --out-records {output.records} --log {log}"


from saescale.interpret.autointerp import next_round as next_autointerp_round


rule autointerp:
    input:
        records=paths.INTERPRET_RECORDS,
    output:
        summary=paths.AUTOINTERP,
        records=paths.AUTOINTERP_RECORDS,
    log:
        log_path("autointerp", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    conda:
        envs()
    params:
        spec=spec(CFG["interpret"]["autointerp"]),
        cache=paths.AUTOINTERP_CACHE,
        code=code_version("autointerp", "interpret/autointerp.py"),
        # one more while the last run left failed latents to retry: the changed param reruns this job,
        # which requests only those (successes come from the cache)
        round=lambda wc: next_autointerp_round(paths.fmt(paths.AUTOINTERP, **wc)),
    shell:
        "saescale autointerp --records {input.records} --cache {params.cache} --spec {params.spec:q}"
        " --round {params.round} --out {output.summary} --out-records {output.records} --log {log}"


rule dashboard:
    input:
        unpack(dashboard_inputs),
    output:
        report(paths.DASHBOARD, caption="../report/dashboard.rst", category="Feature dashboards",
               subcategory="{subject} L{layer} {arch}", labels={"n": "{n}", "k": "{k}"}),
    log:
        log_path("dashboard", "{subject}_L{layer}_{arch}_n{n}_k{k}"),
    benchmark:
        bench_path("dashboard", "{subject}_L{layer}_{arch}_n{n}_k{k}")
    conda:
        envs()
    params:
        autointerp=lambda wc, input: f"--autointerp {input.autointerp}" if "autointerp" in input.keys() else "",
        back=lambda wc: "../" * 4 + Path(paths.REPORT).name,
        code=code_version("dashboard", "report/dashboard.py", "report/templates/dashboard.html"),
    shell:
        "saescale dashboard --records {input.records} --summary {input.summary} {params.autointerp}"
        " --back-link {params.back} --out {output} --log {log}"
