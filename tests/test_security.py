"""Security: strings from data never become markup in the report or the dashboards, and the LLM API key is
read from the environment, sent to the endpoint and written to no file.

A small pipeline (a random 2-layer GPT-2, one TopK SAE, interpret and autointerp, nothing else) runs on a
corpus full of HTML and template payloads, with the same payloads in the report title, the dataset's folder
name and the LLM's explanations; real headless Chromium then opens the report and every dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from browser import chromium, inspect, local_targets  # noqa: F401 (chromium is a fixture)
from helpers import TEXT, random_gpt2, record_authorization, write_texts

# Each payload, if it ever ran, sets window.__xss, adds an <xss-ran> node, or opens an alert.
SCRIPT = "<script>window.__xss=1;document.body.appendChild(document.createElement('xss-ran'))</script>"
IMG = "'\"><img src=x onerror=\"window.__xss=2;alert('xss')\">"
TEMPLATE = "{{ 7*7 }}"  # Jinja2 syntax: shown as typed, never evaluated to 49
FOLDER = "'\"><img src=x onerror=window.__xss=3>"  # a folder name cannot hold '/'
EXPLANATION = f"{SCRIPT} {IMG} {TEMPLATE}"
KEY_ENV, KEY = "SAESCALE_SECURITY_KEY", "sk-saescale-security-sentinel-5f3a9c"
PROBES = {  # read in the page after it loaded
    "xss": "window.__xss === undefined ? null : String(window.__xss)",
    "injected": "document.querySelectorAll('xss-ran, img[src=\"x\"]').length",
    "contexts": "[...document.querySelectorAll('.ctx')].map(e => e.innerText).join('\\n')",
}


class PayloadLLM:
    """An explainer that answers every latent with the payloads; as scorer, a valid 'none fires' list."""

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        user = messages[-1]["content"]
        if re.match(r"Explanation: ", user):
            return json.dumps([0] * len(re.findall(r"^\d+\. ", user, flags=re.MULTILINE)))
        return EXPLANATION


def payload_corpus() -> list[str]:
    """Code and prose with the payloads inline, so tokens, contexts and N2G patterns carry them."""
    return [f"x = '{SCRIPT}'  # {TEMPLATE}", f"<p title={IMG}>hello {TEMPLATE}</p>",
            f"{TEMPLATE} and {SCRIPT} again", *TEXT]


def payload_gpt2(folder: Path, files: list[str]) -> str:
    """`random_gpt2` with SCRIPT and IMG added to the vocabulary whole: one token then carries a complete
    tag, as a real tokenizer's token can, so an unescaped token would run in the dashboard."""
    from transformers import GPT2LMHeadModel

    from saescale.subject import load_tokenizer

    model = random_gpt2(folder, files)
    tokenizer = load_tokenizer(model)
    tokenizer.add_tokens([SCRIPT, IMG])
    tokenizer.save_pretrained(model)
    lm = GPT2LMHeadModel.from_pretrained(model)
    lm.resize_token_embeddings(len(tokenizer))
    lm.save_pretrained(model)
    return model


def small_config(model: str, files: list[str], base_url: str) -> dict:
    """The cheapest run that still writes corpus tokens into dashboards and data strings into the report."""
    def off() -> dict:  # a fresh dict each time: yaml.safe_dump would write a shared one as anchor + aliases
        return {"enabled": False}

    return {
        "subjects": {"rand": {"model": model, "layers": [1], "ctx_len": 16, "train_tokens": 4096,
                              "eval_tokens": 512, "chunk_windows": 32,
                              "dataset": {"path": "text", "data_files": files}}},
        "sweep": {"n": [32], "k": [4]},
        "train": {"tokens": 8192, "batch_size": 512, "dead_tokens": 2048, "heldout_rows": 256},
        "evaluate": {"downstream_windows": 8, "probes": off(), "ablation": off(), "geometry": off()},
        "interpret": {"latents": 4, "dashboard_latents": 4, "example_windows": 128, "eval_windows": 16,
                      "max_suffix": 4, "reconstruction": {"n": []},
                      "autointerp": {"backend": "openai", "model": f"llm {SCRIPT}", "base_url": base_url,
                                     "api_key_env": KEY_ENV, "latents": 2, "max_retries": 0, "n_top": 2,
                                     "n_random": 1, "n_score_pos": 2, "n_score_neg": 2}},
        "analysis": {"progressive": {"archs": []}, "refinement": {"archs": []}},
        "toy": {"allocation": off(), "manifolds": off(), "groundtruth": off()},
        "report": {"title": f"run {SCRIPT} {IMG} {TEMPLATE}"},
    }


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory) -> dict:
    """The small pipeline on the payload corpus, with the API key in the environment: the run directory,
    its config and the Authorization headers the LLM endpoint received."""
    from test_autointerp import serving
    from test_workflow import snakemake

    wdir = tmp_path_factory.mktemp("payload")
    files = write_texts(wdir / "text" / FOLDER, payload_corpus(), copies=100)
    model = payload_gpt2(wdir / "model", files)
    with pytest.MonkeyPatch.context() as env, serving(PayloadLLM()) as server:
        env.setenv(KEY_ENV, KEY)
        authorizations = record_authorization(server)
        cfg = small_config(model, files, server.base_url)
        snakemake(wdir, config=cfg)
    return {"dir": wdir, "config": cfg, "authorizations": authorizations}


