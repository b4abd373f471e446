"""Probability-weighted ratings: a stub model whose next-token distribution is known (with the real SmolLM2
tokenizer, which writes 10 as "1" "0"), the real SmolLM2 judge, OpenAI-style top_logprobs parsing, and the judge
over real HTTP with logprobs, each score recording the method that produced it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from longalign_lib.judge import judge_items, load_template
from longalign_lib.rating_probs import (
    LocalRatingScorer,
    OpenAIRatingScorer,
    distribution_from_top_logprobs,
    summarize_probs,
)

SHOTS = [{"answer": "Alpha", "score": 10}, {"answer": "Beta", "score": 3}]


class StubLM:
    """A causal LM whose next-token distribution depends only on the last input token (known by construction)."""

    def __init__(self, tok, table: dict[str, dict[str, float]]):
        import torch

        self.device = torch.device("cpu")
        self.config = SimpleNamespace(max_position_embeddings=8192)
        self.vocab = len(tok)
        self.ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        self.table = {self.ids(k)[-1]: {self.ids(t)[-1]: p for t, p in v.items()} for k, v in table.items()}
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None, **kw):
        import torch

        self.calls += 1
        probs = torch.full((self.vocab,), 1e-12)
        for t, p in self.table.get(int(input_ids[0, -1]), {}).items():
            probs[t] = p
        rest = 1.0 - float(probs.sum())
        probs[self.ids("hello")[0]] += max(rest, 0.0)  # the remainder goes to a non-rating token
        logits = torch.log(probs)[None, None, :].expand(1, input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits)


def test_stub_distribution_is_read_exactly(smol_tokenizer):
    # after "[[": p(7)=.5, p(8)=.2, p("1")=.2, .1 elsewhere; after "1": p("0")=.25
    stub = StubLM(smol_tokenizer, {"[[": {"7": 0.5, "8": 0.2, "1": 0.2}, "1": {"0": 0.25}})
    scorer = LocalRatingScorer(stub, smol_tokenizer)
    assert scorer._seqs[10] == (scorer._seqs[1][0], stub.ids("0")[0])  # SmolLM2 writes 10 as two tokens
    d = scorer.distribution([{"role": "user", "content": "Rate this answer."}])
    raw = {7: 0.5, 8: 0.2, 10: 0.2 * 0.25, 1: 0.2 * 0.75}
    mass = sum(raw.values())
    assert d["mass"] == pytest.approx(mass, abs=1e-6)
    for r in range(1, 11):
        assert d["probs"][r] == pytest.approx(raw.get(r, 0.0) / mass, abs=1e-6)
    assert d["expected"] == pytest.approx(sum(r * p for r, p in raw.items()) / mass, abs=1e-5)
    assert d["mode"] == 7 and d["method"] == "prob_weighted"
    assert stub.calls == 2  # one pass at "[[", one more after "1" to split 1 from 10


def test_summarize_probs_edge_cases():
    assert summarize_probs({}) is None and summarize_probs({3: 0.0}) is None
    assert summarize_probs({10: 1.0})["expected"] == 10.0


def test_judge_items_with_stub_scorer_records_method(smol_tokenizer):
    stub = StubLM(smol_tokenizer, {"[[": {"9": 0.6, "2": 0.2}})
    items = [{"idx": "a", "query": "Q?", "answer": "R.", "prediction": "P.", "few_shots": SHOTS}]
    row = judge_items(None, items, load_template("rating_first"), runs=2, scorer=LocalRatingScorer(stub, smol_tokenizer),
                      progress=False)[0]
    want = (9 * 0.6 + 2 * 0.2) / 0.8
    assert row["score"] == pytest.approx(want, abs=1e-5) and row["score_method"] == "prob_weighted"
    assert [r["method"] for r in row["runs"]] == ["prob_weighted"] * 2 and not row["failed"]
    att = row["runs"][0]["attempts"][0]
    assert att["mass"] == pytest.approx(0.8, abs=1e-6) and att["mode"] == 9 and att["raw"] == ""
    assert row["runs"][0]["order"] != row["runs"][1]["order"]  # the two runs still see reshuffled examples


def test_real_smollm2_judge_rates_every_item(smol_model_and_tokenizer, one_torch_thread):
    import torch

    model, tok = smol_model_and_tokenizer
    scorer = LocalRatingScorer(model, tok)
    msgs = [{"role": "user", "content": "Rate the answer 1 to 10. Question: 2+2? Reference: 4. Answer: 4."}]
    d = scorer.distribution(msgs)
    assert 0 < d["mass"] <= 1 and 1 <= d["expected"] <= 10 and sum(d["probs"].values()) == pytest.approx(1.0)
    # the same number straight from the model's logits
    ids = scorer.prompt_ids(msgs)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        p1 = torch.softmax(model(input_ids=torch.tensor([ids + [scorer._seqs[1][0]]])).logits[0, -1].float(), -1)
    seven = float(p[scorer._seqs[7][0]])
    ten = float(p[scorer._seqs[10][0]]) * float(p1[scorer._seqs[10][1]])
    assert d["probs"][7] * d["mass"] == pytest.approx(seven, rel=1e-3)
    assert d["probs"][10] * d["mass"] == pytest.approx(ten, rel=1e-3)


def _lp(token, p, tops):
    return {"token": token, "logprob": math.log(p), "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in tops]}


def test_distribution_from_top_logprobs():
    content = [_lp("Rating", 0.9, []), _lp(": [[", 0.9, []), _lp("7", 0.5, [("7", 0.5), ("8", 0.3), (" 7", 0.1), ("x", 0.05)]),
               _lp("]]", 0.99, [])]
    d = distribution_from_top_logprobs(content)
    assert d["probs"][7] == pytest.approx(0.6 / 0.9) and d["mass"] == pytest.approx(0.9)
    assert d["expected"] == pytest.approx((7 * 0.6 + 8 * 0.3) / 0.9) and not d["approximate"]
    # a reply that starts with the digit; a tokenizer that writes 10 as "1" "0"
    split = [_lp("1", 0.6, [("1", 0.6), ("9", 0.4)]), _lp("0", 0.75, [("0", 0.75), ("]]", 0.25)])]
    d = distribution_from_top_logprobs(split)
    assert d["probs"][10] == pytest.approx(0.45) and d["probs"][1] == pytest.approx(0.15) and d["probs"][9] == pytest.approx(0.4)
    assert distribution_from_top_logprobs([_lp("I", 0.9, []), _lp(" cannot", 0.9, [])]) is None
    assert distribution_from_top_logprobs(None) is None


def test_openai_logprobs_over_http(llm_server, tmp_path):
    from longalign_lib.llm import make_client

    llm_server.responder = lambda body, path: "[[8]] Close to the reference."
    llm_server.logprobs = lambda body, text: [_lp("[[", 0.99, []), _lp("8", 0.7, [("8", 0.7), ("6", 0.2), ("9", 0.1)])]
    client = make_client("openai", "judge-m", base_url=llm_server.openai_url, cache_dir=tmp_path / "cache",
                         api_key_env="NO_SUCH_KEY_VAR")
    items = [{"idx": i, "query": "Q?", "answer": "R.", "prediction": "P.", "few_shots": SHOTS} for i in ("1", "2")]
    rows = judge_items(client, items, load_template("rating_first"), runs=2, scorer=OpenAIRatingScorer(client),
                       progress=False)
    assert all(b["logprobs"] is True and b["top_logprobs"] == 20 for b in llm_server.bodies)
    for r in rows:
        assert r["score"] == pytest.approx(8 * 0.7 + 6 * 0.2 + 9 * 0.1) and r["score_method"] == "prob_weighted"
        assert r["runs"][0]["attempts"][0]["parsed_rating"] == 8.0  # the parsed [[n]] is kept beside it
    n = llm_server.count
    again = judge_items(client, items, load_template("rating_first"), runs=2, scorer=OpenAIRatingScorer(client),
                        progress=False)  # the cache keeps the log-probs: no new request, same scores
    assert llm_server.count == n and [r["score"] for r in again] == [r["score"] for r in rows]
    # a server without logprobs: the parsed rating is used, and says so
    llm_server.logprobs = None
    client2 = make_client("openai", "judge-m", base_url=llm_server.openai_url, cache_dir=False, api_key_env="NO_SUCH_KEY_VAR")
    row = judge_items(client2, items[:1], load_template("rating_first"), runs=1, scorer=OpenAIRatingScorer(client2),
                      progress=False)[0]
    assert row["score"] == 8.0 and row["score_method"] == "parsed"


def test_openai_scorer_refuses_backends_without_logprobs(llm_server):
    from longalign_lib.io import LongAlignError
    from longalign_lib.llm import make_client

    client = make_client("anthropic", "c", base_url=llm_server.anthropic_url, cache_dir=False, api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(LongAlignError, match="judge_scoring=parse"):
        OpenAIRatingScorer(client)


# ---------------------------------------------------------------- pre-filled "[[" over OpenAI-compatible servers
def _prefill_logprobs(body, text):
    """A server whose judge, once its reply is begun with "[[" (or "[[1"), puts p(8)=.5, p(7)=.2, p("1")=.2 on the
    next token, and p("0")=.6 after "[[1"; unprefilled, it writes prose with no "[[" (as small judges do)."""
    sent = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    if body.get("messages") and body["messages"][-1]["role"] != "assistant":
        return [_lp("The", 0.9, [("The", 0.9)]), _lp(" answer", 0.9, [(" answer", 0.9)])]
    if sent.endswith("[[1"):
        return [_lp("0", 0.6, [("0", 0.6), ("]]", 0.4)])]
    return [_lp("8", 0.5, [("8", 0.5), ("7", 0.2), ("1", 0.2), ("x", 0.1)]), _lp("]]", 0.99, [("]]", 0.99)])]


PREFILL_RAW = {8: 0.5, 7: 0.2, 10: 0.2 * 0.6, 1: 0.2 * 0.4}


def _check_prefill_distribution(d):
    mass = sum(PREFILL_RAW.values())
    assert d["method"] == "prob_weighted" and not d["approximate"] and d["mass"] == pytest.approx(mass)
    for r, p in PREFILL_RAW.items():
        assert d["probs"][r] == pytest.approx(p / mass)
    assert d["expected"] == pytest.approx(sum(r * p for r, p in PREFILL_RAW.items()) / mass)


def test_chat_prefill_continues_the_final_assistant_message(llm_server, tmp_path):
    from longalign_lib.llm import make_client

    llm_server.responder = lambda body, path: "8]] Close." if body["messages"][-1]["content"] == "[[" else "0]]"
    llm_server.logprobs = _prefill_logprobs
    client = make_client("openai", "judge-m", base_url=llm_server.openai_url, cache_dir=False, api_key_env="NO_SUCH_KEY_VAR")
    msgs = [{"role": "user", "content": "Rate the answer."}]
    d = OpenAIRatingScorer(client, top_logprobs=5, prefill="chat").distribution(msgs)
    first, second = llm_server.bodies
    assert first["messages"] == msgs + [{"role": "assistant", "content": "[["}]
    assert first["continue_final_message"] is True and first["add_generation_prompt"] is False
    assert first["logprobs"] is True and first["top_logprobs"] == 5 and first["temperature"] == 0.0
    # "1" could begin "10": one more request, begun with "[[1", reads p("0")
    assert second["messages"][-1] == {"role": "assistant", "content": "[[1"} and second["max_tokens"] == 1
    _check_prefill_distribution(d)
    assert d["text"] == "[[8]] Close." and d["prefill"] == "chat"
    # unprefilled (main's only way), the same judge gives no distribution at all
    d0 = OpenAIRatingScorer(client, prefill="none").distribution(msgs)
    assert d0["method"] == "parsed" and "expected" not in d0


@pytest.mark.parametrize("fmt", ["legacy", "content"])  # vLLM's /v1/completions logprobs, llama.cpp's
def test_completions_prefill_writes_the_chat_template(llm_server, smol_tokenizer, fmt):
    from longalign_lib.llm import make_client

    llm_server.responder = lambda body, path: "8]]"
    llm_server.logprobs = _prefill_logprobs
    llm_server.completions_logprobs = fmt
    client = make_client("openai", "judge-m", base_url=llm_server.openai_url, cache_dir=False, api_key_env="NO_SUCH_KEY_VAR")
    msgs = [{"role": "user", "content": "Rate the answer."}]
    d = OpenAIRatingScorer(client, top_logprobs=5, prefill="completions", tokenizer=smol_tokenizer).distribution(msgs)
    want = smol_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "[["
    assert llm_server.by_path == {"/v1/completions": 2}
    assert llm_server.bodies[0]["prompt"] == want and llm_server.bodies[0]["logprobs"] == 5
    assert llm_server.bodies[1]["prompt"] == want + "1"
    _check_prefill_distribution(d)
    assert d["text"] == "[[8]]"


def test_judge_stage_probs_over_a_server_uses_the_prefill(llm_server, tmp_path):
    """judge_scoring=probs with a judge_base_url: every run prob-weighted (main: none, the judge wrote no "[[")."""
    import json

    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    llm_server.responder = lambda body, path: "8]]" if body["messages"][-1]["role"] == "assistant" else "The answer."
    llm_server.logprobs = _prefill_logprobs
    rows = [{"idx": str(i), "query": f"Q{i}?", "answer": "R.", "prediction": "P.", "few_shots": SHOTS} for i in range(3)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config("cpu-demo", [f"eval.judge_base_url={llm_server.openai_url}", "eval.judge_model=judge-m",
                                   "eval.judge_cache_dir=" + str(tmp_path / "cache"), "eval.judge_scoring=probs"])
    res = run_one("judge", cfg, tmp_path)
    assert res.metrics["score_methods"] == {"prob_weighted": 3} and res.metrics["judged"] == 3


def test_prefill_settings_are_checked(llm_server):
    from longalign_lib.io import LongAlignError
    from longalign_lib.llm import make_client

    client = make_client("openai", "m", base_url=llm_server.openai_url, cache_dir=False, api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(LongAlignError, match="judge_tokenizer"):
        OpenAIRatingScorer(client, prefill="completions")
    with pytest.raises(LongAlignError, match="judge_prefill"):
        OpenAIRatingScorer(client, prefill="assistant")
