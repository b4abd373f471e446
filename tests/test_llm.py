"""llm.py over real HTTP (OpenAI and Anthropic wire formats on 127.0.0.1), retries, cache, concurrency, cost."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from longalign_lib.io import LongAlignError
from longalign_lib.llm import Price, Reply, approx_tokens, client_from_config, make_client, price_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-0123456789"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers in Europe."}]


@pytest.fixture
def env_key(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    return "TEST_LLM_KEY"


def client(server, backend, tmp_path, env_key=None, **kw):
    url = server.openai_url if backend == "openai" else server.anthropic_url
    return make_client(backend, "test-model", base_url=url, api_key_env=env_key, cache_dir=tmp_path / "cache", **kw)


def test_openai_wire_format(llm_server, tmp_path, env_key):
    llm_server.push(text="Danube, Rhine, Seine.")
    c = client(llm_server, "openai", tmp_path, env_key)
    r = c.chat(MSGS, max_new_tokens=32, temperature=0.0)
    assert isinstance(r, Reply) and r.text == "Danube, Rhine, Seine." and not r.cached
    assert r.usage == {"input_tokens": 7, "output_tokens": 3, "cache_read_tokens": 0, "cache_write_tokens": 0}
    assert llm_server.by_path == {"/v1/chat/completions": 1}
    body, headers = llm_server.bodies[0], llm_server.headers[0]
    assert body["model"] == "test-model" and body["messages"] == MSGS
    assert body["max_tokens"] == 32 and body["temperature"] == 0.0
    assert headers["authorization"] == f"Bearer {KEY}" and headers["user-agent"].startswith("AsyncOpenAI/")
    # the key is never written to the cache
    for f in (tmp_path / "cache").rglob("*.json"):
        assert KEY not in f.read_text()


def test_anthropic_wire_format(llm_server, tmp_path, env_key):
    llm_server.push(text="Danube, Rhine, Seine.")
    c = client(llm_server, "anthropic", tmp_path, env_key)
    r = c.chat(MSGS, max_new_tokens=32, temperature=0.2, stop="\n\n")
    assert r.text == "Danube, Rhine, Seine." and r.usage["input_tokens"] == 7 and r.usage["output_tokens"] == 3
    assert llm_server.by_path == {"/v1/messages": 1}
    body, headers = llm_server.bodies[0], llm_server.headers[0]
    assert body["system"] == "Be brief." and body["messages"] == [MSGS[1]]
    assert body["max_tokens"] == 32 and body["stop_sequences"] == ["\n\n"]
    # the SDK puts the key in its header (x-api-key, or a bearer token in newer SDKs)
    assert KEY in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    assert headers["anthropic-version"] and headers["user-agent"].startswith("AsyncAnthropic/")


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_retries_on_429_and_500(llm_server, tmp_path, backend):
    llm_server.push(status=429).push(status=500).push(status=503).push(text="finally")
    c = client(llm_server, backend, tmp_path)
    r = c.chat(MSGS, max_new_tokens=8)
    assert r.text == "finally"
    assert llm_server.count == 4
    assert c.stats["requests"] == 4 and c.stats["retries"] == 3
    assert c.stats["retry_reasons"] == {"429": 1, "500": 1, "503": 1}


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_slow_reply_times_out_and_is_retried(llm_server, tmp_path, backend):
    llm_server.push(text="too late", delay=1.5).push(text="on time")
    c = client(llm_server, backend, tmp_path, timeout_s=0.4)
    t0 = time.time()
    r = c.chat(MSGS, max_new_tokens=8)
    assert r.text == "on time"
    assert c.stats["retry_reasons"] == {"timeout/connection": 1} and c.stats["retries"] == 1
    assert time.time() - t0 < 1.4  # gave up on the slow answer instead of waiting for it


def test_retry_after_is_honoured(llm_server, tmp_path):
    llm_server.push(status=429, headers={"retry-after": "0.5"}).push(text="ok")
    c = client(llm_server, "openai", tmp_path)
    t0 = time.time()
    assert c.chat(MSGS).text == "ok"
    assert time.time() - t0 >= 0.5


def test_gives_up_after_max_retries(llm_server, tmp_path):
    llm_server.push(status=500, times=10)
    c = client(llm_server, "openai", tmp_path, max_retries=2)
    with pytest.raises(LongAlignError, match="failed after 3 attempts.*HTTP 500"):
        c.chat(MSGS)
    assert llm_server.count == 3


def test_auth_error_fails_at_once_without_leaking_the_key(llm_server, tmp_path, env_key):
    llm_server.push(status=401, error="invalid x-api-key")
    c = client(llm_server, "anthropic", tmp_path, env_key)
    with pytest.raises(LongAlignError) as e:
        c.chat(MSGS)
    assert "401" in str(e.value) and "TEST_LLM_KEY" in str(e.value) and KEY not in str(e.value)
    assert llm_server.count == 1


def test_unreachable_server_is_a_clear_error(tmp_path):
    c = make_client("openai", "m", base_url="http://127.0.0.1:9/v1", cache_dir=tmp_path, max_retries=1, timeout_s=2)
    with pytest.raises(LongAlignError, match="failed after 2 attempts.*connection error.*base_url"):
        c.chat(MSGS)


def test_missing_key_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LongAlignError, match="OPENAI_API_KEY"):
        make_client("openai", "gpt-4o-mini", cache_dir=tmp_path)


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_cache_second_run_makes_zero_requests(llm_server, tmp_path, backend):
    batch = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    c1 = client(llm_server, backend, tmp_path, concurrency=3)
    first = c1.chat_many(batch, desc="first", max_new_tokens=16)
    assert llm_server.count == 6 and [r.text for r in first] == [f"echo: question {i}" for i in range(6)]
    c2 = client(llm_server, backend, tmp_path, concurrency=3)  # a new process would see the same files
    second = c2.chat_many(batch, desc="second", max_new_tokens=16)
    assert llm_server.count == 6, "the rerun must not send any request"
    assert c2.stats["requests"] == 0 and c2.stats["cache_hits"] == 6 and c2.stats["cost_usd"] == 0
    assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)
    c2.chat(batch[0], max_new_tokens=17)  # other params → another key → one new request
    assert llm_server.count == 7


def test_concurrency_is_bounded(llm_server, tmp_path):
    llm_server.push(delay=0.25, times=8)
    c = client(llm_server, "openai", tmp_path, concurrency=3)
    t0 = time.time()
    replies = c.chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(8)])
    assert len(replies) == 8 and [r.text for r in replies] == [f"echo: q{i}" for i in range(8)]
    assert llm_server.max_inflight == 3
    assert time.time() - t0 < 8 * 0.25  # really concurrent


def test_cost_accounting_and_estimate(llm_server, tmp_path):
    prices = {"test-model": [1.0, 2.0], "other": [5.0, 5.0]}
    c = client(llm_server, "openai", tmp_path, prices=prices)
    batch = [[{"role": "user", "content": "word " * 400}], [{"role": "user", "content": "x " * 40}]]
    est = c.estimate(batch, max_new_tokens=100)
    assert est["calls"] == 2 and est["cached"] == 0 and est["output_tokens"] == 200
    assert 200 < est["input_tokens"] < 700
    assert est["cost_usd"] == pytest.approx((est["input_tokens"] * 1.0 + 200 * 2.0) / 1e6)
    assert llm_server.count == 0, "estimating spends nothing"
    r = c.chat(batch[1], max_new_tokens=100)
    assert r.cost_usd == pytest.approx((r.usage["input_tokens"] * 1 + r.usage["output_tokens"] * 2) / 1e6)
    assert c.stats["cost_usd"] == pytest.approx(r.cost_usd)
    est2 = c.estimate(batch, max_new_tokens=100)
    assert est2["calls"] == 1 and est2["cached"] == 1


def test_price_lookup_and_token_estimate():
    prices = {"gpt-4o-mini": [0.15, 0.6], "gpt-4o": [2.5, 10.0]}
    assert price_for("gpt-4o-mini-2024-07-18", prices) == Price(0.15, 0.6, 0.15, 0.15)
    assert price_for("gpt-4o-2024-08-06", prices) == Price(2.5, 10.0, 2.5, 2.5)
    assert price_for("claude-x", {"claude": [1, 5, 0.1, 1.25]}) == Price(1, 5, 0.1, 1.25)
    with pytest.raises(LongAlignError, match=r"prices\['m'\]"):
        price_for("m", {"m": [1.0]})
    assert price_for("llama", prices) is None
    assert approx_tokens("a" * 400) == 100 and approx_tokens("长文本对齐") == 5


def test_client_from_config_and_chat_inside_a_running_loop(llm_server, tmp_path):
    from longalign_lib.config import load_config

    cfg = load_config("cpu-demo", ["synth.backend=openai", f"synth.base_url={llm_server.openai_url}",
                                   "synth.model=served-model"])
    c = client_from_config(cfg.synth, cache_dir=tmp_path)
    assert c.backend_name == "openai" and c.model == "served-model"

    async def notebook_cell():  # Jupyter runs cells inside an event loop: chat() must still work
        return c.chat([{"role": "user", "content": "hello there"}])

    assert asyncio.run(notebook_cell()).text == "echo: hello there"
    assert json.loads(json.dumps(c.stats))["requests"] == 1


def test_openai_raw_completion(llm_server, tmp_path):
    llm_server.push(text=" How do tides work?")
    c = client(llm_server, "openai", tmp_path)
    r = c.complete("<|im_start|>user\n", max_new_tokens=20, stop=["<|im_end|>"])
    assert r.text == " How do tides work?" and llm_server.by_path == {"/v1/completions": 1}
    assert llm_server.bodies[0]["prompt"] == "<|im_start|>user\n" and llm_server.bodies[0]["max_tokens"] == 20


def test_local_backend_real_model(smol_model_and_tokenizer, tmp_path):
    model, tok = smol_model_and_tokenizer
    c = make_client("local", "smollm2-135m-instruct", cache_dir=tmp_path, model_obj=model, tokenizer=tok, threads=1)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat(msgs, max_new_tokens=8, temperature=0.0)
    assert r.text and 0 < r.usage["output_tokens"] <= 8 and r.usage["input_tokens"] == c.count_tokens(msgs)
    assert r.cost_usd == 0.0 and c.estimate([msgs], max_new_tokens=8, temperature=0.0)["calls"] == 0  # cached
    again = c.chat(msgs, max_new_tokens=8, temperature=0.0)
    assert again.cached and again.text == r.text and c.stats["requests"] == 1


def test_local_prefix_cache_gives_the_same_answers(smol_model_and_tokenizer, tmp_path):
    """Reusing the previous call's KV cache for a shared prefix (the document) must not change greedy output."""
    model, tok = smol_model_and_tokenizer
    doc = "The lighthouse keeper logged every passing ship in a green ledger. " * 12
    prompts = [[{"role": "user", "content": doc + "\n\nWho kept the ledger?"}],
               [{"role": "user", "content": doc + "\n\nWhat colour was the ledger?"}]]
    outs = {}
    for reuse in (False, True):
        c = make_client("local", "smollm2-135m-instruct", cache_dir=False, model_obj=model, tokenizer=tok,
                        prefix_cache=reuse, threads=1)
        outs[reuse] = [c.chat(p, max_new_tokens=12, temperature=0.0).text for p in prompts]
        if reuse:
            assert c.backend.stats["reused_tokens"] > 100  # the second call skipped the document's prefill
    assert outs[True] == outs[False]