def payload_record(latent: int, ai: dict) -> dict:
    """A feature record with a payload in every string a dashboard card shows, each a single token."""
    example = {"tokens": ["a", SCRIPT, IMG, TEMPLATE, "\n"], "acts": [0.0, 1.0, 0.5, 0.2, 0.0], "center": 1,
               "activation": 1.0}
    return {"latent": latent, "frequency": 0.01, "max_activation": 1.0, "top_examples": [example],
            "random_examples": [example],
            "n2g": {"patterns": [{"text": IMG, "activation": 1.0}], "precision": 1.0},
            "logits": {"up": [[SCRIPT, 1.0]], "down": [[TEMPLATE, -1.0]]}, "autointerp": ai}


def assert_inert(page) -> None:
    """No payload ran: no dialog, no marker, no injected node, and nothing on the console."""
    assert page.dialogs == [], f"{page.path.name} opened dialogs: {page.dialogs}"
    assert page.probes["xss"] is None and page.probes["injected"] == 0, f"a payload ran in {page.path.name}"
    assert page.errors == [], f"console errors in {page.path.name}: {page.errors}"


def test_dashboard_shows_every_data_string_as_text(chromium, tmp_path):  # noqa: F811
    """Every field of a card (tokens, N2G patterns, logit lens, LLM explanation and error) and the page's
    identity and summary rows, each holding a whole payload."""
    from saescale.report.dashboard import write_dashboard

    records = [payload_record(0, {"status": "ok", "explanation": EXPLANATION, "accuracy": 1.0}),
               payload_record(1, {"status": "failed", "error": f"bad answer {IMG}"})]
    identity = {"subject": "s", "layer": 0, "arch": "topk", "n": 8, "k": 2, "dataset": FOLDER}
    write_dashboard(tmp_path / "page.html", identity, records, summary={"note": TEMPLATE},
                    autointerp_enabled=True, back_link="report.html")
    page = inspect(chromium, tmp_path / "page.html", PROBES)
    assert_inert(page)
    assert page.title == "Feature dashboard: s · layer 0 · topk n=8 k=2"
    for literal in (SCRIPT, IMG, TEMPLATE, FOLDER, EXPLANATION, f"bad answer {IMG}"):
        assert literal in page.text, f"{literal!r} is not shown literally"
    assert f"a{SCRIPT}{IMG}{TEMPLATE}↵" in page.probes["contexts"]


@pytest.mark.slow
def test_payloads_in_data_render_as_text_in_the_report_and_dashboards(payload_run, chromium):  # noqa: F811
    """End to end: the payloads travel from the corpus, the config and the LLM through the stages into the
    report and the dashboards it links to."""
    run, title = payload_run["dir"], payload_run["config"]["report"]["title"]
    report = inspect(chromium, run / "reports/report.html", PROBES)
    assert_inert(report)
    assert report.title == title  # the <title> shows the configured text as typed
    for literal in (SCRIPT, IMG, TEMPLATE, FOLDER, f"llm {SCRIPT}"):  # title, dataset path, LLM model name
        assert literal in report.text, f"{literal!r} is not shown literally in the report"
    dashboards = [path for path in local_targets(report).values() if "latents" in path.parts]
    assert dashboards, "the report links to no dashboard"
    for path in dashboards:
        page = inspect(chromium, path, PROBES)
        assert_inert(page)
        assert EXPLANATION in page.text, "the LLM explanation is not shown literally"
        for literal in (SCRIPT, IMG, TEMPLATE):
            assert literal in page.probes["contexts"], f"{literal!r} is not shown literally in the contexts"


@pytest.mark.slow
def test_the_api_key_reaches_the_endpoint_but_no_file(payload_run):
    """The key is sent (so this test can fail) yet absent from data/, logs/, reports/ and .snakemake/."""
    assert payload_run["authorizations"] and set(payload_run["authorizations"]) == {f"Bearer {KEY}"}
    files = [p for p in Path(payload_run["dir"]).rglob("*") if p.is_file()]
    leaked = [p for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_a_model_path_with_shell_syntax_reaches_the_job_as_one_argument(tmp_path):
    """Paths from the config go into shell commands quoted: a folder named like a command injection is loaded
    as a folder, and the command it spells never runs."""
    from test_workflow import snakemake

    files = write_texts(tmp_path / "text", TEXT)
    pwned = tmp_path / "PWNED"
    model = random_gpt2(tmp_path / f"m x;touch {pwned};#", files)
    cfg = {"subjects": {"odd": {"model": model, "layers": [1], "ctx_len": 16, "train_tokens": 1024,
                                "eval_tokens": 128, "revision": "main;touch PWNED",
                                "dataset": {"path": "text", "data_files": files}}}}
    res = snakemake(tmp_path, "--printshellcmds", "data/activations/odd.zarr", config=cfg)
    assert not pwned.exists() and not (tmp_path / "PWNED").exists()
    assert (tmp_path / "data/activations/odd.zarr/zarr.json").is_file()
    assert "'" + model + "'" in res.stdout + res.stderr  # the printed command quotes it
