"""Load the real LongBench-Chat files (THUDM/LongAlign, folder `LongBench_Chat/`) and judge their human-rated answers.

Run as: python -m longalign_lib.longbench_chat PATH/TO/LongBench_Chat --out runs/lbc/bench.jsonl
        then `longalign judge --set eval.bench_file=runs/lbc/bench.jsonl --run-dir runs/lbc` judges every rated
        answer leave-one-out and reports agreement with the human ratings.
Library:
    cases = load_longbench_chat("LongBench_Chat")     # -> list[benchmarks.BenchCase], errors name file and entry
    items = judge.meta_eval_items(cases)              # one item per rated answer, its own rating held out

We do not ship the files; download them from the LongAlign repository. The layout, as the official `eval.py` reads
it (a folder with):
    test_cases.json   a JSON list; entry k has "idx" (int, 1-based: few_shots.json[idx - 1] belongs to it),
                      "query" (the question), "answer" (the reference answer) and "prompt" (the model's whole input:
                      the document and the question). Other keys are kept in meta.
    few_shots.json    a JSON list of lists: per question, answers rated by humans, [{"answer": str, "score": 1-10}]
                      (three per question in the release)
    prompt_fs.txt     the GPT-4 judge prompt with positional {} slots (not needed here: our judge templates fill
                      the same roles with named placeholders)

Leave-one-out: each human-rated answer is judged with the question's *other* rated answers as the few-shot
examples, so the judge never sees the rating it is asked to reproduce (judge.meta_eval_items does this).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .benchmarks import BenchCase, save_benchmark
from .io import LongAlignError

TEST_CASES = "test_cases.json"
FEW_SHOTS = "few_shots.json"


def _read(path: Path):
    if not path.exists():
        raise LongAlignError(f"{path}: not found; download LongBench-Chat's {path.name} (THUDM/LongAlign, folder "
                             "LongBench_Chat/) into this folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LongAlignError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_longbench_chat(folder: str | Path, limit: int | None = None) -> list[BenchCase]:
    """The questions of LongBench-Chat with their human-rated answers as BenchCases (context = the full prompt).

    Validates both files; an error names the file, the entry (0-based position) and the field.
    """
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    cases_path, shots_path = folder / TEST_CASES, folder / FEW_SHOTS
    cases, shots = _read(cases_path), _read(shots_path)
    if not isinstance(cases, list) or not cases:
        raise LongAlignError(f"{cases_path}: expected a non-empty JSON list of test cases")
    if not isinstance(shots, list):
        raise LongAlignError(f"{shots_path}: expected a JSON list (one list of rated answers per question)")
    out, seen = [], set()
    for k, c in enumerate(cases):
        where = f"{cases_path}: entry {k}"
        if not isinstance(c, dict):
            raise LongAlignError(f"{where}: expected an object with idx, query, answer, prompt")
        for key in ("query", "answer"):
            if not isinstance(c.get(key), str) or not c[key].strip():
                raise LongAlignError(f"{where}: field '{key}' must be a non-empty string")
        idx = c.get("idx")
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 1:
            raise LongAlignError(f"{where}: field 'idx' must be a positive integer (1-based; few_shots.json[idx-1] "
                                 f"holds its rated answers), got {idx!r}")
        if idx in seen:
            raise LongAlignError(f"{where}: duplicate idx {idx}")
        seen.add(idx)
        if idx > len(shots):
            raise LongAlignError(f"{shots_path}: has {len(shots)} entries, but {cases_path} entry {k} has idx {idx}")
        prompt = c.get("prompt", "")
        if not isinstance(prompt, str):
            raise LongAlignError(f"{where}: field 'prompt' must be a string")
        rated = shots[idx - 1]
        if not isinstance(rated, list):
            raise LongAlignError(f"{shots_path}: entry {idx - 1} must be a list of {{\"answer\", \"score\"}}")
        clean = []
        for j, s in enumerate(rated):
            sw = f"{shots_path}: entry {idx - 1}[{j}]"
            if not isinstance(s, dict) or not isinstance(s.get("answer"), str):
                raise LongAlignError(f"{sw}: expected {{\"answer\": str, \"score\": 1-10}}")
            score = s.get("score")
            if isinstance(score, str):  # tolerate "7"
                try:
                    score = float(score)
                except ValueError:
                    score = None
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 10:
                raise LongAlignError(f"{sw}: field 'score' must be a number from 1 to 10, got {s.get('score')!r}")
            clean.append({"answer": s["answer"], "score": score})
        meta = {k2: v for k2, v in c.items() if k2 not in ("idx", "query", "answer", "prompt")}
        meta.update(source="LongBench-Chat", few_shot_scores="human ratings", prompt_is_full_input=True)
        out.append(BenchCase(idx=str(idx), query=c["query"], context=prompt, answer=c["answer"], few_shots=clean,
                             task=str(c.get("task") or "longbench-chat"), meta=meta))
        if limit and len(out) >= limit:
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the LongBench_Chat folder (test_cases.json + few_shots.json)")
    ap.add_argument("--out", required=True, help="benchmark JSONL in the cookbook's format (benchmarks.py)")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        cases = load_longbench_chat(a.folder, a.limit)
    except LongAlignError as e:
        print(f"error: {e}")
        return 2
    save_benchmark(a.out, cases)
    n = sum(len(c.few_shots) for c in cases)
    print(f"wrote {len(cases)} questions with {n} human-rated answers to {a.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
