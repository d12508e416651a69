"""Automated interpretability: an LLM explains each latent from its activating contexts, and a scorer LLM
is tested on that explanation by detection (Bills et al. 2023; EleutherAI's sae-auto-interp).

Detection: the scorer sees the explanation and a shuffled, unmarked mix of held-out activating contexts
(never the ones the explainer saw) and non-activating ones, and answers a JSON list of 0/1, one per
context. Accuracy (threshold 0.5) and AUROC of those answers against the truth are the latent's score.
A response that cannot be parsed is retried, then recorded as failed: it is never scored.

Requests go through the `openai` client (an optional extra: `pip install 'saescale[autointerp]'`) to any
OpenAI-compatible endpoint: a hosted API, `vllm serve`, `transformers serve`. A transient failure (HTTP 429,
408, 409, 5xx, a timeout, a refused connection) is retried with exponential backoff and jitter, waiting at
least the server's `Retry-After`. A latent that still fails is recorded as failed with the error and tried
again on the next run; a latent that succeeded is kept and never requested again.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from saescale.config import ConfigError

log = logging.getLogger("saescale.interpret")

CONFIG_KEY = "config.interpret.autointerp"
INSTALL = "pip install 'saescale[autointerp]'  (or: pip install 'openai>=1.30')"
DEFAULTS: dict[str, Any] = {
    "latents": None,       # None: every record; an int: the first N records; a list: these latent ids
    "max_retries": 2,      # extra attempts after an unparseable response, per stage and run
    "n_top": 8,            # top-activating examples shown to the explainer
    "n_random": 4,         # random activating examples shown to the explainer
    "n_score_pos": 10,     # held-out activating contexts shown to the scorer
    "n_score_neg": 10,     # non-activating contexts shown to the scorer
    "seed": 0,
    "max_tokens": 128,
    "temperature": 0.0,
    "workers": 1,          # latents in flight at once (an HTTP backend can serve several)
    "retry_runs": 3,       # later runs that try a failed latent again
}
PROMPT_KEYS = ("n_top", "n_random", "n_score_pos", "n_score_neg", "seed", "max_tokens", "temperature")
Messages = list[dict[str, str]]
T = TypeVar("T")
UNSCORABLE = "detection needs held-out activating and non-activating contexts; the record lacks one"


class BackendError(RuntimeError):
    """The model endpoint could not answer (network, HTTP status, bad payload); the message names it."""


class TransientError(BackendError):
    """A failure worth waiting out (rate limit, overload, timeout); `retry_after`: the server's wait (s)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ParseError(ValueError):
    """A model response that does not have the requested form."""


class Backend(Protocol):
    identity: str

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str: ...


# --------------------------------------------------------------------------- backoff

@dataclass(frozen=True)
class Backoff:
    """`interpret.autointerp.backoff`: requests per completion (the first included), the first wait and
    the cap on one wait (seconds, doubled per retry), and the cap on all waits of one completion."""

    attempts: int = 6
    initial: float = 1.0
    max_delay: float = 60.0
    max_total: float = 300.0


def backoff_delay(retry: int, policy: Backoff, retry_after: float | None, rand: float) -> float:
    """Seconds to wait before retry number `retry` (1 for the first): initial * 2^(retry-1) capped at
    max_delay, half of it fixed and half uniform in `rand` in [0, 1) ("equal jitter": clients refused
    together spread out, and none retries at once), and never less than the server's Retry-After."""
    base = min(policy.max_delay, policy.initial * 2 ** (retry - 1))
    delay = base / 2 + rand * base / 2
    return max(delay, retry_after) if retry_after is not None else delay


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """The wait a response asks for: `retry-after-ms` (OpenAI's), else `Retry-After` as seconds or as an
    HTTP date (RFC 9110 §10.2.3); None when absent or unreadable. A date in the past means no wait."""
    lower = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
            if math.isfinite(seconds):
                return max(0.0, seconds)
        except ValueError:
            pass
        if name == "retry-after":
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return None


