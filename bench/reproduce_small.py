"""The paper's batching findings reproduced small: SmolLM2-135M-Instruct at 16k, four ways of batching, ≥ 3 seeds.

Run as (one GPU; `bash bench/run_device_reproduce.sh OUT PART` runs it in order, one seed per call):
    python bench/reproduce_small.py data   --work W                 # long records + evaluation sets (CPU)
    python bench/reproduce_small.py short  --work W                 # short chats written by the shipped model
    python bench/reproduce_small.py train  --work W --arm packed_weighted --seed 0
    python bench/reproduce_small.py eval   --work W --model packed_weighted-s0   (or: base, rope8)
    python bench/reproduce_small.py report --work W --out bench/results/reproduce_small
    python bench/reproduce_small.py report --work W --out DIR --n-boot 200   (fewer resamples: a quick look)
CPU test (tiny random model, ~30 s): tests/test_reproduce_small.py runs every command in-process via `main` with
`data --tiny`.

What it does, following LongAlign (Bai et al., 2024), §3–4 and Table 3 / Fig. 4–5, at 135M parameters:
- Model: SmolLM2-135M-Instruct (8k window as shipped), RoPE base ×8 and a 16k window (the paper: ×200 for 64k).
- Training mix (`data`): long records with exactly checkable answers (the five task builders of benchmarks.py —
  retrieve, count, order, multi-hop, verse quotation — planted in the public-domain KJV text), their contexts drawn
  log-uniformly from 1k to 15k tokens (long-tailed: most under 8k); plus short chats whose replies the shipped model
  wrote itself (greedy, self-distillation), standing in for ShareGPT: they keep short-chat behaviour without
  teaching new facts. The data never shares a seed with the evaluation sets.
- Four arms (`train`), identical data, one epoch, same optimizer and schedule:
    naive            shuffled micro-batches of 8 sequences padded to the longest, loss = Eq. 2 (mean per sequence)
    sorted           the same, sequences of similar length batched together
    packed           16k rows (best-fit-decreasing), loss = mean over each pack's target tokens (Eq. 3, biased)
    packed_weighted  the same rows, sequence i weighted K/(N_i·M) (Eq. 4 = Eq. 2)
  Gradient accumulation is chosen so every arm takes about the same number of optimizer steps.
- Evaluation (`eval`): verifiable long tasks in four length buckets (held-out seeds, exact scoring), a needle grid
  (2k–15.5k tokens × 5 depths) and the 20 exact short tasks of data/short_tasks.jsonl; also for the model as shipped
  (`base`) and with RoPE ×8 before training (`rope8`, every arm's starting point).
- `report`: a Table-3-style table (mean over seeds with two-level bootstrap CIs: items, then seeds within an item),
  paired tests between arms (agreement.paired_compare, seeds as repetitions), training-time bars (Fig. 5: seed 0,
  each arm alone on the GPU) and needle heatmaps before/after (Fig. 4); results.json + results.md + PNGs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longalign_lib.io import LongAlignError, read_json, write_json  # noqa: E402  (write_json: atomic)

ARMS = {  # name → (batching settings, label)
    "naive": (["batching.strategy=naive", "batching.loss_reduction=sequence"], "naive batching"),
    "sorted": (["batching.strategy=sorted", "batching.loss_reduction=sequence"], "sorted batching"),
    "packed": (["batching.strategy=packed", "batching.loss_reduction=pack_mean"], "packing"),
    "packed_weighted": (["batching.strategy=packed", "batching.loss_reduction=sequence"], "packing + loss weighting"),
}
TRAIN_TASKS = ("retrieve", "count", "order", "multihop", "quote")
EVAL_TASKS = ("retrieve", "count", "order", "multihop")  # exactly scorable
EVAL_SEED_BASE = 100_000  # evaluation items never share a seed with training records

FULL = dict(model="smollm2-135m-instruct", window=16384, rope=8.0, n_long=400, n_short=400, min_tokens=1000,
            max_tokens=15000, buckets=[(1000, 2000), (2000, 4000), (4000, 8000), (8000, 15500)], per_bucket=8,
            needle_lengths=[2048, 4096, 8192, 12288, 15872], needle_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
            batch_size=8, grad_accum=2, lr=1e-4, max_new_tokens=48, short_new_tokens=128, gen_batch_tokens=65536)
TINY = dict(FULL, window=1024, rope=1.0, n_long=6, n_short=4, min_tokens=120, max_tokens=600,
            buckets=[(120, 300), (300, 600)], per_bucket=1, needle_lengths=[256, 512], needle_depths=[0.0, 1.0],
            batch_size=2, grad_accum=1, lr=1e-3, max_new_tokens=8, short_new_tokens=8, gen_batch_tokens=8192)


def settings(work: Path) -> dict:
    if not (work / "settings.json").exists():
        raise LongAlignError(f"{work / 'settings.json'}: not found; run `python bench/reproduce_small.py data "
                             f"--work {work}` first")
    return read_json(work / "settings.json")


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ------------------------------------------------------------------------------------------------------- data
SHORT_TEMPLATES = (
    "Explain in one or two sentences what this verse says:\n{v}",
    "Give this verse a short title:\n{v}",
    "Rewrite this verse in plain modern English:\n{v}",
    "Who or what is this verse about? Answer briefly.\n{v}",
    "Name one feeling this verse expresses, and say why in one sentence:\n{v}",
)


def long_records(tok, n: int, lo: int, hi: int, seed: int, tasks=TRAIN_TASKS) -> list[dict]:
    """`n` LongAlign-format records: a verifiable task planted in KJV filler of log-uniform length in [lo, hi]."""
    from longalign_lib.benchmarks import BUILDERS
    from longalign_lib.generate import case_messages
    from longalign_lib.needle import Haystack, load_haystack

    rng = random.Random(seed)
    hay = Haystack(load_haystack(), tok)
    out = []
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        n_tok = _log_uniform(rng, lo, hi)
        built = BUILDERS[task](rng, hay, n_tok, rng.randrange(max(hay.n_tokens - n_tok, 1)))
        if built is None:
            continue
        ctx, q, ans, _shots, meta = built
        out.append({"messages": case_messages(q, ctx) + [{"role": "assistant", "content": ans}],
                    "meta": {"task": task, "context_tokens": hay.n(ctx), **meta}})
    return out


def eval_cases(tok, buckets, per_bucket: int, seed: int = EVAL_SEED_BASE) -> list[dict]:
    """Held-out verifiable long tasks: `per_bucket` of each task in each length bucket (lengths log-uniform)."""
    from longalign_lib.benchmarks import BUILDERS
    from longalign_lib.needle import Haystack, load_haystack

    rng = random.Random(seed)
    hay = Haystack(load_haystack(), tok)
    cases = []
    for b, (lo, hi) in enumerate(buckets):
        for task in EVAL_TASKS:
            for k in range(per_bucket):
                n_tok = _log_uniform(rng, lo, hi)
                ctx, q, ans, shots, meta = BUILDERS[task](rng, hay, n_tok, rng.randrange(max(hay.n_tokens - n_tok, 1)))
                cases.append({"idx": f"{task}-b{b}-{k}", "query": q, "context": ctx, "answer": ans, "task": task,
                              "few_shots": shots, "meta": {**meta, "context_tokens": hay.n(ctx), "bucket": b}})
    return cases


def short_prompts(n: int, seed: int) -> list[str]:
    """`n` short instructions over single KJV verses (never the evaluation's short tasks)."""
    from longalign_lib.io import data_dir

    verses = [m.group(1) for f in sorted(data_dir().glob("kjv_*.txt"))
              for line in f.read_text(encoding="utf-8").splitlines()
              if (m := re.match(r"^\d+:\d+ (.{40,})$", line.strip()))]
    rng = random.Random(seed)
    return [rng.choice(SHORT_TEMPLATES).format(v=rng.choice(verses)) for _ in range(n)]


def cmd_data(a) -> None:
    """Long training records + evaluation sets into --work (CPU only; the tokenizer measures every context)."""
    from longalign_lib.io import write_jsonl
    from longalign_lib.models import load_tokenizer

    s = dict(TINY if a.tiny else FULL, tiny=bool(a.tiny), data_seed=a.seed)
    if a.tiny:
        from longalign_lib.toy_data import tiny_model_dir

        s["model"] = "random:" + str(tiny_model_dir(a.work / "tiny_model"))
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = load_tokenizer(s["model"])
    long = long_records(tok, s["n_long"], s["min_tokens"], s["max_tokens"], seed=a.seed)
    write_jsonl(a.work / "train_long.jsonl", long)
    write_jsonl(a.work / "eval_long.jsonl", eval_cases(tok, s["buckets"], s["per_bucket"]))
    s["data"] = {"n_long": len(long), "long_seconds": round(time.time() - t0, 1),
                 "long_context_tokens": sorted(r["meta"]["context_tokens"] for r in long)}
    write_json(a.work / "settings.json", s)
    print(f"[data] {len(long)} long records and the evaluation sets written ({s['data']['long_seconds']} s)")


def cmd_short(a) -> None:
    """Short chats: instructions over single verses, replies written by the shipped model (greedy)."""
    import torch

    from longalign_lib.generate import generate_replies
    from longalign_lib.io import write_jsonl
    from longalign_lib.models import load_model_and_tokenizer

    s = settings(a.work)
    t0 = time.time()
    model, tok = load_model_and_tokenizer(s["model"], dtype="bf16" if torch.cuda.is_available() else "fp32")
    prompts = short_prompts(s["n_short"], seed=s["data_seed"] + 1)
    replies = generate_replies(model, tok, [[{"role": "user", "content": p}] for p in prompts],
                               max_new_tokens=s["short_new_tokens"], batch_size=100, max_batch_tokens=1 << 20,
                               progress=False, threads=1)
    short = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r["prediction"]}],
              "meta": {"task": "short_self_distilled"}} for p, r in zip(prompts, replies, strict=True)
             if r["prediction"].strip()]
    write_jsonl(a.work / "train_short.jsonl", short)
    s["data"].update(n_short=len(short), short_dropped_empty=len(prompts) - len(short),
                     short_seconds=round(time.time() - t0, 1))
    write_json(a.work / "settings.json", s)
    print(f"[short] {len(short)} short records ({s['data']['short_seconds']} s); e.g. {short[0]['messages'] if short else None}")


