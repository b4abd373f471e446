"""Short-task regression set: the bundled file, the exact scorer, the real SmolLM2 on it, the paired before/after
comparison, and the eval stage writing short_tasks.json."""
from __future__ import annotations

import json

import pytest

from longalign_lib.io import LongAlignError
from longalign_lib.short_tasks import compare_short, evaluate_short_tasks, is_correct, load_short_tasks


def test_bundled_set_loads_and_errors_name_the_line(tmp_path):
    items = load_short_tasks()
    assert len(items) == 20 and len({it["idx"] for it in items}) == 20
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps({"idx": "a", "query": "Q?", "answers": ["x"]}) + "\n" + json.dumps({"idx": "b", "query": "Q?", "answers": []}) + "\n")
    with pytest.raises(LongAlignError, match=r"s\.jsonl:2: field 'answers'"):
        load_short_tasks(bad)


@pytest.mark.parametrize("pred, answers, ok", [
    ("Paris", ["Paris"], True), ("The capital of France is Paris.", ["Paris"], True), ("Parisian food", ["Paris"], False),
    ("twelve", ["12", "twelve"], True), ("112", ["12"], False), ("It is twenty-seven.", ["twenty-seven"], True),
    ("Good morning!", ["hello", "good morning"], True), ("", ["x"], False),
])
def test_is_correct(pred, answers, ok):
    assert is_correct(pred, answers) is ok


def test_compare_before_after_by_hand():
    before = [{"idx": str(i), "correct": 1.0} for i in range(6)]
    after = [{"idx": str(i), "correct": 0.0 if i < 3 else 1.0} for i in range(6)]
    c = compare_short(before, after)
    assert c["mean_diff"] == pytest.approx(-0.5) and c["lost"] == ["0", "1", "2"]
    assert c["p_value"] == pytest.approx(2 / 8)  # 3 non-zero differences: only all-same signs reach |mean| 0.5


def test_real_model_answers_some_short_tasks(smol_model_and_tokenizer, one_torch_thread):
    model, tok = smol_model_and_tokenizer
    items = [it for it in load_short_tasks() if it["idx"].startswith("capital")]
    rows = evaluate_short_tasks(model, tok, items, max_new_tokens=8)
    assert [r["idx"] for r in rows] == [it["idx"] for it in items]
    assert sum(r["correct"] for r in rows) >= 3, rows  # SmolLM2-135M-Instruct knows European capitals


def test_eval_stage_writes_short_tasks_json(tmp_path, one_torch_thread):
    from longalign_lib.config import load_config
    from longalign_lib.io import read_json
    from longalign_lib.pipeline import run_one

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"idx": "c0", "query": "What is the code? Reply with the code only.",
                                 "context": "The code is 4411.", "answer": "4411", "task": "retrieve"}) + "\n")
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in [{"idx": "p", "query": "What is the capital of France?", "answers": ["Paris"]},
                                                            {"idx": "r", "query": "What is the capital of Italy?", "answers": ["Rome"]}]))
    cfg = load_config("cpu-demo", [f"eval.bench_file={bench}", "eval.max_new_tokens=4", "eval.short_tasks=true",
                                   f"eval.short_tasks_file={short}"])
    res = run_one("eval", cfg, tmp_path)
    out = read_json(tmp_path / "short_tasks.json")
    assert [r["idx"] for r in out["rows"]] == ["p", "r"] and res.metrics["short_accuracy"] == out["accuracy"]
    assert "short_tasks.json" in res.outputs and "Short-task regression set (2 exact questions)" in res.report
    assert "compare" not in out  # the evaluated model is the base model: nothing to compare with
