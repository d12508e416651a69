"""Autointerp: prompts, parsing, metrics and backoff as pure functions; the pipeline end to end through the
`openai` client over real HTTP, against a scripted explainer/scorer served by a fake OpenAI-compatible endpoint
(which can refuse with 429 / Retry-After or fail for chosen latents), and in process against a tiny random
transformers model."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from saescale.config import ConfigError
from saescale.interpret.autointerp import (
    UNSCORABLE,
    BackendError,
    Backoff,
    Cache,
    OpenAIBackend,
    ParseError,
    TransformersBackend,
    TransientError,
    backoff_delay,
    call_with_backoff,
    detection_messages,
    detection_metrics,
    detection_set,
    explainer_messages,
    make_backend,
    next_round,
    parse_detection,
    parse_explanation,
    retry_after_seconds,
    run_autointerp,
    summarize,
)

WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "glass",
         "chair", "music", "paper", "smile", "train", "ocean", "grass", "house"]
SENTINEL = "sk-SENTINEL-do-not-leak-1234567890"
NO_WAIT = Backoff(attempts=3, initial=0.0, max_delay=0.0, max_total=0.0)
ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- a fake OpenAI-compatible endpoint

class Reply(Exception):
    """Raised by a served model: the endpoint answers this status, headers and error message instead."""

    def __init__(self, status: int, message: str = "refused", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class LLMServer(ThreadingHTTPServer):
    """POST /v1/chat/completions in front of anything with `complete(messages, max_tokens, temperature)`.
    Counts requests and keeps each request's last message and Authorization header, for the tests."""

    daemon_threads = True

    def __init__(self, model):
        super().__init__(("127.0.0.1", 0), LLMHandler)
        self.model = model
        self.request_count = 0
        self.prompts: list[str] = []
        self.authorizations: list[str | None] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class LLMHandler(BaseHTTPRequestHandler):
    server: LLMServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with self.server.lock:
            self.server.request_count += 1
            self.server.prompts.append(body["messages"][-1]["content"])
            self.server.authorizations.append(self.headers.get("Authorization"))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route POST {self.path}"}})
        try:
            text = self.server.model.complete(body["messages"], body["max_tokens"], body["temperature"])
        except Reply as r:
            return self._send(r.status, {"error": {"message": r.message}}, r.headers)
        except Exception as e:  # noqa: BLE001 (a scripted model's bug: a 500 naming it, as a real server)
            return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]})

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass


@contextlib.contextmanager
def serving(model):
    """`model` behind a local OpenAI-compatible endpoint (`.base_url`, `.request_count`, `.authorizations`)."""
    server = LLMServer(model)
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
               {"status": "failed", "accuracy": None, "auroc": None, "retry": True}]
    assert summarize(results) == {"n_latents": 3, "n_ok": 2, "n_failed": 1, "n_retry": 1, "mean_accuracy": 0.75,
                                  "mean_auroc": 0.75}


def test_make_backend_errors_name_the_config_key():
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.base_url is required for backend openai"):
        make_backend({"backend": "openai", "model": "m"})
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.model is required"):
        make_backend({"backend": "transformers"})
    with pytest.raises(ConfigError, match=r"config\.interpret\.autointerp\.backend: 'gpt'"):
        make_backend({"backend": "gpt"})
    backend = make_backend({"backend": "openai", "model": "m", "base_url": "http://h:1/v1/",
                            "backoff": {"attempts": 2, "max_total": 9}})
    assert backend.identity == "openai:m@http://h:1/v1"
    assert backend.backoff == Backoff(attempts=2, initial=1.0, max_delay=60.0, max_total=9)


# --------------------------------------------------------------------------- the openai package is optional

def test_openai_is_an_optional_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(re.match(r"openai\b", d) for d in project["dependencies"])
    assert any(re.match(r"openai\s*>=", d) for d in project["optional-dependencies"]["autointerp"])


