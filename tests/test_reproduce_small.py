"""bench/reproduce_small.py end to end on CPU with `--tiny` (a tiny random model with SmolLM2's real tokenizer).

Runs data → short → train (packed, packed_weighted, naive; seed 0) → eval (rope8, packed_weighted-s0) → report
in-process through the script's `main`, then checks what the paper's comparison rests on: every arm trains the
same real tokens, packing computes no padding, packed arms take one pack per micro-batch and about as many optimizer
steps as naive batching, the evaluation items are scored exactly and sit in their length buckets, and the report
has a table with consistent CIs and its figures.
"""
from __future__ import annotations

import doctest
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("packed", "packed_weighted", "naive")
EVALUATED = ("rope8", "packed_weighted-s0")


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_small", ROOT / "bench" / "reproduce_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rs():
    return _load_script()


@pytest.fixture(scope="module")
def done(rs, tmp_path_factory, one_torch_thread_module):
    """The whole tiny pipeline once; returns (work dir, report dir, seconds per command)."""
    work, out = tmp_path_factory.mktemp("repro_work"), tmp_path_factory.mktemp("repro_out")
    steps = [["data", "--tiny"], ["short"], *[["train", "--arm", a, "--seed", "0"] for a in ARMS],
             *[["eval", "--model", m] for m in EVALUATED], ["report", "--out", str(out), "--n-boot", "200"]]
    seconds = {}
    for argv in steps:
        t0 = time.perf_counter()
        assert rs.main([argv[0], "--work", str(work), *argv[1:]]) == 0
        seconds[" ".join(argv)] = round(time.perf_counter() - t0, 2)
    print("tiny pipeline seconds:", seconds)
    return work, out, seconds


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _result(work: Path, arm: str) -> dict:
    return json.loads((work / "runs" / f"{arm}-s0" / "result.json").read_text())


def test_two_level_ci_doctest(rs):
    res = doctest.testmod(rs, verbose=False)
    assert res.attempted >= 1 and res.failed == 0


