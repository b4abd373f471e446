"""The LLM client for data synthesis and judging: cache, concurrency, usage and cost around a provider backend.

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
The backends themselves (OpenAI-compatible, Anthropic, local transformers) are in providers.py; Reply and
ContextTooLong in reply.py.
API keys are read from the environment only (`api_key_env`), handed to the SDK client and never written to
logs, caches, errors or outputs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import re
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import LongAlignError, write_json
from .models import longalign_home
from .provenance import model_fingerprint
from .providers import AnthropicBackend, LocalBackend, OpenAIBackend, SDKBackend, norm_params, plain_messages
from .reply import USAGE_KEYS, ContextTooLong, Reply, empty_usage, norm_finish  # noqa: F401  (re-exported: see below)

# ContextTooLong and norm_finish live in reply.py (shared with providers.py); they stay importable from here.
BACKENDS = ("openai", "anthropic", "local")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
BATCH_DISCOUNT = 0.5  # both providers' Batch APIs bill 50 % of the interactive price


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
        if hasattr(backend, "stats") and isinstance(backend, SDKBackend):
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
            messages = plain_messages(messages)  # the cache_prefix marker changes the bill, not the answer
        blob = json.dumps({"backend": self.backend_name, "model": self.model, "kind": kind, "messages": messages,
                           "params": norm_params(params), "base_url": getattr(self.backend, "base_url", None),
                           "weights": self.weights_fingerprint}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def weights_fingerprint(self) -> str | None:
        """provenance.model_fingerprint of a local backend's model (computed once per client); None for APIs."""
        if not isinstance(self.backend, LocalBackend):
            return None
        if getattr(self, "_weights_fp", None) is None:
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
            write_json(path, {"backend": self.backend_name, "model": reply.model, "params": norm_params(params),
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
        params = norm_params(params)
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
                if not isinstance(self.backend, SDKBackend):
                    self.stats["requests"] += 1  # SDK backends count each HTTP attempt themselves
                if kind == "chat":
                    wire = payload if isinstance(self.backend, SDKBackend) else plain_messages(payload)
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
        if isinstance(self.backend, LocalBackend):
            return self.backend.count(plain_messages(messages))
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
        b = OpenAIBackend(model, base_url, api_key_env, float(timeout_s), int(max_retries), **backend_kw)
    elif backend == "anthropic":
        b = AnthropicBackend(model, base_url, api_key_env, float(timeout_s), int(max_retries), **backend_kw)
    else:
        b = LocalBackend(model, **backend_kw)
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
