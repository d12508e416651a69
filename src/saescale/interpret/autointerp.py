"""Automated interpretability: an LLM explains each latent from its activating contexts, and a scorer LLM
is tested on that explanation by detection (Bills et al. 2023; EleutherAI's sae-auto-interp).

Detection: the scorer sees the explanation and a shuffled, unmarked mix of held-out activating contexts
(never the ones the explainer saw) and non-activating ones, and answers a JSON list of 0/1, one per
context. Accuracy (threshold 0.5) and AUROC of those answers against the truth are the latent's score.
A response that cannot be parsed is retried, then recorded as failed: it is never scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from saescale.config import ConfigError

log = logging.getLogger("saescale.interpret")

CONFIG_KEY = "config.interpret.autointerp"
DEFAULTS: dict[str, Any] = {
    "latents": None,       # None: every record; an int: the first N records; a list: these latent ids
    "max_retries": 2,      # extra attempts after a failed or unparseable response, per stage
    "n_top": 8,            # top-activating examples shown to the explainer
    "n_random": 4,         # random activating examples shown to the explainer
    "n_score_pos": 10,     # held-out activating contexts shown to the scorer
    "n_score_neg": 10,     # non-activating contexts shown to the scorer
    "seed": 0,
    "max_tokens": 128,
    "temperature": 0.0,
    "workers": 1,          # latents in flight at once (an HTTP backend can serve several)
}
Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """The model endpoint could not answer (network, HTTP status, bad payload); the message names it."""


class ParseError(ValueError):
    """A model response that does not have the requested form."""


class Backend(Protocol):
    identity: str

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str: ...


# --------------------------------------------------------------------------- backends

class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, `python -m saescale.interpret.server`).

    The key is read from `api_key_env` at each call and sent only in the Authorization header; it is
    not stored on the object, so it cannot leak into the identity, the cache or a repr.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.identity = f"openai:{model}@{base_url.rstrip('/')}"

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode(errors="replace")
            hint = f" (is ${self.api_key_env} set to a valid key?)" if e.code in (401, 403) else ""
            raise BackendError(_redact(f"{self.url} answered HTTP {e.code}{hint}: {detail}", key)) from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(_redact(f"cannot reach {self.url}: {getattr(e, 'reason', e)}", key)) from None
        except json.JSONDecodeError:
            raise BackendError(f"{self.url} answered something that is not JSON") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url} answered without choices[0].message.content") from None


def _redact(text: str, secret: str | None) -> str:
    """Servers sometimes echo the key they rejected; it must not reach a log or a results file."""
    return text.replace(secret, "<redacted>") if secret else text


class TransformersBackend:
    """A local causal LM: chat template when the tokenizer has one, else a plain "role: content" transcript."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.identity = f"transformers:{model_path}"

    def prompt(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

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
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      pad_token_id=pad, **sample)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_backend(cfg: dict) -> Backend:
    """Build the backend a `interpret.autointerp` config section names; errors name the key to fix."""
    def need(key: str) -> Any:
        if not cfg.get(key):
            raise ConfigError(f"{CONFIG_KEY}.{key} is required for backend {cfg.get('backend')}")
        return cfg[key]

    kind = cfg.get("backend")
    if kind == "openai":
        return OpenAIBackend(need("base_url"), need("model"), cfg.get("api_key_env", "OPENAI_API_KEY"),
                             cfg.get("timeout", 120.0))
    if kind == "transformers":
        return TransformersBackend(need("model"), cfg.get("device", "cpu"))
    raise ConfigError(f"{CONFIG_KEY}.backend: {kind!r} is not one of 'openai', 'transformers'")


# --------------------------------------------------------------------------- cache

class Cache:
    """Responses on disk, one JSON file per sha256 of (identity, messages, max_tokens, temperature, attempt).

    A rerun with the same prompts is free; `attempt` is in the key so a retry asks again instead of
    reading back the response that failed.
    """

    def __init__(self, dir: str | Path):
        self.dir = Path(dir)
        self.hits = self.misses = 0

    @staticmethod
    def key(identity: str, messages: Messages, max_tokens: int, temperature: float, attempt: int) -> str:
        canonical = json.dumps([identity, messages, max_tokens, float(temperature), attempt],
                               sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def complete(self, backend: Backend, messages: Messages, max_tokens: int, temperature: float,
                 attempt: int) -> str:
        """Asks the backend only on a miss. Backend errors are not cached: they may pass."""
        key = self.key(backend.identity, messages, max_tokens, temperature, attempt)
        path = self.dir / key[:2] / f"{key}.json"
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())["response"]
        self.misses += 1
        text = backend.complete(messages, max_tokens, temperature)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"identity": backend.identity, "attempt": attempt, "response": text}, f)
        os.replace(f.name, path)  # atomic: a killed run never leaves a half-written response
        return text


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