# ------------------------------------------------------------------------------------------------------ train
def train_rows(work: Path, tok, window: int) -> list[dict]:
    from longalign_lib.formatting import format_records
    from longalign_lib.io import read_jsonl

    records = [r for f in ("train_long.jsonl", "train_short.jsonl") if (work / f).exists()
               for r in read_jsonl(work / f)]
    examples, _ = format_records(records, tok, max_length=window)
    return [e.row() for e in examples]


def packed_accum(rows: list[dict], window: int, batch_size: int, grad_accum: int) -> int:
    """Packs per optimizer step so that packing takes about as many steps as naive batching."""
    naive_steps = math.ceil(len(rows) / (batch_size * grad_accum))
    packs = math.ceil(sum(r["length"] for r in rows) / (0.98 * window))
    return max(1, round(packs / naive_steps))


def arm_config(s: dict, arm: str, seed: int, accum_packed: int, device: str):
    from longalign_lib.config import load_config

    sets, _ = ARMS[arm]
    packed = arm.startswith("packed")  # packed: one pack per micro-batch; naive/sorted: batch_size sequences
    accum = accum_packed if packed else s["grad_accum"]
    return load_config("gpu-small", [
        f"model.name={s['model']}", f"model.rope_base_factor={s['rope']}",
        f"model.max_position_embeddings={s['window']}", f"model.device={device}",
        f"batching.max_pack_tokens={s['window']}", f"batching.batch_size={1 if packed else s['batch_size']}",
        f"batching.grad_accum={accum}", f"batching.seed={seed}", "batching.drop_last=false",
        "train.epochs=1", "train.max_steps=-1", "train.save_steps=0", "train.tensorboard=false",
        f"train.lr={s['lr']}", "train.warmup_ratio=0.05", "train.lr_scheduler=cosine", f"train.seed={seed}",
        "train.activation_checkpointing=all", "train.cpu_threads=1", *sets])


