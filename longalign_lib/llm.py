"""Chat backends for data synthesis and judging: OpenAI(-compatible), Anthropic and local transformers, one interface.

Usage:
    from longalign_lib.llm import make_client, client_from_config
    client = make_client("openai", "gpt-4o-mini")                       # key from $OPENAI_API_KEY
    client = make_client("openai", "qwen", base_url="http://localhost:8000/v1")   # vLLM / llama.cpp / Ollama
    client = make_client("anthropic", "claude-3-5-haiku-latest")        # key from $ANTHROPIC_API_KEY
    client = make_client("local", "smollm2-135m-instruct")              # offline, transformers + chat template
    reply = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64, temperature=0.0)
    replies = client.chat_many([msgs1, msgs2], desc="answers", max_new_tokens=256)
    client.estimate([msgs1, msgs2], max_new_tokens=256)   # calls, tokens, cost before spending anything
    client.stats                                         # requests, cache_hits, retries, tokens, cost_usd

What sits around the backends (all ours, observable in `client.stats`):
- bounded async concurrency (`concurrency` requests in flight) and a tqdm bar in `chat_many`;
- retries with exponential backoff and jitter on HTTP 429, 408, 409, 5xx (incl. Anthropic's 529), timeouts and
  dropped connections; `Retry-After` is honoured (capped); other 4xx answers fail at once with a clear message;
- a persistent cache keyed by (backend, model, messages, params) under `cache_dir`
  (default $LONGALIGN_HOME/llm_cache): a rerun or a resumed run repeats no request;
- usage and cost accounting from a price table (USD per 1M input/output tokens, `SynthConfig.prices`).
API keys are read from the environment only (`api_key_env`), sent only in the request header and never
written to logs, caches or outputs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import random
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import LongAlignError, write_json
from .models import load_model_and_tokenizer, load_tokenizer, longalign_home

BACKENDS = ("openai", "anthropic", "local")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}
ANTHROPIC_VERSION = "2023-06-01"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


@dataclass
class Reply:
    """One model answer. `usage` = {"input_tokens", "output_tokens"}; `cached` replies cost nothing again."""

    text: str
    usage: dict = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    model: str = ""
    cached: bool = False
    cost_usd: float = 0.0
    logprobs: list | None = None  # per-token log-probabilities, when asked for (openai: logprobs=True, top_logprobs=k)


class ContextTooLong(LongAlignError):
    """The prompt does not fit the local model's window (callers may skip that one item)."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason, self.retry_after, self.detail = reason, retry_after, detail


# ----------------------------------------------------------------------------------------------------------------
# token counting and prices
# ----------------------------------------------------------------------------------------------------------------
def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer (±20% for BPE tokenizers): ~4 chars/token, ~1 token per CJK char."""
    cjk = len(CJK.findall(text))
    return int(round((len(text) - cjk) / 4.0 + cjk * 1.0))


def messages_tokens(messages: list[dict], count=approx_tokens) -> int:
    return sum(count(m.get("content") or "") + 4 for m in messages) + 2


def price_for(model: str, prices: dict | None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for `model`: exact key, else the longest key that prefixes the name."""
    if not prices:
        return None
    if model in prices:
        p = prices[model]
    else:
        keys = [k for k in prices if model.startswith(k) or model.split("/")[-1].startswith(k)]
        if not keys:
            return None
        p = prices[max(keys, key=len)]
    if not (isinstance(p, (list, tuple)) and len(p) == 2):
        raise LongAlignError(f"prices[{model!r}]={p!r}: expected [input_usd_per_1M, output_usd_per_1M]")
    return float(p[0]), float(p[1])


def cost_of(usage: dict, price: tuple[float, float] | None) -> float:
    if not price:
        return 0.0
    return (usage.get("input_tokens", 0) * price[0] + usage.get("output_tokens", 0) * price[1]) / 1e6


# ----------------------------------------------------------------------------------------------------------------
# backends: one request each, no retries (the client retries)
# ----------------------------------------------------------------------------------------------------------------
def _norm_params(params: dict) -> dict:
    p = dict(params)
    if "max_tokens" in p and "max_new_tokens" not in p:
        p["max_new_tokens"] = p.pop("max_tokens")
    return {k: v for k, v in sorted(p.items()) if v is not None}


