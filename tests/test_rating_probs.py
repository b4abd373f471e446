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