# ---------------------------------------------------------------------------------------------------------------
# prompt caching: the document marked for Anthropic's cache, cached-token usage from both wire formats
# ---------------------------------------------------------------------------------------------------------------
DOC = " ".join(f"word{i}" for i in range(60))


def _doc_msgs(question: str, mark: bool = True) -> list[dict]:
    m = {"role": "user", "content": f"{DOC}\n\n{question}"}
    if mark:
        m["cache_prefix"] = len(DOC)
    return [m]


def test_anthropic_cache_control_marks_the_document_and_usage_records_cache_tokens(llm_server, tmp_path):
    prices = {"test-model": [1.0, 5.0, 0.1, 1.25]}
    c = client(llm_server, "anthropic", tmp_path, prices=prices)
    r1 = c.chat(_doc_msgs("Which words come first?"), max_new_tokens=16)
    r2 = c.chat(_doc_msgs("Which words come last?"), max_new_tokens=16)
    first = llm_server.bodies[0]["messages"][0]["content"]
    assert first[0] == {"type": "text", "text": DOC, "cache_control": {"type": "ephemeral"}}
    assert first[1]["text"] == "\n\nWhich words come first?" and "cache_control" not in first[1]
    assert r1.usage["cache_write_tokens"] == 60 and r1.usage["cache_read_tokens"] == 0
    assert r2.usage["cache_read_tokens"] == 60 and r2.usage["cache_write_tokens"] == 0
    assert r2.usage["input_tokens"] == 64  # all prompt tokens, the cached ones included
    # cost: 4 plain input tokens at $1, 60 cached at $0.1 (read) or $1.25 (write), output at $5
    assert r2.cost_usd == pytest.approx((4 * 1.0 + 60 * 0.1 + r2.usage["output_tokens"] * 5.0) / 1e6)
    assert r1.cost_usd == pytest.approx((4 * 1.0 + 60 * 1.25 + r1.usage["output_tokens"] * 5.0) / 1e6)
    assert c.stats["cache_read_tokens"] == 60 and c.stats["cache_write_tokens"] == 60
    # the marker changes the bill, not the answer: the same request unmarked is a cache hit
    assert c.chat(_doc_msgs("Which words come first?", mark=False), max_new_tokens=16).cached
    assert llm_server.count == 2