def test_without_openai_the_module_loads_and_the_openai_backend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(ConfigError) as err:
        make_backend({"backend": "openai", "model": "m", "base_url": "http://h:1/v1"})
    assert "config.interpret.autointerp.backend" in str(err.value)
    assert "pip install 'saescale[autointerp]'" in str(err.value)
    code = ("import sys; sys.modules['openai'] = None; import saescale.cli, saescale.interpret.autointerp as a; "
            "print(a.TransformersBackend.__name__)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "TransformersBackend"


# --------------------------------------------------------------------------- backoff

def test_backoff_doubles_with_equal_jitter_up_to_the_cap_and_never_undercuts_retry_after():
    policy = Backoff(attempts=10, initial=1.0, max_delay=8.0, max_total=100.0)
    assert [backoff_delay(i, policy, None, 0.0) for i in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [backoff_delay(i, policy, None, 0.999999) for i in range(1, 6)] == pytest.approx([1, 2, 4, 8, 8])
    assert backoff_delay(1, policy, 30.0, 0.5) == 30.0  # the server's wait wins over a shorter backoff
    assert backoff_delay(5, policy, 0.0, 0.5) == 6.0


def test_retry_after_reads_seconds_milliseconds_and_http_dates():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds({"Retry-After": "7"}, now) == 7.0
    assert retry_after_seconds({"retry-after-ms": "1500", "Retry-After": "7"}, now) == 1.5
    assert retry_after_seconds({"Retry-After": format_datetime(now + timedelta(seconds=42), usegmt=True)}, now) == 42
    assert retry_after_seconds({"Retry-After": "Wed, 01 Jan 2025 11:00:00 GMT"}, now) == 0.0  # in the past
    assert retry_after_seconds({"Retry-After": "soon"}, now) is None
    assert retry_after_seconds({"Retry-After": "-3"}, now) == 0.0
    assert retry_after_seconds({}, now) is None


def test_backoff_caps_requests_and_total_wait_and_passes_other_errors_at_once():
    waits: list[float] = []
    calls = []

    def always(error):
        def call():
            calls.append(1)
            raise error
        return call

    policy = Backoff(attempts=4, initial=1.0, max_delay=60.0, max_total=100.0)
    with pytest.raises(BackendError, match=r"gave up after 4 requests.*backoff\.attempts") as err:
        call_with_backoff(always(TransientError("HTTP 503")), policy, waits.append, lambda: 0.5)
    assert not isinstance(err.value, TransientError) and len(calls) == 4 and waits == [0.75, 1.5, 3.0]

    waits.clear(), calls.clear()
    tight = Backoff(attempts=10, initial=4.0, max_delay=60.0, max_total=10.0)
    with pytest.raises(BackendError, match=r"asks to wait 30\.0 s.*backoff\.max_total"):
        call_with_backoff(always(TransientError("HTTP 429", retry_after=30.0)), tight, waits.append)
    assert len(calls) == 1 and waits == []  # a Retry-After past the budget fails at once, without sleeping
    with pytest.raises(BackendError, match="gave up"):
        call_with_backoff(always(TransientError("HTTP 503")), tight, waits.append, lambda: 0.999)
    assert sum(waits) == pytest.approx(10.0)  # the last wait is cut to what is left

    calls.clear()
    with pytest.raises(BackendError, match="HTTP 401"):
        call_with_backoff(always(BackendError("HTTP 401")), policy, waits.append)
    assert len(calls) == 1


class Flaky:
    """Answers `replies` in turn (each a Reply to raise or a text), then `then` forever."""

    def __init__(self, replies: list, then: str = "fine"):
        self.replies, self.then = list(replies), then

    def complete(self, messages, max_tokens, temperature) -> str:
        reply = self.replies.pop(0) if self.replies else self.then
        if isinstance(reply, Reply):
            raise reply
        return reply


def test_429_with_retry_after_then_200_is_waited_out_through_the_openai_client():
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    replies = [Reply(429, "slow down", {"Retry-After": "2"}), Reply(503, "busy", {"Retry-After": later}),
               Reply(500, "oops")]
    waits: list[float] = []
    with serving(Flaky(replies)) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env=None, sleep=waits.append,
                                backoff=Backoff(attempts=4, initial=0.25, max_delay=1.0, max_total=60.0))
        assert backend.complete([{"role": "user", "content": "hi"}], 8, 0.0) == "fine"
        assert server.request_count == 4  # the openai client's own retries are off: each request is ours
    assert waits[0] == 2.0 and 1.0 <= waits[1] <= 3.0 and 0.5 <= waits[2] <= 1.0


def test_a_refusal_that_outlasts_the_attempts_is_a_backend_error(monkeypatch):
    with serving(Flaky([Reply(429, "quota")] * 5)) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env=None, sleep=lambda s: None,
                                backoff=Backoff(attempts=2, initial=0.0, max_delay=0.0, max_total=0.0))
        with pytest.raises(BackendError, match=r"HTTP 429.*quota.*gave up after 2 requests"):
            backend.complete([{"role": "user", "content": "hi"}], 8, 0.0)
        assert server.request_count == 2


