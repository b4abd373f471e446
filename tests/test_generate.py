"""Generation: chat template, middle truncation, length-grouped batches, batched = unbatched, streamed resumable eval."""
from __future__ import annotations

import json

import pytest

from longalign_lib.generate import (
    case_messages,
    encode_prompt,
    generate_batch,
    middle_truncate,
    model_window,
    plan_batches,
    reference_scores,
)
from longalign_lib.io import LongAlignError, read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.mark.parametrize("n, keep", [(10, 10), (10, 4), (11, 5), (100, 1), (7, 20)])
def test_middle_truncate_keeps_head_and_tail(n, keep):
    ids = list(range(n))
    out = middle_truncate(ids, keep)
    assert len(out) == min(n, keep)
    if n > keep:
        assert out[: keep // 2] == ids[: keep // 2] and out[keep // 2:] == ids[n - (keep - keep // 2):]
    else:
        assert out == ids
    with pytest.raises(LongAlignError):
        middle_truncate(ids, 0)


def test_prompt_uses_the_models_own_template_and_keeps_the_question(smol_tokenizer):
    tok = smol_tokenizer
    msgs = case_messages("Which verse names Naomi?", "word " * 3000)
    ids, n = encode_prompt(tok, msgs)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")
    assert "[INST]" not in text and n == len(ids) > 3000
    short, n2 = encode_prompt(tok, msgs, 200)
    t2 = tok.decode(short)
    assert len(short) == 200 and n2 == n
    assert t2.startswith("<|im_start|>") and "Which verse names Naomi?<|im_end|>" in t2  # head and tail survive
    assert t2.count("word") < 200


def test_plan_batches_groups_by_length_within_budget():
    lengths = [100, 900, 120, 880, 500, 110, 70, 950]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=2200, max_new_tokens=16)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or (max(lengths[i] for i in b) + 16) * len(b) <= 2200
    assert batches[0] == [7, 1] and set(batches[-1]) <= {0, 2, 5, 6}  # longest first, similar lengths together


def test_window(smol_model_and_tokenizer):
    model, tok = smol_model_and_tokenizer
    assert model_window(model, tok) == 8192 and model_window(model, tok, 1000) == 1000
    assert model_window(model, tok, 10**6) == 8192  # an override never raises the window


def test_batched_generation_matches_one_by_one(smol_model_and_tokenizer):
    model, tok = smol_model_and_tokenizer
    prompts = [encode_prompt(tok, case_messages(q))[0] for q in
               ["What is the capital of France?", "Name a colour of the sky on a clear day, in one word."]]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    together = generate_batch(model, tok, prompts, max_new_tokens=8)
    alone = [generate_batch(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone and all(t for t, _ in together)



def test_reference_scores_compare_replies_with_the_records_answers(smol_model_and_tokenizer):
    model, tok = smol_model_and_tokenizer
    q = [{"role": "user", "content": "What is the capital of France? Reply with one word."}]
    reply = generate_batch(model, tok, [encode_prompt(tok, q)[0]], max_new_tokens=8)[0][0]
    records = [{"messages": q + [{"role": "assistant", "content": f"  {reply} "}]},  # its own reply: exact
               {"messages": q + [{"role": "assistant", "content": "Zanzibar quokka"}]}]
    s = reference_scores(model, tok, records, max_new_tokens=8)
    assert s["predictions"] == [reply, reply]
    assert s["exact"] == [True, False] and s["f1"][0] == 1.0 and s["f1"][1] < 1.0


def _bench(path, n=3):
    rows = [{"idx": f"c{i}", "query": f"What is the code of box {i}? Reply with the code only.",
             "context": f"Box {i} holds code {4000 + i}. " + "Filler sentence about the weather. " * 20,
             "answer": str(4000 + i), "task": "retrieve", "meta": {"distractors": []},
             "few_shots": [{"answer": str(4000 + i), "score": 10}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_stage_streams_and_resumes(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    bench = _bench(tmp_path / "bench.jsonl")
    cfg = load_config("cpu-demo", [f"eval.bench_file={bench}", "eval.max_new_tokens=6", "eval.batch_size=2"])
    res = run_one("eval", cfg, tmp_path)
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["idx"] for r in sorted(rows, key=lambda r: r["idx"])] == ["c0", "c1", "c2"]
    assert res.metrics["cases"] == 3 and res.metrics["resumed"] == 0 and res.metrics["model"] == cfg.model.name
    assert all(r["n_new_tokens"] <= 6 and r["exact"] in (0.0, 1.0) and "context" not in r for r in rows)
    # a run killed mid-write: one finished row, then a torn line
    keep = next(r for r in rows if r["idx"] == "c1")
    (tmp_path / "predictions.jsonl").write_text(json.dumps(keep) + "\n" + '{"idx": "c0", "predic', encoding="utf-8")
    res2 = run_one("eval", cfg, tmp_path)
    rows2 = read_jsonl(tmp_path / "predictions.jsonl")
    assert res2.metrics["resumed"] == 1 and sorted(r["idx"] for r in rows2) == ["c0", "c1", "c2"]
    assert next(r for r in rows2 if r["idx"] == "c1") == keep  # kept, not regenerated
    for r in rows2:  # rows another model wrote in the same run dir: regenerated, never mixed in
        r["reuse"]["parts"]["model"] = "another-model"
        r["reuse"]["key"] = "another-key"
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows2), encoding="utf-8")
    res3 = run_one("eval", cfg, tmp_path)
    assert res3.metrics["resumed"] == 0 and res3.metrics["recompute_why"] == {"model changed": 3}
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) == 3


def test_truncation_is_reported_when_the_window_is_small(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    bench = _bench(tmp_path / "bench.jsonl", n=1)
    cfg = load_config("cpu-demo", [f"eval.bench_file={bench}", "eval.max_new_tokens=4", "eval.max_input_tokens=64",
                                   "eval.no_document_pass=true"])
    res = run_one("eval", cfg, tmp_path)
    row = read_jsonl(tmp_path / "predictions.jsonl")[0]
    assert row["truncated"] and row["n_input_tokens"] == 60 and row["n_prompt_tokens"] > 150
    assert res.metrics["truncated"] == 1 and res.metrics["truncated_tokens"] == row["n_prompt_tokens"] - 60
    # the no-document control: the same question without its context, scored the same way
    assert isinstance(row["no_doc_prediction"], str) and row["no_doc_exact"] in (0.0, 1.0)
    assert res.metrics["answered_without_document"] == int(row["no_doc_exact"])


def test_evaluated_model_is_the_trained_one_when_present(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.generate import eval_model_config

    cfg = load_config("gpu-small")  # RoPE base ×8, window 16k for training
    mc, name = eval_model_config(cfg, tmp_path)
    assert mc is cfg.model and name == cfg.model.name
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    mc, name = eval_model_config(cfg, tmp_path)
    assert name == str(tmp_path / "model") and mc.name == name
    assert mc.rope_base_factor == 1.0 and mc.max_position_embeddings is None  # already in the saved config
    cfg.eval.model = "smollm2-135m-instruct"
    assert eval_model_config(cfg, tmp_path)[1] == "smollm2-135m-instruct"


def test_eval_model_uses_transformers_sdpa_for_generation(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.generate import load_eval_model

    model, tok, name = load_eval_model(load_config("cpu-demo"), tmp_path)
    assert name == "smollm2-135m-instruct" and model.config._attn_implementation == "sdpa"