def cmd_train(a) -> None:
    """Train one arm with one seed into <work>/runs/<arm>-s<seed>; result.json has time, tokens and the loss log."""
    import torch

    from longalign_lib import train
    from longalign_lib.models import load_tokenizer

    s = settings(a.work)
    name = f"{a.arm}-s{a.seed}"
    run = a.work / "runs" / name
    if (run / "result.json").exists() and not a.force:
        print(f"[train] {name}: done already")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(s["model"])
    rows = train_rows(a.work, tok, s["window"])
    accum = packed_accum(rows, s["window"], s["batch_size"], s["grad_accum"])
    cfg = arm_config(s, a.arm, a.seed, accum, device)
    t0 = time.time()
    res = train.train(cfg, run, dataset=rows, save_model=True, quiet=True)
    wall = time.time() - t0
    log = res["log"]
    out = {"arm": a.arm, "seed": a.seed, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "concurrent": bool(a.concurrent), "steps": len(log), "grad_accum": cfg.batching.grad_accum,
           "sequences": len(rows), "tokens": sum(r["tokens"] for r in log),
           "computed_tokens": sum(r["computed_tokens"] for r in log), "step_s": sum(r["step_s"] for r in log),
           "train_s": res.get("train_s"), "wall_s": round(wall, 2),
           "peak_mem_gib": max((r["peak_mem_gib"] for r in log), default=None),
           "loss": [r["loss"] for r in log], "model_dir": res["model_dir"]}
    out["tokens_per_s"] = out["tokens"] / out["step_s"] if out["step_s"] else None
    write_json(run / "result.json", out)
    print(f"[train] {name}: {out['steps']} steps, {out['tokens']:,} tokens ({out['computed_tokens']:,} computed), "
          f"{out['step_s']:.1f} s in steps, loss {out['loss'][0]:.3f} → {out['loss'][-1]:.3f}")