def test_backend_errors_name_the_endpoint_but_not_the_key(monkeypatch):
    monkeypatch.setenv("SAESCALE_TEST_KEY", SENTINEL)
    messages = [{"role": "user", "content": "hi"}]

    class Echo:  # a server that quotes the rejected key back, as some do
        def complete(self, messages, max_tokens, temperature):
            raise Reply(401, f"invalid key {SENTINEL}")

    with serving(ScriptedModel("perfect")) as server:
        wrong_path = OpenAIBackend(server.base_url + "/nowhere", "m", api_key_env="SAESCALE_TEST_KEY")
        with pytest.raises(BackendError, match="HTTP 404") as err:
            wrong_path.complete(messages, 8, 0.0)
        assert wrong_path.url in str(err.value) and SENTINEL not in str(err.value)
        assert server.request_count == 1  # a 404 is not retried
    with serving(Echo()) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env="SAESCALE_TEST_KEY")
        with pytest.raises(BackendError, match=r"HTTP 401 \(is \$SAESCALE_TEST_KEY set") as err:
            backend.complete(messages, 8, 0.0)
        assert SENTINEL not in str(err.value) and "<redacted>" in str(err.value)
        assert server.authorizations == [f"Bearer {SENTINEL}"]  # sent, once
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", api_key_env="SAESCALE_TEST_KEY", timeout=2,
                           backoff=NO_WAIT, sleep=lambda s: None)
    with pytest.raises(BackendError, match=f"cannot reach http://127.0.0.1:{port}/v1.*gave up after 3") as err:
        closed.complete(messages, 8, 0.0)
    assert SENTINEL not in str(err.value) and repr(closed) == f"OpenAIBackend('openai:m@http://127.0.0.1:{port}/v1')"


# --------------------------------------------------------------------------- failed latents, next runs

class Breakable(ScriptedModel):
    """ScriptedModel('perfect') that, for prompts about a word in `fail` (a set the test edits between
    runs), answers HTTP 503 (`how="http"`) or an unparseable detection answer (`how="garbage"`)."""

    def __init__(self, fail: set[str], how: str):
        super().__init__("perfect")
        self.fail, self.how = fail, how

    def complete(self, messages, max_tokens, temperature) -> str:
        user = messages[-1]["content"]
        hit = any(f"<<{w}>>" in user or f'"{w}"' in user for w in self.fail)
        if hit and self.how == "http":
            raise Reply(503, "overloaded")
        if hit and self.how == "garbage" and user.startswith("Explanation:"):
            return "I cannot tell."
        return super().complete(messages, max_tokens, temperature)


TRIGGERS = ["zebra", "violin", "comet"]
SMALL = {"n_top": 4, "n_random": 2, "n_score_pos": 4, "n_score_neg": 4, "max_tokens": 16}


def requested_words(server, start: int) -> set[str]:
    return {w for prompt in server.prompts[start:] for w in TRIGGERS if f"<<{w}>>" in prompt or f'"{w}"' in prompt}


def test_latents_failed_by_the_endpoint_are_asked_again_next_run_and_only_they(tmp_path):
    records = [make_record(i, w, seed=20 + i, n_top=10, n_random=3, n_neg=6) for i, w in enumerate(TRIGGERS)]
    model = Breakable({"violin"}, "http")
    with serving(model) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env=None, backoff=NO_WAIT, sleep=lambda s: None)
        first = run_autointerp(records, backend, Cache(tmp_path), SMALL)
        assert [r["status"] for r in first] == ["ok", "failed", "ok"]
        failed = first[1]
        assert "HTTP 503" in failed["error"] and "overloaded" in failed["error"] and failed["retry"]
        assert failed["attempts"] == 1  # a backend error ends the stage; its retries were the backoff's
        assert server.request_count == 2 + 3 + 2  # two per good latent, three 503s for violin
        assert summarize(first)["n_retry"] == 1

        model.fail.clear()  # the endpoint recovers
        seen = server.request_count
        second = run_autointerp(records, backend, Cache(tmp_path), SMALL)
        assert requested_words(server, seen) == {"violin"} and server.request_count - seen == 2
        assert [r["status"] for r in second] == ["ok"] * 3 and [r["reused"] for r in second] == [True, False, True]
        assert second[1]["round"] == 1 and second[0] == {**first[0], "reused": True}

        seen = server.request_count
        third = run_autointerp(records, backend, Cache(tmp_path), SMALL)
        assert server.request_count == seen and all(r["reused"] for r in third)


