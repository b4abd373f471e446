"""Chat backends for data synthesis and judging: the official OpenAI and Anthropic SDKs and local transformers.

Usage:
    from longalign_lib.llm import make_client, client_from_config
    client = make_client("openai", "gpt-4o-mini")                       # key from $OPENAI_API_KEY
    client = make_client("openai", "qwen", base_url="http://localhost:8000/v1")   # vLLM / llama.cpp / Ollama
    client = make_client("anthropic", "claude-haiku-4-5")               # key from $ANTHROPIC_API_KEY
    client = make_client("local", "smollm2-135m-instruct")              # offline, transformers + chat template
    reply = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64, temperature=0.0)
    replies = client.chat_many([msgs1, msgs2], desc="answers", max_new_tokens=256)
    client.estimate([msgs1, msgs2], max_new_tokens=256)   # calls, tokens, cost before spending anything
    client.stats                                         # requests, cache_hits, retries, tokens, cost_usd

The wire formats, retries (exponential backoff, `Retry-After`, 408/409/429/5xx, time-outs, dropped
connections) and typed errors come from `openai.AsyncOpenAI` (any `base_url`: OpenAI, vLLM, llama.cpp server,
Ollama, OpenRouter) and `anthropic.AsyncAnthropic`; `max_retries` and `timeout_s` are passed to them. Around
them, ours (observable in `client.stats`):
- bounded async concurrency (`concurrency` requests in flight) and a tqdm bar in `chat_many`;
- a persistent cache keyed by (backend, model, messages, params) under `cache_dir`
  (default $LONGALIGN_HOME/llm_cache): a rerun or a resumed run repeats no request;
- usage (input, output, cache-read and cache-write tokens) and cost from a price table (USD per 1M tokens,
  `SynthConfig.prices`), batch results at the batch discount;
- prompt caching: a message may carry `cache_prefix` = the number of leading characters of its content that
  stay identical across calls (the document); Anthropic requests mark that block with `cache_control`, OpenAI
  caches identical prefixes by itself. The marker is not part of the cache key;
- deferral for Batch APIs: inside `with client.deferring():` a cache miss is recorded and raises `Deferred`
  instead of calling the model; llm_batch.py sends the recorded requests as one batch and folds the results
  into the cache, after which the same code runs again on cache hits.
API keys are read from the environment only (`api_key_env`), handed to the SDK client and never written to
logs, caches, errors or outputs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib
import json
import os
import re
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import LongAlignError, write_json
from .models import load_model_and_tokenizer, load_tokenizer, longalign_home

BACKENDS = ("openai", "anthropic", "local")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
BATCH_DISCOUNT = 0.5  # both providers' Batch APIs bill 50 % of the interactive price


def empty_usage() -> dict:
    """{input_tokens (all prompt tokens, cached ones included), output_tokens, cache_read_tokens, cache_write_tokens}."""
    return dict.fromkeys(USAGE_KEYS, 0)


@dataclass
class Reply:
    """One model answer. `usage`: see `empty_usage`; `cached` replies cost nothing again."""

    text: str
    usage: dict = field(default_factory=empty_usage)
    model: str = ""
    cached: bool = False
    cost_usd: float = 0.0
    logprobs: list | None = None  # per-token log-probabilities, when asked for (openai: logprobs=True, top_logprobs=k)
    finish_reason: str | None = None  # "stop" (the model ended), "length" (cut at max_new_tokens), other, or None

    @property
    def truncated(self) -> bool:
        """True when the reply was cut by the token cap: never keep such a reply as training data.

        >>> Reply("The answer is", finish_reason="length").truncated
        True
        >>> Reply("The answer is 4.", finish_reason="stop").truncated
        False
        """
        return self.finish_reason == "length"


def norm_finish(reason) -> str | None:
    """One vocabulary for why generation ended: OpenAI's `finish_reason`, Anthropic's `stop_reason`, local.

    >>> [norm_finish(r) for r in ("stop", "length", "max_tokens", "end_turn", "stop_sequence", None)]
    ['stop', 'length', 'length', 'stop', 'stop', None]
    """
    if reason is None:
        return None
    r = str(reason)
    if r in ("length", "max_tokens", "model_length"):
        return "length"
    if r in ("stop", "end_turn", "stop_sequence", "eos"):
        return "stop"
    return r


class ContextTooLong(LongAlignError):
    """The prompt does not fit the local model's window (callers may skip that one item)."""


class Deferred(Exception):  # noqa: N818  (a signal, not an error)
    """Raised inside `client.deferring()` for a request that is not cached yet: it waits for the next batch."""

    def __init__(self, n: int = 1):
        super().__init__(f"{n} request(s) deferred to a batch")
        self.n = n


# ----------------------------------------------------------------------------------------------------------------
# token counting and prices
# ----------------------------------------------------------------------------------------------------------------
def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer (±20% for BPE tokenizers): ~4 chars/token, ~1 token per CJK char."""
    cjk = len(CJK.findall(text))
    return int(round((len(text) - cjk) / 4.0 + cjk * 1.0))


def messages_tokens(messages: list[dict], count=approx_tokens) -> int:
    return sum(count(m.get("content") or "") + 4 for m in messages) + 2


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. Cache rates default to the input rate (a provider without prompt caching)."""

    input: float
    output: float
    cache_read: float
    cache_write: float

    @classmethod
    def parse(cls, p, model: str = "?") -> Price:
        """From [input, output], [input, output, cache_read, cache_write] or a dict with those keys."""
        if isinstance(p, dict):
            try:
                i, o = float(p["input"]), float(p["output"])
            except (KeyError, TypeError, ValueError):
                raise LongAlignError(f"prices[{model!r}]={p!r}: needs numeric 'input' and 'output'") from None
            return cls(i, o, float(p.get("cache_read", i)), float(p.get("cache_write", i)))
        if isinstance(p, (list, tuple)) and len(p) in (2, 4) and all(isinstance(v, (int, float)) for v in p):
            v = [float(x) for x in p]
            return cls(v[0], v[1], v[2] if len(v) == 4 else v[0], v[3] if len(v) == 4 else v[0])
        raise LongAlignError(f"prices[{model!r}]={p!r}: expected [input, output] or [input, output, cache_read, "
                             "cache_write] in USD per 1M tokens")