def _http_error_text(resp) -> str:
    try:
        j = resp.json()
        err = j.get("error", j) if isinstance(j, dict) else j
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except Exception:
        return resp.text[:300]


class _HTTPBackend:
    name = "http"

    def __init__(self, model: str, base_url: str | None, api_key_env: str | None, timeout_s: float, **kw):
        import httpx  # noqa: F401  (fail early if missing)

        self.model = model
        self.base_url = (base_url or DEFAULT_BASE_URL[self.name]).rstrip("/")
        self.key_env = api_key_env or DEFAULT_KEY_ENV[self.name]
        self._key = os.environ.get(self.key_env) or None
        if self._key is None and base_url is None:
            raise LongAlignError(f"backend '{self.name}' needs an API key: set the environment variable "
                                 f"{self.key_env} (or point base_url at a server that needs none)")
        self.timeout_s = timeout_s
        self.extra = kw
        self._http = None

    async def open(self):
        import httpx

        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)))

    async def close(self):
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _post(self, url: str, body: dict, headers: dict):
        import httpx

        try:
            resp = await self._http.post(url, json=body, headers=headers)
        except httpx.TimeoutException as e:
            raise _Retryable("timeout", detail=type(e).__name__) from None
        except httpx.TransportError as e:
            raise _Retryable("connection", detail=f"{type(e).__name__} ({url})") from None
        if resp.status_code in RETRY_STATUS or resp.status_code >= 500:
            ra = resp.headers.get("retry-after")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            raise _Retryable(str(resp.status_code), ra, _http_error_text(resp))
        if resp.status_code >= 400:
            hint = ""
            if resp.status_code in (401, 403):
                hint = f"; check the API key in ${self.key_env}"
            elif resp.status_code == 404:
                hint = "; check the model name and base_url"
            raise LongAlignError(f"{self.name} backend: {url} answered HTTP {resp.status_code}: "
                                 f"{_http_error_text(resp)}{hint}")
        try:
            return resp.json()
        except ValueError:
            raise _Retryable("bad_json", detail=resp.text[:120]) from None


class _OpenAIBackend(_HTTPBackend):
    """POST {base_url}/chat/completions (OpenAI, vLLM, llama.cpp server, Ollama, ...)."""

    name = "openai"

    def _headers(self):
        h = {"content-type": "application/json"}
        if self._key:
            h["authorization"] = f"Bearer {self._key}"
        return h

    def body(self, messages, params):
        p = dict(params)
        body = {"model": self.model, "messages": messages}
        if "max_new_tokens" in p:
            body[self.extra.get("max_tokens_field", "max_tokens")] = p.pop("max_new_tokens")
        body.update(p)
        return body

    async def call(self, messages, params):
        j = await self._post(f"{self.base_url}/chat/completions", self.body(messages, params), self._headers())
        try:
            choice = j["choices"][0]
            text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        except (KeyError, IndexError, TypeError):
            raise _Retryable("bad_reply", detail=str(j)[:120]) from None
        u = j.get("usage") or {}
        usage = {"input_tokens": int(u.get("prompt_tokens") or 0), "output_tokens": int(u.get("completion_tokens") or 0)}
        logprobs = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        return (text, usage, j.get("model") or self.model) + ((logprobs,) if logprobs else ())

    async def complete(self, prompt, params):
        p = dict(params)
        body = {"model": self.model, "prompt": prompt, "max_tokens": p.pop("max_new_tokens", 128), **p}
        j = await self._post(f"{self.base_url}/completions", body, self._headers())
        try:
            text = j["choices"][0]["text"] or ""
        except (KeyError, IndexError, TypeError):
            raise _Retryable("bad_reply", detail=str(j)[:120]) from None
        u = j.get("usage") or {}
        usage = {"input_tokens": int(u.get("prompt_tokens") or 0), "output_tokens": int(u.get("completion_tokens") or 0)}
        return text, usage, j.get("model") or self.model