def call_with_backoff(call: Callable[[], T], policy: Backoff, sleep: Callable[[float], None] = time.sleep,
                      rand: Callable[[], float] = random.random) -> T:
    """`call()`, retried after each TransientError up to policy.attempts requests and policy.max_total
    seconds of waiting; then the last error as a BackendError saying so. Other errors pass at once."""
    waited = 0.0
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except TransientError as e:
            remaining = policy.max_total - waited
            if attempt == policy.attempts:
                raise BackendError(f"{e} (gave up after {attempt} requests and {waited:.1f} s of waiting: "
                                   f"{CONFIG_KEY}.backoff.attempts)") from None
            if e.retry_after is not None and e.retry_after > remaining:
                raise BackendError(f"{e} (the server asks to wait {e.retry_after:.1f} s, more than the "
                                   f"{remaining:.1f} s left of {CONFIG_KEY}.backoff.max_total)") from None
            delay = min(backoff_delay(attempt, policy, e.retry_after, rand()), remaining)
            log.info("%s; retry %d of %d in %.1f s", e, attempt, policy.attempts - 1, delay)
            sleep(delay)
            waited += delay
    raise AssertionError("unreachable: policy.attempts >= 1")


# --------------------------------------------------------------------------- backends

def require_openai():
    """The `openai` module, or a ConfigError naming the key that asked for it and the install command."""
    try:
        import openai
    except ImportError:
        raise ConfigError(f"{CONFIG_KEY}.backend: 'openai' needs the openai package, which is not installed. "
                          f"Install it with: {INSTALL}") from None
    return openai


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, `transformers serve`) through the
    `openai` client, with our backoff in place of its own (`max_retries=0`) so that waits are configurable.

    The key is read from `api_key_env` when the client is first needed and held only inside the `openai`
    client: it is in no attribute of ours, so not in the identity, the cache, a result or a repr.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, backoff: Backoff | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.openai = require_openai()
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.backoff, self.sleep = backoff or Backoff(), sleep
        self.identity = f"openai:{model}@{self.base_url}"
        self._client = None
        self._lock = threading.Lock()
        for name in ("httpx", "httpx2"):  # the client's transport logs each request at INFO: a line per call
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.identity!r})"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def client(self):
        with self._lock:
            if self._client is None:
                # a local server needs no key, but the client insists on one: send a placeholder
                self._client = self.openai.OpenAI(base_url=self.base_url, api_key=self._key() or "no-key-set",
                                                  timeout=self.timeout, max_retries=0)
            return self._client

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        return call_with_backoff(lambda: self._request(messages, max_tokens, temperature), self.backoff,
                                 self.sleep)

    def _request(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        o, key = self.openai, self._key()
        try:
            response = self.client().chat.completions.create(model=self.model, messages=messages,
                                                             max_tokens=max_tokens, temperature=temperature)
        except o.APIStatusError as e:
            status = e.status_code
            hint = ""
            if status in (401, 403):
                hint = (f" (is ${self.api_key_env} set to a valid key?)" if key else
                        f" (${self.api_key_env} is not set: {CONFIG_KEY}.api_key_env names the variable)")
            message = _redact(f"{self.url} answered HTTP {status}{hint}: {e.response.text[:300]}", key)
            if status in (408, 409, 429) or status >= 500:
                raise TransientError(message, retry_after_seconds(e.response.headers)) from None
            raise BackendError(message) from None
        except o.APITimeoutError:
            raise TransientError(f"{self.url} did not answer within {self.timeout:g} s "
                                 f"({CONFIG_KEY}.timeout)") from None
        except o.APIConnectionError as e:
            raise TransientError(_redact(f"cannot reach {self.url}: {e.__cause__ or e}", key)) from None
        except o.APIError as e:  # e.g. an answer that is not JSON
            raise BackendError(_redact(f"{self.url} answered something unusable: {e}", key)) from None
        try:
            return response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise BackendError(f"{self.url} answered without choices[0].message.content") from None


def _redact(text: str, secret: str | None) -> str:
    """Servers sometimes echo the key they rejected; it must not reach a log or a results file."""
    return text.replace(secret, "<redacted>") if secret else text


class TransformersBackend:
    """A local causal LM in the job's own process: the offline path, no server needed. Chat template when
    the tokenizer has one, else a plain "role: content" transcript."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.identity = f"transformers:{model_path}"
        self._lock = threading.Lock()  # one generation at a time: a torch model is not re-entrant

    def prompt(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        import torch

        ids = self.tokenizer(self.prompt(messages), return_tensors="pt").input_ids
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit:  # a small model's window: keep the end of the prompt, where the request is
            max_tokens = min(max_tokens, limit - 1)
            if ids.shape[1] > limit - max_tokens:
                log.warning("prompt of %d tokens truncated to the last %d", ids.shape[1], limit - max_tokens)
                ids = ids[:, -(limit - max_tokens):]
        ids = ids.to(self.device)
        sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      pad_token_id=pad, **sample)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_backoff(cfg: dict) -> Backoff:
    return Backoff(**{**Backoff().__dict__, **(cfg.get("backoff") or {})})


def make_backend(cfg: dict) -> Backend:
    """Build the backend a `interpret.autointerp` config section names; errors name the key to fix."""
    def need(key: str) -> Any:
        if not cfg.get(key):
            raise ConfigError(f"{CONFIG_KEY}.{key} is required for backend {cfg.get('backend')}")
        return cfg[key]

    kind = cfg.get("backend")
    if kind == "openai":
        return OpenAIBackend(need("base_url"), need("model"), cfg.get("api_key_env", "OPENAI_API_KEY"),
                             cfg.get("timeout", 120.0), make_backoff(cfg))
    if kind == "transformers":
        return TransformersBackend(need("model"), cfg.get("device", "cpu"))
    raise ConfigError(f"{CONFIG_KEY}.backend: {kind!r} is not one of 'openai', 'transformers'")


# --------------------------------------------------------------------------- cache

def _write_json_atomic(path: Path, obj: Any) -> None:
    """Atomic: a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f)
    os.replace(f.name, path)