def test_two_level_ci_brackets_the_mean(rs):
    c = rs.two_level_ci({"a": [1.0, 0.0, 1.0], "b": [0.0, 0.0, 0.0], "c": [1.0, 1.0, 1.0]}, n_boot=300)
    assert c["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3) and c["n_items"] == 3
    assert 0.0 <= c["ci"][0] < c["mean"] < c["ci"][1] <= 1.0
    assert rs.two_level_ci({})["mean"] is None


def test_every_arm_trains_the_same_real_tokens_packing_computes_no_padding(done):
    work = done[0]
    res = {a: _result(work, a) for a in ARMS}
    assert len({r["tokens"] for r in res.values()}) == 1 and res["naive"]["tokens"] > 0
    assert len({r["sequences"] for r in res.values()}) == 1
    for a in ("packed", "packed_weighted"):
        assert res[a]["computed_tokens"] == res[a]["tokens"]
    assert res["naive"]["computed_tokens"] > res["naive"]["tokens"]  # padded to the longest of each micro-batch
    for r in res.values():
        assert r["steps"] == len(r["loss"]) > 0 and all(math.isfinite(x) for x in r["loss"])
        assert (Path(r["model_dir"]) / "config.json").exists()


def test_packed_arms_take_one_pack_per_micro_batch_and_about_naives_steps(rs, done):
    """The bug this guards: batch_size applied to packs (6 optimizer steps instead of ~44 at full size)."""
    import numpy as np

    from longalign_lib.batching import best_fit_decreasing
    from longalign_lib.models import load_tokenizer

    work = done[0]
    s = rs.settings(work)
    rows = rs.train_rows(work, load_tokenizer(s["model"]), s["window"])
    accum = rs.packed_accum(rows, s["window"], s["batch_size"], s["grad_accum"])
    n_packs = len(best_fit_decreasing(np.array([r["length"] for r in rows]), s["window"]))
    naive = _result(work, "naive")
    assert naive["sequences"] == len(rows)
    assert naive["grad_accum"] == s["grad_accum"]
    assert naive["steps"] == math.ceil(len(rows) / (s["batch_size"] * s["grad_accum"]))
    for a in ("packed", "packed_weighted"):
        r = _result(work, a)
        cfg = rs.arm_config(s, a, 0, accum, "cpu")
        assert cfg.batching.batch_size == 1 and r["grad_accum"] == accum
        assert r["steps"] == math.ceil(n_packs / accum)  # one pack per micro-batch
        assert abs(r["steps"] - naive["steps"]) <= max(1, accum)
    # at full size the same rule gives the packed arms about as many steps as naive batching
    full = rs.FULL
    big = [{"length": n} for n in np.random.default_rng(0).integers(1200, 15000, size=800)]
    acc = rs.packed_accum(big, full["window"], full["batch_size"], full["grad_accum"])
    packs = math.ceil(sum(r["length"] for r in big) / (0.98 * full["window"]))
    naive_steps = math.ceil(len(big) / (full["batch_size"] * full["grad_accum"]))
    assert acc > 1 and abs(math.ceil(packs / acc) - naive_steps) <= 0.25 * naive_steps


def _distractor(case: dict) -> str:
    meta = case["meta"]
    if case["task"] in ("retrieve", "multihop"):
        return meta["distractors"][0]
    if case["task"] == "count":
        return str(meta["count"] + 1)
    if case["task"] == "order":
        return ", ".join(reversed(meta["expected_order"]))
    raise AssertionError(case["task"])


def test_eval_items_are_exactly_scorable_and_in_their_length_buckets(rs, done):
    from longalign_lib.benchmarks import score_exact

    work = done[0]
    s = rs.settings(work)
    cases = _read_jsonl(work / "eval_long.jsonl")
    assert len(cases) == len(s["buckets"]) * len(rs.EVAL_TASKS) * s["per_bucket"]
    assert len({c["idx"] for c in cases}) == len(cases)
    for c in cases:
        assert score_exact(c, c["answer"]) == 1.0, c["idx"]
        assert score_exact(c, _distractor(c)) == 0.0, c["idx"]
        lo, hi = s["buckets"][c["meta"]["bucket"]]
        assert 0.9 * lo <= c["meta"]["context_tokens"] <= 1.1 * hi, (c["idx"], c["meta"]["context_tokens"])
    train = _read_jsonl(work / "train_long.jsonl")
    assert len(train) == s["n_long"] and {r["meta"]["task"] for r in train} == set(rs.TRAIN_TASKS)
    for r in train:
        assert 0.9 * s["min_tokens"] <= r["meta"]["context_tokens"] <= 1.1 * s["max_tokens"]
    assert s["data"]["long_context_tokens"] == sorted(r["meta"]["context_tokens"] for r in train)
    # the tiny random model may write only empty replies: those are dropped, and counted
    short = _read_jsonl(work / "train_short.jsonl")
    assert len(short) == s["data"]["n_short"] == s["n_short"] - s["data"]["short_dropped_empty"]
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip()
                         for r in short)


def test_eval_files_cover_every_item(done):
    work = done[0]
    n = len(_read_jsonl(work / "eval_long.jsonl"))
    for m in EVALUATED:
        ev = json.loads((work / "evals" / f"{m}.json").read_text())
        assert len(ev["long"]) == n and all(x["score"] in (0.0, 1.0) for x in ev["long"])
        assert ev["needle"]["cells"] and ev["short"]


def test_report_table_cis_and_figures(done):
    out = done[1]
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"rope8", "packed_weighted"}
    for g, row in res["table"].items():
        assert row["seeds"] == 1
        for part in ("long", "needle", "short"):
            c = row[part]
            assert c["ci"][0] <= c["mean"] <= c["ci"][1], (g, part, c)
    assert res["table"]["packed_weighted"]["train"]["steps"] > 0
    assert "packed_weighted vs rope8: long" in res["comparisons"]
    md = (out / "results.md").read_text()
    assert md.startswith("| model | seeds | long tasks % |") and "packing + loss weighting" in md
    for png in ("training_time.png", "needle_before_after.png", "long_tasks_by_length.png"):
        assert (out / png).stat().st_size > 1000, png


def test_a_step_without_its_data_says_which_step_to_run(rs, tmp_path, capsys):
    assert rs.main(["train", "--work", str(tmp_path / "empty"), "--arm", "naive"]) == 2
    err = capsys.readouterr().err
    assert "settings.json: not found" in err and "reproduce_small.py data --work" in err
