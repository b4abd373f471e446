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
    from longalign_lib.inputs import eval_model_config

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
    from longalign_lib.inputs import load_eval_model

    model, tok, name = load_eval_model(load_config("cpu-demo"), tmp_path)
    assert name == "smollm2-135m-instruct" and model.config._attn_implementation == "sdpa"


def test_decode_batch_equals_one_prompt_generate_with_repetition_penalty(smol_model_and_tokenizer):
    """Left padding with a repetition penalty: transformers' batched generate penalises the pad id (= eos for
    SmolLM2) in padded rows; decode_batch keeps pads out, so every row equals its one-prompt greedy decode."""
    import torch

    from longalign_lib.generate import _eos_ids_of, decode_batch

    model, tok = smol_model_and_tokenizer
    texts = ["What is 2+2?", "Name three colours of the rainbow and explain why the sky is blue.", "Hi"]
    ids = [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]) for t in texts]
    eos = _eos_ids_of(model, tok)
    torch.set_num_threads(1)
    ref = []
    for x in ids:
        t = torch.tensor([x])
        o = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=14, do_sample=False,
                           repetition_penalty=1.1, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        ref.append(o[0, len(x):].tolist())
    got = decode_batch(model, ids, [14, 14, 14], eos, tok.pad_token_id, repetition_penalty=1.1)
    assert [g for g, _ in got] == ref
    assert [f for _, f in got] == ["stop" if r[-1] in eos else "length" for r in ref] and got[2][1] == "stop"
    capped = decode_batch(model, ids, [3, 14, 2], eos, tok.pad_token_id, repetition_penalty=1.1)
    assert [len(g) for g, _ in capped][::2] == [3, 2] and capped[1][0] == ref[1]  # per-prompt caps


def test_setup_check_says_a_looping_reply_at_a_scaled_rope_is_expected_not_a_success():
    """The reply the gpu-small check printed on an H200 (RoPE ×8, untrained) must not read as a pass of quality."""
    import doctest

    from longalign_lib.stages import check

    assert doctest.testmod(check).failed == 0
    looped = "The language model's language model's language model's language model's language model's language"
    loops, verdict = check.reply_verdict(looped, 8.0)
    assert loops and "loops" in verdict and "×8" in verdict and "untrained" in verdict
    loops, verdict = check.reply_verdict(looped, 1.0)
    assert loops and "degenerate" in verdict
    loops, verdict = check.reply_verdict("Long-context alignment teaches a model to follow instructions over "
                                         "very long inputs such as whole books.", 8.0)
    assert not loops and "untrained" in verdict


def test_generation_speed_bench_core_on_cpu(smol_model_and_tokenizer):
    """bench/generation_speed.py's comparison (what the GPU run reports), tiny: both paths, same greedy texts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "generation_speed.py"
    spec = importlib.util.spec_from_file_location("generation_speed", path)
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    model, tok = smol_model_and_tokenizer
    prompts = gs.synth_prompts(tok, 2, 40)
    assert len(prompts) == 2 and prompts[0] != prompts[1] and "numbered list" in prompts[0][0]["content"]
    res = gs.compare(model, tok, prompts, max_new_tokens=4, single_n=2, batch_size=4, max_batch_tokens=4096)
    assert res["identical_texts"] == res["compared"] == 2 and res["batches"] == 1
    assert res["one_at_a_time"]["new_tokens"] == res["batched"]["new_tokens"] > 0
    assert res["one_at_a_time"]["tokens_per_s"] > 0 and res["batched"]["tokens_per_s"] > 0


def test_decode_batch_steps_copy_nothing_from_the_host_and_grow_no_mask(tiny):
    """A decode step builds its next input on the device and passes a view of a preallocated mask: no
    host→device tensor and no mask torch.cat per step (issue 23: the old loop made 2 copies and 2 cats per step)."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    from longalign_lib.generate import decode_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny), attn_implementation="sdpa").eval()
    prompts = [list(range(10, 40)), list(range(50, 70))]

    def ops(steps):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            got = decode_batch(model, prompts, steps, [], 0, repetition_penalty=1.1)
        assert [len(g) for g, _ in got] == [steps, steps]
        return collections.Counter(e.name for e in p.events())

    short, long = ops(2), ops(7)
    assert long["aten::lift_fresh"] == short["aten::lift_fresh"]  # torch.tensor(python data): setup only
    from transformers import DynamicCache

    cache, x = DynamicCache(), torch.tensor([prompts[0]])
    with torch.no_grad():
        model(input_ids=x, past_key_values=cache, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as p:  # one bare decode step: the model's own cats
            model(input_ids=x[:, -1:], attention_mask=torch.ones(1, 31, dtype=torch.long), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
    model_cats = sum(e.name == "aten::cat" for e in p.events())  # KV cache appends, RoPE
    assert (long["aten::cat"] - short["aten::cat"]) / 5 == model_cats