def _sha256(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cache:
    """On disk, two kinds of JSON file.

    `<2 hex>/<sha256>.json`: a response, keyed by the sha256 of (identity, messages, max_tokens, temperature,
    attempt), so a rerun with the same prompts is free; `attempt` is in the key so a retry asks again
    instead of reading back the response that failed. Backend errors are never stored: they may pass.

    `latents/<2 hex>/<sha256>.json`: each latent's last result and its round (0 on its first run, one more
    on each run that tried it again after a failure). A latent that succeeded is returned from here, never re-requested;
    one that failed is run again with a further `max_retries + 1` attempts per stage.
    """

    def __init__(self, dir: str | Path):
        self.dir = Path(dir)
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(identity: str, messages: Messages, max_tokens: int, temperature: float, attempt: int) -> str:
        return _sha256([identity, messages, max_tokens, float(temperature), attempt])

    def complete(self, backend: Backend, messages: Messages, max_tokens: int, temperature: float,
                 attempt: int) -> str:
        """Asks the backend only on a miss."""
        key = self.key(backend.identity, messages, max_tokens, temperature, attempt)
        path = self.dir / key[:2] / f"{key}.json"
        if path.exists():
            with self._lock:
                self.hits += 1
            return json.loads(path.read_text())["response"]
        with self._lock:
            self.misses += 1
        text = backend.complete(messages, max_tokens, temperature)
        _write_json_atomic(path, {"identity": backend.identity, "attempt": attempt, "response": text})
        return text

    def _latent_path(self, key: str) -> Path:
        return self.dir / "latents" / key[:2] / f"{key}.json"

    def load_latent(self, key: str) -> dict | None:
        path = self._latent_path(key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # damaged: run the latent again
            log.warning("unreadable autointerp result %s: running its latent again", path)
            return None

    def save_latent(self, key: str, round: int, result: dict) -> None:
        _write_json_atomic(self._latent_path(key), {"round": round, "result": result})


def latent_key(record: dict, explainer: str, scorer: str, cfg: dict) -> str:
    """What a latent's result depends on: its record, both models and every setting that shapes a prompt."""
    return _sha256([explainer, scorer, {k: cfg[k] for k in PROMPT_KEYS}, record])


def next_round(summary_path: str | Path) -> int:
    """The `--round` of the autointerp job that writes `summary_path`: the last run's round when it left no
    failed latent to retry, one more when it did. Snakemake sees a changed param and reruns the job, which
    asks only for the failed latents; once none is left the round stops changing and the job stays done."""
    try:
        summary = json.loads(Path(summary_path).read_text())
        last = int(summary.get("round", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
    return last + 1 if summary.get("n_retry", summary.get("n_failed")) else last


# --------------------------------------------------------------------------- prompts and parsing

def render(tokens: list[str], acts: list[float] | None = None) -> str:
    """One context on one line: newlines shown as \\n; with acts, each token with activation > 0 in << >>."""
    if acts is not None and len(acts) != len(tokens):
        raise ValueError(f"an example has {len(tokens)} tokens but {len(acts)} activations")
    out = []
    for i, token in enumerate(tokens):
        token = token.replace("\n", "\\n").replace("\r", "\\r")
        if acts is not None and acts[i] > 0:
            body = token.lstrip(" ")  # "def <<foo>>" reads better than "def<< foo>>"
            token = token[: len(token) - len(body)] + f"<<{body}>>" if body else f"<<{token}>>"
        out.append(token)
    return "".join(out)


EXPLAINER_SYSTEM = (
    "You are interpreting one latent of a sparse autoencoder trained on a language model's activations. "
    "You see text excerpts where the latent is active; the tokens on which it fires are wrapped in << >>. "
    "Say in one short phrase (at most 15 words) what the latent detects. Reply with the phrase only.")
SCORER_SYSTEM = (
    "You test an explanation of a sparse autoencoder latent. You get the explanation and numbered text "
    "excerpts; the latent fires somewhere in some of them. For each excerpt decide whether the latent fires "
    "in it, from the explanation alone. Reply with a JSON list only: 1 if it fires, 0 if it does not.")


def explainer_messages(record: dict, n_top: int, n_random: int) -> Messages:
    """The first n_top top examples and first n_random random examples, activating tokens marked."""
    def block(title: str, examples: list[dict]) -> str:
        lines = [f"{i}. (max activation {max(ex['acts']):.3g}) {render(ex['tokens'], ex['acts'])}"
                 for i, ex in enumerate(examples, 1)]
        return f"{title}:\n" + "\n".join(lines) if lines else ""

    top, rand = record["top_examples"][:n_top], record.get("random_examples", [])[:n_random]
    parts = [block("Top-activating excerpts", top), block("Random activating excerpts", rand)]
    user = "\n\n".join(p for p in parts if p) + "\n\nWhat does this latent detect? One short phrase."
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> str:
    """The first non-empty line, without a label or enclosing quotes; 2-200 characters with at least one letter."""
    lines = [line.strip() for line in text.replace("```", "").splitlines() if line.strip()]
    if not lines:
        raise ParseError("empty explanation")
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", lines[0], flags=re.IGNORECASE).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":  # only a quote around the whole phrase
        line = line[1:-1].strip()
    if not 2 <= len(line) <= 200 or not re.search(r"[^\W\d_]", line):
        raise ParseError(f"not a usable explanation: {line[:80]!r}")
    return line


def detection_messages(explanation: str, contexts: list[list[str]]) -> Messages:
    numbered = "\n".join(f"{i}. {render(tokens)}" for i, tokens in enumerate(contexts, 1))
    user = (f"Explanation: {explanation}\n\nExcerpts:\n{numbered}\n\n"
            f"Reply with a JSON list of {len(contexts)} numbers, one per excerpt in order: 1 or 0.")
    return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": user}]


def parse_detection(text: str, n: int) -> list[float]:
    """The first [...] in the text as exactly n numbers in [0, 1]; anything else is a ParseError."""
    match = re.search(r"\[[^\[\]]*\]", text)
    if not match:
        raise ParseError(f"no JSON list in the response: {text[:80]!r}")
    try:
        values = json.loads(match.group())
    except json.JSONDecodeError:
        raise ParseError(f"not a JSON list: {match.group()[:80]!r}") from None
    if len(values) != n:
        raise ParseError(f"expected {n} answers, got {len(values)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
        raise ParseError(f"answers must be numbers in [0, 1]: {match.group()[:80]!r}")
    return [float(v) for v in values]


# --------------------------------------------------------------------------- scoring

def detection_metrics(scores: list[float], labels: list[int]) -> dict:
    """Accuracy (score >= 0.5 means "fires") and AUROC as the Mann-Whitney statistic: the chance that a
    random activating context outscores a random non-activating one, ties counting 1/2. AUROC is None
    when one class is absent."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    n = len(scores)
    accuracy = sum((s >= 0.5) == bool(y) for s, y in zip(scores, labels)) / n if n else None
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    auroc = None
    if pos and neg:
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        auroc = wins / (len(pos) * len(neg))
    return {"accuracy": accuracy, "auroc": auroc, "n": n}


def detection_set(record: dict, cfg: dict, rng: random.Random) -> tuple[list[list[str]], list[int]]:
    """Held-out activating contexts and non-activating ones, shuffled. Held out: after the explainer's
    examples, and not equal to any of them (random examples may repeat top ones)."""
    top, rand = record["top_examples"], record.get("random_examples", [])
    seen = {tuple(ex["tokens"]) for ex in top[:cfg["n_top"]] + rand[:cfg["n_random"]]}
    held_out = []
    for ex in top[cfg["n_top"]:] + rand[cfg["n_random"]:]:
        if tuple(ex["tokens"]) not in seen:
            seen.add(tuple(ex["tokens"]))
            held_out.append(ex)
    pos = rng.sample(held_out, min(cfg["n_score_pos"], len(held_out)))
    negatives = record.get("negative_examples", [])
    neg = rng.sample(negatives, min(cfg["n_score_neg"], len(negatives)))
    items = [(ex["tokens"], 1) for ex in pos] + [(ex["tokens"], 0) for ex in neg]
    rng.shuffle(items)
    return [t for t, _ in items], [y for _, y in items]


def _ask(stage: str, messages: Messages, parse, backend: Backend, cache: Cache, cfg: dict, out: dict,
         round: int = 0):
    """Attempts 0 .. (round + 1) * (1 + max_retries) - 1, each its own cache key: a later round replays the
    earlier rounds' unparseable responses from the cache (free) and then asks anew. The parsed answer, or
    None with out["error"] saying why. A BackendError ends the stage: its retries were the backoff's."""
    for attempt in range((round + 1) * (cfg["max_retries"] + 1)):
        out["attempts"] += 1
        out["prompt_hashes"].append(cache.key(backend.identity, messages, cfg["max_tokens"], cfg["temperature"],
                                              attempt))
        try:
            return parse(cache.complete(backend, messages, cfg["max_tokens"], cfg["temperature"], attempt))
        except ParseError as e:
            out["error"] = f"{stage} attempt {attempt + 1}: {e}"
        except BackendError as e:
            out["error"] = f"{stage} attempt {attempt + 1}: {e}"
            return None
    return None


def interpret_latent(record: dict, backend: Backend, cache: Cache, cfg: dict, scorer: Backend | None = None,
                     round: int = 0) -> dict:
    """One latent's result. `attempts` counts completions asked for (cached or not) over both stages;
    `prompt_hashes` holds their cache keys, so every response behind a score can be found on disk.
    `retry`: whether a later run tries this latent again (a failure that may pass, within retry_runs)."""
    out = {"latent": record["latent"], "explanation": None, "status": "failed", "error": None,
           "accuracy": None, "auroc": None, "n_scored": 0, "attempts": 0, "prompt_hashes": [],
           "round": round, "retry": False}
    rng = random.Random(f"{cfg['seed']}:{record['latent']}")  # per latent: a subset run gives the same prompts
    contexts, labels = detection_set(record, cfg, rng)
    if not any(labels) or all(labels):  # the record decides this: another run cannot change it
        out["error"] = UNSCORABLE
        return out
    out["retry"] = round < cfg["retry_runs"]
    explanation = _ask("explainer", explainer_messages(record, cfg["n_top"], cfg["n_random"]),
                       parse_explanation, backend, cache, cfg, out, round)
    if explanation is None:
        return out
    out["explanation"] = explanation
    scores = _ask("detection", detection_messages(explanation, contexts), lambda text: parse_detection(
        text, len(contexts)), scorer or backend, cache, cfg, out, round)
    if scores is None:
        return out
    metrics = detection_metrics(scores, labels)
    out.update(status="ok", error=None, retry=False, accuracy=metrics["accuracy"], auroc=metrics["auroc"],
               n_scored=metrics["n"])
    return out


def _resume_latent(record: dict, backend: Backend, cache: Cache, cfg: dict, scorer: Backend | None) -> dict:
    """The stored result when it is final (a success, or a record that cannot be scored) or was already
    tried on retry_runs later runs; else a new round of the latent, stored."""
    key = latent_key(record, backend.identity, (scorer or backend).identity, cfg)
    stored = cache.load_latent(key)
    if stored is not None:
        last = stored["result"]
        if last["status"] == "ok" or last["error"] == UNSCORABLE or stored["round"] >= cfg["retry_runs"]:
            return {**last, "retry": False, "reused": True}
    round = stored["round"] + 1 if stored is not None else 0
    result = interpret_latent(record, backend, cache, cfg, scorer, round)
    cache.save_latent(key, round, result)
    return {**result, "reused": False}


def run_autointerp(records: list[dict], backend: Backend, cache: Cache, cfg: dict | None = None,
                   scorer: Backend | None = None) -> list[dict]:
    """Explain each latent with `backend` and score it with `scorer` (default: the same model).

    A failure is recorded in the latent's result, never raised, so one bad response cannot stop a run; the
    next run asks again for the failed latents only (see Cache). `reused` marks results from an earlier run.
    """
    cfg = {**DEFAULTS, **(cfg or {})}
    chosen = cfg["latents"]
    if isinstance(chosen, int):
        records = records[:chosen]
    elif chosen is not None:
        wanted = set(chosen)
        records = [r for r in records if r["latent"] in wanted]
    with ThreadPoolExecutor(max(1, cfg["workers"])) as pool:
        jobs = pool.map(lambda r: _resume_latent(r, backend, cache, cfg, scorer), records)
        results = list(tqdm(jobs, total=len(records), desc="autointerp", unit="latent"))
    for r in results:
        if r["status"] == "failed" and not r["reused"]:
            log.warning("latent %s failed (%s): %s", r["latent"],
                        "tried again on the next run" if r["retry"] else "not retried", r["error"])
    reused, failed = sum(r["reused"] for r in results), sum(r["status"] == "failed" for r in results)
    log.info("autointerp: %d latents (%d kept from earlier runs), %d failed; responses: %d cached, %d requested",
             len(results), reused, failed, cache.hits, cache.misses)
    return results


def summarize(results: list[dict]) -> dict:
    """Means over the latents that were scored; failures only count in n_failed."""
    ok = [r for r in results if r["status"] == "ok"]

    def mean(key: str) -> float | None:
        values = [r[key] for r in ok if r[key] is not None and not math.isnan(r[key])]
        return sum(values) / len(values) if values else None

    return {"n_latents": len(results), "n_ok": len(ok), "n_failed": len(results) - len(ok),
            "n_retry": sum(bool(r.get("retry")) for r in results),
            "mean_accuracy": mean("accuracy"), "mean_auroc": mean("auroc")}