# ------------------------------------------------------------------------------------------------------- eval
def load_eval_model(s: dict, which: str, work: Path, device: str):
    from longalign_lib.models import load_model_and_tokenizer

    dtype = "bf16" if device == "cuda" else "fp32"
    if which == "base":  # as shipped: its own window, no RoPE change
        return load_model_and_tokenizer(s["model"], dtype=dtype, device=device)
    if which == "rope8":  # every arm's starting point: RoPE base scaled, window raised, untrained
        return load_model_and_tokenizer(s["model"], dtype=dtype, device=device, rope_base_factor=s["rope"],
                                        max_position_embeddings=s["window"])
    return load_model_and_tokenizer(str(work / "runs" / which / "model"), dtype=dtype, device=device)


def cmd_eval(a) -> None:
    """Long tasks by bucket, needle grid and short tasks for one model → <work>/evals/<model>.json."""
    import torch

    from longalign_lib.benchmarks import score_exact
    from longalign_lib.generate import case_messages, generate_replies, make_generate_fn, model_window
    from longalign_lib.io import read_jsonl
    from longalign_lib.needle import run_grid
    from longalign_lib.short_tasks import evaluate_short_tasks, load_short_tasks

    s = settings(a.work)
    dest = a.work / "evals" / f"{a.model}.json"
    if dest.exists() and not a.force:
        print(f"[eval] {a.model}: done already")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model, tok = load_eval_model(s, a.model, a.work, device)
    window = model_window(model, tok)
    cases = read_jsonl(a.work / "eval_long.jsonl")
    outs = generate_replies(model, tok, [case_messages(c["query"], c["context"]) for c in cases],
                            max_new_tokens=s["max_new_tokens"], batch_size=16, max_batch_tokens=s["gen_batch_tokens"],
                            progress=False, threads=1)
    long = [{"idx": c["idx"], "task": c["task"], "bucket": c["meta"]["bucket"],
             "context_tokens": c["meta"]["context_tokens"], "answer": c["answer"], "prediction": o["prediction"],
             "truncated": o["truncated"], "score": score_exact(c, o["prediction"])}
            for c, o in zip(cases, outs, strict=True)]
    gen = make_generate_fn(model, tok, max_new_tokens=s["max_new_tokens"], batch_size=8,
                           max_batch_tokens=s["gen_batch_tokens"], threads=1)
    needle = run_grid(gen, tok, s["needle_lengths"], s["needle_depths"], window=window, batch=8, progress=False,
                      model_label=a.model)
    short = evaluate_short_tasks(model, tok, load_short_tasks(), max_new_tokens=16, threads=1)
    res = {"model": a.model, "window": window, "device": device, "seconds": round(time.time() - t0, 1),
           "long": long, "needle": {k: needle[k] for k in ("lengths", "depths", "skipped_lengths", "mean_score")}
           | {"cells": [{k: c[k] for k in ("length", "depth", "score", "prediction")} for c in needle["cells"]]},
           "short": short}
    write_json(dest, res)
    acc = sum(x["score"] for x in long) / len(long)
    print(f"[eval] {a.model}: long {acc:.3f}, needle {needle['mean_score']}, "
          f"short {sum(r['correct'] for r in short) / len(short):.3f} ({res['seconds']} s)")


