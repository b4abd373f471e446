"""Long-context benchmark files: the JSONL format, its loader, an offline test set and verifiable long tasks.

Run as: python -m longalign_lib.benchmarks --out runs/bench.jsonl [--context-tokens 1500] [--per-task 2]
Library:
    cases = load_benchmark("my_bench.jsonl")                    # validates, errors name file:line:field
    cases = make_offline_set(tokenizer, context_tokens=1500)    # built from data/kjv_*.txt, answers known
    score = score_exact(case, prediction)                       # 1.0 / 0.0 for verifiable tasks, None otherwise

Format — one JSON object per line (the LongBench-Chat layout, plus two optional fields):
    idx        str | int   unique case id (default: the line number)
    query      str         the question or instruction, asked after the context
    context    str         the long document ("" for a question without one)
    answer     str         the reference answer (the judge sees it; the model never does)
    few_shots  list        example answers with ratings: [{"answer": str, "score": 1..10}, ...]; the judge sees
                           them (shuffled each run) to calibrate its scale. May be empty.
    task       str         optional: retrieve | count | order | multihop (exactly scorable) or any other label
    meta       dict        optional: provenance; verifiable tasks keep what the exact scorer needs here

Verifiable long tasks plant made-up sentences into public-domain filler text (needle.Haystack), so their answers
are exact by construction: retrieve one planted code among distractors, count how often a planted sentence
occurs, order planted events, and combine two planted facts (multi-hop). `score_exact` checks them without any
judge. Their few-shot examples carry ratings assigned by a fixed rubric (correct 10, partly right 4-6, wrong 1-2),
not by humans; meta["few_shot_scores"] says so.
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import LongAlignError, iter_jsonl, write_jsonl
from .models import load_tokenizer
from .needle import Haystack, load_haystack

VERIFIABLE = ("retrieve", "count", "order", "multihop")
TASKS = (*VERIFIABLE, "quote")


@dataclass
class BenchCase:
    idx: str
    query: str
    context: str
    answer: str
    few_shots: list[dict] = field(default_factory=list)
    task: str = "open"
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _fail(path, line, msg) -> LongAlignError:
    return LongAlignError(f"{path}:{line}: {msg}")


def parse_case(obj, path: str = "<bench>", line: int = 0) -> BenchCase:
    """Validate one benchmark object; a problem raises LongAlignError naming file, line and field."""
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("query", "answer"):
        if key not in obj:
            raise _fail(path, line, f"missing field '{key}' (required: query, context, answer; optional: idx, few_shots)")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise _fail(path, line, f"field '{key}' must be a non-empty string")
    context = obj.get("context", "")
    if not isinstance(context, str):
        raise _fail(path, line, f"field 'context' must be a string, got {type(context).__name__}")
    shots = obj.get("few_shots") or []
    if not isinstance(shots, list):
        raise _fail(path, line, "field 'few_shots' must be a list of {\"answer\": str, \"score\": 1-10}")
    clean = []
    for j, s in enumerate(shots):
        if not isinstance(s, dict) or not isinstance(s.get("answer"), str):
            raise _fail(path, line, f"few_shots[{j}] must be an object with a string 'answer' and a numeric 'score'")
        score = s.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 10:
            raise _fail(path, line, f"few_shots[{j}].score must be a number from 1 to 10, got {score!r}")
        clean.append({"answer": s["answer"], "score": score})
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise _fail(path, line, "field 'meta' must be an object")
    idx = obj.get("idx", line)
    if not isinstance(idx, (str, int)) or isinstance(idx, bool):
        raise _fail(path, line, f"field 'idx' must be a string or integer, got {idx!r}")
    return BenchCase(idx=str(idx), query=obj["query"], context=context, answer=obj["answer"], few_shots=clean,
                     task=str(obj.get("task") or "open"), meta=meta)


def load_benchmark(path: str | Path, limit: int | None = None) -> list[BenchCase]:
    """Read and validate a benchmark JSONL file (format in this module's docstring)."""
    cases, seen = [], {}
    for line, obj in iter_jsonl(path):
        case = parse_case(obj, str(path), line)
        if case.idx in seen:
            raise _fail(path, line, f"duplicate idx {case.idx!r} (first on line {seen[case.idx]}); ids must be unique")
        seen[case.idx] = line
        cases.append(case)
        if limit and len(cases) >= limit:
            break
    if not cases:
        raise LongAlignError(f"{path}: no benchmark cases; see longalign_lib/benchmarks.py for the format")
    return cases


def save_benchmark(path: str | Path, cases: list[BenchCase]) -> Path:
    return write_jsonl(path, [c.to_dict() for c in cases])


# ---------------------------------------------------------------- verifiable long tasks (our own made-up facts)
ADJECTIVES = ["amber", "cobalt", "granite", "willow", "saffron", "harbor", "ember", "juniper", "slate", "coral"]
COLORS = ["teal", "crimson", "ochre", "violet", "ivory", "olive", "maroon", "indigo"]
NAMES = ["Tamsin", "Oswin", "Petra", "Lucan", "Maelis", "Corvin", "Idony", "Benedek"]
ROOMS = ["map room", "bell tower", "seed vault", "loom hall", "salt cellar", "glass workshop"]
FAIRS = ["lantern", "honey", "ferry", "kite", "barley", "copper", "thistle", "pepper"]
TOWNS = ["northern", "river", "eastern", "mill"]
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
REFUSAL = "The text does not say."


def _depths(rng: random.Random, k: int) -> list[float]:
    return [round(rng.uniform(0.05, 0.95), 3) for _ in range(k)]


def _retrieve(rng, hay, n_tokens, start):
    adj = rng.sample(ADJECTIVES, 3)
    codes = [str(rng.randint(1000, 9999)) for _ in adj]
    facts = [f"The vault code for the {a} archive is {c}." for a, c in zip(adj, codes, strict=False)]
    ctx, _ = hay.build(n_tokens, list(zip(_depths(rng, 3), facts, strict=False)), start, word_fallback=False)
    q = f"What is the vault code for the {adj[0]} archive? Reply with the code only."
    shots = [{"answer": f"The vault code for the {adj[0]} archive is {codes[0]}.", "score": 10},
             {"answer": codes[1], "score": 2}, {"answer": REFUSAL, "score": 1}]
    return ctx, q, codes[0], shots, {"distractors": codes[1:]}


def _count(rng, hay, n_tokens, start):
    color, other = rng.sample(COLORS, 2)
    town = rng.choice(TOWNS)
    k, m = rng.randint(2, 5), rng.randint(1, 3)
    target = f"A courier in a {color} cloak passed through the {town} gate."
    noise = f"A courier in an {other} cloak passed through the {town} gate." if other[0] in "aeiou" else \
        f"A courier in a {other} cloak passed through the {town} gate."
    ins = [(d, target) for d in _depths(rng, k)] + [(d, noise) for d in _depths(rng, m)]
    ctx, _ = hay.build(n_tokens, ins, start, word_fallback=False)
    q = (f"How many times does the text say that a courier in a {color} cloak passed through the {town} gate? "
         "Reply with a number.")
    shots = [{"answer": f"It says so {k} times.", "score": 10}, {"answer": str(k + m), "score": 3},
             {"answer": str(k - 1), "score": 4}]
    return ctx, q, str(k), shots, {"count": k, "distractor_count": m}


def _order(rng, hay, n_tokens, start):
    fairs = rng.sample(FAIRS, 4)
    depths = sorted(_depths(rng, 4))
    events = [(d, f"That year the town held the {f} fair.") for d, f in zip(depths, fairs, strict=True)]
    ctx, _ = hay.build(n_tokens, events, start, word_fallback=False)
    shown = fairs[:]
    rng.shuffle(shown)
    q = (f"The text mentions four fairs: {', '.join(shown)}. List them in the order in which they appear in the text, "
         "separated by commas.")
    swapped = fairs[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    shots = [{"answer": ", ".join(fairs), "score": 10}, {"answer": ", ".join(swapped), "score": 5},
             {"answer": ", ".join(reversed(fairs)), "score": 2}]
    return ctx, q, ", ".join(fairs), shots, {"expected_order": fairs}


def _multihop(rng, hay, n_tokens, start):
    (p1, p2), (r1, r2), (c1, c2) = rng.sample(NAMES, 2), rng.sample(ROOMS, 2), rng.sample(COLORS, 2)
    facts = [f"{p1} holds the key to the {r1}.", f"The walls of the {r1} are painted {c1}.",
             f"{p2} holds the key to the {r2}.", f"The walls of the {r2} are painted {c2}."]
    ctx, _ = hay.build(n_tokens, list(zip(_depths(rng, 4), facts, strict=False)), start, word_fallback=False)
    q = f"What colour are the walls of the room whose key {p1} holds? Reply with the colour only."
    shots = [{"answer": f"{p1} holds the key to the {r1}, whose walls are {c1}.", "score": 10},
             {"answer": c2, "score": 2}, {"answer": f"{p1} holds the key to the {r1}.", "score": 4}]
    return ctx, q, c1, shots, {"distractors": [c2], "hops": [r1]}


def _quote(rng, hay, n_tokens, start):
    """Quote one verse of the (KJV) filler by its chapter:verse label — answer known from the text itself."""
    ctx, _ = hay.build(n_tokens, [], start, word_fallback=False)
    verses = re.findall(r"^(\d+:\d+) (.+)$", ctx, flags=re.M)
    counts = {}
    for ref, _ in verses:
        counts[ref] = counts.get(ref, 0) + 1
    verses = [(r, t) for r, t in verses[1:-1] if counts[r] == 1 and len(t.split()) >= 8]
    if len(verses) < 2:
        return None
    i = rng.randrange(len(verses) - 1)
    (ref, text), (_, nxt) = verses[i], verses[i + 1]
    half = " ".join(text.split()[: len(text.split()) // 2])
    q = f"Quote verse {ref} of the text above exactly."
    shots = [{"answer": text, "score": 10}, {"answer": half + " ...", "score": 5}, {"answer": nxt, "score": 2}]
    return ctx, q, text, shots, {"ref": ref}


BUILDERS = {"retrieve": _retrieve, "count": _count, "order": _order, "multihop": _multihop, "quote": _quote}


def make_verifiable_tasks(tokenizer, haystack: str | None = None, context_tokens: int = 1500, n_per_task: int = 2,
                          tasks: tuple[str, ...] = VERIFIABLE, seed: int = 0) -> list[BenchCase]:
    """Long tasks with exact answers, planted into filler text (default: the bundled KJV books).

    Each case's context has about `context_tokens` tokens (tokenizer's count) and starts at a different place of
    the haystack. Deterministic for a given seed.
    """
    unknown = [t for t in tasks if t not in BUILDERS]
    if unknown:
        raise LongAlignError(f"unknown task type(s) {unknown}; choose from {', '.join(BUILDERS)}")
    rng = random.Random(seed)
    hay = Haystack(haystack if haystack is not None else load_haystack(), tokenizer)
    cases = []
    for task in tasks:
        made = 0
        for _attempt in range(n_per_task * 4):
            if made == n_per_task:
                break
            start = rng.randrange(max(hay.n_tokens - context_tokens, 1))
            built = BUILDERS[task](rng, hay, context_tokens, start)
            if built is None:
                continue
            ctx, q, ans, shots, meta = built
            meta = {**meta, "context_tokens": hay.n(ctx), "seed": seed,
                    "few_shot_scores": "rubric (constructed), not human ratings"}
            cases.append(BenchCase(idx=f"{task}-{made}", query=q, context=ctx, answer=ans, few_shots=shots,
                                   task=task, meta=meta))
            made += 1
    return cases


def make_offline_set(tokenizer, context_tokens: int = 1500, n_per_task: int = 1, seed: int = 0,
                     haystack_dir: str | Path | None = None) -> list[BenchCase]:
    """The small offline test set: the four verifiable tasks plus verse quotation, all from local text."""
    return make_verifiable_tasks(tokenizer, load_haystack(haystack_dir), context_tokens, n_per_task,
                                 tasks=TASKS, seed=seed)


# ---------------------------------------------------------------- exact scoring
def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(_norm(word))}(?!\w)", _norm(text)) is not None


def _first_number(text: str) -> int | None:
    for tok in _norm(text).split():
        if tok.isdigit():
            return int(tok)
        if tok in NUMBER_WORDS:
            return NUMBER_WORDS[tok]
    return None


def score_exact(case, prediction: str) -> float | None:
    """Exact score of `prediction` for a verifiable task (1.0 right, 0.0 wrong); None for other tasks.

    retrieve/multihop: the right answer appears as a whole word and no distractor does; count: the first number
    in the reply (digits or a word up to twelve) equals the count; order: the four names appear, first
    mentions in the expected order.
    """
    c = case if isinstance(case, dict) else case.to_dict()
    task, meta, answer = c.get("task"), c.get("meta") or {}, c.get("answer", "")
    prediction = prediction or ""
    if task in ("retrieve", "multihop"):
        ok = _has_word(prediction, answer) and not any(_has_word(prediction, d) for d in meta.get("distractors", []))
        return float(ok)
    if task == "count":
        return float(_first_number(prediction) == int(answer))
    if task == "order":
        expected = meta.get("expected_order") or [x.strip() for x in answer.split(",")]
        text = _norm(prediction)
        pos = [re.search(rf"(?<!\w){re.escape(_norm(n))}(?!\w)", text) for n in expected]
        return float(all(pos) and [p.start() for p in pos] == sorted(p.start() for p in pos))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer that measures context length")
    ap.add_argument("--context-tokens", type=int, default=1500)
    ap.add_argument("--per-task", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack-dir", default=None)
    a = ap.parse_args(argv)
    cases = make_offline_set(load_tokenizer(a.model), a.context_tokens, a.per_task, a.seed, a.haystack_dir)
    save_benchmark(a.out, cases)
    print(f"wrote {len(cases)} cases to {a.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