def test_unparseable_answers_get_new_attempts_on_later_runs_up_to_retry_runs(tmp_path):
    records = [make_record(i, w, seed=30 + i, n_top=10, n_random=3, n_neg=6) for i, w in enumerate(TRIGGERS)]
    cfg = {**SMALL, "max_retries": 1, "retry_runs": 2}
    model = Breakable({"comet"}, "garbage")
    with serving(model) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env=None, backoff=NO_WAIT)
        first = run_autointerp(records, backend, Cache(tmp_path), cfg)
        assert first[2]["status"] == "failed" and first[2]["error"].startswith("detection attempt 2:")
        assert first[2]["explanation"] == 'the word "comet"' and first[2]["retry"]

        seen = server.request_count  # the model still fails: cached answers replay free, then 2 new attempts
        second = run_autointerp(records, backend, Cache(tmp_path), cfg)
        assert server.request_count - seen == 2 and requested_words(server, seen) == {"comet"}
        assert second[2]["error"].startswith("detection attempt 4:") and second[2]["attempts"] == 1 + 4

        seen = server.request_count  # round 2 = retry_runs: the last one
        third = run_autointerp(records, backend, Cache(tmp_path), cfg)
        assert server.request_count - seen == 2 and third[2]["round"] == 2 and not third[2]["retry"]
        assert summarize(third)["n_retry"] == 0 and summarize(third)["n_failed"] == 1

        model.fail.clear()
        seen = server.request_count  # retry_runs used up: kept as failed, not asked again
        fourth = run_autointerp(records, backend, Cache(tmp_path), cfg)
        assert server.request_count == seen and fourth[2]["status"] == "failed" and fourth[2]["reused"]

        seen = server.request_count  # a larger retry_runs gives it another run, which now succeeds
        fifth = run_autointerp(records, backend, Cache(tmp_path), {**cfg, "retry_runs": 3})
        assert fifth[2]["status"] == "ok" and fifth[2]["round"] == 3 and server.request_count - seen == 1


def test_a_record_that_cannot_be_scored_is_final_and_never_requested(tmp_path):
    record = make_record(0, "zebra", seed=0, n_top=4, n_random=0, n_neg=0)
    with serving(ScriptedModel("perfect")) as server:
        backend = OpenAIBackend(server.base_url, "m", api_key_env=None)
        for _ in range(2):
            [r] = run_autointerp([record], backend, Cache(tmp_path), SMALL)
            assert r["error"] == UNSCORABLE and not r["retry"]
        assert server.request_count == 0


def test_next_round_moves_on_only_while_failed_latents_are_left(tmp_path):
    summary = tmp_path / "s.json"
    assert next_round(summary) == 0  # no run yet
    summary.write_text(json.dumps({"round": 0, "n_failed": 0, "n_retry": 0}))
    assert next_round(summary) == 0  # the param Snakemake recorded: nothing to rerun
    summary.write_text(json.dumps({"round": 2, "n_failed": 3, "n_retry": 1}))
    assert next_round(summary) == 3
    summary.write_text(json.dumps({"round": 2, "n_failed": 3, "n_retry": 0}))
    assert next_round(summary) == 2  # failures that are not retried do not rerun the job
    summary.write_text("{not json")
    assert next_round(summary) == 0


# --------------------------------------------------------------------------- end to end

def test_transformers_backend_returns_text(tiny_model):
    backend = TransformersBackend(tiny_model)
    messages = [{"role": "user", "content": "the apple"}]
    assert isinstance(backend.complete(messages, max_tokens=8, temperature=0.0), str)
    assert isinstance(backend.complete(messages, max_tokens=8, temperature=0.7), str)


