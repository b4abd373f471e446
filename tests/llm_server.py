"""A real HTTP server on 127.0.0.1 for tests, speaking every wire format the OpenAI and Anthropic SDKs use here.

Usage (the fixture is registered in tests/conftest.py):
    def test_x(llm_server):
        llm_server.push(status=429)                       # next answer: HTTP 429
        llm_server.push(text="1. A?\n2. B?", delay=0.5)   # then a slow 200 answer
        llm_server.responder = lambda body, path: "..."  # default text once the queue is empty
        llm_server.logprobs = lambda body, text: [...]    # OpenAI logprobs.content for requests with logprobs=true
        llm_server.cap_words = True        # answers longer than the request's max_tokens (in words) are cut there
        llm_server.completions_logprobs = "content"       # /v1/completions logprobs as llama.cpp (default: vLLM)
        client = make_client("openai", "m", base_url=llm_server.openai_url, cache_dir=tmp_path)
        client = make_client("anthropic", "m", base_url=llm_server.anthropic_url, cache_dir=tmp_path)
        llm_server.count, .bodies, .headers, .by_path, .log, .max_inflight   # what the server saw
        llm_server.batch_hold = True       # batches stay in progress until set back to False
        llm_server.batch_fail_items = 2    # the next 2 batch items end in an error

Endpoints:
- OpenAI: POST /v1/chat/completions, POST /v1/completions, POST /v1/files (multipart), GET /v1/files/{id}/content,
  POST /v1/batches, GET /v1/batches/{id};
- Anthropic: POST /v1/messages, POST /v1/messages/batches, GET /v1/messages/batches/{id}, GET .../{id}/results.
Each interactive request pops the next scripted answer (thread-safe); with an empty queue `responder(body, path)`
gives the text. A scripted error carries `retry-after-ms: 10` unless it sets its own headers, so the SDKs'
retries stay fast. Usage counts are whitespace-separated words of the prompt and of the answer. Prompt caching is
simulated: Anthropic blocks marked `cache_control` are written on first sight and read afterwards; for OpenAI the
first message's text up to its first blank line counts as cached once seen (when ≥ `openai_cache_min_words`).
With `cap_words`, an answer of more words than the request's max_tokens/max_completion_tokens is cut to that
many words and reported as cut (OpenAI finish_reason "length", Anthropic stop_reason "max_tokens"), as a real
server does at its token cap; otherwise every answer ends normally ("stop" / "end_turn").
Batches finish on the first status poll after `batch_hold` is False; their items never count as interactive
requests (`count`), and `batch_items` lists every item ever submitted (to assert none was sent twice).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

INTERACTIVE = ("/v1/chat/completions", "/v1/completions", "/v1/messages")


@dataclass
class Scripted:
    text: str | None = None
    status: int = 200
    delay: float = 0.0
    error: str | None = None
    headers: dict | None = None


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content)  # the blocks of one message, rejoined
    return str(content or "")


def default_responder(body: dict, path: str) -> str:
    msgs = body.get("messages") or [{"content": body.get("prompt", "")}]
    last = _text_of(msgs[-1].get("content", "")) if msgs else ""
    return "echo: " + " ".join(last.split()[:12])


def _prompt_words(body: dict) -> int:
    n = len(_text_of(body.get("system", "")).split()) + len(str(body.get("prompt", "")).split())
    for m in body.get("messages") or []:
        n += len(_text_of(m.get("content", "")).split())
    return n


class LLMServer:
    """The scriptable server. Start with `start()`, stop with `stop()` (the fixture does both)."""

    def __init__(self):
        self.queue: deque[Scripted] = deque()
        self.responder = default_responder
        self.logprobs = None  # (body, text) -> OpenAI `logprobs.content` list, sent when a request asks for logprobs
        self.completions_logprobs = "legacy"  # /v1/completions sends them as vLLM does (legacy) or llama.cpp (content)
        self.count = 0
        self.by_path: dict[str, int] = {}
        self.log: list[str] = []
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_items: list[dict] = []
        self.batch_hold = False
        self.batch_fail_items = 0
        self.openai_cache_min_words = 20
        self.cap_words = False
        self._seen_prefixes: set[str] = set()
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
            self.log.clear()
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

    def posts(self, path: str) -> int:
        """How many POSTs reached `path` (e.g. '/v1/batches')."""
        return sum(1 for x in self.log if x == f"POST {path}")

    # -- the model: text + usage, with simulated prompt caching --------------------------------------------
    def _usage(self, body: dict, path: str, text: str) -> dict:
        words_in, words_out = _prompt_words(body), len(text.split())
        if path.startswith("/v1/messages"):
            write = read = 0
            for m in body.get("messages") or []:
                for b in m.get("content") if isinstance(m.get("content"), list) else []:
                    if b.get("cache_control"):
                        n, key = len(b.get("text", "").split()), b.get("text", "")
                        with self.lock:
                            hit = key in self._seen_prefixes
                            self._seen_prefixes.add(key)
                        read, write = (read + n, write) if hit else (read, write + n)
            return {"input_tokens": words_in - read - write, "output_tokens": words_out,
                    "cache_read_input_tokens": read, "cache_creation_input_tokens": write}
        cached = 0
        msgs = body.get("messages") or []
        if msgs:
            prefix = _text_of(msgs[0].get("content")).split("\n\n")[0]
            n = len(prefix.split())
            if n >= self.openai_cache_min_words:
                with self.lock:
                    cached = n if prefix in self._seen_prefixes else 0
                    self._seen_prefixes.add(prefix)
        return {"prompt_tokens": words_in, "completion_tokens": words_out, "total_tokens": words_in + words_out,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _answer(self, body: dict, path: str, text: str) -> dict:
        model = body.get("model", "test-model")
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        words = list(re.finditer(r"\S+", text))
        cut = bool(self.cap_words and cap and len(words) > int(cap))
        if cut:
            text = text[: words[int(cap) - 1].end()]  # the line breaks before the cap stay
        usage = self._usage(body, path, text)
        if path.startswith("/v1/messages"):
            return {"id": f"msg_{time.time_ns()}", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens" if cut else "end_turn",
                    "stop_sequence": None, "usage": usage}
        finish = "length" if cut else "stop"
        if path == "/v1/completions":
            lp = None
            if body.get("logprobs") and self.logprobs:
                content = self.logprobs(body, text)
                lp = {"content": content} if self.completions_logprobs == "content" else {  # llama.cpp | vLLM
                    "tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in c.get("top_logprobs") or []} for c in content],
                    "text_offset": [0] * len(content)}
            return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "model": model, "created": 0,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}],
                    "usage": usage}
        logprobs = {"content": self.logprobs(body, text)} if body.get("logprobs") and self.logprobs else None
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": model, "created": 0,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": logprobs}], "usage": usage}

    # -- serving ------------------------------------------------------------------------------------------
    def _next(self) -> Scripted | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            n = int(h.headers.get("content-length") or 0)
            raw = h.rfile.read(n) if n else b""
            path = h.path.split("?")[0]
            with self.lock:
                self.by_path[path] = self.by_path.get(path, 0) + 1
                self.log.append(f"{method} {path}")
                self.headers.append({k.lower(): v for k, v in h.headers.items()})
            if method == "POST" and path in INTERACTIVE:
                self._interactive(h, path, raw)
            else:
                self._batch_api(h, method, path, raw)
        finally:
            with self.lock:
                self.inflight -= 1

    def _interactive(self, h, path: str, raw: bytes) -> None:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        with self.lock:
            self.count += 1
            self.bodies.append(body)
        s = self._next() or Scripted()
        if s.delay:
            time.sleep(s.delay)
        if s.status != 200:
            kind = "rate_limit_error" if s.status == 429 else "api_error"
            payload = {"error": {"message": s.error or f"scripted HTTP {s.status}", "type": kind}}
            if path == "/v1/messages":
                payload = {"type": "error", **payload}
            headers = s.headers if s.headers is not None else {"retry-after-ms": "10"}
            return self._send(h, s.status, payload, headers)
        text = s.text if s.text is not None else self.responder(body, path)
        self._send(h, 200, self._answer(body, path, text), s.headers)

    # -- Batch APIs -----------------------------------------------------------------------------------------
    def _run_item(self, body: dict, path: str):
        """(ok, answer JSON or error message) for one batch item; `batch_fail_items` makes the next ones fail."""
        with self.lock:
            self.batch_items.append(body)
            fail = self.batch_fail_items > 0
            if fail:
                self.batch_fail_items -= 1
        if fail:
            return False, "scripted batch item failure"
        return True, self._answer(body, path, self.responder(body, path))

    def _finish(self, b: dict) -> None:
        if b["done"]:
            return
        if b["kind"] == "openai":
            out, err = [], []
            for line in b["lines"]:
                ok, res = self._run_item(line["body"], line["url"])
                row = {"id": f"req_{len(out) + len(err)}", "custom_id": line["custom_id"]}
                if ok:
                    out.append({**row, "response": {"status_code": 200, "request_id": "r", "body": res},
                                "error": None})
                else:
                    err.append({**row, "response": {"status_code": 500, "request_id": "r",
                                                    "body": {"error": {"message": res}}}, "error": None})
            for name, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    fid = f"file-{b['id']}-{name[:3]}"
                    self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    b["obj"][name] = fid
            b["obj"].update(status="completed", request_counts={"total": len(b["lines"]), "completed": len(out),
                                                                 "failed": len(err)})
        else:
            results, counts = [], {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            for r in b["lines"]:
                ok, res = self._run_item(r["params"], "/v1/messages")
                if ok:
                    results.append({"custom_id": r["custom_id"], "result": {"type": "succeeded", "message": res}})
                    counts["succeeded"] += 1
                else:
                    results.append({"custom_id": r["custom_id"], "result": {"type": "errored", "error": {
                        "type": "error", "error": {"type": "api_error", "message": res}}}})
                    counts["errored"] += 1
            b["results"] = "".join(json.dumps(r) + "\n" for r in results).encode()
            b["obj"].update(processing_status="ended", request_counts=counts, ended_at="2026-01-01T00:00:00Z",
                            results_url=f"{self.url}/v1/messages/batches/{b['id']}/results")
        b["done"] = True

    def _batch_api(self, h, method: str, path: str, raw: bytes) -> None:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/files":
            ctype = h.headers.get("content-type", "")
            msg = BytesParser(policy=email_policy).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            data, purpose = b"", ""
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name == "file":
                    data = part.get_payload(decode=True)
                elif name == "purpose":
                    purpose = part.get_payload(decode=True).decode()
            fid = f"file-{len(self.files) + 1}"
            self.files[fid] = data
            return self._send(h, 200, {"id": fid, "object": "file", "bytes": len(data), "created_at": 0,
                                       "filename": "batch.jsonl", "purpose": purpose, "status": "processed"})
        if method == "GET" and len(parts) == 4 and parts[1] == "files" and parts[3] == "content":
            return self._send_raw(h, 200, self.files.get(parts[2], b""), "application/octet-stream")
        if method == "POST" and path == "/v1/batches":
            body = json.loads(raw or b"{}")
            lines = [json.loads(x) for x in self.files[body["input_file_id"]].decode().split("\n") if x.strip()]
            bid = f"batch_{len(self.batches) + 1}"
            obj = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                   "completion_window": "24h", "status": "in_progress", "created_at": 0,
                   "metadata": body.get("metadata"), "output_file_id": None, "error_file_id": None,
                   "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
            self.batches[bid] = {"id": bid, "kind": "openai", "lines": lines, "obj": obj, "done": False}
            return self._send(h, 200, obj)
        if method == "GET" and len(parts) == 3 and parts[1] == "batches":
            b = self.batches.get(parts[2])
            if b is None:
                return self._send(h, 404, {"error": {"message": f"no batch {parts[2]}"}})
            if not self.batch_hold:
                self._finish(b)
            return self._send(h, 200, b["obj"])
        if method == "POST" and path == "/v1/messages/batches":
            body = json.loads(raw or b"{}")
            bid = f"msgbatch_{len(self.batches) + 1}"
            obj = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
                   "request_counts": {"processing": len(body["requests"]), "succeeded": 0, "errored": 0,
                                      "canceled": 0, "expired": 0},
                   "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z", "ended_at": None,
                   "archived_at": None, "cancel_initiated_at": None, "results_url": None}
            self.batches[bid] = {"id": bid, "kind": "anthropic", "lines": body["requests"], "obj": obj,
                                 "done": False}
            return self._send(h, 200, obj)
        if method == "GET" and len(parts) == 4 and parts[1:3] == ["messages", "batches"]:
            b = self.batches.get(parts[3])
            if b is None:
                return self._send(h, 404, {"type": "error", "error": {"type": "not_found_error", "message": "no batch"}})
            if not self.batch_hold:
                self._finish(b)
            return self._send(h, 200, b["obj"])
        if method == "GET" and len(parts) == 5 and parts[4] == "results":
            b = self.batches[parts[3]]
            return self._send_raw(h, 200, b.get("results", b""), "application/binary")
        return self._send(h, 404, {"error": {"message": f"no route {method} {path}"}})

    @staticmethod
    def _send(h, status, payload, headers=None):
        LLMServer._send_raw(h, status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    @staticmethod
    def _send_raw(h, status, data: bytes, ctype: str, headers=None):
        try:
            h.send_response(status)
            h.send_header("content-type", ctype)
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
                server.handle(self, "POST")

            def do_GET(self):  # noqa: N802
                server.handle(self, "GET")

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
