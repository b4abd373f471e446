"""Benchmark format, loader errors, the offline set and the verifiable long tasks with their exact scorer."""
from __future__ import annotations

import json
import re

import pytest

from longalign_lib.benchmarks import (
    VERIFIABLE,
    load_benchmark,
    make_offline_set,
    make_verifiable_tasks,
    save_benchmark,
    score_exact,
)
from longalign_lib.io import LongAlignError
from longalign_lib.needle import load_haystack


@pytest.fixture(scope="module")
def hay():
    return load_haystack()


@pytest.fixture(scope="module")
def tasks(smol_tokenizer, hay):
    return make_verifiable_tasks(smol_tokenizer, hay, context_tokens=600, n_per_task=2, seed=3)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"idx": "a", "query": "Q?", "context": "long text", "answer": "A.",
        "few_shots": [{"answer": "A.", "score": 10}, {"answer": "B.", "score": 2}]}


def test_load_round_trip_and_defaults(tmp_path):
    p = _write(tmp_path / "b.jsonl", [GOOD, {"query": "Q2", "answer": "A2"}])
    cases = load_benchmark(p)
    assert [c.idx for c in cases] == ["a", "2"]  # a missing idx becomes the line number
    assert cases[0].few_shots[1] == {"answer": "B.", "score": 2} and cases[1].context == "" and cases[1].few_shots == []
    save_benchmark(tmp_path / "c.jsonl", cases)
    assert [c.to_dict() for c in load_benchmark(tmp_path / "c.jsonl")] == [c.to_dict() for c in cases]


@pytest.mark.parametrize("bad, line, words", [
    ({"idx": 1, "context": "x", "answer": "A"}, 2, "missing field 'query'"),
    ({**GOOD, "idx": "b", "few_shots": [{"answer": "x", "score": 11}]}, 2, "few_shots[0].score"),
    ({**GOOD, "idx": "b", "few_shots": [{"score": 3}]}, 2, "few_shots[0]"),
    ({**GOOD, "idx": "b", "context": 5}, 2, "'context' must be a string"),
    ({**GOOD}, 2, "duplicate idx 'a'"),
    ('{"query": "Q", ', 2, "invalid JSON"),
])
def test_loader_errors_name_file_line_and_field(tmp_path, bad, line, words):
    p = _write(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(LongAlignError) as e:
        load_benchmark(p)
    assert f"bad.jsonl:{line}:" in str(e.value) and words in str(e.value)


def test_verifiable_answers_hold_by_construction(tasks, smol_tokenizer):
    assert sorted({c.task for c in tasks}) == sorted(VERIFIABLE) and len(tasks) == 8
    for c in tasks:
        n = len(smol_tokenizer(c.context, add_special_tokens=False)["input_ids"])
        assert 540 <= n <= 620, (c.idx, n)
        if c.task == "retrieve":
            adj = re.search(r"for the (\w+) archive", c.query).group(1)
            fact = f"The vault code for the {adj} archive is {c.answer}."
            at = c.context.index(fact)
            assert at == 0 or re.search(r"[.!?\n]['\")\]]*\s*$", c.context[:at])  # planted between sentences
            assert all(f"archive is {d}." in c.context for d in c.meta["distractors"])
        elif c.task == "count":
            color = re.search(r"in a (\w+) cloak", c.query).group(1)
            town = re.search(r"through the (\w+) gate", c.query).group(1)
            sentence = f"A courier in a {color} cloak passed through the {town} gate."
            assert c.context.count(sentence) == int(c.answer) and c.meta["distractor_count"] >= 1
        elif c.task == "order":
            pos = [c.context.index(f"the {f} fair") for f in c.answer.split(", ")]
            assert pos == sorted(pos) and len(pos) == 4
        elif c.task == "multihop":
            person = re.search(r"whose key (\w+) holds", c.query).group(1)
            room = re.search(rf"{person} holds the key to the ([\w ]+)\.", c.context).group(1)
            assert f"The walls of the {room} are painted {c.answer}." in c.context


def test_exact_scorer_agrees_with_the_rubric(tasks):
    for c in tasks:
        scores = [score_exact(c, s["answer"]) for s in c.few_shots]
        assert scores[0] == 1.0 and scores[1:] == [0.0] * (len(scores) - 1), (c.idx, scores)
        assert score_exact(c, "The text does not say.") == 0.0


def test_exact_scorer_edge_cases(tasks):
    by = {c.task: c for c in tasks}
    count = by["count"]
    words = ["zero", "one", "two", "three", "four", "five", "six"]
    assert score_exact(count, f"I counted {words[int(count.answer)]} mentions.") == 1.0
    assert score_exact(count, f"{int(count.answer) + 1}, not {count.answer}") == 0.0  # the first number counts
    order = by["order"]
    names = order.answer.split(", ")
    assert score_exact(order, "First " + " then ".join(names) + ".") == 1.0
    assert score_exact(order, ", ".join(names[:3])) == 0.0
    retrieve = by["retrieve"]
    assert score_exact(retrieve, f"Code {retrieve.answer}") == 1.0
    assert score_exact(retrieve, f"{retrieve.answer} or {retrieve.meta['distractors'][0]}") == 0.0
    assert score_exact(retrieve, f"{retrieve.answer}7") == 0.0  # a longer number is not the code
    assert score_exact({"task": "open", "answer": "x"}, "x") is None


def test_deterministic_per_seed(smol_tokenizer, hay):
    a = make_verifiable_tasks(smol_tokenizer, hay, context_tokens=300, n_per_task=1, seed=7)
    b = make_verifiable_tasks(smol_tokenizer, hay, context_tokens=300, n_per_task=1, seed=7)
    c = make_verifiable_tasks(smol_tokenizer, hay, context_tokens=300, n_per_task=1, seed=8)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.context for x in a] != [x.context for x in c]


def test_offline_set_includes_verse_quotes_from_the_text(smol_tokenizer, tmp_path):
    cases = make_offline_set(smol_tokenizer, context_tokens=400, n_per_task=1, seed=0)
    quote = next(c for c in cases if c.task == "quote")
    ref = re.search(r"verse (\d+:\d+)", quote.query).group(1)
    assert f"{ref} {quote.answer}" in quote.context
    assert score_exact(quote, quote.answer) is None  # free text: judged, not exact-scored
    save_benchmark(tmp_path / "o.jsonl", cases)
    assert len(load_benchmark(tmp_path / "o.jsonl")) == len(cases) == 5


def test_unknown_task_is_a_clear_error(smol_tokenizer, hay):
    with pytest.raises(LongAlignError, match="unknown task"):
        make_verifiable_tasks(smol_tokenizer, hay, tasks=("retrieve", "sing"))