def test_openai_cached_tokens_are_read_from_usage(llm_server, tmp_path):
    c = client(llm_server, "openai", tmp_path, prices={"test-model": [1.0, 2.0, 0.5, 1.0]})
    c.chat(_doc_msgs("first?"), max_new_tokens=8)
    r = c.chat(_doc_msgs("second?"), max_new_tokens=8)
    assert all(isinstance(m["content"], str) for m in llm_server.bodies[1]["messages"])  # OpenAI caches by itself
    assert "cache_prefix" not in llm_server.bodies[1]["messages"][0]  # our marker never goes on the wire
    assert r.usage["cache_read_tokens"] == 60 and r.usage["input_tokens"] == 61
    assert r.cost_usd == pytest.approx((1 * 1.0 + 60 * 0.5 + r.usage["output_tokens"] * 2.0) / 1e6)


# ---------------------------------------------------------------------------------------------------------------
# local backend: batched generation (what a GPU uses; forced here with batch_size)
# ---------------------------------------------------------------------------------------------------------------
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Name three colours of the rainbow and say why the sky looks blue."}],
           [{"role": "user", "content": "Hi"}]]


def test_local_batched_replies_equal_one_at_a_time_and_only_misses_are_decoded(smol_model_and_tokenizer, tmp_path):
    model, tok = smol_model_and_tokenizer
    one = make_client("local", "smollm2-135m-instruct", cache_dir=False, model_obj=model, tokenizer=tok, threads=1)
    assert not one.backend.batched and one.concurrency == 4  # CPU default: one at a time, as before
    ref = [one.chat(p, max_new_tokens=12, temperature=0.0) for p in PROMPTS]
    many = make_client("local", "smollm2-135m-instruct", cache_dir=tmp_path, model_obj=model, tokenizer=tok,
                       threads=1, batch_size=8)
    assert many.backend.batched and many.concurrency == 8
    got = many.chat_many(PROMPTS[:2], progress=False, max_new_tokens=12, temperature=0.0)
    assert many.backend.stats == {"reused_tokens": 0, "batches": 1, "batched_requests": 2}
    got += many.chat_many(PROMPTS, progress=False, max_new_tokens=12, temperature=0.0)[2:]  # two cache hits
    assert many.backend.stats["batched_requests"] == 3 and many.stats["cache_hits"] == 2
    assert [r.text for r in got] == [r.text for r in ref]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in ref] and "length" in [r.finish_reason for r in got]
    assert [r.usage["output_tokens"] for r in got] == [r.usage["output_tokens"] for r in ref]