def price_for(model: str, prices: dict | None) -> Price | None:
    """The Price of `model`: exact key, else the longest key that prefixes the name (dated snapshots match)."""
    if not prices:
        return None
    if model in prices:
        return Price.parse(prices[model], model)
    keys = [k for k in prices if model.startswith(k) or model.split("/")[-1].startswith(k)]
    return Price.parse(prices[max(keys, key=len)], model) if keys else None


def cost_of(usage: dict, price: Price | None, batch: bool = False, batch_discount: float = BATCH_DISCOUNT) -> float:
    """USD of one usage record: uncached input, cache reads, cache writes and output at their own rates.

    >>> round(cost_of({"input_tokens": 1000, "output_tokens": 100, "cache_read_tokens": 800}, Price(1, 2, 0.1, 1.25)), 6)
    0.00048
    """
    if not price:
        return 0.0
    read, write = int(usage.get("cache_read_tokens", 0) or 0), int(usage.get("cache_write_tokens", 0) or 0)
    plain = max(0, int(usage.get("input_tokens", 0) or 0) - read - write)
    usd = (plain * price.input + read * price.cache_read + write * price.cache_write
           + int(usage.get("output_tokens", 0) or 0) * price.output) / 1e6
    return usd * (batch_discount if batch else 1.0)


# ----------------------------------------------------------------------------------------------------------------
# SDK backends: one logical call each; the SDK retries inside it
# ----------------------------------------------------------------------------------------------------------------
def _norm_params(params: dict) -> dict:
    p = dict(params)
    if "max_tokens" in p and "max_new_tokens" not in p:
        p["max_new_tokens"] = p.pop("max_tokens")
    return {k: v for k, v in sorted(p.items()) if v is not None}


def _plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _num(obj, *names) -> int:
    for n in names:
        obj = getattr(obj, n, None) if not isinstance(obj, dict) else obj.get(n)
        if obj is None:
            return 0
    return int(obj or 0)


class _SDKBackend:
    """What the OpenAI and Anthropic backends share: key lookup, the SDK client's life, error messages, counting."""

    name = "sdk"
    sdk_module = ""
    OPTIONS: tuple = ()

    def __init__(self, model: str, base_url: str | None, api_key_env: str | None, timeout_s: float,
                 max_retries: int, **extra):
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self.key_env = api_key_env or DEFAULT_KEY_ENV[self.name]
        if not os.environ.get(self.key_env) and base_url is None:
            raise LongAlignError(f"backend '{self.name}' needs an API key: set the environment variable "
                                 f"{self.key_env} (or point base_url at a server that needs none)")
        unknown = set(extra) - set(self.OPTIONS)
        if unknown:
            raise LongAlignError(f"backend '{self.name}': unknown option(s) {sorted(unknown)}; "
                                 f"known: {', '.join(self.OPTIONS) or 'none'}")
        self.timeout_s, self.max_retries, self.extra = float(timeout_s), int(max_retries), extra
        try:
            self.sdk = importlib.import_module(self.sdk_module)
        except ImportError:
            raise LongAlignError(f"backend '{self.name}' needs the official SDK: pip install {self.sdk_module} "
                                 "(or pip install -e '.[api]')") from None
        self.stats: dict | None = None  # the LLMClient's stats, updated per HTTP attempt
        self._client = None
        self._failed: dict = {}

    def __repr__(self):
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, key from ${self.key_env})"

    # -- per-attempt counting through the http client's event hooks (the SDK retries inside one call) ---------
    @staticmethod
    def _attempt_id(request) -> tuple:
        try:
            body = hashlib.sha1(request.content).hexdigest()
        except Exception:  # a streamed upload has no content to hash
            body = ""
        return request.method, str(request.url), body

    async def _on_request(self, request) -> None:
        st = self.stats if self.stats is not None else {}
        st["requests"] = st.get("requests", 0) + 1
        try:
            retry = int(request.headers.get("x-stainless-retry-count") or 0)
        except ValueError:
            retry = 0
        if retry > 0:
            st["retries"] = st.get("retries", 0) + 1
            reason = self._failed.pop(self._attempt_id(request), "timeout/connection")
            rr = st.setdefault("retry_reasons", {})
            rr[reason] = rr.get(reason, 0) + 1

    async def _on_response(self, response) -> None:
        if response.status_code in RETRY_STATUS or response.status_code >= 500:
            self._failed[self._attempt_id(response.request)] = str(response.status_code)

    async def open(self):
        key = os.environ.get(self.key_env) or "no-key"  # a keyless local server still needs a placeholder
        http = self.sdk.DefaultAsyncHttpxClient(event_hooks={"request": [self._on_request],
                                                             "response": [self._on_response]})
        kw = {"api_key": key, "max_retries": self.max_retries, "timeout": self.timeout_s, "http_client": http}
        if self.base_url:
            kw["base_url"] = self.base_url
        self._client = self._make_client(**kw)

    async def close(self):
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _make_client(self, **kw):
        raise NotImplementedError

    def _error(self, e: Exception, what: str) -> LongAlignError:
        """One clear message for an SDK error (the key is never part of it)."""
        where = self.base_url or "the default API endpoint"
        if isinstance(e, (self.sdk.APITimeoutError, self.sdk.APIConnectionError)):
            kind = "timeout" if isinstance(e, self.sdk.APITimeoutError) else "connection error"
            return LongAlignError(f"{self.name} backend, model {self.model!r}: {what} failed after "
                                  f"{self.max_retries + 1} attempts; last error: {kind} at {where} "
                                  "(is the server running? check base_url and timeout_s)")
        status = getattr(e, "status_code", None)
        body = getattr(e, "body", None)
        msg = body.get("error", body) if isinstance(body, dict) else body
        msg = msg.get("message", msg) if isinstance(msg, dict) else (msg or str(e))
        msg = str(msg)[:300]
        if status in RETRY_STATUS or (status or 0) >= 500:
            return LongAlignError(f"{self.name} backend, model {self.model!r}: {what} failed after "
                                  f"{self.max_retries + 1} attempts; last error: HTTP {status}: {msg}")
        hint = ""
        if status in (401, 403):
            hint = f"; check the API key in ${self.key_env}"
        elif status == 404:
            hint = "; check the model name and base_url"
        return LongAlignError(f"{self.name} backend at {where}: {what} answered HTTP {status}: {msg}{hint}")

    @staticmethod
    def _split(body: dict, method) -> dict:
        """SDK keyword arguments for `method`; fields it does not name go through extra_body unchanged.

        SDK versions differ in which sampling fields they name (newer Anthropic SDKs drop `temperature`),
        so the signature decides, and the JSON sent is the same either way.
        """
        import inspect

        named = {n for n, p in inspect.signature(method).parameters.items() if p.kind == p.KEYWORD_ONLY}
        kw = {k: v for k, v in body.items() if k in named}
        extra = {k: v for k, v in body.items() if k not in named}
        if extra:
            kw["extra_body"] = extra
        return kw

    async def _guard(self, coro, what: str):
        try:
            return await coro
        except self.sdk.APIError as e:
            raise self._error(e, what) from None