class _AnthropicBackend(_HTTPBackend):
    """POST {base_url}/v1/messages (Anthropic Messages API)."""

    name = "anthropic"

    def body(self, messages, params):
        p = dict(params)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body = {"model": self.model, "max_tokens": p.pop("max_new_tokens", 1024),
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]}
        if system:
            body["system"] = system
        if "stop" in p:
            stop = p.pop("stop")
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        p.pop("seed", None)  # not part of the Messages API
        body.update(p)
        return body

    async def call(self, messages, params):
        h = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if self._key:
            h["x-api-key"] = self._key
        j = await self._post(f"{self.base_url}/v1/messages", self.body(messages, params), h)
        try:
            text = "".join(b.get("text", "") for b in j["content"] if b.get("type") == "text")
        except (KeyError, TypeError):
            raise _Retryable("bad_reply", detail=str(j)[:120]) from None
        u = j.get("usage") or {}
        usage = {"input_tokens": int(u.get("input_tokens") or 0), "output_tokens": int(u.get("output_tokens") or 0)}
        return text, usage, j.get("model") or self.model

    async def complete(self, prompt, params):
        raise LongAlignError("the anthropic backend has no raw text completion; use backend 'local' or an "
                             "OpenAI-compatible server (vLLM) for Magpie-style generation")


class _LocalBackend:
    """transformers generation with the model's own chat template (offline default: SmolLM2-135M-Instruct).

    Calls run one at a time in a worker thread (a CPU/GPU model gains nothing from parallel Python threads).
    Extra keywords: dtype, device, repetition_penalty (default 1.1), model_obj/tokenizer (an already-loaded
    pair), threads (torch CPU threads while generating; 1 is much faster on a machine shared with other jobs,
    where OpenMP threads wait on each other; 0 = leave torch's setting), prefix_cache (reuse the previous
    call's KV cache for the shared prompt prefix; off by default because it assumes the weights do not change
    between calls — synth turns it on).
    """

    name = "local"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", repetition_penalty: float = 1.1,
                 model_obj=None, tokenizer=None, threads: int = 0, prefix_cache: bool = False, **_):
        self.model = model
        self.dtype, self.device, self.rep, self.threads = dtype, device, repetition_penalty, int(threads or 0)
        self.prefix_cache, self.min_prefix = prefix_cache, 32
        self._last = None  # (token ids, KV cache) of the previous call, for prefix reuse
        self.stats = {"reused_tokens": 0}
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
        text = tok.decode(new, skip_special_tokens=True)
        if stop:
            for s in [stop] if isinstance(stop, str) else stop:
                if s and s in text:
                    text = text[: text.index(s)]
        return text.strip(), {"input_tokens": len(ids), "output_tokens": len(new)}

    def _chat_sync(self, messages, params):
        with self._lock:
            _, tok = self._load()
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
            text, usage = self._generate(list(ids), params)
        return text, usage, self.model

    def _complete_sync(self, prompt, params):
        with self._lock:
            _, tok = self._load()
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            text, usage = self._generate(list(ids), params)
        return text, usage, self.model

    async def call(self, messages, params):
        return await asyncio.get_running_loop().run_in_executor(None, self._chat_sync, messages, params)

    async def complete(self, prompt, params):
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


