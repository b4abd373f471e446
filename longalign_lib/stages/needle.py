"""`longalign needle`: needle-in-a-haystack grid (context length × depth) → needle.json + heatmap.

Run as: longalign needle --preset cpu-demo [--needle-scorer contains|judge] [--needle-fresh]
Finished cells (needle_cells.jsonl) are reused only when the model's weights fingerprint, the needle, question,
key fact, haystack, answer length, seed and scorer (with its judge) are unchanged (needle.run_grid's reuse key).
"""
from __future__ import annotations

from pathlib import Path

from .. import plots
from ..generate import make_generate_fn, model_window
from ..inputs import eval_model_identity, load_eval_model
from ..io import LongAlignError, write_json
from ..judge import judge_config, load_template, needle_judge_scorer
from ..needle import heatmap, load_haystack, run_grid
from ..provenance import judge_identity
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--needle-scorer", choices=["contains", "judge"], default=None,
                   help="score by the key fact appearing in the answer (default) or by the LLM judge")
    p.add_argument("--needle-fresh", action="store_true", help="ignore finished cells and rerun the whole grid")


def run(cfg, run_dir: Path, args) -> StageResult:
    ec = cfg.eval
    run_dir = Path(run_dir)
    cells_file = run_dir / "needle_cells.jsonl"
    if getattr(args, "needle_fresh", False) and cells_file.exists():
        cells_file.unlink()
    model, tok, model_name = load_eval_model(cfg, run_dir)
    window = model_window(model, tok, ec.max_input_tokens)
    gen = make_generate_fn(model, tok, max_new_tokens=ec.needle_max_new_tokens, seed=ec.seed, batch_size=ec.batch_size,
                           max_batch_tokens=ec.max_batch_tokens, progress=False, threads=ec.local_threads)
    scorer_name = getattr(args, "needle_scorer", None) or ec.needle_scorer
    scorer = None
    if scorer_name == "judge":
        scorer = needle_judge_scorer(ec, ec.needle_text, ec.needle_question)
    elif scorer_name != "contains":
        raise LongAlignError(f"eval.needle_scorer={scorer_name!r}: choose contains or judge")
    hay = load_haystack(ec.needle_haystack_dir)
    judged = judge_identity(ec, judge_config(ec).judge_backend, "llm", "parse", load_template(ec.judge_prompt_file)) \
        if scorer_name == "judge" else None
    reuse = {"model": eval_model_identity(cfg, run_dir),
             "settings": {"max_new_tokens": ec.needle_max_new_tokens, "seed": ec.seed},
             "scorer": {"name": scorer_name, "judge": judged}}
    result = run_grid(gen, tok, list(ec.needle_lengths), list(ec.needle_depths), haystack=hay,
                      needle=ec.needle_text, question=ec.needle_question, key_fact=ec.needle_key_fact,
                      window=window, reserve=ec.needle_max_new_tokens + 32, scorer=scorer, cells_file=cells_file,
                      batch=ec.batch_size, model_label=model_name, reuse=reuse)
    if not result["cells"]:
        raise LongAlignError(f"every needle length {ec.needle_lengths} exceeds the model window ({window} tokens); "
                             "choose smaller eval.needle_lengths")
    result.update(model=model_name, scorer=scorer_name,
                  haystack=str(ec.needle_haystack_dir or "data/kjv_*.txt (bundled)"))
    write_json(run_dir / "needle.json", result)
    fig = heatmap(result)
    png = plots.save(fig, run_dir / "figures" / "needle_heatmap.png", close=True)
    by_len = {n: sum(c["score"] for c in result["cells"] if c["length"] == n) / len(result["depths"])
              for n in result["lengths"]}
    metrics = {"needle_mean": round(result["mean_score"], 4), "cells": len(result["cells"]),
               "reused": result["reused"], "recomputed": result["recomputed"],
               "recompute_why": result["recompute_why"],
               "skipped_lengths": len(result["skipped_lengths"]), "window": window, "scorer": scorer_name,
               **{f"needle_len_{n}": round(v, 4) for n, v in by_len.items()}}
    skipped = (f" Lengths {result['skipped_lengths']} exceed the model window ({window} tokens) and were skipped."
               if result["skipped_lengths"] else "")
    placed = (f" Needles sit within {result['max_depth_error']:.3f} of the requested token depth, contexts within "
              f"{result['max_length_error']:.1%} of the requested length (tolerances {result['depth_tolerance']} "
              f"and {result['length_tolerance']:.1%})." if result["max_depth_error"] is not None else "")
    why = "; ".join(f"{r}: {n}" for r, n in result["recompute_why"].items())
    reused = (f" {result['reused']} cells reused from an earlier run, {result['recomputed']} of the earlier cells "
              f"recomputed ({why})." if result["reused"] or result["recomputed"] else "")
    report = (f"Needle *{result['needle']}* planted in {len(result['lengths'])} context lengths × "
              f"{len(result['depths'])} depths of {result['haystack']}; scored by `{scorer_name}`. "
              f"Mean score **{result['mean_score']:.2f}**.{skipped}{placed}{reused}\n\n![needle heatmap]({png.relative_to(run_dir)})")
    return StageResult(metrics, ["needle.json", "needle_cells.jsonl", str(png.relative_to(run_dir))],
                       report)