def _legacy_logprobs(lp: dict) -> list[dict] | None:
    """A /v1/completions `logprobs` object in the legacy format (tokens, token_logprobs, top_logprobs as
    {token: logprob} dicts; vLLM, OpenAI) as the chat format's content list (llama.cpp already sends that)."""
    tokens = lp.get("tokens") or []
    if not tokens:
        return None
    lps, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    return [{"token": t, "logprob": lps[i] if i < len(lps) else None,
             "top_logprobs": [{"token": k, "logprob": v} for k, v in ((tops[i] if i < len(tops) else None) or {}).items()]}
            for i, t in enumerate(tokens)]


class _OpenAIBackend(_SDKBackend):
    """`openai.AsyncOpenAI`: chat completions, raw completions, files + batches (OpenAI or any compatible server)."""

    name, sdk_module = "openai", "openai"
    OPTIONS = ("max_tokens_field",)  # max_completion_tokens for models that reject max_tokens

    def _make_client(self, **kw):
        return self.sdk.AsyncOpenAI(**kw)

    def body(self, kind: str, payload, params: dict) -> dict:
        p = dict(params)
        body: dict = {"model": self.model}
        if kind == "chat":
            body["messages"] = _plain(payload)
            if "max_new_tokens" in p:
                body[self.extra.get("max_tokens_field", "max_tokens")] = p.pop("max_new_tokens")
        else:
            body["prompt"] = payload
            body["max_tokens"] = p.pop("max_new_tokens", 128)
        body.update(p)
        return body

    @staticmethod
    def usage_of(u) -> dict:
        if u is None:
            return empty_usage()
        return {"input_tokens": _num(u, "prompt_tokens"), "output_tokens": _num(u, "completion_tokens"),
                "cache_read_tokens": _num(u, "prompt_tokens_details", "cached_tokens"), "cache_write_tokens": 0}

    @classmethod
    def parse_reply(cls, j: dict, kind: str, model: str):
        """(text, usage, model) from a chat/completions JSON body (interactive answers and batch result lines)."""
        choice = (j.get("choices") or [{}])[0]
        text = ((choice.get("message") or {}).get("content") if kind == "chat" else choice.get("text")) or ""
        lp = choice.get("logprobs")
        logprobs = lp.get("content") if isinstance(lp, dict) else None
        if logprobs is None and isinstance(lp, dict) and kind == "complete":
            logprobs = _legacy_logprobs(lp)
        meta = {"logprobs": logprobs, "finish_reason": norm_finish(choice.get("finish_reason"))}
        return text, cls.usage_of(j.get("usage")), j.get("model") or model, meta

    async def call(self, messages, params):
        create = self._client.chat.completions.create
        r = await self._guard(create(**self._split(self.body("chat", messages, params), create)), "chat")
        return self.parse_reply(r.model_dump(), "chat", self.model)

    async def complete(self, prompt, params):
        create = self._client.completions.create
        r = await self._guard(create(**self._split(self.body("complete", prompt, params), create)), "completion")
        return self.parse_reply(r.model_dump(), "complete", self.model)

    # -- Batch API: one JSONL file of requests, one batch per endpoint ---------------------------------------
    ENDPOINT = {"chat": "/v1/chat/completions", "complete": "/v1/completions"}

    def batch_line(self, custom_id: str, kind: str, payload, params: dict) -> dict:
        return {"custom_id": custom_id, "method": "POST", "url": self.ENDPOINT[kind],
                "body": self.body(kind, payload, params)}

    async def batch_submit(self, lines: list[dict], label: str) -> str:
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
        f = await self._guard(self._client.files.create(file=(f"{label}.jsonl", data, "application/jsonl"),
                                                         purpose="batch"), "batch file upload")
        b = await self._guard(self._client.batches.create(input_file_id=f.id, endpoint=lines[0]["url"],
                                                           completion_window="24h", metadata={"longalign": label}),
                              "batch create")
        return b.id

    async def batch_status(self, batch_id: str) -> dict:
        b = await self._guard(self._client.batches.retrieve(batch_id), "batch status")
        c = b.request_counts
        total, done, failed = (_num(c, "total"), _num(c, "completed"), _num(c, "failed")) if c else (0, 0, 0)
        return {"status": b.status, "ended": b.status in ("completed", "failed", "expired", "cancelled"),
                "total": total, "done": done + failed, "failed": failed}

    async def batch_results(self, batch_id: str, kinds: dict) -> dict:
        """custom_id → ("ok", text, usage, model) | ("error", message) for every item the batch returned."""
        b = await self._guard(self._client.batches.retrieve(batch_id), "batch status")
        out: dict = {}
        if b.status == "failed":
            errs = "; ".join(getattr(e, "message", str(e)) for e in (getattr(b.errors, "data", None) or []))
            return {cid: ("error", f"batch failed: {errs or 'no reason given'}") for cid in kinds}
        for fid in (b.output_file_id, b.error_file_id):
            if not fid:
                continue
            content = await self._guard(self._client.files.content(fid), "batch results")
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                cid, resp = row.get("custom_id"), row.get("response") or {}
                if resp.get("status_code") == 200 and not row.get("error"):
                    out[cid] = ("ok", *self.parse_reply(resp.get("body") or {}, kinds.get(cid, "chat"), self.model))
                else:
                    err = row.get("error") or (resp.get("body") or {}).get("error") or {}
                    out[cid] = ("error", f"HTTP {resp.get('status_code')}: {err.get('message', err)}"[:300])
        return out


