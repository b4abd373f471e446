"""`longalign eval`: generate answers on a long-context benchmark with the trained (or given) model → predictions.jsonl.

Run as: longalign eval --preset cpu-demo [--bench FILE] [--eval-limit N] [--eval-fresh]
        [--set eval.no_document_pass=true] [--set eval.short_tasks=true]
Predictions are appended one batch at a time, so an interrupted run resumes where it stopped. Each row carries its
reuse key (provenance.py): the evaluated model's weights fingerprint, the eval settings that change an answer
(PREDICTION_SETTINGS) and the case itself. A row is reused only when its key is unchanged: a retrained model, a
changed setting or an edited case regenerates it; the report says how many were reused and why others were not.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..benchmarks import score_exact
from ..generate import case_messages, generate_replies
from ..inputs import eval_model_identity, load_eval_model, load_or_build_bench
from ..io import append_jsonl, read_jsonl, write_json, write_jsonl
from ..models import load_model_and_tokenizer
from ..provenance import ReuseLog, reuse_key
from ..scoring import bootstrap_ci
from ..short_tasks import compare_short, evaluate_short_tasks, load_short_tasks
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--bench", default=None, help="benchmark JSONL to answer (default: eval.bench_file, else the "
                                                 "offline verifiable set saved as <run_dir>/bench.jsonl)")
    p.add_argument("--eval-limit", type=int, default=None, help="answer only the first N cases")
    p.add_argument("--eval-fresh", action="store_true", help="discard predictions.jsonl and start over")


def run(cfg, run_dir: Path, args) -> StageResult:
    ec = cfg.eval
    run_dir = Path(run_dir)
    pred_path = run_dir / "predictions.jsonl"
    if getattr(args, "eval_fresh", False) and pred_path.exists():
        pred_path.unlink()
    model, tok, model_name = load_eval_model(cfg, run_dir)
    cases, source = load_or_build_bench(cfg, run_dir, getattr(args, "bench", None), tok)
    if getattr(args, "eval_limit", None):
        cases = cases[: args.eval_limit]
    pk = prediction_key(cfg, run_dir)
    keys = {c.idx: reuse_key(**pk, case=c.to_dict()) for c in cases}
    log = ReuseLog()
    done = _reusable_predictions(pred_path, keys, log)
    todo = [c for c in cases if c.idx not in done]
    resumed = len(cases) - len(todo)

    nodoc = {}
    if ec.no_document_pass and todo:  # the control: the question alone, without its document
        outs = generate_replies(model, tok, [case_messages(c.query) for c in todo], max_new_tokens=ec.max_new_tokens,
                                batch_size=ec.batch_size, max_batch_tokens=ec.max_batch_tokens, seed=ec.seed,
                                desc="eval (no document)", threads=ec.local_threads)
        nodoc = {c.idx: o["prediction"] for c, o in zip(todo, outs, strict=True)}

    def stream(indices, results):
        for i, r in zip(indices, results, strict=False):
            c = todo[i]
            meta = {k: v for k, v in c.meta.items()}
            row = {"idx": c.idx, "task": c.task, "query": c.query, "answer": c.answer, "few_shots": c.few_shots,
                   "meta": meta, **r, "exact": score_exact(c, r["prediction"]), "model": model_name,
                   "reuse": keys[c.idx]}
            if c.idx in nodoc:
                row.update(no_doc_prediction=nodoc[c.idx], no_doc_exact=score_exact(c, nodoc[c.idx]))
            append_jsonl(pred_path, row)
            done[c.idx] = row

    t0 = time.time()
    if todo:
        generate_replies(model, tok, [case_messages(c.query, c.context) for c in todo],
                         max_new_tokens=ec.max_new_tokens, max_input_tokens=ec.max_input_tokens,
                         batch_size=ec.batch_size, max_batch_tokens=ec.max_batch_tokens, seed=ec.seed,
                         on_batch=stream, desc="eval", threads=ec.local_threads)
    gen_s = time.time() - t0
    rows = [done[c.idx] for c in cases]
    exact = [r["exact"] for r in rows if r.get("exact") is not None]
    ci = bootstrap_ci(exact, seed=ec.seed)
    by_task = {}
    for r in rows:
        if r.get("exact") is not None:
            by_task.setdefault(r["task"], []).append(r["exact"])
    new_tokens = sum(r["n_new_tokens"] for r in rows if r["idx"] in {c.idx for c in todo})
    metrics = {"model": model_name, "cases": len(rows), "resumed": resumed, "recomputed": log.recomputed,
               "recompute_why": dict(log.why), "truncated": sum(bool(r["truncated"]) for r in rows),
               "mean_input_tokens": round(sum(r["n_input_tokens"] for r in rows) / len(rows), 1),
               "exact_mean": round(ci["mean"], 4) if exact else None, "exact_n": len(exact),
               **{f"exact_{t}": round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
               "generate_s": round(gen_s, 2), "new_tokens_per_s": round(new_tokens / gen_s, 2) if gen_s > 0 else None,
               "truncated_tokens": sum(max(0, r["n_prompt_tokens"] - r["n_input_tokens"]) for r in rows)}
    if any("no_doc_exact" in r for r in rows):
        metrics["answered_without_document"] = sum(r.get("no_doc_exact") == 1 for r in rows)
    lines = [f"Model `{model_name}` answered {len(rows)} cases from {source} "
             f"({metrics['truncated']} truncated in the middle to the window; {resumed} resumed from an earlier run)."
             + (f" Of the earlier predictions, {log.text('predictions')}." if log.recomputed else "")]
    if "answered_without_document" in metrics:
        lines.append(f"No-document control: {metrics['answered_without_document']} of {len(rows)} questions answered "
                     "right from the question alone (they test prior knowledge, not reading).")
    if exact:
        lines.append(f"Exact score on the verifiable tasks: **{ci['mean']:.2f}** (95% CI {ci['lo']:.2f}–{ci['hi']:.2f}, "
                     f"n={len(exact)}).")
    lines += ["", "| idx | task | input tokens | exact | prediction |", "|---|---|---|---|---|"]
    for r in rows[:8]:
        pred = r["prediction"].replace("\n", " ").replace("|", "/")[:90]
        lines.append(f"| {r['idx']} | {r['task']} | {r['n_input_tokens']} | {r.get('exact')} | {pred} |")
    outputs = ["predictions.jsonl"]
    if ec.short_tasks:
        lines.append("")
        lines.append(_short_tasks(cfg, run_dir, model, tok, model_name, metrics))
        outputs.append("short_tasks.json")
    return StageResult(metrics, outputs, "\n".join(lines))


# eval settings that change a prediction (batch_size / max_batch_tokens / local_threads only change the speed)
PREDICTION_SETTINGS = ("max_new_tokens", "max_input_tokens", "seed", "no_document_pass")


def prediction_key(cfg, run_dir: Path) -> dict:
    """What a prediction depends on besides its case: the evaluated model (inputs.eval_model_identity: weights
    fingerprint, dtype, RoPE settings) and the eval settings that change an answer. Parts of its reuse key."""
    return {"model": eval_model_identity(cfg, run_dir),
            "settings": {k: getattr(cfg.eval, k) for k in PREDICTION_SETTINGS}}


def _reusable_predictions(pred_path: Path, keys: dict, log: ReuseLog) -> dict:
    """{idx: row} of predictions.jsonl whose reuse key equals this evaluation's; the other rows of these cases are
    dropped from the file (rewritten atomically) and counted in `log` with the reason, so they are generated again.
    Rows of cases outside this evaluation (a smaller --eval-limit) stay when model and settings are unchanged."""
    if not pred_path.exists():
        return {}
    any_key = next(iter(keys.values()), None)
    done, keep, dropped = {}, [], 0
    for row in read_jsonl(pred_path, allow_partial_last_line=True):
        idx = str(row.get("idx"))
        if idx in keys:
            if idx not in done and log.check(row.get("reuse"), keys[idx]):
                done[idx] = row
                keep.append(row)
                continue
        elif any_key is not None and isinstance(row.get("reuse"), dict) and all(
                row["reuse"].get("parts", {}).get(p) == any_key["parts"][p] for p in ("model", "settings")):
            keep.append(row)
            continue
        dropped += 1
    if dropped:
        write_jsonl(pred_path, keep)
    return done


def _short_tasks(cfg, run_dir: Path, model, tok, model_name: str, metrics: dict) -> str:
    """The short-task regression check: the evaluated model, and the base model before training when they differ."""
    ec = cfg.eval
    items = load_short_tasks(ec.short_tasks_file)
    after = evaluate_short_tasks(model, tok, items, seed=ec.seed, threads=ec.local_threads)
    acc = sum(r["correct"] for r in after) / len(after)
    res = {"model": model_name, "accuracy": acc, "rows": after}
    metrics["short_accuracy"] = round(acc, 4)
    text = f"Short-task regression set ({len(items)} exact questions): `{model_name}` {acc:.2f}."
    if model_name != cfg.model.name:  # a trained model: compare with the model it started from
        base, btok = load_model_and_tokenizer(cfg=cfg.model)
        before = evaluate_short_tasks(base, btok, items, seed=ec.seed, threads=ec.local_threads)
        c = compare_short(before, after, seed=ec.seed)
        res.update(base_model=cfg.model.name, base_rows=before, compare=c)
        metrics["short_accuracy_before"] = round(c["mean_b"], 4)
        text += (f" Before training (`{cfg.model.name}`): {c['mean_b']:.2f}; after − before {c['mean_diff']:+.2f} "
                 f"(95% CI {c['ci'][0]:+.2f} to {c['ci'][1]:+.2f}, permutation p = {c['p_value']:.2f}); "
                 f"lost: {', '.join(c['lost']) or 'none'}.")
    write_json(run_dir / "short_tasks.json", res)
    return text

