"""Short-task regression check: does long-context training keep the model's short-task answers (paper: MT-Bench)?

Run as: longalign eval --set eval.short_tasks=true   (→ <run_dir>/short_tasks.json: base vs trained model)
Library:
    items = load_short_tasks()                                # data/short_tasks.jsonl: {idx, query, answers}
    rows = evaluate_short_tasks(model, tok, items)            # [{idx, prediction, correct}]
    cmp = compare_short(rows_before, rows_after)              # paired: after − before, bootstrap CI, permutation p

The set is small, offline and exactly scorable: arithmetic, capitals, everyday facts and word questions, each with
its accepted answers. An answer is correct when one accepted answer appears in it as a whole word or phrase
(case and punctuation ignored). It is a smoke alarm, not MT-Bench: a drop here means training broke something
basic; no drop does not prove chat quality is intact.
"""
from __future__ import annotations

import re
from pathlib import Path

from .agreement import paired_compare
from .generate import case_messages, generate_replies
from .io import LongAlignError, iter_jsonl

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "data" / "short_tasks.jsonl"


def load_short_tasks(path: str | Path | None = None) -> list[dict]:
    """Read and validate a short-task file ({idx, query, answers: [str, ...]} per line); errors name file:line."""
    path = Path(path or DEFAULT_FILE)
    items, seen = [], set()
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not obj["query"].strip():
            raise LongAlignError(f"{path}:{line}: expected {{\"idx\", \"query\": str, \"answers\": [str, ...]}}")
        answers = obj.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise LongAlignError(f"{path}:{line}: field 'answers' must be a non-empty list of strings")
        idx = str(obj.get("idx", line))
        if idx in seen:
            raise LongAlignError(f"{path}:{line}: duplicate idx {idx!r}")
        seen.add(idx)
        items.append({"idx": idx, "query": obj["query"], "answers": answers})
    if not items:
        raise LongAlignError(f"{path}: no short tasks")
    return items


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", (s or "").lower()).split())


def is_correct(prediction: str, answers: list[str]) -> bool:
    """True when an accepted answer occurs in the prediction as a whole word / phrase.

    >>> is_correct("The capital is Paris.", ["Paris"]), is_correct("Parisian", ["Paris"])
    (True, False)
    """
    text = _norm(prediction)
    return any(re.search(rf"(?<![\w-]){re.escape(_norm(a))}(?![\w-])", text) for a in answers)


def evaluate_short_tasks(model, tok, items: list[dict], max_new_tokens: int = 16, seed: int = 0,
                         threads: int = 0, progress: bool = False) -> list[dict]:
    """Answer each short task greedily through the chat template; returns [{idx, prediction, correct}]."""
    outs = generate_replies(model, tok, [case_messages(it["query"]) for it in items], max_new_tokens=max_new_tokens,
                            batch_size=8, seed=seed, progress=progress, desc="short tasks", threads=threads)
    return [{"idx": it["idx"], "prediction": o["prediction"], "correct": float(is_correct(o["prediction"], it["answers"]))}
            for it, o in zip(items, outs, strict=True)]


def compare_short(before: list[dict], after: list[dict], seed: int = 0) -> dict:
    """after − before on the shared items (accuracy difference), with a paired bootstrap CI and permutation p."""
    res = paired_compare({r["idx"]: r["correct"] for r in after}, {r["idx"]: r["correct"] for r in before}, seed=seed)
    res["lost"] = sorted(r["idx"] for r in before if r["correct"] and
                         not next((a["correct"] for a in after if a["idx"] == r["idx"]), 1.0))
    return res