# ----------------------------------------------------------------------------------------------------- report
def two_level_ci(reps: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of {item: [score per seed]} with a CI from resampling items, then seeds within each item.

    >>> two_level_ci({"a": [1.0, 1.0], "b": [0.0, 0.0]})["mean"]
    0.5
    """
    import numpy as np

    items = [np.asarray(v, dtype=float) for v in reps.values() if len(v)]
    if not items:
        return {"mean": None, "ci": [None, None], "n_items": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for t in range(n_boot):
        pick = rng.integers(0, len(items), size=len(items))
        means[t] = np.mean([rng.choice(items[i], size=len(items[i])).mean() for i in pick])
    q = (1 - level) / 2
    return {"mean": float(np.mean([x.mean() for x in items])), "n_items": len(items),
            "ci": [float(np.quantile(means, q)), float(np.quantile(means, 1 - q))]}


def _by_item(evals: list[dict], part: str, key: str = "score", where=lambda x: True) -> dict:
    """{item id: [score in each seed's eval]} for one evaluation part (long / needle / short)."""
    reps: dict = {}
    for ev in evals:
        rows = ev["needle"]["cells"] if part == "needle" else ev[part]
        for r in rows:
            if not where(r):
                continue
            idx = f"{r['length']}@{r['depth']}" if part == "needle" else r["idx"]
            reps.setdefault(idx, []).append(float(r[key]))
    return reps


def cmd_report(a) -> dict:
    """Aggregate every result under --work into results.json, results.md and figures in --out."""
    from longalign_lib.agreement import paired_compare
    from longalign_lib.io import write_text

    s = settings(a.work)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((a.work / "evals").glob("*.json"))}
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted((a.work / "runs").glob("*/result.json"))}
    groups = {"base": ["base"], "rope8": ["rope8"]}
    for arm in ARMS:
        groups[arm] = sorted(k for k in evals if k.startswith(arm + "-s"))
    groups = {g: [evals[m] for m in ms if m in evals] for g, ms in groups.items()}
    groups = {g: v for g, v in groups.items() if v}
    buckets = s["buckets"]
    nb = a.n_boot

    def ci(reps: dict) -> dict:
        return two_level_ci(reps, n_boot=nb)

    table = {}
    for g, evs in groups.items():
        row = {"seeds": len(evs), "long": ci(_by_item(evs, "long")), "needle": ci(_by_item(evs, "needle")),
               "short": ci(_by_item(evs, "short", "correct")),
               "long_by_bucket": [ci(_by_item(evs, "long", where=lambda r, b=b: r["bucket"] == b))
                                  for b in range(len(buckets))],
               "long_by_task": {t: ci(_by_item(evs, "long", where=lambda r, t=t: r["task"] == t))
                                for t in EVAL_TASKS},
               "needle_skipped": evs[0]["needle"]["skipped_lengths"],
               "long_truncated": sum(r["truncated"] for r in evs[0]["long"])}
        seed_runs = [runs[k] for k in sorted(runs) if k.startswith(g + "-s")]
        if seed_runs:
            alone = [r for r in seed_runs if not r["concurrent"]]
            row["train"] = {"steps": seed_runs[0]["steps"], "grad_accum": seed_runs[0]["grad_accum"],
                            "tokens": seed_runs[0]["tokens"], "computed_tokens": seed_runs[0]["computed_tokens"],
                            "loss_last": [r["loss"][-1] for r in seed_runs],
                            "time_s_alone": alone[0]["step_s"] if alone else None,
                            "tokens_per_s_alone": alone[0]["tokens_per_s"] if alone else None,
                            "peak_mem_gib": alone[0]["peak_mem_gib"] if alone else None}
        table[g] = row
    comparisons = {}
    pairs = [("packed_weighted", "packed"), ("packed_weighted", "naive"), ("sorted", "naive"), ("packed", "naive"),
             *[(arm, "rope8") for arm in ARMS]]
    for x, y in pairs:
        if x in groups and y in groups:
            for part, key in (("long", "score"), ("needle", "score"), ("short", "correct")):
                comparisons[f"{x} vs {y}: {part}"] = paired_compare(_by_item(groups[x], part, key),
                                                                    _by_item(groups[y], part, key), n_boot=nb,
                                                                    seed=0)
    result = {"settings": {k: v for k, v in s.items() if k != "data"}, "data": s.get("data"), "table": table,
              "comparisons": comparisons}
    write_json(out / "results.json", result)
    write_text(out / "results.md", markdown(result))
    figures(result, groups, out)
    print((out / "results.md").read_text())
    return result


def _fmt(c: dict, pct: bool = True) -> str:
    if c.get("mean") is None:
        return "–"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.2f}")
    return f"{f(c['mean'])} [{f(c['ci'][0])}, {f(c['ci'][1])}]"


