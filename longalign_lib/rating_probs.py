"""Probability-weighted judge ratings: the judge's whole distribution over the ratings 1..10, not one sampled digit.

Usage:
    from longalign_lib.rating_probs import LocalRatingScorer, OpenAIRatingScorer, distribution_from_top_logprobs
    scorer = LocalRatingScorer(model, tokenizer)         # any transformers causal LM with a chat template
    d = scorer.distribution([{"role": "user", "content": judge_prompt}])
    d["expected"], d["probs"][7], d["mass"]              # Σ r·p(r), p(7), how much probability sat on 1..10
    scorer = OpenAIRatingScorer(client, prefill="chat")  # an llm.py openai client: vLLM, llama.cpp server, ...
    parse_rating(reply, prompt)                          # the judge's own last [[n]]; [[n]] copied from `prompt` skipped

Why: a judge that writes "[[7]]" was perhaps 40 % sure of 7 and 35 % of 8; the digit it wrote throws that away,
and a small judge often writes no rating at all. Reading the next-token probabilities *at the rating position*
gives a score for every item and a finer one (G-Eval, Liu et al. 2023, weights ratings the same way).

Local models: the judge's reply is prefilled with "[[" (the assistant turn of the chat template starts with it),
one forward pass gives p(first token of each rating), and ratings whose tokens are a prefix of another rating's
(SmolLM2 writes 10 as "1" "0") get one more step: p(10) = p("1")·p("0" | "1"), p(1) = p("1")·(1 − p("0" | "1")).
OpenAI-compatible servers: the reply is prefilled the same way, as a continued final assistant message
(prefill="chat") or through /v1/completions with the chat template applied (prefill="completions"), and the
`top_logprobs` of the first generated token are read; p("0" | "[[1") takes one more one-token request. Without a
prefill (api.openai.com) the position right after a "[[" the judge wrote is read. `mass` (the probability on valid
ratings before renormalising) says how much the judge itself believed it was giving a rating.

Parsing (`parse_rating`): only the protocol's [[n]], the last one the judge wrote itself; a [[n]] copied from its
prompt (a rated example, the template's "for example: [[6]]", a graded answer containing one) is not a rating.
"""
from __future__ import annotations

import inspect
import math
import re

from .io import LongAlignError
from .llm import run_sync

RATINGS = tuple(range(1, 11))

_NUM = r"(\d+(?:\.\d+)?)"
# The protocol's one form (LongBench-Chat: the judge writes its rating as [[n]], 1-10). Looser forms ("n/10",
# "Rating: n", "[n]") are not read: the judge prompt itself writes "[Example answer 2, rated 5/10]" and a judge that
# echoes its prompt would be read as rating the answer 5.
PATTERNS = [("double_brackets", re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\]\]"))]
ECHO_CONTEXT = (8, 16)  # characters before a [[n]] compared with the prompt: at least 8, at most 16


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text or "")


def rating_matches(text: str, prompt: str | None = None) -> list[dict]:
    """Every [[n]] in a judge reply: {value, start, echoed}. `echoed`: the [[n]] and the text before it also stand
    in `prompt` (what the judge was sent): the judge is copying its prompt (a rated example, the template's
    "for example: [[6]]", an answer that contains a rating), not rating.

    The test: the 16 characters before the [[n]] (whitespace squashed; at least 8), followed by the same [[n]],
    occur in the prompt. Short, so that an echo with a changed label or line break is still caught; a [[n]] with
    fewer than 8 characters before it (a reply that starts with its rating) is the judge's own.

    >>> p = "[Example answer 1, rated 5/10]\\nGood. [[3]]\\n\\nGive the rating, for example: [[6]]"
    >>> [(m["value"], m["echoed"]) for m in rating_matches("Give the rating, for example: [[6]] Mine: [[8]]", p)]
    [(6.0, True), (8.0, False)]
    """
    squashed = _squash(prompt) if prompt else ""
    out = []
    for m in PATTERNS[0][1].finditer(text or ""):
        v = float(m.group(1))
        if not 1.0 <= v <= 10.0:
            continue
        before = _squash(text[:m.start()]).lstrip()
        lo, hi = ECHO_CONTEXT
        echoed = bool(squashed) and len(before) >= lo and \
            (before[-hi:] + _squash(m.group(0))) in squashed
        out.append({"value": v, "start": m.start(), "echoed": echoed})
    return out


