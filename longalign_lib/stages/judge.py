"""`longalign judge`: LongBench-Chat-style LLM judge (plus reference-overlap proxies) over the predictions → judgments.jsonl.

Run as: longalign judge --preset cpu-demo [--predictions FILE] [--human-scores FILE] [--judge-proxy-only] [--judge-fresh]
        longalign judge --compare RUN_A RUN_B   → <run_dir>/compare.json (A − B, paired bootstrap CI, permutation p)
The report carries the judge reliability section (judge.reliability) whenever reference scores exist.
Predictions come from inputs.predictions; judge.judge_predictions judges them, reusing a judgment in judgments.jsonl
only when its reuse key (provenance.py) is unchanged: the judge
(provenance.judge_identity: backend, model, base_url, a local judge's weights, scoring, template, settings) and
what it read of the item (question, reference, prediction, rated examples). Edited predictions are judged again,
alone; a row with fewer runs than eval.judge_runs gets the missing runs, one with more keeps its first ones.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import plots
from ..inputs import predictions
from ..io import write_json
from ..judge import (
    compare_runs,
    compare_text,
    judge_config,
    judge_mode,
    judge_predictions,
    reliability,
    reliability_text,
    scores_figure,
    summarize,
)
from ..scoring import PROXY_LABEL
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
    mode, batch = judge_mode(ec, getattr(args, "judge_proxy_only", False))
    items, source = predictions(cfg, run_dir, getattr(args, "predictions", None), getattr(args, "human_scores", None))
    judged = judge_predictions(ec, cfg.model, items, out_path, mode, batch, batch_dir=run_dir / "batches")
    rows, log, extended, scoring = judged.rows, judged.log, judged.extended, judged.scoring
    summary = summarize(rows, ec.seed)
    rel = reliability(rows, n_boot=ec.reliability_boot, seed=ec.seed, length_edges=ec.length_buckets)
    summary.update(mode=mode, source=source, seconds=round(time.time() - judged.started, 2), proxy_label=PROXY_LABEL,
                   judge={"backend": judge_config(ec).judge_backend, "model": ec.judge_model,
                          "base_url": ec.judge_base_url, "runs": ec.judge_runs, "scoring": scoring,
                          "template": ec.judge_prompt_file or "default", "batch": batch} if mode == "llm" else None,
                   client_stats=judged.client_stats, reliability=rel)
    write_json(run_dir / "judge_summary.json", summary)
    fig = scores_figure(rows)
    png = plots.save(fig, run_dir / "figures" / "judge_scores.png", close=True)
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    metrics = {"judge_mean": r3(summary["judge_mean"]), "judge_ci_lo": r3(summary["judge_ci_lo"]),
               "judge_ci_hi": r3(summary["judge_ci_hi"]), "judged": summary["judged"], "cases": summary["n"],
               "failed_cases": summary["failed_cases"], "unparseable_replies": summary["unparseable_replies"],
               "proxy_token_f1": r3(summary["proxy_token_f1"]), "proxy_rouge_l": r3(summary["proxy_rouge_l"]),
               "cost_usd": summary["cost_usd"], "mode": mode, "judge_parse_rate": r3(summary["parsing"]["rate"]),
               "reused": log.reused, "extended": extended, "recomputed": log.recomputed - extended,
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
    reuse_txt = (f" Of these, {log.reused} judgments were reused from an earlier run, {extended} extended to "
                 f"{ec.judge_runs} runs, {log.recomputed - extended} judged anew"
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