class Counting:
    """A backend wrapper that counts completions."""

    def __init__(self, backend):
        self.backend, self.identity, self.calls = backend, backend.identity, 0

    def complete(self, *args) -> str:
        self.calls += 1
        return self.backend.complete(*args)


def test_random_scorer_output_is_failed_not_scored_and_the_key_is_never_written(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCALE_TEST_KEY", SENTINEL)
    records = [make_record(i, "zebra", seed=i, n_top=6, n_random=2, n_neg=6, length=6) for i in range(3)]
    cfg = {"latents": 2, "max_retries": 1, "retry_runs": 0, "n_top": 3, "n_random": 1, "n_score_pos": 3,
           "n_score_neg": 3, "max_tokens": 16, "temperature": 0.0}
    scorer = Counting(TransformersBackend(tiny_model))  # in process: the offline path
    with serving(ScriptedModel("perfect")) as explainer_server:
        explainer = OpenAIBackend(explainer_server.base_url, "scripted", api_key_env="SAESCALE_TEST_KEY")
        results = run_autointerp(records, explainer, Cache(tmp_path / "cache"), cfg, scorer=scorer)
        again = run_autointerp(records, explainer, Cache(tmp_path / "cache"), cfg, scorer=scorer)
        assert explainer_server.request_count == 2 and scorer.calls == 4  # retry_runs 0: nothing asked again
        assert set(explainer_server.authorizations) == {f"Bearer {SENTINEL}"}
    assert again == [{**r, "reused": True} for r in results]
    assert [r["latent"] for r in results] == [0, 1]
    for r in results:
        assert r["explanation"] == 'the word "zebra"' and r["status"] == "failed" and not r["retry"]
        assert r["error"].startswith("detection attempt 2:")  # first try and one retry, both unparseable
        assert r["accuracy"] is None and r["auroc"] is None and r["n_scored"] == 0
        assert r["attempts"] == 3 == len(set(r["prompt_hashes"]))
    assert summarize(results)["n_failed"] == 2 and summarize(results)["mean_accuracy"] is None
    files = list((tmp_path / "cache").rglob("*"))
    assert any("latents" in f.parts for f in files) and any(len(f.parent.name) == 2 for f in files)
    assert not any(f.name.endswith(".tmp") for f in files)
    assert not any(SENTINEL in f.read_text() for f in files if f.is_file())
    assert SENTINEL not in json.dumps(results)


def test_unusable_explanation_is_retried_then_failed(tiny_model, tmp_path):
    records = [make_record(0, "zebra", seed=0, n_top=6, n_random=2, n_neg=6, length=6)]
    cfg = {"max_retries": 2, "n_top": 3, "n_random": 1, "max_tokens": 16}
    backend = Counting(TransformersBackend(tiny_model))
    [r] = run_autointerp(records, backend, Cache(tmp_path), cfg)
    assert r["status"] == "failed" and r["explanation"] is None and r["accuracy"] is None
    assert r["error"].startswith("explainer attempt 3:") and r["attempts"] == backend.calls == 3


def test_perfect_explainer_separates_from_random_explainer(tmp_path):
    records = [make_record(i, trigger, seed=10 + i) for i, trigger in enumerate(["zebra", "violin", "comet"])]
    cfg = {"n_top": 10, "n_random": 5, "n_score_pos": 20, "n_score_neg": 20, "seed": 0}
    summaries = {}
    for mode, workers in [("perfect", 3), ("random", 1)]:  # one client, three threads; a seeded random order
        with serving(ScriptedModel(mode)) as server:
            backend = OpenAIBackend(server.base_url, f"scripted-{mode}", api_key_env=None)
            results = run_autointerp(records, backend, Cache(tmp_path / mode), {**cfg, "workers": workers})
        assert all(r["status"] == "ok" and r["n_scored"] == 40 for r in results)
        summaries[mode] = summarize(results)
    assert summaries["perfect"]["mean_accuracy"] == 1.0 and summaries["perfect"]["mean_auroc"] == 1.0
    assert 0.3 < summaries["random"]["mean_accuracy"] < 0.7 and 0.3 < summaries["random"]["mean_auroc"] < 0.7
