"""`longalign synth`: Self-Instruct long tasks over the corpus + short chat data (Magpie, ShareGPT) → long.jsonl, short.jsonl.

Run as: longalign synth --preset cpu-demo [--dry-run] [--resume] [--set synth.backend=openai --set synth.model=...]
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .. import plots
from ..corpus import load_corpus
from ..inputs import corpus_docs
from ..io import LongAlignError, iter_jsonl, write_json, write_jsonl
from ..llm import client_from_config, make_client
from ..llm_batch import batch_summary
from ..models import load_tokenizer
from ..short_data import import_sharegpt, magpie_prefix, magpie_records
from ..synth import mix_figure, synth_long, synth_long_batched
from ..synth_cost import dry_run, lever_table
from ..synth_parts import done_ids, retry_cap, task_for
from .base import StageResult, add_resume_flag


def add_arguments(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="print calls, estimated tokens and cost; spend nothing")
    add_resume_flag(p)


def short_tokenizer(cfg, short_client):
    """The chat template Magpie writes its prompts with: `synth.short_tokenizer`, else (local backend) the model's.

    A served model's name (`synth.short_model=smollm2` on a llama.cpp server) is often not a hub id, so an
    OpenAI-compatible short backend needs `synth.short_tokenizer` set; it is loaded before any paid call.
    """
    s = cfg.synth
    if not s.short_tokenizer and short_client.backend_name == "local":
        return short_client.backend.tokenizer
    if not s.short_tokenizer:
        raise LongAlignError(f"synth.short_tokenizer is not set: Magpie-style short data through "
                             f"short_backend={s.short_backend} needs the served model's chat template. Set it to a "
                             "local folder, hub id or smollm2-135m-instruct (e.g. --set "
                             "synth.short_tokenizer=smollm2-135m-instruct), or set synth.n_short=0")
    try:
        return load_tokenizer(s.short_tokenizer)
    except LongAlignError:
        raise
    except Exception as e:
        raise LongAlignError(f"synth.short_tokenizer={s.short_tokenizer!r}: cannot load a tokenizer from it "
                             f"({type(e).__name__}: {str(e)[:200]}); give a local folder or a cached hub id") from None


def check_prerequisites(cfg, client, n_docs: int) -> dict:
    """Everything the stage needs, checked before the first paid call: settings, short-data files, the
    Magpie client and tokenizer, batch support. Returns {short_records, short_client, tokenizer}."""
    s = cfg.synth
    if s.mode not in ("interactive", "batch"):
        raise LongAlignError(f"synth.mode={s.mode!r}: choose interactive or batch")
    for i in range(min(n_docs, len(s.task_types) or 1)):
        task_for(i, s)  # unknown task types fail here
    retry_cap(1, s)  # a retry_truncated_factor that is neither 0 nor > 1 fails here
    if s.mode == "batch" and not client.supports_batch:
        raise LongAlignError(f"synth.mode=batch needs a Batch API: backend {client.backend_name!r} has none; use "
                             "synth.backend=openai or anthropic, or synth.mode=interactive")
    short_recs, imported, bad_lines = [], Counter(), []
    for f in s.short_files:
        recs, c = import_sharegpt(f, bad=bad_lines)
        short_recs += recs
        imported.update(c)
    short_client = tok = None
    if s.n_short > 0:
        if s.short_backend == "anthropic":
            raise LongAlignError("synth.short_backend=anthropic: Magpie needs raw text completions; use local or "
                                 "an OpenAI-compatible server (vLLM, llama.cpp), or set synth.n_short=0")
        short_client = _short_client(cfg, client)
        tok = short_tokenizer(cfg, short_client)
        magpie_prefix(tok)  # the template must render a user turn
    return {"short_records": short_recs, "imported": imported, "bad_lines": bad_lines, "short_client": short_client,
            "tokenizer": tok}


def _short_client(cfg, long_client):
    s = cfg.synth
    if s.short_backend == long_client.backend_name and s.short_model == long_client.model:
        return long_client
    if s.short_backend == "local":
        return make_client("local", s.short_model, cache_dir=s.cache_dir, dtype=cfg.model.dtype,
                           device=cfg.model.device, threads=s.local_threads, prefix_cache=s.local_prefix_cache)
    return make_client(s.short_backend, s.short_model, base_url=s.base_url, api_key_env=s.api_key_env,
                       cache_dir=s.cache_dir, concurrency=s.concurrency, max_retries=s.max_retries,
                       timeout_s=s.timeout_s, prices=s.prices)


def _dry_run_client(s):
    """An API client to see which calls are already cached, when one can be made without a key prompt; else None
    (the local backend is never loaded for a dry run: it costs nothing, and tokens are approximated)."""
    if s.backend == "local":
        return None
    try:
        return client_from_config(s)
    except LongAlignError:  # no API key: the plan does not need one
        return None


def dry_run_stage(cfg, run_dir: Path, args) -> StageResult:
    """`longalign synth --dry-run`: the plan from the corpus if one exists, else from the requested size (no corpus
    is built, no model loaded, no API key needed); writes synth_plan.json and spends nothing."""
    s = cfg.synth
    path = Path(s.corpus_file) if s.corpus_file else run_dir / "corpus.jsonl"
    if s.corpus_file and not path.exists():
        raise LongAlignError(f"synth.corpus_file={path}: file not found")
    docs = load_corpus(path) if path.exists() else None
    if docs is not None and s.max_docs:
        docs = docs[: s.max_docs]
    done = done_ids(run_dir / "long.jsonl", run_dir / "synth_rejects.jsonl")[0] \
        if docs is not None and getattr(args, "resume", False) else set()
    plan = dry_run(_dry_run_client(s), docs, s, done, corpus_cfg=cfg.corpus)
    cached = plan["questions"]["cached"]
    print(f"[longalign] synth --dry-run ({plan['estimated_from']}): {plan['documents']:,} documents → "
          f"{plan['calls']:,} calls ({'cache not checked' if cached is None else f'{cached} question calls cached'}), "
          f"~{plan['input_tokens']:,} input + ≤{plan['output_tokens']:,} output tokens, ≈ ${plan['cost_usd']:.4f} on "
          f"{plan['backend']}:{plan['model']}", flush=True)
    sc = plan["scale"]
    print(f"[longalign] a {sc['records']:,}-document run (mean document {sc['mean_doc_tokens']:,} tokens; "
          f"output at its caps), interactive vs batch x prompt caching off/on:\n{lever_table(sc['rows'])}",
          flush=True)
    write_json(run_dir / "synth_plan.json", plan)
    return StageResult({"dry_run": True, "documents": plan["documents"], "calls": plan["calls"],
                        "input_tokens": plan["input_tokens"], "output_tokens": plan["output_tokens"],
                        "cost_usd": plan["cost_usd"]}, ["synth_plan.json"],
                       f"Dry run only ({plan['estimated_from']}): {plan['calls']:,} calls, "
                       f"≈ ${plan['cost_usd']:.4f}. Nothing was generated.", dry_run=True)


def run(cfg, run_dir: Path, args) -> StageResult:
    s = cfg.synth
    run_dir = Path(run_dir)
    if getattr(args, "dry_run", False):
        return dry_run_stage(cfg, run_dir, args)
    docs, corpus_from = corpus_docs(cfg, run_dir)
    if s.max_docs:
        docs = docs[: s.max_docs]
    client = client_from_config(s, model_cfg=cfg.model)
    long_path, short_path = run_dir / "long.jsonl", run_dir / "short.jsonl"
    rej_long, rej_short = run_dir / "synth_rejects.jsonl", run_dir / "short_rejects.jsonl"
    resume = bool(getattr(args, "resume", False))
    pre = check_prerequisites(cfg, client, len(docs))  # before the first paid call
    if s.mode == "batch":
        long_stats = synth_long_batched(client, docs, s, long_path, rej_long, run_dir / "batches", resume=resume)
    else:
        long_stats = synth_long(client, docs, s, long_path, rej_long, resume=resume)
    # short data (Magpie runs interactively: raw completions have no batch endpoint on most servers)
    short_recs, imported = pre["short_records"], pre["imported"]
    short_client = pre["short_client"]
    magpie_path = run_dir / "short_magpie.jsonl"
    magpie = {"kept": 0, "attempts": 0, "rejected": {}, "truncation": {"rejected": 0, "retried": 0}}
    if short_client is not None:
        magpie = magpie_records(short_client, pre["tokenizer"], s.n_short, s, magpie_path, rej_short, resume=resume)
        if magpie_path.exists():  # every Magpie sample may have been rejected
            short_recs += [r for _, r in iter_jsonl(magpie_path, allow_partial_last_line=True)]
    write_jsonl(short_path, short_recs)

    records = [r for _, r in iter_jsonl(long_path)] if long_path.exists() else []
    fig = plots.save(mix_figure(records, long_stats["rejected"], long_stats["planned_task_types"]),
                     run_dir / "figures" / "synth_mix.png", close=True)
    stats = dict(client.stats)
    if short_client is not None and short_client is not client:
        for k in ("requests", "cache_hits", "retries", "input_tokens", "output_tokens", "cache_read_tokens",
                  "cache_write_tokens", "cost_usd"):
            stats[k] += short_client.stats[k]
    summary = {"corpus": corpus_from, "long": long_stats, "short": {"imported": dict(imported), "magpie": magpie,
                                                                       "total": len(short_recs),
                                                                       "bad_lines": pre["bad_lines"]},
               "llm": {**stats, "backend": client.backend_name, "model": client.model, "mode": s.mode}}
    if s.mode == "batch":
        summary["batches"] = batch_summary(run_dir / "batches")
    write_json(run_dir / "synth.json", summary)
    metrics = {"long_records": len(records), "docs": len(docs), "rejected": sum(long_stats["rejected"].values()),
               "short_records": len(short_recs), "requests": stats["requests"], "cache_hits": stats["cache_hits"],
               "retries": stats["retries"], "cost_usd": round(stats["cost_usd"], 4),
               "cache_read_tokens": stats["cache_read_tokens"], "batch_items": stats["batch_items"],
               "batch_failed": stats["batch_failed"],
               "seconds_long": long_stats["seconds"], "bad_lines": pre["bad_lines"],
               "truncated_rejected": long_stats["truncation"]["rejected"] + magpie["truncation"]["rejected"],
               "truncated_retried": long_stats["truncation"]["retried"] + magpie["truncation"]["retried"],
               **{f"reject_{k}": v for k, v in sorted(long_stats["rejected"].items())}}
    rej = ", ".join(f"{k} {v}" for k, v in long_stats["rejected"].items()) or "none"
    lt, mt = long_stats["truncation"], magpie["truncation"]
    factor = s.retry_truncated_factor
    cut_note = (f" Cut at the token cap (never kept): {lt['rejected']} long and {mt['rejected']} Magpie replies "
                f"rejected as truncated, {lt['retried'] + mt['retried']} regenerated with a "
                + (f"{factor:g}x cap" if factor else "larger cap (off: synth.retry_truncated_factor=0)")
                + f", {lt['question_lists_cut']} question lists trimmed to their complete lines.")
    example = ""
    if records:
        m = records[0]["meta"]
        example = (f"\n\nExample ({m['genre']}, {m['task_type']}): **Q:** {m['question']}\n\n"
                   f"> {records[0]['messages'][1]['content'][:400]}")
    report = (f"Self-Instruct with `{client.backend_name}:{client.model}` over {len(docs)} documents from "
              f"{corpus_from}: {len(records)} long records kept, rejected: {rej}. Short records: {len(short_recs)} "
              f"({magpie['kept']} Magpie, {imported.get('kept', 0)} imported).{cut_note} Requests {stats['requests']}, cache hits "
              f"{stats['cache_hits']}, retries {stats['retries']}, cost ${stats['cost_usd']:.4f}"
              f" ({s.mode}; {stats['cache_read_tokens']:,} prompt tokens read from the provider's cache"
              + (f"; {stats['batch_items']} batch items, {stats['batch_failed']} failed and retried"
                 if s.mode == "batch" else "") + ")."
              f"{example}\n\n![task mix]({fig.relative_to(run_dir)})")
    return StageResult(metrics, ["long.jsonl", "short.jsonl", "synth.json", str(fig.relative_to(run_dir))],
                       report)