def parse_rating(text: str, prompt: str | None = None, strict: bool = True) -> tuple[float | None, str | None]:
    """The judge's 1-10 rating from its reply and how it was found: (rating, "double_brackets") or (None, None).

    Only the protocol's [[n]] is read, and the last one the judge wrote itself wins: with `prompt` (the text the
    judge was sent), a [[n]] the judge copied from it is skipped (see rating_matches). Values outside 1..10 are
    ignored. `strict` is kept for old callers: [[n]] is the only form either way.

    >>> parse_rating("[[3]] at first, but on reflection [[9]]")
    (9.0, 'double_brackets')
    >>> parse_rating("[Example answer 2, rated 5/10] Overall 8/10.")
    (None, None)
    """
    own = [m["value"] for m in rating_matches(text, prompt) if not m["echoed"]]
    return (own[-1], PATTERNS[0][0]) if own else (None, None)


def prompt_text(messages: list[dict]) -> str:
    """Everything the judge was sent (all turns), for parse_rating's echo test."""
    return "\n\n".join(str(m.get("content") or "") for m in messages)


def summarize_probs(raw: dict[int, float]) -> dict | None:
    """{rating: unnormalised prob} → {probs (sum 1), mass, expected, mode}; None when no mass at all.

    >>> d = summarize_probs({7: 0.3, 8: 0.1})
    >>> round(d["expected"], 2), d["mode"], round(d["mass"], 2)
    (7.25, 7, 0.4)
    """
    mass = float(sum(max(0.0, p) for p in raw.values()))
    if mass <= 0 or not math.isfinite(mass):
        return None
    probs = {r: float(max(0.0, raw.get(r, 0.0))) / mass for r in RATINGS}
    expected = sum(r * p for r, p in probs.items())
    mode = max(RATINGS, key=lambda r: probs[r])
    return {"probs": probs, "mass": mass, "expected": expected, "mode": mode}