def test_local_batched_sampling_does_not_depend_on_batch_mates(smol_model_and_tokenizer):
    model, tok = smol_model_and_tokenizer
    c = make_client("local", "smollm2-135m-instruct", cache_dir=False, model_obj=model, tokenizer=tok, threads=1,
                    batch_size=4)
    kw = {"max_new_tokens": 10, "temperature": 0.9, "seed": 7}
    alone = c.chat(PROMPTS[1], **kw).text
    together = c.chat_many(PROMPTS, progress=False, **kw)[1].text
    other_seed = c.chat(PROMPTS[1], **{**kw, "seed": 8}).text
    assert alone == together and alone != other_seed


def test_local_batched_too_long_prompt_fails_alone(smol_model_and_tokenizer):
    from longalign_lib.reply import ContextTooLong

    model, tok = smol_model_and_tokenizer
    c = make_client("local", "smollm2-135m-instruct", cache_dir=False, model_obj=model, tokenizer=tok, threads=1,
                    batch_size=4)
    window = model.config.max_position_embeddings
    outs = c.backend.generate_many([[1, 2, 3], [5] * window], [{"max_new_tokens": 4}, {"max_new_tokens": 4}])
    assert isinstance(outs[1], ContextTooLong) and "window" in str(outs[1]) and outs[0][2]["finish_reason"]
    with pytest.raises(ContextTooLong):
        c.complete("word " * window, max_new_tokens=4)


