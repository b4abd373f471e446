"""The provider backends behind `llm.LLMClient`: OpenAI-compatible and Anthropic SDKs, and local transformers.

Usage (through the client, which adds cache, concurrency and accounting):
    from longalign_lib.llm import make_client
    client = make_client("anthropic", "claude-haiku-4-5")   # an LLMClient around an AnthropicBackend
    client.backend                                         # the backend object defined here

Each backend turns one logical call (chat or completion) into a `reply.Reply`-shaped result: text, usage, model,
normalised finish reason; the SDK backends also write and parse Batch API lines (llm_batch.py). Retries and
wire formats come from the official SDKs; the local backend runs transformers `generate` with the model's chat
template, one call at a time or in continuous batches.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import json
import os
import threading

from .generate import _eos_ids_of, decode_batch, plan_batches
from .io import LongAlignError
from .models import load_model_and_tokenizer, load_tokenizer
from .reply import ContextTooLong, empty_usage, norm_finish

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


# ----------------------------------------------------------------------------------------------------------------
# SDK backends: one logical call each; the SDK retries inside it
# ----------------------------------------------------------------------------------------------------------------
def norm_params(params: dict) -> dict:
    """Generation params as cached and sent: `max_tokens` spelled `max_new_tokens`, None dropped, keys sorted."""
    p = dict(params)
    if "max_tokens" in p and "max_new_tokens" not in p:
        p["max_new_tokens"] = p.pop("max_tokens")
    return {k: v for k, v in sorted(p.items()) if v is not None}


def plain_messages(messages: list[dict]) -> list[dict]:
    """Messages with only role and content (drops markers such as `cache_prefix`)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _num(obj, *names) -> int:
    for n in names:
        obj = getattr(obj, n, None) if not isinstance(obj, dict) else obj.get(n)
        if obj is None:
            return 0
    return int(obj or 0)


class SDKBackend:
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


class OpenAIBackend(SDKBackend):
    """`openai.AsyncOpenAI`: chat completions, raw completions, files + batches (OpenAI or any compatible server)."""

    name, sdk_module = "openai", "openai"
    OPTIONS = ("max_tokens_field",)  # max_completion_tokens for models that reject max_tokens

    def _make_client(self, **kw):
        return self.sdk.AsyncOpenAI(**kw)

    def body(self, kind: str, payload, params: dict) -> dict:
        p = dict(params)
        body: dict = {"model": self.model}
        if kind == "chat":
            body["messages"] = plain_messages(payload)
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


class AnthropicBackend(SDKBackend):
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
class LocalBackend:
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