def markdown(result: dict) -> str:
    s, table = result["settings"], result["table"]
    names = {"base": "as shipped (8k, untrained)", "rope8": "RoPE ×8, 16k, untrained",
             **{k: v[1] for k, v in ARMS.items()}}
    bnames = [f"{lo // 1000 if lo >= 1000 else lo}k–{hi / 1000:g}k" if lo >= 1000 else f"{lo}–{hi}"
              for lo, hi in s["buckets"]]
    lines = ["| model | seeds | long tasks % | " + " | ".join(bnames) + " | needle % | short tasks % | train time s "
             "(tok/s) | steps |",
             "|---|---:|---:|" + "---:|" * len(bnames) + "---:|---:|---:|---:|"]
    for g, r in table.items():
        tr = r.get("train") or {}
        t = (f"{tr['time_s_alone']:.1f} ({tr['tokens_per_s_alone']:,.0f})" if tr.get("time_s_alone") else "–")
        lines.append(f"| {names.get(g, g)} | {r['seeds']} | {_fmt(r['long'])} | "
                     + " | ".join(f"{100 * b['mean']:.1f}" if b["mean"] is not None else "–"
                                  for b in r["long_by_bucket"])
                     + f" | {_fmt(r['needle'])} | {_fmt(r['short'])} | {t} | {tr.get('steps', '–')} |")
    lines += ["", "Long tasks by task type (% exact, mean over seeds)", "",
              "| model | " + " | ".join(EVAL_TASKS) + " |", "|---|" + "---:|" * len(EVAL_TASKS)]
    for g, r in table.items():
        lines.append(f"| {names.get(g, g)} | " + " | ".join(
            f"{100 * r['long_by_task'][t]['mean']:.1f}" if r["long_by_task"][t]["mean"] is not None else "–"
            for t in EVAL_TASKS) + " |")
    lines += ["", "Paired comparisons (items; the seeds of an item are its repetitions): mean difference in points, "
              "95 % CI, permutation p", "", "| comparison | n | difference | 95 % CI | p |", "|---|---:|---:|---|---:|"]
    for k, c in result["comparisons"].items():
        if c["mean_diff"] is None:
            continue
        lines.append(f"| {k} | {c['n']} | {100 * c['mean_diff']:+.1f} | [{100 * c['ci'][0]:+.1f}, "
                     f"{100 * c['ci'][1]:+.1f}] | {c['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def figures(result: dict, groups: dict, out: Path) -> None:
    import numpy as np

    from longalign_lib import plots

    table = result["table"]
    timed = [a for a in ARMS if (table.get(a) or {}).get("train", {}).get("time_s_alone")]
    if timed:  # Fig. 5: training time of the same data, each arm alone on the GPU
        fig, (ax1, ax2) = plots.figure(1, 2, figsize=(10, 3.8))
        t = [table[a]["train"]["time_s_alone"] for a in timed]
        ax1.bar([ARMS[a][1] for a in timed], t, color=plots.CYCLE[:len(timed)])
        for i, v in enumerate(t):
            ax1.annotate(f"{v:.0f} s\n{t[0] / v:.2f}×", (i, v), ha="center", va="bottom", fontsize=8)
        ax1.set_ylim(0, 1.25 * max(t))
        ax1.set_ylabel("training time, one epoch (s)")
        ax1.set_title("Same data, one epoch (seed 0, alone on the GPU)")
        comp = [table[a]["train"]["computed_tokens"] / table[a]["train"]["tokens"] for a in timed]
        ax2.bar([ARMS[a][1] for a in timed], comp, color=plots.CYCLE[:len(timed)])
        ax2.set_ylabel("computed / real tokens")
        ax2.set_title("Padding computed per real token")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelrotation=15)
        plots.save(fig, out / "training_time.png", close=True)
    panels = [g for g in ("base", "rope8", *ARMS) if g in groups]
    if panels:  # Fig. 4: needle heatmaps, before and after (mean over seeds)
        from longalign_lib.needle import heatmap_panels

        lengths, depths = result["settings"]["needle_lengths"], result["settings"]["needle_depths"]
        mats = {}
        for g in panels:
            m = np.full((len(depths), len(lengths)), np.nan)
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    v = [c["score"] for ev in groups[g] for c in ev["needle"]["cells"]
                         if c["length"] == n and c["depth"] == d]
                    if v:
                        m[i, j] = float(np.mean(v))
            mats[{"base": "as shipped", "rope8": "RoPE ×8, untrained"}.get(g, ARMS.get(g, ("", g))[1])] = m
        fig = heatmap_panels(mats, lengths, depths, title="Needle in a haystack before and after training "
                                                          "(mean over seeds; cells beyond the 8k window not run)")
        plots.save(fig, out / "needle_before_after.png", close=True)
    fig, ax = plots.figure(1, 1, figsize=(7, 3.8))  # long-task accuracy by length bucket, with CIs
    x = np.arange(len(result["settings"]["buckets"]))
    shown = [g for g in ("rope8", *ARMS) if g in table]
    for k, g in enumerate(shown):
        b = table[g]["long_by_bucket"]
        mean = np.array([c["mean"] if c["mean"] is not None else np.nan for c in b])
        lo = np.array([c["ci"][0] if c["ci"][0] is not None else np.nan for c in b])
        hi = np.array([c["ci"][1] if c["ci"][1] is not None else np.nan for c in b])
        off = (k - (len(shown) - 1) / 2) * 0.08
        ax.errorbar(x + off, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=ARMS.get(g, (0, g))[1]
                    if g in ARMS else "RoPE ×8, untrained")
    ax.set_xticks(x, [f"{lo}–{hi}" for lo, hi in result["settings"]["buckets"]])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("exact accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Verifiable long tasks by length (mean over seeds, 95 % CI)")
    ax.legend(fontsize=7)
    plots.save(fig, out / "long_tasks_by_length.png", close=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["data", "short", "train", "eval", "report"])
    ap.add_argument("--work", type=Path, default=Path("runs/reproduce_small"))
    ap.add_argument("--arm", choices=list(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="eval: base | rope8 | <arm>-s<seed>")
    ap.add_argument("--out", default="bench/results/reproduce_small")
    ap.add_argument("--n-boot", type=int, default=2000,
                    help="report: bootstrap resamples per CI (the published results use 2000)")
    ap.add_argument("--tiny", action="store_true", help="data: a tiny random model and tiny sizes (CPU smoke test)")
    ap.add_argument("--concurrent", action="store_true", help="train: other runs share the GPU (time not reported)")
    ap.add_argument("--force", action="store_true", help="redo a finished train/eval")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd == "train" and not a.arm:
        ap.error("train needs --arm")
    if a.cmd == "eval" and not a.model:
        ap.error("eval needs --model")
    try:
        {"data": cmd_data, "short": cmd_short, "train": cmd_train, "eval": cmd_eval, "report": cmd_report}[a.cmd](a)
    except LongAlignError as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
