"""Autointerp: prompts, parsing and metrics as pure functions; the pipeline end to end over real HTTP,
against a tiny random transformers model and against a scripted explainer/scorer."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter

import pytest
import torch

from saescale.config import ConfigError
from saescale.interpret.autointerp import (
    BackendError,
    Cache,
    OpenAIBackend,
    ParseError,
    TransformersBackend,
    detection_messages,
    detection_metrics,
    detection_set,
    explainer_messages,
    make_backend,
    parse_detection,
    parse_explanation,
    run_autointerp,
    summarize,
)
from saescale.interpret.server import make_server

WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "glass",
         "chair", "music", "paper", "smile", "train", "ocean", "grass", "house"]
SENTINEL = "sk-SENTINEL-do-not-leak-1234567890"


def make_record(latent: int, trigger: str, seed: int, n_top: int = 30, n_random: int = 10, n_neg: int = 30,
                length: int = 10) -> dict:
    """A latent that fires exactly on `trigger`, which never occurs in its non-activating contexts."""
    rng = random.Random(seed)

    def example(fires: bool) -> dict:
        words = [rng.choice(WORDS) for _ in range(length)]
        center = rng.randrange(length)
        if fires:
            words[center] = trigger
        acts = [round(rng.uniform(0.5, 3.0), 3) if fires and i == center else 0.0 for i in range(length)]
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return {"tokens": tokens, "acts": acts, "center": center, "activation": max(acts)}

    top = sorted((example(True) for _ in range(n_top)), key=lambda e: -e["activation"])
    return {"latent": latent, "frequency": 0.01, "top_examples": top,
            "random_examples": [example(True) for _ in range(n_random)],
            "negative_examples": [example(False) for _ in range(n_neg)]}


@contextlib.contextmanager
def serving(backend):
    server = make_server(backend, "127.0.0.1", 0, model_name="test-model")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random 1-layer GPT-2 with a byte-level BPE trained here: it answers, but never sensibly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescale.subject import load_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_lm")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS + ["zebra", "the", "a", "def", "(", ")"]) for _ in range(12))
             for _ in range(300)]
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    train_tokenizer(str(corpus), 400, str(folder))
    tok = load_tokenizer(str(folder))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=1024,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


class ScriptedModel:
    """A deterministic explainer and scorer. As explainer: 'perfect' names the most often marked token,
    'random' a word picked at random. As scorer: 1 for each excerpt containing the quoted word."""

    def __init__(self, mode: str):
        self.mode = mode
        self.rng = random.Random(1)

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        user = messages[-1]["content"]
        asked = re.match(r"Explanation: (.*)", user)
        if asked is None:
            marked = Counter(re.findall(r"<<(\w+)>>", user)).most_common(1)[0][0]
            return f'the word "{marked if self.mode == "perfect" else self.rng.choice(WORDS)}"'
        word = re.search(r'"(\w+)"', asked.group(1)).group(1)
        excerpts = re.findall(r"^\d+\. (.*)$", user, flags=re.MULTILINE)
        return json.dumps([int(word in re.findall(r"\w+", line)) for line in excerpts])


# --------------------------------------------------------------------------- metrics and parsing

def test_detection_metrics_known_answers():
    labels = [1, 1, 0, 0]
    assert detection_metrics([1, 1, 0, 0], labels) == {"accuracy": 1.0, "auroc": 1.0, "n": 4}
    assert detection_metrics([0, 0, 1, 1], labels) == {"accuracy": 0.0, "auroc": 0.0, "n": 4}
    assert detection_metrics([1, 1, 1, 1], labels)["auroc"] == 0.5
    # 0.9 beats 0.6 and 0.1, 0.4 beats only 0.1: 3 of 4 pairs; predictions [1, 0, 1, 0] right twice
    assert detection_metrics([0.9, 0.4, 0.6, 0.1], labels) == {"accuracy": 0.5, "auroc": 0.75, "n": 4}
    # ties between classes count 1/2: pairs (1>0)=1, (1 vs 1)=0.5, (0 vs 0)=0.5, (0<1)=0 -> 2/4
    assert detection_metrics([1, 0, 0, 1], labels)["auroc"] == 0.5
    assert detection_metrics([1, 0], [1, 1])["auroc"] is None


def test_parse_detection_accepts_exact_lists_and_rejects_the_rest():
    assert parse_detection("[1, 0, 1]", 3) == [1.0, 0.0, 1.0]
    assert parse_detection("Sure:\n```json\n[0, 1]\n```", 2) == [0.0, 1.0]
    for bad in ["[1, 0]", "[1, 0, 1, 1]", "1 0 1", "", "[1, 0, x]", "[1, 0, 2]", "[true, false, true]",
                '["1", "0", "1"]', "the the the"]:
        with pytest.raises(ParseError):
            parse_detection(bad, 3)


def test_parse_explanation_takes_one_clean_line():
    assert parse_explanation('  Explanation: "the word zebra"\nand more') == "the word zebra"
    assert parse_explanation("\n\nopening parentheses in code\n") == "opening parentheses in code"
    assert parse_explanation('the word "zebra"') == 'the word "zebra"'  # inner quotes are kept
    for bad in ["", "   \n  ", "!!", "x" * 300, "12 34"]:
        with pytest.raises(ParseError):
            parse_explanation(bad)


def test_explainer_prompt_marks_activating_tokens_and_keeps_text_verbatim():
    ex = {"tokens": ["def", " foo", "(", "x", ")", ":\n", '    return {"a": 1}'],
          "acts": [0.0, 1.5, 0.0, 0.7, 0.0, 0.0, 0.0], "center": 1, "activation": 1.5}
    record = {"latent": 3, "top_examples": [ex], "random_examples": [], "negative_examples": []}
    prompt = explainer_messages(record, n_top=5, n_random=5)[-1]["content"]
    assert 'def <<foo>>(<<x>>):\\n    return {"a": 1}' in prompt  # newline shown, quotes/braces untouched
    assert "<<def>>" not in prompt and "<<(>>" not in prompt
    scorer_prompt = detection_messages("calls", [ex["tokens"]])[-1]["content"]
    assert "<<" not in scorer_prompt and '1. def foo(x):\\n    return {"a": 1}' in scorer_prompt


def test_scorer_never_sees_the_explainers_examples():
    record = make_record(0, "zebra", seed=0)
    cfg = {"n_top": 10, "n_random": 5, "n_score_pos": 100, "n_score_neg": 8}
    contexts, labels = detection_set(record, cfg, random.Random(0))
    shown = [ex["tokens"] for ex in record["top_examples"][:10] + record["random_examples"][:5]]
    assert sum(labels) == 25 and labels.count(0) == 8  # every held-out positive, 8 negatives
    assert not any(c in shown for c in contexts)
    record["random_examples"][7] = record["top_examples"][0]  # a random example repeating a shown one
    contexts, labels = detection_set(record, cfg, random.Random(0))
    assert sum(labels) == 24 and record["top_examples"][0]["tokens"] not in contexts


def test_summarize_averages_successes_only():
    results = [{"status": "ok", "accuracy": 1.0, "auroc": 1.0}, {"status": "ok", "accuracy": 0.5, "auroc": 0.5},
               {"status": "failed", "accuracy": None, "auroc": None}]
    assert summarize(results) == {"n_latents": 3, "n_ok": 2, "n_failed": 1, "mean_accuracy": 0.75,
                                  "mean_auroc": 0.75}


def test_make_backend_errors_name_the_config_key():
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.base_url is required for backend openai"):
        make_backend({"backend": "openai", "model": "m"})
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.model is required"):
        make_backend({"backend": "transformers"})
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.backend: 'gpt'"):
        make_backend({"backend": "gpt"})
    backend = make_backend({"backend": "openai", "model": "m", "base_url": "http://h:1/v1/"})
    assert backend.identity == "openai:m@http://h:1/v1"


# --------------------------------------------------------------------------- over HTTP

def test_transformers_backend_returns_text(tiny_model):
    backend = TransformersBackend(tiny_model)
    messages = [{"role": "user", "content": "the apple"}]
    assert isinstance(backend.complete(messages, max_tokens=8, temperature=0.0), str)
    assert isinstance(backend.complete(messages, max_tokens=8, temperature=0.7), str)


def test_random_scorer_output_is_failed_not_scored_and_a_rerun_is_all_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCALE_TEST_KEY", SENTINEL)
    records = [make_record(i, "zebra", seed=i, n_top=6, n_random=2, n_neg=6, length=6) for i in range(3)]
    cfg = {"latents": 2, "max_retries": 1, "n_top": 3, "n_random": 1, "n_score_pos": 3, "n_score_neg": 3,
           "max_tokens": 16, "temperature": 0.0}
    with serving(ScriptedModel("perfect")) as explainer_server, serving(TransformersBackend(tiny_model)) as server:
        explainer = OpenAIBackend(explainer_server.base_url, "scripted", api_key_env="SAESCALE_TEST_KEY")
        scorer = OpenAIBackend(server.base_url, "tiny", api_key_env="SAESCALE_TEST_KEY")
        results = run_autointerp(records, explainer, Cache(tmp_path / "cache"), cfg, scorer=scorer)
        calls = explainer_server.request_count + server.request_count
        again = run_autointerp(records, explainer, Cache(tmp_path / "cache"), cfg, scorer=scorer)
        assert explainer_server.request_count + server.request_count == calls  # all from the cache
    assert again == results
    assert [r["latent"] for r in results] == [0, 1]
    for r in results:
        assert r["explanation"] == 'the word "zebra"' and r["status"] == "failed"
        assert r["error"].startswith("detection attempt 2:")  # first try and one retry, both unparseable
        assert r["accuracy"] is None and r["auroc"] is None and r["n_scored"] == 0
        assert r["attempts"] == 3 == len(set(r["prompt_hashes"]))
    assert server.request_count == 4 and explainer_server.request_count == 2
    assert summarize(results)["n_failed"] == 2 and summarize(results)["mean_accuracy"] is None
    files = list((tmp_path / "cache").rglob("*"))
    assert not any(f.name.endswith(".tmp") for f in files)
    assert not any(SENTINEL in f.read_text() for f in files if f.is_file())
    assert SENTINEL not in json.dumps(results)


def test_unusable_explanation_is_retried_then_failed(tiny_model, tmp_path):
    records = [make_record(0, "zebra", seed=0, n_top=6, n_random=2, n_neg=6, length=6)]
    cfg = {"max_retries": 2, "n_top": 3, "n_random": 1, "max_tokens": 16}
    with serving(TransformersBackend(tiny_model)) as server:
        [r] = run_autointerp(records, OpenAIBackend(server.base_url, "tiny"), Cache(tmp_path), cfg)
    assert r["status"] == "failed" and r["explanation"] is None and r["accuracy"] is None
    assert r["error"].startswith("explainer attempt 3:") and r["attempts"] == server.request_count == 3


def test_perfect_explainer_separates_from_random_explainer(tmp_path):
    records = [make_record(i, trigger, seed=10 + i) for i, trigger in enumerate(["zebra", "violin", "comet"])]
    cfg = {"n_top": 10, "n_random": 5, "n_score_pos": 20, "n_score_neg": 20, "seed": 0}
    summaries = {}
    for mode in ["perfect", "random"]:
        with serving(ScriptedModel(mode)) as server:
            backend = OpenAIBackend(server.base_url, f"scripted-{mode}")
            results = run_autointerp(records, backend, Cache(tmp_path / mode), cfg)
        assert all(r["status"] == "ok" and r["n_scored"] == 40 for r in results)
        summaries[mode] = summarize(results)
    assert summaries["perfect"]["mean_accuracy"] == 1.0 and summaries["perfect"]["mean_auroc"] == 1.0
    assert 0.3 < summaries["random"]["mean_accuracy"] < 0.7 and 0.3 < summaries["random"]["mean_auroc"] < 0.7


def test_server_rejects_malformed_requests_and_lists_its_model():
    with serving(ScriptedModel("perfect")) as server:
        for body in [b"{not json", b"[]", b'{"messages": []}', b'{"messages": [{"role": "user"}]}',
                     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}']:
            request = urllib.request.Request(server.base_url + "/chat/completions", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == 400 and "message" in json.loads(err.value.read())["error"]
        with urllib.request.urlopen(server.base_url + "/models", timeout=5) as response:
            assert json.loads(response.read())["data"][0]["id"] == "test-model"


def test_backend_errors_name_the_endpoint_but_not_the_key(monkeypatch):
    monkeypatch.setenv("SAESCALE_TEST_KEY", SENTINEL)
    messages = [{"role": "user", "content": "hi"}]
    with serving(ScriptedModel("perfect")) as server:
        wrong_path = OpenAIBackend(server.base_url + "/nowhere", "m", api_key_env="SAESCALE_TEST_KEY")
        with pytest.raises(BackendError, match="HTTP 404") as err:
            wrong_path.complete(messages, 8, 0.0)
        assert wrong_path.url in str(err.value) and SENTINEL not in str(err.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", api_key_env="SAESCALE_TEST_KEY", timeout=2)
    with pytest.raises(BackendError, match=f"cannot reach http://127.0.0.1:{port}/v1") as err:
        closed.complete(messages, 8, 0.0)
    assert SENTINEL not in str(err.value)


def test_server_command_serves_a_local_model(tiny_model):
    """`python -m saescale.interpret.server --model PATH --port 0` logs its address and answers."""
    command = [sys.executable, "-m", "saescale.interpret.server", "--model", tiny_model, "--port", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if match := re.search(r"serving .* at (http://\S+)", line):
                break
        else:
            pytest.fail(f"the server exited with {proc.wait()} before serving")
        backend = OpenAIBackend(match.group(1), "tiny")
        assert isinstance(backend.complete([{"role": "user", "content": "hi"}], 4, 0.0), str)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