def test_magpie_waves_are_decoded_in_batches(smol_model_and_tokenizer, tmp_path):
    from longalign_lib.config import SynthConfig
    from longalign_lib.io import read_jsonl
    from longalign_lib.short_data import magpie_records

    model, tok = smol_model_and_tokenizer
    s = SynthConfig(short_question_tokens=16, short_max_new_tokens=12, min_answer_words=3)
    c = make_client("local", "smollm2-135m-instruct", cache_dir=False, model_obj=model, tokenizer=tok, threads=1,
                    batch_size=3)
    st = magpie_records(c, tok, 2, s, tmp_path / "short.jsonl", tmp_path / "rej.jsonl", progress=False)
    # at these small caps the 135M model's replies are often cut: those are rejected (`truncated`), never kept
    kept = read_jsonl(tmp_path / "short.jsonl") if (tmp_path / "short.jsonl").exists() else []
    assert st["kept"] == len(kept) and all(set(r["meta"]["finish_reason"].values()) == {"stop"} for r in kept)
    assert c.backend.stats["batches"] < c.stats["requests"]  # the wave's calls shared batches


def test_synth_documents_share_batches_question_wave_then_answer_wave(smol_model_and_tokenizer, tmp_path):
    """Self-Instruct over three documents with a batched local model: the question calls of all documents are
    decoded together, then their answer calls (not 2 × 3 one-at-a-time generations); a rerun is all cache hits."""
    from longalign_lib.config import SynthConfig
    from longalign_lib.corpus import Document
    from longalign_lib.synth import synth_long

    model, tok = smol_model_and_tokenizer
    lines = [x for x in (ROOT / "data" / "kjv_ruth.txt").read_text().splitlines() if len(x) > 40]
    docs = [Document(f"d{i}", "data", "literature", "en", f"Ruth {i}", "\n".join(lines[i * 3:(i + 1) * 3]),
                     "public domain", 80) for i in range(3)]
    s = SynthConfig(task_types=["summary"], n_questions=2, question_max_new_tokens=14, max_new_tokens=8,
                    question_attempts=1, min_answer_words=1)
    runs = []
    for k in range(2):
        c = make_client("local", "smollm2-135m-instruct", cache_dir=tmp_path / "cache", model_obj=model,
                        tokenizer=tok, threads=1, batch_size=8)
        st = synth_long(c, docs, s, tmp_path / f"long{k}.jsonl", tmp_path / f"rej{k}.jsonl", progress=False)
        runs.append((st, dict(c.backend.stats), dict(c.stats)))
    (st, backend, client_stats), (st2, backend2, client_stats2) = runs
    assert st["processed"] == 3 and client_stats["requests"] >= 3
    assert backend["batches"] <= 2 < client_stats["requests"]  # one question batch (+ one answer batch)
    assert backend2["batches"] == 0 and client_stats2["requests"] == 0  # cached: nothing decoded again
    assert st2["kept"] == st["kept"] and st2["rejected"] == st["rejected"]