class LocalRatingScorer:
    """Rating distribution from a local transformers judge, with its reply prefilled by `prefix` ("[[")."""

    backend_name = "local"

    def __init__(self, model, tokenizer, prefix: str = "[[", threads: int = 0, name: str | None = None):
        self.model, self.tok, self.prefix, self.threads = model, tokenizer, prefix, int(threads or 0)
        self.name = name or getattr(tokenizer, "name_or_path", None)
        self.stats = {"forward_passes": 0, "items": 0}
        try:
            self._params = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError, AttributeError):
            self._params = set()
        self._seqs = self._rating_sequences()

    def _rating_sequences(self) -> dict[int, tuple[int, ...]]:
        """Token ids of each rating as written right after the prefix (tokenized together, then the prefix cut)."""
        enc = lambda s: list(self.tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        pre = enc(self.prefix)
        seqs = {}
        for r in RATINGS:
            both = enc(self.prefix + str(r))
            seqs[r] = tuple(both[len(pre):]) if both[:len(pre)] == pre else tuple(enc(str(r)))
        return seqs

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat-templated judge prompt (generation prompt on) followed by the prefix tokens."""
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
        return list(ids) + list(self.tok(self.prefix, add_special_tokens=False)["input_ids"])

    def _logprobs(self, ids: list[int], past=None, n_past: int = 0):
        """Next-token log-probs after `ids`; with `past` (the KV cache of ids[:n_past]) only the rest is run."""
        import torch

        x = torch.tensor([ids[n_past:]], device=self.model.device)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=self.model.device)
        kw = {"use_cache": True}
        if "logits_to_keep" in self._params:  # only the last position's logits: skips most of the LM head
            kw["logits_to_keep"] = 1
        if past is not None:  # newer transformers name the KV cache argument `cache`
            kw["cache" if "cache" in self._params else "past_key_values"] = past
        with torch.no_grad():
            out = self.model(input_ids=x, attention_mask=mask, **kw)
        self.stats["forward_passes"] += 1
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1), new_cache

    def distribution(self, messages: list[dict]) -> dict | None:
        """{probs, mass, expected, mode} of the judge's rating for this judge chat (see summarize_probs)."""
        import torch

        before = torch.get_num_threads()
        if self.threads and self.model.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            base = self.prompt_ids(messages)
            cache: dict[tuple[int, ...], object] = {}
            kv = {"past": None}  # the prompt's KV cache, lent once to the first continuation (it grows in place)

            def lp(ctx: tuple[int, ...]):  # log-probs of the next token after base + ctx
                if ctx not in cache:
                    if not ctx:
                        cache[ctx], kv["past"] = self._logprobs(base)
                    elif kv.get("past") is not None:
                        cache[ctx], _ = self._logprobs(base + list(ctx), kv.pop("past"), len(base))
                    else:
                        cache[ctx], _ = self._logprobs(base + list(ctx))
                return cache[ctx]

            raw = {}
            for r, seq in self._seqs.items():
                logp = sum(float(lp(seq[:k])[t]) for k, t in enumerate(seq))
                nexts = {s[len(seq)] for s in self._seqs.values() if len(s) > len(seq) and s[:len(seq)] == seq}
                stop = 1.0 - sum(math.exp(float(lp(seq)[t])) for t in nexts) if nexts else 1.0
                raw[r] = math.exp(logp) * max(0.0, stop)
        finally:
            torch.set_num_threads(before)
        self.stats["items"] += 1
        out = summarize_probs(raw)
        if out is not None:
            out.update(method="prob_weighted", text="", usage={"input_tokens": len(base), "output_tokens": 0},
                       cost_usd=0.0, cached=False)
        return out


def distribution_from_top_logprobs(content: list[dict] | None, marker: str = "[[", start: int | None = None,
                                   p_zero_after_one: float | None = None) -> dict | None:
    """Rating distribution from an OpenAI-style `choices[0].logprobs.content` list.

    Reads the `top_logprobs` at position `start` (a reply prefilled with "[[": 0), else at the first token after
    `marker` (or at the first token, when the reply starts with a digit). A rating written as two tokens ("1" "0")
    is resolved with the next position when the reply took that path, or with `p_zero_after_one` (p("0") after
    "[[1", asked separately); otherwise "1" counts as rating 1 and the result is marked approximate.
    """
    if not content:
        return None
    k = start
    if k is None:
        text = ""
        for i, t in enumerate(content):
            if text.rstrip().endswith(marker):
                k = i
                break
            text += t.get("token") or ""
    if k is None and (content[0].get("token") or "").strip()[:1].isdigit():
        k = 0
    if k is None or k >= len(content):
        return None

    def tops(pos):
        c = content[pos]
        cands = list(c.get("top_logprobs") or [])
        if not any(x.get("token") == c.get("token") for x in cands):
            cands.append({"token": c.get("token"), "logprob": c.get("logprob")})
        return cands

    raw, approximate = {}, False
    for cand in tops(k):
        s = (cand.get("token") or "").strip()
        if s.isdigit() and 1 <= int(s) <= 10 and cand.get("logprob") is not None:
            raw[int(s)] = raw.get(int(s), 0.0) + math.exp(float(cand["logprob"]))
    if 1 in raw and 10 not in raw:  # the server's tokenizer may write 10 as "1" "0"
        chosen = (content[k].get("token") or "").strip()
        if chosen == "1" and k + 1 < len(content):
            p0 = sum(math.exp(float(c["logprob"])) for c in tops(k + 1)
                     if (c.get("token") or "").strip() == "0" and c.get("logprob") is not None)
        else:
            p0 = p_zero_after_one
        if p0 is None:
            approximate = True
        else:
            raw[10], raw[1] = raw[1] * p0, raw[1] * (1 - p0)
    out = summarize_probs(raw)
    if out is not None:
        out["approximate"] = approximate
    return out


PREFILL_MODES = ("chat", "completions", "none")


class OpenAIRatingScorer:
    """Rating distribution from an OpenAI-compatible server that returns token log-probabilities.

    `prefill` says how the rating position is reached (the server's capability, declared in the config):
    - "chat": /v1/chat/completions with the judge's reply begun as a final assistant message "[[" and
      `continue_final_message` (vLLM, llama.cpp server, SGLang); `top_logprobs` at the first generated token;
    - "completions": /v1/completions with the prompt written by `tokenizer`'s chat template + "[[" and `logprobs`
      (any server with a completions endpoint; vLLM's and llama.cpp's log-probability formats are both read);
    - "none": the reply is generated unprefilled (api.openai.com takes no prefilled assistant turn) and read at
      the first token after a "[[" it wrote.
    A distribution whose "1" could start "10" (tokenizers that write 10 as "1" "0") asks once more, prefilled
    with "[[1", for p("0"). Calls go through the client, so at most `client.concurrency` are in flight.
    """

    def __init__(self, client, top_logprobs: int = 20, max_new_tokens: int = 16, seed: int = 0,
                 prefill: str = "none", tokenizer=None, prefix: str = "[["):
        if client.backend_name != "openai":
            raise LongAlignError(f"probability-weighted ratings need token log-probabilities; backend "
                                 f"{client.backend_name!r} does not return them (use an OpenAI-compatible server, "
                                 "or set eval.judge_scoring=parse)")
        if prefill not in PREFILL_MODES:
            raise LongAlignError(f"eval.judge_prefill={prefill!r}: choose auto, {', '.join(PREFILL_MODES)}")
        if prefill == "completions" and tokenizer is None:
            raise LongAlignError("eval.judge_prefill=completions writes the judge prompt with the served model's "
                                 "chat template: set eval.judge_tokenizer (a hub id or local folder of that model)")
        self.client, self.top_logprobs, self.max_new_tokens, self.seed = client, int(top_logprobs), max_new_tokens, seed
        self.prefill, self.tok, self.prefix = prefill, tokenizer, prefix

    async def _ask(self, messages: list[dict], prefix: str, max_new_tokens: int):
        """(reply, logprobs content list, whether the content starts right after `prefix`)."""
        common = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "seed": self.seed}
        if self.prefill == "completions":
            prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
            rep = await self.client.acomplete(prompt, logprobs=self.top_logprobs, **common)
        elif self.prefill == "chat":
            rep = await self.client.achat(messages + [{"role": "assistant", "content": prefix}], logprobs=True,
                                          top_logprobs=self.top_logprobs, continue_final_message=True,
                                          add_generation_prompt=False, **common)
        else:
            rep = await self.client.achat(messages, logprobs=True, top_logprobs=self.top_logprobs, **common)
        return rep, getattr(rep, "logprobs", None), self.prefill != "none"

    async def adistribution(self, messages: list[dict]) -> dict:
        """{probs, mass, expected, mode, method, text, ...} (coroutine); method "parsed" when no distribution."""
        rep, content, prefilled = await self._ask(messages, self.prefix, self.max_new_tokens)
        text = rep.text
        if prefilled and not text.lstrip().startswith(self.prefix):  # vLLM returns the continuation only
            text = self.prefix + text
        out = distribution_from_top_logprobs(content, self.prefix, start=0 if prefilled else None) or {}
        usage, cost, cached = dict(rep.usage), rep.cost_usd, rep.cached
        if out.get("approximate") and prefilled:  # p("0" | "[[1"): one more short request
            rep1, c1, _ = await self._ask(messages, self.prefix + "1", 1)
            if c1:
                p0 = sum(math.exp(float(c["logprob"])) for c in (c1[0].get("top_logprobs") or [])
                         if (c.get("token") or "").strip() == "0" and c.get("logprob") is not None)
                out = distribution_from_top_logprobs(content, self.prefix, start=0, p_zero_after_one=p0) or out
            usage = {k: int(usage.get(k, 0) or 0) + int(rep1.usage.get(k, 0) or 0) for k in usage}
            cost, cached = (cost or 0.0) + (rep1.cost_usd or 0.0), cached and rep1.cached
        out.update(method="prob_weighted" if out else "parsed", text=text, usage=usage, cost_usd=cost,
                   cached=cached, prefill=self.prefill)
        return out

    def distribution(self, messages: list[dict]) -> dict | None:
        return run_sync(self.adistribution(messages))