class _AnthropicBackend(_SDKBackend):
    """`anthropic.AsyncAnthropic`: the Messages API and Message Batches, prompt caching with `cache_control`."""

    name, sdk_module = "anthropic", "anthropic"

    def _make_client(self, **kw):
        return self.sdk.AsyncAnthropic(**kw)

    @staticmethod
    def content(m: dict):
        """A string, or two text blocks when the message marks a cacheable prefix (the document)."""
        n = int(m.get("cache_prefix") or 0)
        text = m["content"]
        if 0 < n < len(text):
            return [{"type": "text", "text": text[:n], "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": text[n:]}]
        if n >= len(text) > 0:
            return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
        return text

    def body(self, messages, params: dict) -> dict:
        p = dict(params)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body = {"model": self.model, "max_tokens": p.pop("max_new_tokens", 1024),
                "messages": [{"role": m["role"], "content": self.content(m)} for m in messages
                             if m["role"] != "system"]}
        if system:
            body["system"] = system
        if "stop" in p:
            stop = p.pop("stop")
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        p.pop("seed", None)  # not part of the Messages API
        body.update(p)
        return body

    @staticmethod
    def usage_of(u) -> dict:
        if u is None:
            return empty_usage()
        read = _num(u, "cache_read_input_tokens")
        write = _num(u, "cache_creation_input_tokens")
        return {"input_tokens": _num(u, "input_tokens") + read + write, "output_tokens": _num(u, "output_tokens"),
                "cache_read_tokens": read, "cache_write_tokens": write}

    @classmethod
    def parse_message(cls, m: dict, model: str):
        text = "".join(b.get("text", "") for b in (m.get("content") or []) if b.get("type") == "text")
        meta = {"finish_reason": norm_finish(m.get("stop_reason"))}
        return text, cls.usage_of(m.get("usage")), m.get("model") or model, meta

    async def call(self, messages, params):
        create = self._client.messages.create
        r = await self._guard(create(**self._split(self.body(messages, params), create)), "chat")
        return self.parse_message(r.model_dump(), self.model)

    async def complete(self, prompt, params):
        raise LongAlignError("the anthropic backend has no raw text completion; use backend 'local' or an "
                             "OpenAI-compatible server (vLLM, llama.cpp) for Magpie-style generation")

    # -- Message Batches --------------------------------------------------------------------------------------
    def batch_line(self, custom_id: str, kind: str, payload, params: dict) -> dict:
        if kind != "chat":
            raise LongAlignError("the anthropic backend batches chat requests only")
        return {"custom_id": custom_id, "params": self.body(payload, params)}

    async def batch_submit(self, lines: list[dict], label: str) -> str:
        b = await self._guard(self._client.messages.batches.create(requests=lines), "batch create")
        return b.id

    async def batch_status(self, batch_id: str) -> dict:
        b = await self._guard(self._client.messages.batches.retrieve(batch_id), "batch status")
        c = b.request_counts
        failed = _num(c, "errored") + _num(c, "canceled") + _num(c, "expired")
        done = _num(c, "succeeded") + failed
        return {"status": b.processing_status, "ended": b.processing_status == "ended",
                "total": done + _num(c, "processing"), "done": done, "failed": failed}

    async def batch_results(self, batch_id: str, kinds: dict) -> dict:
        out: dict = {}
        decoder = await self._guard(self._client.messages.batches.results(batch_id), "batch results")
        async for item in decoder:
            r = item.result.model_dump()
            if r.get("type") == "succeeded":
                out[item.custom_id] = ("ok", *self.parse_message(r.get("message") or {}, self.model))
            else:
                err = ((r.get("error") or {}).get("error") or {}).get("message") if r.get("type") == "errored" else ""
                out[item.custom_id] = ("error", f"{r.get('type')}{': ' + str(err) if err else ''}"[:300])
        return out


