"""The LongBench-Chat loader on a fixture in the real layout (data/longbench_chat_sample), its errors, the converter,
and the leave-one-out meta-evaluation judged by the real SmolLM2 judge through probability-weighted ratings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longalign_lib.io import LongAlignError
from longalign_lib.judge import meta_eval_items
from longalign_lib.longbench_chat import load_longbench_chat, main

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "longbench_chat_sample"


def test_loader_reads_the_real_layout():
    cases = load_longbench_chat(FIXTURE)
    assert [c.idx for c in cases] == ["1", "2", "3"] and all(len(c.few_shots) == 3 for c in cases)
    raw = json.loads((FIXTURE / "test_cases.json").read_text())
    shots = json.loads((FIXTURE / "few_shots.json").read_text())
    for c, r in zip(cases, raw, strict=True):
        assert c.query == r["query"] and c.answer == r["answer"] and c.context == r["prompt"]
        assert c.few_shots == shots[r["idx"] - 1]  # few_shots.json is indexed by idx - 1
        assert c.meta["source"] == "LongBench-Chat" and c.meta["length"] == r["length"]  # extra keys kept in meta
    assert load_longbench_chat(FIXTURE / "test_cases.json", limit=2)[-1].idx == "2"


def test_leave_one_out_items():
    items = meta_eval_items(load_longbench_chat(FIXTURE))
    assert len(items) == 9
    for it in items:
        assert it["human_score"] in [s["score"] for s in json.loads((FIXTURE / "few_shots.json").read_text())[int(it["idx"].split("#")[0]) - 1]]
        assert it["prediction"] not in [s["answer"] for s in it["few_shots"]] and len(it["few_shots"]) == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda c, s: c[1].pop("query"), r"test_cases\.json: entry 1: field 'query'"),
    (lambda c, s: c[0].update(idx=0), r"entry 0: field 'idx' must be a positive integer"),
    (lambda c, s: c[2].update(idx=1), r"entry 2: duplicate idx 1"),
    (lambda c, s: s.pop(), r"few_shots\.json: has 2 entries.*idx 3"),
    (lambda c, s: s[1][2].update(score=11), r"few_shots\.json: entry 1\[2\]: field 'score'.*11"),
])
def test_loader_errors_name_file_entry_field(tmp_path, breakage, message):
    cases = json.loads((FIXTURE / "test_cases.json").read_text())
    shots = json.loads((FIXTURE / "few_shots.json").read_text())
    breakage(cases, shots)
    (tmp_path / "test_cases.json").write_text(json.dumps(cases))
    (tmp_path / "few_shots.json").write_text(json.dumps(shots))
    with pytest.raises(LongAlignError, match=message):
        load_longbench_chat(tmp_path)


def test_loader_missing_and_bad_json(tmp_path):
    with pytest.raises(LongAlignError, match="test_cases.json: not found; download"):
        load_longbench_chat(tmp_path)
    shutil.copy(FIXTURE / "test_cases.json", tmp_path)
    (tmp_path / "few_shots.json").write_text("[[{]]")
    with pytest.raises(LongAlignError, match=r"few_shots\.json:1: not valid JSON"):
        load_longbench_chat(tmp_path)


def test_converter_writes_a_benchmark_the_cookbook_loads(tmp_path, capsys):
    from longalign_lib.benchmarks import load_benchmark

    assert main([str(FIXTURE), "--out", str(tmp_path / "b.jsonl")]) == 0
    assert "3 questions with 9 human-rated answers" in capsys.readouterr().out
    back = load_benchmark(tmp_path / "b.jsonl")
    assert [c.to_dict() for c in back] == [c.to_dict() for c in load_longbench_chat(FIXTURE)]


def test_fixture_judged_leave_one_out_by_smollm2(smol_model_and_tokenizer, one_torch_thread):
    from longalign_lib.agreement import reliability_report
    from longalign_lib.judge import judge_items, load_template
    from longalign_lib.rating_probs import LocalRatingScorer

    model, tok = smol_model_and_tokenizer
    items = meta_eval_items(load_longbench_chat(FIXTURE))
    rows = judge_items(None, items, load_template("rating_first"), runs=1, scorer=LocalRatingScorer(model, tok),
                       progress=False)
    assert all(r["score"] is not None and r["score_method"] == "prob_weighted" for r in rows)  # every item rated
    rep = reliability_report([r["score"] for r in rows], [it["human_score"] for it in items], n_boot=100)
    assert rep["n"] == 9 and all(k in rep for k in ("spearman", "weighted_kappa", "krippendorff_alpha", "leniency"))
    assert -1 <= rep["spearman"]["value"] <= 1 and rep["spearman"]["lo"] <= rep["spearman"]["hi"]
