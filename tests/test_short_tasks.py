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