def _ask(stage: str, messages: Messages, parse, backend: Backend, cache: Cache, cfg: dict, out: dict):
    """Up to 1 + max_retries attempts; the parsed answer, or None with out["error"] saying why."""
    for attempt in range(cfg["max_retries"] + 1):
        out["attempts"] += 1
        out["prompt_hashes"].append(cache.key(backend.identity, messages, cfg["max_tokens"], cfg["temperature"],
                                              attempt))
        try:
            return parse(cache.complete(backend, messages, cfg["max_tokens"], cfg["temperature"], attempt))
        except (BackendError, ParseError) as e:
            out["error"] = f"{stage} attempt {attempt + 1}: {e}"
    return None


def interpret_latent(record: dict, backend: Backend, cache: Cache, cfg: dict, scorer: Backend | None = None) -> dict:
    """One latent's result. `attempts` counts completions asked for (cached or not) over both stages;
    `prompt_hashes` holds their cache keys, so every response behind a score can be found on disk."""
    out = {"latent": record["latent"], "explanation": None, "status": "failed", "error": None,
           "accuracy": None, "auroc": None, "n_scored": 0, "attempts": 0, "prompt_hashes": []}
    rng = random.Random(f"{cfg['seed']}:{record['latent']}")  # per latent: a subset run gives the same prompts
    contexts, labels = detection_set(record, cfg, rng)
    if not any(labels) or all(labels):
        out["error"] = "detection needs held-out activating and non-activating contexts; the record lacks one"
        return out
    explanation = _ask("explainer", explainer_messages(record, cfg["n_top"], cfg["n_random"]),
                       parse_explanation, backend, cache, cfg, out)
    if explanation is None:
        return out
    out["explanation"] = explanation
    scores = _ask("detection", detection_messages(explanation, contexts),
                  lambda text: parse_detection(text, len(contexts)), scorer or backend, cache, cfg, out)
    if scores is None:
        return out
    metrics = detection_metrics(scores, labels)
    out.update(status="ok", error=None, accuracy=metrics["accuracy"], auroc=metrics["auroc"],
               n_scored=metrics["n"])
    return out


def run_autointerp(records: list[dict], backend: Backend, cache: Cache, cfg: dict | None = None,
                   scorer: Backend | None = None) -> list[dict]:
    """Explain each latent with `backend` and score it with `scorer` (default: the same model).

    A failure is recorded in the latent's result, never raised, so one bad response cannot stop a run.
    """
    cfg = {**DEFAULTS, **(cfg or {})}
    chosen = cfg["latents"]
    if isinstance(chosen, int):
        records = records[:chosen]
    elif chosen is not None:
        wanted = set(chosen)
        records = [r for r in records if r["latent"] in wanted]
    with ThreadPoolExecutor(max(1, cfg["workers"])) as pool:
        jobs = pool.map(lambda r: interpret_latent(r, backend, cache, cfg, scorer), records)
        results = list(tqdm(jobs, total=len(records), desc="autointerp", unit="latent"))
    for r in results:
        if r["status"] == "failed":
            log.warning("latent %s failed: %s", r["latent"], r["error"])
    log.info("autointerp: %d latents, cache %d hits / %d misses", len(results), cache.hits, cache.misses)
    return results


def summarize(results: list[dict]) -> dict:
    """Means over the latents that were scored; failures only count in n_failed."""
    ok = [r for r in results if r["status"] == "ok"]

    def mean(key: str) -> float | None:
        values = [r[key] for r in ok if r[key] is not None and not math.isnan(r[key])]
        return sum(values) / len(values) if values else None

    return {"n_latents": len(results), "n_ok": len(ok), "n_failed": len(results) - len(ok),
            "mean_accuracy": mean("accuracy"), "mean_auroc": mean("auroc")}
