"""`longalign judge`: LongBench-Chat-style LLM judge (plus reference-overlap proxies) over the predictions → judgments.jsonl.

Run as: longalign judge --preset cpu-demo [--predictions FILE] [--human-scores FILE] [--judge-proxy-only] [--judge-fresh]
        longalign judge --compare RUN_A RUN_B   → <run_dir>/compare.json (A − B, paired bootstrap CI, permutation p)
The report carries the judge reliability section (judge.reliability) whenever reference scores exist.
A judgment in judgments.jsonl is reused only when its reuse key (provenance.py) is unchanged: the judge
(provenance.judge_identity: backend, model, base_url, a local judge's weights, scoring, template, settings) and
what it read of the item (question, reference, prediction, rated examples). Edited predictions are judged again,
alone; a row with fewer runs than eval.judge_runs gets the missing runs, one with more keeps its first ones.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import plots
from ..inputs import load_or_build_bench
from ..io import LongAlignError, append_jsonl, read_jsonl, write_json, write_jsonl
from ..judge import (
    compare_runs,
    compare_text,
    judge_config,
    judge_items,
    load_template,
    make_judge_client,
    make_rating_scorer,
    meta_eval_items,
    read_human_scores,
    reliability,
    reliability_text,
    resolve_scoring,
    scores_figure,
    summarize,
)
from ..provenance import ReuseLog, changed_parts, judge_identity, reuse_key
from ..scoring import PROXY_LABEL, proxy_scores
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--predictions", default=None, help="predictions JSONL to judge (default: <run_dir>/predictions.jsonl;"
                   " without one, the benchmark's rated example answers are judged: a meta-evaluation)")
    p.add_argument("--human-scores", default=None, help="JSONL of {idx, score} human ratings: adds Spearman/Kendall")
    p.add_argument("--judge-proxy-only", action="store_true", help="skip the LLM judge; reference-overlap proxy only")
    p.add_argument("--judge-fresh", action="store_true", help="discard judgments.jsonl and start over")
    p.add_argument("--compare", nargs=2, default=None, metavar=("RUN_A", "RUN_B"),
                   help="compare two judged run dirs (A − B): paired bootstrap CI over items and judge runs, "
                        "permutation p, effect size → <run_dir>/compare.json")


def run(cfg, run_dir: Path, args) -> StageResult:
    ec = cfg.eval
    run_dir = Path(run_dir)
    if getattr(args, "compare", None):
        c = compare_runs(*args.compare, seed=ec.seed)
        write_json(run_dir / "compare.json", c)
        return StageResult({k: c[k] for k in ("n", "mean_a", "mean_b", "mean_diff", "ci", "effect_size", "p_value")},
                           ["compare.json"], compare_text(c))
    out_path = run_dir / "judgments.jsonl"
    if getattr(args, "judge_fresh", False) and out_path.exists():
        out_path.unlink()
    mode = "proxy" if getattr(args, "judge_proxy_only", False) else ec.judge_mode
    if mode not in ("llm", "batch", "proxy"):
        raise LongAlignError(f"eval.judge_mode={mode!r}: choose llm, batch or proxy")
    batch = mode == "batch"  # the LLM judge through the provider's Batch API: same requests, same rows
    mode = "llm" if batch else mode
    pred_path = Path(getattr(args, "predictions", None) or run_dir / "predictions.jsonl")
    if pred_path.exists():
        items, source = read_jsonl(pred_path, allow_partial_last_line=True), str(pred_path)
        for k, it in enumerate(items, 1):
            missing = [f for f in ("idx", "query", "answer", "prediction") if f not in it]
            if missing:
                raise LongAlignError(f"{pred_path}:{k}: missing field(s) {missing}; predictions come from `longalign eval`")
            it["idx"] = str(it["idx"])
    elif getattr(args, "predictions", None):
        raise LongAlignError(f"{pred_path}: file not found")
    else:
        cases, bench = load_or_build_bench(cfg, run_dir)
        items = meta_eval_items(cases)
        source = f"the rated example answers of {bench} (meta-evaluation: no predictions.jsonl in {run_dir})"
    if getattr(args, "human_scores", None):
        human = read_human_scores(args.human_scores)
        for it in items:
            if it["idx"] in human:
                it["human_score"] = human[it["idx"]]
    scoring = resolve_scoring(ec) if mode == "llm" else None
    if batch and scoring == "probs":
        raise LongAlignError("eval.judge_mode=batch sends the judge's text requests as a batch and parses their "
                             "[[n]] ratings: set eval.judge_scoring=parse (or auto with an API judge), or judge_mode=llm")
    template = load_template(ec.judge_prompt_file) if mode == "llm" else None
    judge_part = judge_identity(ec, judge_config(ec).judge_backend, mode, scoring, template)
    keys = {it["idx"]: reuse_key(judge=judge_part, item={k: it.get(k) for k in ITEM_FIELDS}) for it in items}
    log = ReuseLog()
    done, groups, extended = _reusable_judgments(out_path, items, keys, ec.judge_runs if mode == "llm" else 0, log)
    for it in items:  # the rows kept, their pass-through fields (human score, exact...) refreshed from the input
        if it["idx"] in done:
            done[it["idx"]] = _row(done[it["idx"]], it, mode, keys[it["idx"]])
    resumed = out_path.exists()
    if resumed:  # this judging's rows only (stale ones go); rows being extended stay until replaced
        write_jsonl(out_path, [done.get(it["idx"]) or extended[it["idx"]] for it in items
                               if it["idx"] in done or it["idx"] in extended])
    todo = [it for g in groups.values() for it in g]
    local = judge_config(ec).judge_backend == "local"
    client = make_judge_client(ec, cfg.model) if mode == "llm" and todo and not (scoring == "probs" and local) else None
    scorer = make_rating_scorer(ec, cfg.model, client) if scoring == "probs" and todo else None
    t0 = time.time()
    step = max(8, 2 * ec.judge_concurrency)
    kw = dict(runs=ec.judge_runs, max_attempts=ec.judge_max_attempts, seed=ec.seed, temperature=ec.judge_temperature,
              max_new_tokens=ec.judge_max_new_tokens)
    for first, group in sorted(groups.items()):  # first = 0: new rows; > 0: rows judged with fewer runs, extended
        if batch and client is not None:  # every run of every case in one batch; then the loop below reads the cache
            from ..llm_batch import run_batched

            def judge_all(group=group, first=first):
                return judge_items(client, group, template, first_run=first, **kw)

            run_batched(client, judge_all, run_dir / "batches", "judge" if not first else f"judge-runs{first + 1}+",
                        poll_s=ec.judge_batch_poll_s)
        for s in range(0, len(group), step):
            chunk = group[s:s + step]
            judged = judge_items(client, chunk, template, scorer=scorer, first_run=first, **kw) if client or scorer \
                else [{"idx": it["idx"], "score": None} for it in chunk]
            for it, j in zip(chunk, judged, strict=False):
                if first:
                    j = merge_runs(extended[it["idx"]], j)
                row = _row(j, it, mode, keys[it["idx"]])
                append_jsonl(out_path, row)
                done[it["idx"]] = row
    rows = [done[it["idx"]] for it in items]
    if resumed and todo:  # in input order, the extended rows in place of their shorter versions
        write_jsonl(out_path, rows)
    summary = summarize(rows, ec.seed)
    rel = reliability(rows, n_boot=ec.reliability_boot, seed=ec.seed, length_edges=ec.length_buckets)
    summary.update(mode=mode, source=source, seconds=round(time.time() - t0, 2), proxy_label=PROXY_LABEL,
                   judge={"backend": judge_config(ec).judge_backend, "model": ec.judge_model,
                          "base_url": ec.judge_base_url, "runs": ec.judge_runs, "scoring": scoring,
                          "template": ec.judge_prompt_file or "default", "batch": batch} if mode == "llm" else None,
                   client_stats=client.stats if client else None, reliability=rel)
    write_json(run_dir / "judge_summary.json", summary)
    fig = scores_figure(rows)
    png = plots.save(fig, run_dir / "figures" / "judge_scores.png", close=True)
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    metrics = {"judge_mean": r3(summary["judge_mean"]), "judge_ci_lo": r3(summary["judge_ci_lo"]),
               "judge_ci_hi": r3(summary["judge_ci_hi"]), "judged": summary["judged"], "cases": summary["n"],
               "failed_cases": summary["failed_cases"], "unparseable_replies": summary["unparseable_replies"],
               "proxy_token_f1": r3(summary["proxy_token_f1"]), "proxy_rouge_l": r3(summary["proxy_rouge_l"]),
               "cost_usd": summary["cost_usd"], "mode": mode, "judge_parse_rate": r3(summary["parsing"]["rate"]),
               "reused": log.reused, "extended": len(extended), "recomputed": log.recomputed - len(extended),
               "recompute_why": dict(log.why)}
    for k in ("agreement_judge_human", "agreement_judge_exact"):
        if k in summary:
            metrics[k.replace("agreement_", "spearman_")] = r3(summary[k]["spearman"])
    metrics["score_methods"] = rel["score_methods"]
    if "judge_vs_human" in rel:
        metrics["weighted_kappa_judge_human"] = r3(rel["judge_vs_human"]["weighted_kappa"]["value"])
        metrics["leniency_judge_human"] = r3(rel["judge_vs_human"]["leniency"]["value"])
    if "judge_vs_exact" in rel:
        metrics["auc_judge_exact"] = r3(rel["judge_vs_exact"]["auc"]["value"])
    methods = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in sorted(rel["score_methods"].items()))
    judge_txt = (f"Judge `{ec.judge_model}` ({judge_config(ec).judge_backend}, scores: {methods}), {ec.judge_runs} "
                 f"runs per case: mean "
                 f"**{summary['judge_mean']:.2f}**/10 (95% bootstrap CI {summary['judge_ci_lo']:.2f}–"
                 f"{summary['judge_ci_hi']:.2f}, {summary['judged']}/{summary['n']} cases rated, "
                 f"{summary['unparseable_replies']} of {summary['judge_calls']} replies unparseable), "
                 f"{summary['input_tokens']}+{summary['output_tokens']} tokens, ${summary['cost_usd']:.4f}."
                 if summary["judge_mean"] is not None else
                 f"No LLM judge ratings (mode `{mode}`{', every judge reply unparseable' if mode == 'llm' else ''})."
                 + (" A small local judge rarely follows the `[[n]]` format: point it at a capable model with "
                    "`eval.judge_backend`/`eval.judge_base_url` + `eval.judge_model`." if mode == "llm" else ""))
    reuse_txt = (f" Of these, {log.reused} judgments were reused from an earlier run, {len(extended)} extended to "
                 f"{ec.judge_runs} runs, {log.recomputed - len(extended)} judged anew"
                 + (f" ({'; '.join(f'{r}: {n}' for r, n in log.why.items())})" if log.why else "") + "."
                 if log.reused or log.recomputed else "")
    report = (f"Judged {summary['n']} answers from {source}.{reuse_txt}\n\n{judge_txt}\n\n"
              f"Proxy scores ({PROXY_LABEL.removeprefix('proxy (').rstrip(')')}): token F1 {summary['proxy_token_f1']:.3f}, ROUGE-L {summary['proxy_rouge_l']:.3f}."
              f"\n\n![judge scores]({png.relative_to(run_dir)})")
    rubric = any(str((it.get("meta") or {}).get("few_shot_scores", "")).startswith("rubric") for it in items)
    rel_txt = reliability_text(rel, ec.judge_model if mode == "llm" else "proxy",
                               "rubric ratings (constructed, not human)" if rubric else "human ratings")
    if rel_txt:
        report += "\n\n" + rel_txt
    return StageResult(metrics, ["judgments.jsonl", "judge_summary.json", str(png.relative_to(run_dir))],
                       report)



# ---------------------------------------------------------------- reuse: a judgment is keyed by what produced it
ITEM_FIELDS = ("query", "answer", "prediction", "few_shots")  # what the judge reads of an item
PASS_THROUGH = ("n_prompt_tokens", "n_input_tokens", "truncated", "no_doc_exact", "no_doc_prediction")


def _reusable_judgments(path: Path, items: list[dict], keys: dict, runs: int, log: ReuseLog):
    """Sort the rows of an earlier judgments.jsonl: (done {idx: row reused as it is, cut to `runs` runs},
    groups {first run to judge: [items]}, extended {idx: row to extend with runs len(row.runs)..runs-1}).
    Every item whose key changed (or that has no row) is in groups[0]; `log` counts and explains."""
    old: dict[str, dict] = {}
    if path.exists():
        for r in read_jsonl(path, allow_partial_last_line=True):
            old[str(r.get("idx"))] = r  # the last row of an idx wins (an extension appended after its original)
    done, groups, extended = {}, {}, {}
    for it in items:
        idx, row = it["idx"], old.get(it["idx"])
        if row is None:
            groups.setdefault(0, []).append(it)
            continue
        diff = changed_parts(row.get("reuse"), keys[idx])
        have = len(row.get("runs") or [])
        if diff:
            log.recompute(", ".join(diff) + (" changed" if isinstance(row.get("reuse"), dict) else ""))
            groups.setdefault(0, []).append(it)
        elif runs and have < runs:
            log.recompute(f"judged with {have} run(s), judge_runs={runs}")
            extended[idx] = row
            groups.setdefault(have, []).append(it)
        else:
            log.reused += 1
            done[idx] = merge_runs(row, None, runs) if runs and have > runs else row
    return done, groups, extended


def merge_runs(row: dict, new: dict | None, keep: int | None = None) -> dict:
    """A judgment row over the runs of `row` followed by those of `new` (its extension; None: none), cut to the
    first `keep` runs; the score (mean of the rated runs), method, failures, usage and cost are recomputed."""
    runs = list(row.get("runs") or []) + list((new or {}).get("runs") or [])
    runs = runs[:keep] if keep else runs
    ratings = [r["rating"] for r in runs if r.get("rating") is not None]
    methods = sorted({r["method"] for r in runs if r.get("rating") is not None and r.get("method")})
    usage = {"input_tokens": 0, "output_tokens": 0}
    for r in runs:
        for a in r.get("attempts") or []:
            for k in usage:
                usage[k] += int((a.get("usage") or {}).get(k, 0) or 0)
    return {**row, **(new or {}), "runs": runs, "score": sum(ratings) / len(ratings) if ratings else None,
            "score_method": (methods[0] if len(methods) == 1 else "mixed") if methods else None,
            "n_failed_runs": len(runs) - len(ratings), "failed": not ratings, "usage": usage,
            "cost_usd": sum(a.get("cost_usd") or 0.0 for r in runs for a in r.get("attempts") or [])}


def _row(j: dict, it: dict, mode: str, key: dict) -> dict:
    """A judgments.jsonl row: the judge's part `j` plus what the item passes through (refreshed on reuse)."""
    row = {**j, "task": it.get("task"), "prediction": it.get("prediction", ""), "reference": it["answer"],
           "proxy": proxy_scores(it.get("prediction", ""), it["answer"]), "exact": it.get("exact"),
           "human_score": it.get("human_score"), "mode": mode, **{k: it[k] for k in PASS_THROUGH if k in it},
           "reuse": key}
    if "n_prompt_tokens" in it and "n_input_tokens" in it:
        row["truncated_tokens"] = max(0, int(it["n_prompt_tokens"]) - int(it["n_input_tokens"]))
    return row