class LLMClient:
    """Chat with one model through one backend, with cache, retries, bounded concurrency and cost accounting."""

    def __init__(self, backend, *, cache_dir: str | Path | None | bool = None, concurrency: int = 4,
                 max_retries: int = 5, prices: dict | None = None, retry_base_s: float = 1.0,
                 retry_max_s: float = 30.0):
        self.backend = backend
        self.backend_name = backend.name
        self.model = backend.model
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir else longalign_home() / "llm_cache"
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.retry_base_s, self.retry_max_s = float(retry_base_s), float(retry_max_s)
        self.prices = prices or {}
        self.price = price_for(self.model, self.prices)
        self.stats: dict[str, Any] = {"requests": 0, "cache_hits": 0, "retries": 0, "input_tokens": 0,
                                      "output_tokens": 0, "cost_usd": 0.0, "retry_reasons": {}}
        self._sem: asyncio.Semaphore | None = None
        self._depth = 0

    def __repr__(self):
        return f"LLMClient(backend={self.backend_name!r}, model={self.model!r}, concurrency={self.concurrency})"

    # -- cache ---------------------------------------------------------------------------------------------
    def cache_key(self, messages, params: dict, kind: str = "chat") -> str:
        blob = json.dumps({"backend": self.backend_name, "model": self.model, "kind": kind, "messages": messages,
                           "params": _norm_params(params)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> Reply | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            j = json.loads(path.read_text(encoding="utf-8"))
            return Reply(j["text"], dict(j["usage"]), j.get("model", self.model), cached=True, cost_usd=0.0,
                         logprobs=j.get("logprobs"))
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is simply recomputed

    def _cache_put(self, key: str, reply: Reply, params: dict) -> None:
        path = self._cache_path(key)
        if path is not None:
            write_json(path, {"backend": self.backend_name, "model": reply.model, "params": _norm_params(params),
                              "text": reply.text, "usage": reply.usage, "created": time.time(),
                              **({"logprobs": reply.logprobs} if reply.logprobs else {})})

    def is_cached(self, messages, **params) -> bool:
        p = self._cache_path(self.cache_key(messages, params))
        return p is not None and p.exists()

    # -- async core ----------------------------------------------------------------------------------------
    @asynccontextmanager
    async def session(self):
        """Open the backend (HTTP connection pool) for a batch of calls on the current event loop."""
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

    async def _with_retries(self, fn, what: str):
        attempt = 0
        while True:
            self.stats["requests"] += 1
            try:
                return await fn()
            except _Retryable as e:
                if attempt >= self.max_retries:
                    hint = " (is the server running? check base_url)" if e.reason == "connection" else ""
                    raise LongAlignError(f"{self.backend_name} backend, model {self.model!r}: {what} failed after "
                                         f"{attempt + 1} attempts; last error: {e}{hint}") from None
                self.stats["retries"] += 1
                rr = self.stats["retry_reasons"]
                rr[e.reason] = rr.get(e.reason, 0) + 1
                delay = min(self.retry_max_s, self.retry_base_s * (2 ** attempt)) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = min(self.retry_max_s, max(delay, e.retry_after))
                attempt += 1
                await asyncio.sleep(delay)

    def _account(self, reply: Reply) -> Reply:
        if reply.cached:
            self.stats["cache_hits"] += 1
            return reply
        reply.cost_usd = cost_of(reply.usage, self.price)
        self.stats["input_tokens"] += reply.usage.get("input_tokens", 0)
        self.stats["output_tokens"] += reply.usage.get("output_tokens", 0)
        self.stats["cost_usd"] += reply.cost_usd
        return reply

    async def _call(self, kind: str, payload, params: dict) -> Reply:
        params = _norm_params(params)
        key = self.cache_key(payload, params, kind)
        hit = self._cache_get(key)
        if hit is not None:
            return self._account(hit)
        async with self.session():
            async with self._sem:
                hit = self._cache_get(key)  # a twin request may have finished while we waited
                if hit is not None:
                    return self._account(hit)
                fn = self.backend.call if kind == "chat" else self.backend.complete
                text, usage, model, *extra = await self._with_retries(lambda: fn(payload, params), kind)
        reply = self._account(Reply(text, usage, model, cached=False, logprobs=extra[0] if extra else None))
        self._cache_put(key, reply, params)
        return reply

    async def achat(self, messages: list[dict], **params) -> Reply:
        """One chat call (coroutine). params: max_new_tokens, temperature, top_p, stop, seed, ... (backend-native)."""
        _check_messages(messages)
        return await self._call("chat", [{"role": m["role"], "content": m["content"]} for m in messages], params)

    async def acomplete(self, prompt: str, **params) -> Reply:
        """Raw text continuation (local models, OpenAI-compatible /completions): for Magpie-style prompting."""
        return await self._call("complete", prompt, params)

    # -- sync API ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], **params) -> Reply:
        return run_sync(self.achat(messages, **params))

    def complete(self, prompt: str, **params) -> Reply:
        return run_sync(self.acomplete(prompt, **params))

    def chat_many(self, batch: list[list[dict]], desc: str = "llm", progress: bool = True, **params) -> list[Reply]:
        """Many chat calls, at most `concurrency` in flight, in input order, with a progress bar."""
        from tqdm.auto import tqdm

        async def go():
            async with self.session():
                bar = tqdm(total=len(batch), desc=desc, disable=not progress, leave=False)

                async def one(m):
                    r = await self.achat(m, **params)
                    bar.update(1)
                    return r

                try:
                    return await asyncio.gather(*(one(m) for m in batch))
                finally:
                    bar.close()

        return list(run_sync(go()))

    # -- planning ------------------------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict]) -> int:
        if isinstance(self.backend, _LocalBackend):
            return self.backend.count(messages)
        return messages_tokens(messages)

    def estimate(self, batch: list[list[dict]], max_new_tokens: int, **params) -> dict:
        """What `chat_many(batch, max_new_tokens=...)` would cost: calls (cached ones excluded), tokens, USD.

        Output tokens are counted at `max_new_tokens` (an upper bound); input tokens with the local tokenizer,
        or approximately (~4 characters per token) for API models.
        """
        calls = cached = tin = 0
        for msgs in batch:
            if self.is_cached(msgs, max_new_tokens=max_new_tokens, **params):
                cached += 1
                continue
            calls += 1
            tin += self.count_tokens(msgs)
        usage = {"input_tokens": tin, "output_tokens": calls * int(max_new_tokens)}
        return {"backend": self.backend_name, "model": self.model, "calls": calls, "cached": cached, **usage,
                "cost_usd": round(cost_of(usage, self.price), 6),
                "price_per_1M": list(self.price) if self.price else None}


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LongAlignError("chat(): messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise LongAlignError(f"chat(): messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")


def make_client(backend: str, model: str, base_url: str | None = None, api_key_env: str | None = None,
                cache_dir: str | Path | None | bool = None, concurrency: int = 4, max_retries: int = 5,
                timeout_s: float = 120.0, prices: dict | None = None, retry_base_s: float = 1.0,
                retry_max_s: float = 30.0, **backend_kw) -> LLMClient:
    """Build an LLMClient. backend: openai (incl. any OpenAI-compatible base_url) | anthropic | local.

    `cache_dir=False` disables the cache. `backend_kw` go to the backend (local: dtype, device,
    repetition_penalty, model_obj/tokenizer; openai: max_tokens_field).
    """
    if backend not in BACKENDS:
        raise LongAlignError(f"unknown LLM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not model:
        raise LongAlignError(f"backend {backend!r}: set a model name")
    if backend == "openai":
        b = _OpenAIBackend(model, base_url, api_key_env, float(timeout_s), **backend_kw)
    elif backend == "anthropic":
        b = _AnthropicBackend(model, base_url, api_key_env, float(timeout_s), **backend_kw)
    else:
        b = _LocalBackend(model, **backend_kw)
    return LLMClient(b, cache_dir=cache_dir, concurrency=concurrency, max_retries=max_retries, prices=prices,
                     retry_base_s=retry_base_s, retry_max_s=retry_max_s)


def client_from_config(section, prefix: str = "", model_cfg=None, **overrides) -> LLMClient:
    """Client from a config section: SynthConfig (backend, model, base_url, ...) or, with prefix='judge_', EvalConfig.

    Fields looked up (with `prefix` first, then without): backend, model, base_url, api_key_env, concurrency,
    max_retries, timeout_s, prices, cache_dir. `model_cfg` (a ModelConfig) supplies dtype/device for `local`.
    """
    def get(name, default=None):
        for n in (prefix + name, name):
            if hasattr(section, n):
                return getattr(section, n)
        return default

    kw: dict[str, Any] = {
        "base_url": get("base_url"), "api_key_env": get("api_key_env"), "cache_dir": get("cache_dir"),
        "concurrency": get("concurrency", 4), "max_retries": get("max_retries", 5), "timeout_s": get("timeout_s", 120.0),
        "prices": get("prices"),
    }
    backend = get("backend", "local")
    if backend == "local":
        kw["threads"] = get("local_threads", 0)
        kw["prefix_cache"] = bool(get("local_prefix_cache", False))
        if model_cfg is not None:
            kw.update(dtype=model_cfg.dtype, device=model_cfg.device)
    kw.update(overrides)
    return make_client(backend, get("model"), **kw)