# ----------------------------------------------------------------------------------------------------------------
# local backend
# ----------------------------------------------------------------------------------------------------------------
class _LocalBackend:
    """transformers generation with the model's own chat template (offline default: SmolLM2-135M-Instruct).

    Calls run one at a time in a worker thread (a CPU/GPU model gains nothing from parallel Python threads).
    Extra keywords: dtype, device, repetition_penalty (default 1.1), model_obj/tokenizer (an already-loaded
    pair), threads (torch CPU threads while generating; 1 is much faster on a machine shared with other jobs,
    where OpenMP threads wait on each other; 0 = leave torch's setting), prefix_cache (reuse the previous
    call's KV cache for the shared prompt prefix; off by default because it assumes the weights do not change
    between calls — synth turns it on), batch_size and max_batch_tokens (batched generation, below).

    Batched generation (a GPU; `batch_size` > 1): concurrent calls (`chat_many`, synth's documents in flight,
    Magpie's waves) are queued; whatever is queued when the model is free is decoded together in left-padded
    batches grouped by length (`generate.plan_batches`: ≤ batch_size prompts and ≤ max_batch_tokens padded
    prompt+answer tokens each) by `generate.decode_batch`. Greedy replies equal one-at-a-time decoding; sampled
    ones use a generator seeded per request, so a reply does not depend on its batch-mates. batch_size 0 = auto:
    64 on a GPU, 1 (one at a time, with prefix_cache) on a CPU; max_batch_tokens 0 = auto: 131072 on a GPU.
    """

    name = "local"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", repetition_penalty: float = 1.1,
                 model_obj=None, tokenizer=None, threads: int = 0, prefix_cache: bool = False, batch_size: int = 0,
                 max_batch_tokens: int = 0, **_):
        self.model = model
        self.batch_size, self.max_batch_tokens = int(batch_size or 0), int(max_batch_tokens or 0)
        self._queue: list = []  # (ids, params, future) waiting for the next batch
        self._worker = None
        self.dtype, self.device, self.rep, self.threads = dtype, device, repetition_penalty, int(threads or 0)
        self.prefix_cache, self.min_prefix = prefix_cache, 32
        self._last = None  # (token ids, KV cache) of the previous call, for prefix reuse
        self.stats = {"reused_tokens": 0, "batches": 0, "batched_requests": 0}
        self._m, self._tok = model_obj, tokenizer
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.model)
        return self._tok

    def _load(self):
        if self._m is None:
            self._m, self._tok = load_model_and_tokenizer(self.model, dtype=self.dtype, device=self.device)
        return self._m, self._tok

    def _reusable_cache(self, ids: list[int]):
        """The previous call's KV cache cut to the prefix it shares with `ids` (the document, typically), or None.

        The question-list call and the answer call of one document share the chat template and the whole
        document, so the answer call only needs to encode its own instruction: prompt processing is halved.
        """
        if not self.prefix_cache or self._last is None:
            return None
        last_ids, cache = self._last
        n = 0
        for a, b in zip(last_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1, cache.get_seq_length())
        self._last = None
        if n < self.min_prefix:
            return None
        extra = cache.get_seq_length() - n
        if extra > 0:
            cache.crop(-extra)  # transformers ≥5: a negative value removes that many tokens from the end
        return cache

    def count(self, messages) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    async def open(self):
        pass

    async def close(self):
        pass

    def _generate(self, ids, params):
        import torch

        model, tok = self._load()
        p = dict(params)
        max_new = int(p.pop("max_new_tokens", 256))
        window = getattr(model.config, "max_position_embeddings", None)
        if window and len(ids) + max_new > window:
            raise ContextTooLong(f"local model {self.model!r}: prompt of {len(ids)} tokens + {max_new} new tokens "
                                 f"exceeds its {window}-token window; shorten the documents (corpus.max_tokens)")
        temperature = float(p.pop("temperature", 0.0) or 0.0)
        seed = int(p.pop("seed", 0) or 0)
        stop = p.pop("stop", None)
        kw = {"do_sample": temperature > 0, "repetition_penalty": self.rep}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=float(p.pop("top_p", 0.95)))
        eos = [tok.eos_token_id]
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            i = tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
            if i is not None and i not in eos:
                eos.append(i)
        torch.manual_seed(seed)
        x = torch.tensor([ids], device=model.device)
        past = self._reusable_cache(ids)
        reused = past.get_seq_length() if past is not None else 0
        if past is not None:
            kw["past_key_values"] = past
        before = torch.get_num_threads()
        if self.threads and model.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                     eos_token_id=eos, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                     return_dict_in_generate=True, **kw)
        finally:
            torch.set_num_threads(before)
        seq = out.sequences[0].tolist()
        if self.prefix_cache and getattr(out, "past_key_values", None) is not None:
            self._last = (seq, out.past_key_values)
        self.stats["reused_tokens"] += reused
        new = seq[len(ids):]
        finish = "stop" if new and new[-1] in eos else ("length" if len(new) >= max_new else "stop")
        text = tok.decode(new, skip_special_tokens=True)
        if stop:
            for s in [stop] if isinstance(stop, str) else stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"  # ended at a stop string: complete, not cut
        return text.strip(), {"input_tokens": len(ids), "output_tokens": len(new)}, {"finish_reason": finish}

    def _chat_sync(self, messages, params):
        with self._lock:
            _, tok = self._load()
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
            text, usage, meta = self._generate(list(ids), params)
        return text, usage, self.model, meta

    def _complete_sync(self, prompt, params):
        with self._lock:
            _, tok = self._load()
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            text, usage, meta = self._generate(list(ids), params)
        return text, usage, self.model, meta

    # -- batched generation --------------------------------------------------------------------------------
    def on_gpu(self) -> bool:
        """Where the model will run (without loading it when it is not loaded yet)."""
        if self._m is not None:
            return self._m.device.type != "cpu"
        if self.device not in ("auto", "cuda") and not str(self.device).startswith("cuda"):
            return False
        import torch
        return bool(torch.cuda.is_available())

    @property
    def batched(self) -> bool:
        return self.max_in_flight > 1

    @property
    def max_in_flight(self) -> int:
        """Requests one batch may hold (the client lets at least this many be in flight)."""
        return self.batch_size if self.batch_size > 0 else (64 if self.on_gpu() else 1)

    def batch_token_budget(self) -> int:
        return self.max_batch_tokens if self.max_batch_tokens > 0 else (131072 if self.on_gpu() else 8192)

    def _encode(self, kind: str, payload) -> list[int]:
        _, tok = self._load()
        if kind == "chat":
            return list(tok.apply_chat_template(payload, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
        return list(tok(payload, add_special_tokens=False)["input_ids"])

    def generate_many(self, ids_list: list[list[int]], params_list: list[dict]) -> list[tuple]:
        """[(text, usage, meta)] for token-id prompts, decoded in planned batches (sync; the worker thread's job).

        Each prompt keeps its own max_new_tokens, temperature, top_p, seed and stop; a prompt that does not fit
        the window comes back as a ContextTooLong instance in its slot.
        """
        import torch

        from .generate import _eos_ids_of, decode_batch, plan_batches

        model, tok = self._load()
        eos = _eos_ids_of(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        window = getattr(model.config, "max_position_embeddings", None)
        caps = [int(p.get("max_new_tokens", 256)) for p in params_list]
        out: list = [None] * len(ids_list)
        ok = []
        for i, (ids, cap) in enumerate(zip(ids_list, caps, strict=True)):
            if window and len(ids) + cap > window:
                out[i] = ContextTooLong(f"local model {self.model!r}: prompt of {len(ids)} tokens + {cap} new tokens "
                                        f"exceeds its {window}-token window; shorten the documents "
                                        "(corpus.max_tokens)")
            else:
                ok.append(i)
        before = torch.get_num_threads()
        if self.threads and model.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            # each prompt's padded width counts its own answer budget: plan on prompt + cap, with no extra budget
            for b in plan_batches([len(ids_list[i]) + caps[i] for i in ok], self.max_in_flight,
                                  self.batch_token_budget(), 0):
                rows = [ok[k] for k in b]
                self.stats["batches"] += 1
                self.stats["batched_requests"] += len(rows)
                ps = [params_list[i] for i in rows]
                gens = decode_batch(model, [ids_list[i] for i in rows], [caps[i] for i in rows], eos, pad,
                                    repetition_penalty=self.rep,
                                    temperature=[float(p.get("temperature") or 0.0) for p in ps],
                                    top_p=[float(p.get("top_p") or 0.95) for p in ps],
                                    seeds=[int(p.get("seed") or 0) for p in ps])
                for i, (new, finish) in zip(rows, gens, strict=True):
                    text = tok.decode(new, skip_special_tokens=True)
                    stop = params_list[i].get("stop")
                    for s in ([stop] if isinstance(stop, str) else stop or []):
                        if s and s in text:
                            text = text[: text.index(s)]
                    out[i] = (text.strip(), {"input_tokens": len(ids_list[i]), "output_tokens": len(new)},
                              {"finish_reason": finish})
        finally:
            torch.set_num_threads(before)
        return out

    def _generate_locked(self, ids_list, params_list):
        with self._lock:
            return self.generate_many(ids_list, params_list)

    def _load_batched(self):
        with self._lock:
            model, tok = self._load()
            impl = getattr(model.config, "_attn_implementation", "")
            if str(impl).startswith("longalign") and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("sdpa")  # generation: transformers' SDPA with left padding
        return model, tok

    async def _submit(self, kind: str, payload, params) -> tuple:
        loop = asyncio.get_running_loop()
        if self._m is None:
            await loop.run_in_executor(None, self._load_batched)
        fut = loop.create_future()
        self._queue.append((self._encode(kind, payload), dict(params), fut))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        text, usage, meta = await fut
        return text, usage, self.model, meta

    async def _drain(self):
        """Decode whatever is queued, batch after batch, until the queue is empty."""
        loop = asyncio.get_running_loop()
        while self._queue:
            seen = -1
            for _ in range(100):  # let every coroutine that is ready queue its request first
                if len(self._queue) == seen:
                    break
                seen = len(self._queue)
                await asyncio.sleep(0)
            items, self._queue = self._queue, []
            try:
                res = await loop.run_in_executor(None, self._generate_locked, [x[0] for x in items],
                                                 [x[1] for x in items])
            except BaseException as e:  # noqa: BLE001  (every waiting caller gets the error)
                res = [e] * len(items)
            for (_, _, fut), r in zip(items, res, strict=True):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    async def call(self, messages, params):
        if self.batched:
            return await self._submit("chat", messages, params)
        return await asyncio.get_running_loop().run_in_executor(None, self._chat_sync, messages, params)

    async def complete(self, prompt, params):
        if self.batched:
            return await self._submit("complete", prompt, params)
        return await asyncio.get_running_loop().run_in_executor(None, self._complete_sync, prompt, params)



# ----------------------------------------------------------------------------------------------------------------
# the client
# ----------------------------------------------------------------------------------------------------------------
def run_sync(coro):
    """Run a coroutine to completion from sync code, also inside Jupyter (whose loop is already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


@dataclass
class PendingRequest:
    """A request recorded inside `client.deferring()`: what a batch must send, and the cache key it fills."""

    key: str
    kind: str  # chat | complete
    payload: Any  # messages (with any cache_prefix marker) or a prompt
    params: dict


class LLMClient:
    """Chat with one model through one backend, with cache, bounded concurrency, usage and cost accounting."""

    def __init__(self, backend, *, cache_dir: str | Path | None | bool = None, concurrency: int = 4,
                 prices: dict | None = None, batch_discount: float = BATCH_DISCOUNT):
        self.backend = backend
        self.backend_name = backend.name
        self.model = backend.model
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir else longalign_home() / "llm_cache"
        self.concurrency = max(1, int(concurrency))
        self.max_retries = getattr(backend, "max_retries", 0)
        self.prices = prices or {}
        self.price = price_for(self.model, self.prices)
        self.batch_discount = float(batch_discount)
        self.stats: dict[str, Any] = {"requests": 0, "cache_hits": 0, "retries": 0, **empty_usage(),
                                      "cost_usd": 0.0, "retry_reasons": {}, "batch_items": 0,
                                      "batch_failed": 0}
        if hasattr(backend, "stats") and isinstance(backend, _SDKBackend):
            backend.stats = self.stats
        self._sem: asyncio.Semaphore | None = None
        self._depth = 0
        self._pending: dict[str, PendingRequest] | None = None

    def __repr__(self):
        return f"LLMClient(backend={self.backend_name!r}, model={self.model!r}, concurrency={self.concurrency})"

    @property
    def supports_batch(self) -> bool:
        return hasattr(self.backend, "batch_submit")

    # -- cache ---------------------------------------------------------------------------------------------
    def cache_key(self, messages, params: dict, kind: str = "chat") -> str:
        """The reply cache's key: backend, model, endpoint (base_url: two servers serving the same alias do not
        share replies), for a local model its weights fingerprint (a model retrained into the same folder misses),
        the request kind, messages and parameters."""
        if kind == "chat":
            messages = _plain(messages)  # the cache_prefix marker changes the bill, not the answer
        blob = json.dumps({"backend": self.backend_name, "model": self.model, "kind": kind, "messages": messages,
                           "params": _norm_params(params), "base_url": getattr(self.backend, "base_url", None),
                           "weights": self.weights_fingerprint}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def weights_fingerprint(self) -> str | None:
        """provenance.model_fingerprint of a local backend's model (computed once per client); None for APIs."""
        if not isinstance(self.backend, _LocalBackend):
            return None
        if getattr(self, "_weights_fp", None) is None:
            from .provenance import model_fingerprint

            self._weights_fp = model_fingerprint(self.model)
        return self._weights_fp

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> Reply | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            j = json.loads(path.read_text(encoding="utf-8"))
            return Reply(j["text"], {**empty_usage(), **j["usage"]}, j.get("model", self.model), cached=True,
                         logprobs=j.get("logprobs"), finish_reason=j.get("finish_reason"))
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is simply recomputed

    def cache_put(self, key: str, reply: Reply, params: dict, via: str = "interactive") -> None:
        """Store a reply under `key` (llm_batch folds batch results in through this)."""
        path = self._cache_path(key)
        if path is not None:
            write_json(path, {"backend": self.backend_name, "model": reply.model, "params": _norm_params(params),
                              "text": reply.text, "usage": reply.usage, "cost_usd": reply.cost_usd, "via": via,
                              "created": time.time(), "finish_reason": reply.finish_reason,
                              **({"logprobs": reply.logprobs} if reply.logprobs else {})})

    def is_cached_key(self, key: str) -> bool:
        p = self._cache_path(key)
        return p is not None and p.exists()

    def is_cached(self, messages, kind: str = "chat", **params) -> bool:
        p = self._cache_path(self.cache_key(messages, params, kind))
        return p is not None and p.exists()

    # -- deferral (Batch APIs) -----------------------------------------------------------------------------
    @contextmanager
    def deferring(self):
        """Within this block a cache miss is recorded and raises `Deferred` instead of calling the model.

        Yields the dict {cache key: PendingRequest} of what was recorded (llm_batch sends it as a batch).
        """
        if self._pending is not None:  # nested: share the outer record
            yield self._pending
            return
        self._pending = {}
        try:
            yield self._pending
        finally:
            self._pending = None

    @property
    def pending(self) -> list[PendingRequest]:
        return list((self._pending or {}).values())

    # -- async core ----------------------------------------------------------------------------------------
    @asynccontextmanager
    async def session(self):
        """Open the backend (the SDK client and its connection pool) for a batch of calls on this event loop."""
        self._depth += 1
        if self._depth == 1:
            self._sem = asyncio.Semaphore(self.concurrency)
            await self.backend.open()
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                await self.backend.close()
                self._sem = None

    def account(self, reply: Reply, batch: bool = False) -> Reply:
        """Add a reply's usage and cost to `stats` (a cache hit costs nothing); returns it."""
        if reply.cached:
            self.stats["cache_hits"] += 1
            return reply
        reply.cost_usd = cost_of(reply.usage, self.price, batch, self.batch_discount)
        for k in USAGE_KEYS:
            self.stats[k] += int(reply.usage.get(k, 0) or 0)
        self.stats["cost_usd"] += reply.cost_usd
        return reply

    async def _call(self, kind: str, payload, params: dict) -> Reply:
        params = _norm_params(params)
        key = self.cache_key(payload, params, kind)
        hit = self._cache_get(key)
        if hit is not None:
            return self.account(hit)
        if self._pending is not None:
            self._pending.setdefault(key, PendingRequest(key, kind, payload, params))
            raise Deferred()
        async with self.session():
            async with self._sem:
                hit = self._cache_get(key)  # a twin request may have finished while we waited
                if hit is not None:
                    return self.account(hit)
                if not isinstance(self.backend, _SDKBackend):
                    self.stats["requests"] += 1  # SDK backends count each HTTP attempt themselves
                if kind == "chat":
                    wire = payload if isinstance(self.backend, _SDKBackend) else _plain(payload)
                    text, usage, model, meta = await self.backend.call(wire, params)
                else:
                    text, usage, model, meta = await self.backend.complete(payload, params)
        reply = self.account(Reply(text, {**empty_usage(), **usage}, model, cached=False,
                                   logprobs=meta.get("logprobs"), finish_reason=meta.get("finish_reason")))
        self.cache_put(key, reply, params)
        return reply

    async def achat(self, messages: list[dict], **params) -> Reply:
        """One chat call (coroutine). params: max_new_tokens, temperature, top_p, stop, seed, ... (backend-native)."""
        _check_messages(messages)
        keep = ("role", "content", "cache_prefix")
        return await self._call("chat", [{k: m[k] for k in keep if k in m} for m in messages], params)

    async def acomplete(self, prompt: str, **params) -> Reply:
        """Raw text continuation (local models, OpenAI-compatible /completions): for Magpie-style prompting."""
        return await self._call("complete", prompt, params)

    # -- sync API ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], **params) -> Reply:
        return run_sync(self.achat(messages, **params))

    def complete(self, prompt: str, **params) -> Reply:
        return run_sync(self.acomplete(prompt, **params))

    def chat_many(self, batch: list[list[dict]], desc: str = "llm", progress: bool = True, **params) -> list[Reply]:
        """Many chat calls, at most `concurrency` in flight, in input order, with a progress bar.

        Inside `deferring()`, every miss of the batch is recorded before one `Deferred` is raised.
        """
        from tqdm.auto import tqdm

        async def go():
            async with self.session():
                bar = tqdm(total=len(batch), desc=desc, disable=not progress, leave=False)

                async def one(m):
                    r = await self.achat(m, **params)
                    bar.update(1)
                    return r

                try:
                    out = await asyncio.gather(*(one(m) for m in batch), return_exceptions=True)
                finally:
                    bar.close()
                deferred = [r for r in out if isinstance(r, Deferred)]
                for r in out:
                    if isinstance(r, BaseException) and not isinstance(r, Deferred):
                        raise r
                if deferred:
                    raise Deferred(len(deferred))
                return out

        return list(run_sync(go()))

    # -- planning ------------------------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict]) -> int:
        if isinstance(self.backend, _LocalBackend):
            return self.backend.count(_plain(messages))
        return messages_tokens(messages)

    def estimate(self, batch: list[list[dict]], max_new_tokens: int, batch_mode: bool = False,
                 cache_read_tokens: int = 0, cache_write_tokens: int = 0, **params) -> dict:
        """What `chat_many(batch, max_new_tokens=...)` would cost: calls (cached ones excluded), tokens, USD.

        Output tokens are counted at `max_new_tokens` (an upper bound); input tokens with the local tokenizer,
        or approximately (~4 characters per token) for API models. `batch_mode` applies the batch discount;
        `cache_read_tokens`/`cache_write_tokens` (totals) price that part of the input at the cache rates.
        """
        calls = cached = tin = 0
        for msgs in batch:
            if self.is_cached(msgs, max_new_tokens=max_new_tokens, **params):
                cached += 1
                continue
            calls += 1
            tin += self.count_tokens(msgs)
        usage = {"input_tokens": tin, "output_tokens": calls * int(max_new_tokens),
                 "cache_read_tokens": min(cache_read_tokens, tin), "cache_write_tokens": cache_write_tokens}
        return {"backend": self.backend_name, "model": self.model, "calls": calls, "cached": cached, **usage,
                "cost_usd": round(cost_of(usage, self.price, batch_mode, self.batch_discount), 6),
                "price_per_1M": [self.price.input, self.price.output] if self.price else None}


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LongAlignError("chat(): messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise LongAlignError(f"chat(): messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")


def make_client(backend: str, model: str, base_url: str | None = None, api_key_env: str | None = None,
                cache_dir: str | Path | None | bool = None, concurrency: int = 4, max_retries: int = 5,
                timeout_s: float = 120.0, prices: dict | None = None, batch_discount: float = BATCH_DISCOUNT,
                **backend_kw) -> LLMClient:
    """Build an LLMClient. backend: openai (incl. any OpenAI-compatible base_url) | anthropic | local.

    `max_retries` and `timeout_s` go to the SDK client (its retry loop with backoff and Retry-After).
    `cache_dir=False` disables the cache. `backend_kw` go to the backend (local: dtype, device,
    repetition_penalty, model_obj/tokenizer, threads, prefix_cache, batch_size, max_batch_tokens; openai:
    max_tokens_field). A batched local backend raises `concurrency` to its batch size.
    """
    if backend not in BACKENDS:
        raise LongAlignError(f"unknown LLM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not model:
        raise LongAlignError(f"backend {backend!r}: set a model name")
    if backend == "openai":
        b = _OpenAIBackend(model, base_url, api_key_env, float(timeout_s), int(max_retries), **backend_kw)
    elif backend == "anthropic":
        b = _AnthropicBackend(model, base_url, api_key_env, float(timeout_s), int(max_retries), **backend_kw)
    else:
        b = _LocalBackend(model, **backend_kw)
        concurrency = max(int(concurrency), b.max_in_flight)  # a batch fills from the requests in flight
    return LLMClient(b, cache_dir=cache_dir, concurrency=concurrency, prices=prices, batch_discount=batch_discount)


def client_from_config(section, prefix: str = "", model_cfg=None, **overrides) -> LLMClient:
    """Client from a config section: SynthConfig (backend, model, base_url, ...) or, with prefix='judge_', EvalConfig.

    Fields looked up (with `prefix` first, then without): backend, model, base_url, api_key_env, concurrency,
    max_retries, timeout_s, prices, batch_discount, cache_dir. `model_cfg` (a ModelConfig) supplies
    dtype/device for `local`.
    """
    def get(name, default=None):
        for n in (prefix + name, name):
            if hasattr(section, n):
                return getattr(section, n)
        return default

    kw: dict[str, Any] = {
        "base_url": get("base_url"), "api_key_env": get("api_key_env"), "cache_dir": get("cache_dir"),
        "concurrency": get("concurrency", 4), "max_retries": get("max_retries", 5), "timeout_s": get("timeout_s", 120.0),
        "prices": get("prices"), "batch_discount": get("batch_discount", BATCH_DISCOUNT),
    }
    backend = get("backend", "local")
    if backend == "local":
        kw["threads"] = get("local_threads", 0)
        kw["prefix_cache"] = bool(get("local_prefix_cache", False))
        kw["batch_size"] = get("local_batch_size", 0)
        kw["max_batch_tokens"] = get("local_max_batch_tokens", 0)
        if model_cfg is not None:
            kw.update(dtype=model_cfg.dtype, device=model_cfg.device)
    kw.update(overrides)
    return make_client(backend, get("model"), **kw)
