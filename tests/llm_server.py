"""A real HTTP chat server on 127.0.0.1 for tests: OpenAI chat-completions and Anthropic messages wire formats.

Usage (the fixture is registered in tests/conftest.py):
    def test_x(llm_server):
        llm_server.push(status=429)                       # next answer: HTTP 429
        llm_server.push(text="1. A?\n2. B?", delay=0.5)   # then a slow 200 answer
        llm_server.responder = lambda body, path: "..."  # default text once the queue is empty
        llm_server.logprobs = lambda body, text: [...]    # OpenAI logprobs.content for requests with logprobs=true
        client = make_client("openai", "m", base_url=llm_server.openai_url, cache_dir=tmp_path)
        client = make_client("anthropic", "m", base_url=llm_server.anthropic_url, cache_dir=tmp_path)
        llm_server.count, .bodies, .headers, .by_path, .max_inflight   # what the server saw

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI), POST /v1/messages (Anthropic). Each
request pops the next scripted answer (thread-safe); with an empty queue `responder(body, path)` gives the text.
Usage counts are computed as whitespace-separated words of the prompt and of the answer.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Scripted:
    text: str | None = None
    status: int = 200
    delay: float = 0.0
    error: str | None = None
    headers: dict | None = None


def default_responder(body: dict, path: str) -> str:
    msgs = body.get("messages") or [{"content": body.get("prompt", "")}]
    last = msgs[-1].get("content", "") if msgs else ""
    if isinstance(last, list):
        last = " ".join(b.get("text", "") for b in last)
    return "echo: " + " ".join(str(last).split()[:12])


def _prompt_words(body: dict) -> int:
    n = len(str(body.get("system", "")).split()) + len(str(body.get("prompt", "")).split())
    for m in body.get("messages") or []:
        n += len(str(m.get("content", "")).split())
    return n


class LLMServer:
    """The scriptable server. Start with `start()`, stop with `stop()` (the fixture does both)."""

    def __init__(self):
        self.queue: deque[Scripted] = deque()
        self.responder = default_responder
        self.logprobs = None  # (body, text) -> OpenAI `logprobs.content` list, sent when a request asks for logprobs
        self.count = 0
        self.by_path: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- scripting ----------------------------------------------------------------------------------------
    def push(self, text: str | None = None, status: int = 200, delay: float = 0.0, error: str | None = None,
             headers: dict | None = None, times: int = 1) -> LLMServer:
        for _ in range(times):
            self.queue.append(Scripted(text, status, delay, error, headers))
        return self

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.count = 0
            self.by_path.clear()
            self.bodies.clear()
            self.headers.clear()
            self.max_inflight = 0

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_url(self) -> str:
        """base_url for the openai backend (the SDK convention: ends with /v1)."""
        return self.url + "/v1"

    @property
    def anthropic_url(self) -> str:
        """base_url for the anthropic backend (the SDK convention: host only)."""
        return self.url

    # -- serving ------------------------------------------------------------------------------------------
    def _next(self) -> Scripted | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self._handle(h)
        finally:
            with self.lock:
                self.inflight -= 1

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        with self.lock:
            self.count += 1
            self.by_path[h.path] = self.by_path.get(h.path, 0) + 1
            self.bodies.append(body)
            self.headers.append({k.lower(): v for k, v in h.headers.items()})
        s = self._next() or Scripted()
        if s.delay:
            time.sleep(s.delay)
        if h.path not in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
            s = Scripted(status=404, error=f"no route {h.path}")
        if s.status != 200:
            kind = "rate_limit_error" if s.status == 429 else "api_error"
            payload = {"error": {"message": s.error or f"scripted HTTP {s.status}", "type": kind}}
            if h.path == "/v1/messages":
                payload = {"type": "error", **payload}
            return self._send(h, s.status, payload, s.headers)
        text = s.text if s.text is not None else self.responder(body, h.path)
        usage_in, usage_out = _prompt_words(body), len(text.split())
        model = body.get("model", "test-model")
        if h.path == "/v1/messages":
            payload = {"id": f"msg_{self.count}", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": usage_in, "output_tokens": usage_out}}
        elif h.path == "/v1/completions":
            payload = {"id": f"cmpl-{self.count}", "object": "text_completion", "model": model,
                       "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                                 "total_tokens": usage_in + usage_out}}
        else:
            payload = {"id": f"chatcmpl-{self.count}", "object": "chat.completion", "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                                 "total_tokens": usage_in + usage_out}}
            if body.get("logprobs") and self.logprobs is not None:
                payload["choices"][0]["logprobs"] = {"content": self.logprobs(body, text)}
        self._send(h, 200, payload, s.headers)

    @staticmethod
    def _send(h, status, payload, headers=None):
        data = json.dumps(payload).encode("utf-8")
        try:
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, str(v))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def start(self) -> LLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                server.handle(self)

            def log_message(self, *a):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


@pytest.fixture
def llm_server():
    """A fresh LLMServer on a random 127.0.0.1 port for one test."""
    server = LLMServer().start()
    try:
        yield server
    finally:
        server.stop()
