"""A minimal OpenAI-compatible chat server in front of anything with `complete(messages, max_tokens,
temperature)`: serve a local transformers model to autointerp (or any OpenAI client), and let the tests
exercise the real HTTP path.

    python -m saescale.interpret.server --model PATH --port 8000
    # then: backend openai, base_url http://127.0.0.1:8000/v1

Endpoints: POST /v1/chat/completions, GET /v1/models. No authentication: bind it to localhost.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from saescale.interpret.autointerp import Backend, TransformersBackend

log = logging.getLogger("saescale.interpret.server")


class ChatServer(ThreadingHTTPServer):
    """`request_count` counts every HTTP request handled, so a test can tell cache hits from calls."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, model_name: str):
        super().__init__(address, ChatHandler)
        self.backend, self.model_name = backend, model_name
        self.request_count = 0
        self._count_lock = threading.Lock()
        self.generate_lock = threading.Lock()  # one generation at a time: a torch model is not re-entrant

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def count(self) -> None:
        with self._count_lock:
            self.request_count += 1


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def do_GET(self) -> None:
        self.server.count()
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, _error(f"no route GET {self.path}"))
        self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                     "owned_by": "local"}]})

    def do_POST(self) -> None:
        self.server.count()
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, _error(f"no route POST {self.path}"))
        try:
            length = int(self.headers.get("Content-Length", 0))
            messages, max_tokens, temperature = parse_request(json.loads(self.rfile.read(length) or b"null"))
        except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            return self._send(400, _error(str(e), "invalid_request_error"))
        backend = self.server.backend
        try:
            with self.server.generate_lock:
                text = backend.complete(messages, max_tokens, temperature)
        except Exception as e:  # the client gets a 500 with the reason; the server keeps serving
            log.exception("completion failed")
            return self._send(500, _error(f"{type(e).__name__}: {e}", "server_error"))
        count = getattr(backend, "count_tokens", lambda s: len(s.split()))
        prompt_tokens = sum(count(m["content"]) for m in messages)
        completion_tokens = count(text)
        self._send(200, {
            "id": f"chatcmpl-{self.server.request_count}", "object": "chat.completion",
            "created": int(time.time()), "model": self.server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # request lines to the debug log, not stderr
        log.debug("%s " + format, self.address_string(), *args)


def parse_request(body: Any) -> tuple[list[dict[str, str]], int, float]:
    """(messages, max_tokens, temperature) from an OpenAI chat request, or TypeError/ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise TypeError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(f"messages[{i}] must be an object with string 'role' and 'content'")
    max_tokens = body.get("max_tokens", 256)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError("'max_tokens' must be a positive integer")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError("'temperature' must be a number >= 0")
    return [{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, float(temperature)


def _error(message: str, kind: str = "not_found_error") -> dict:
    return {"error": {"message": message, "type": kind}}


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 0, model_name: str = "local") -> ChatServer:
    """A bound, not yet serving server; port 0 picks a free port (see `.base_url`)."""
    return ChatServer((host, port), backend, model_name)


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """Serve a local transformers model until interrupted."""
    server = make_server(TransformersBackend(model_path, device), host, port, model_name=model_path)
    log.info("serving %s at %s", model_path, server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a transformers model directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.model, args.host, args.port, args.device)


if __name__ == "__main__":
    main()
