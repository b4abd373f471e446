# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Evaluating long-context answers: generation, an LLM judge, and the needle test
#
# LongAlign measures its models on **LongBench-Chat**: open questions over long documents, answered by the model
# and graded 1–10 by GPT-4 against a reference answer. The judge never reads the long document; instead it sees
# the question, the reference, and a few answers that humans already rated, which anchor its scale. The paper
# checks this judge against human ratings (its Table 1) and adds the **needle-in-a-haystack** test: plant one
# fact somewhere in a long text and ask for it.
#
# This notebook runs each piece on the offline SmolLM2-135M-Instruct:
#
# 1. a small benchmark built from the bundled public-domain text, with answers known by construction;
# 2. generation through the model's **own chat template**, with middle truncation to its window;
# 3. the judge protocol — prompt assembly, parsing `[[n]]`, two runs with reshuffled examples — run with the
#    135M model as judge, and the reference-overlap **proxy** scores beside it;
# 4. agreement statistics (Spearman, Kendall, bootstrap intervals);
# 5. a needle grid and its heatmap.
#
# Library code: `longalign_lib.benchmarks`, `longalign_lib.generate`, `longalign_lib.judge`,
# `longalign_lib.scoring`, `longalign_lib.needle`. The same steps run as `longalign eval`, `longalign judge` and
# `longalign needle`.

# %% tags=["parameters"]
SMOKE = False  # True: the fastest settings (CI, `make test`)
OUT_DIR = "../runs/notebooks/05_judge_evaluation"
MODEL = "smollm2-135m-instruct"  # the evaluated model: a HF id or local path of any chat model
CONTEXT_TOKENS = 1200  # length of each benchmark context
N_PER_TASK = 1  # cases per task type (retrieve, count, order, multihop, quote)
MAX_NEW_TOKENS = 48
JUDGE_BACKEND = "local"  # local | openai | anthropic
JUDGE_MODEL = "smollm2-135m-instruct"  # e.g. gpt-4o, or the name a vLLM server serves
JUDGE_BASE_URL = None  # e.g. "http://localhost:8000/v1" for vLLM / llama.cpp (OpenAI wire format)
JUDGE_RUNS = 2
JUDGE_MAX_NEW_TOKENS = 32
NEEDLE_LENGTHS = [256, 512, 1024, 2048]
NEEDLE_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
THREADS = 0  # torch CPU threads while generating (0 = torch's default; 1 is much faster on a shared machine)

# %%
import random
import time
from pathlib import Path

from longalign_lib import plots
from longalign_lib.benchmarks import make_offline_set, score_exact
from longalign_lib.generate import case_messages, encode_prompt, generate_replies, make_generate_fn, model_window
from longalign_lib.io import write_metrics
from longalign_lib.judge import build_judge_prompt, judge_items, load_template, parse_rating, scores_figure, summarize
from longalign_lib.llm import make_client
from longalign_lib.models import load_model_and_tokenizer
from longalign_lib.needle import heatmap, load_haystack, run_grid
from longalign_lib.scoring import agreement, bootstrap_ci, proxy_scores

t_start = time.time()
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
if SMOKE:
    CONTEXT_TOKENS, N_PER_TASK, MAX_NEW_TOKENS, JUDGE_MAX_NEW_TOKENS = 300, 1, 24, 16
    NEEDLE_LENGTHS, NEEDLE_DEPTHS, THREADS = [128, 256], [0.0, 0.5, 1.0], 1

model, tok = load_model_and_tokenizer(MODEL)
print(f"{MODEL}: window {model_window(model, tok)} tokens")

# %% [markdown]
# ## 1. A benchmark with answers known by construction
#
# The benchmark format is LongBench-Chat's: one JSON object per line with `idx, query, context, answer,
# few_shots[{answer, score}]` (documented in `longalign_lib/benchmarks.py`; `load_benchmark` validates it and
# names file and line on errors). Without a real benchmark at hand we build one from the bundled King James
# books: made-up sentences are **planted** into the text, so every answer is exact —
#
# * *retrieve*: one vault code among three planted ones; *count*: how often a planted sentence recurs (a similar
#   distractor sentence is planted too); *order*: the order of four planted events; *multihop*: two planted facts
#   must be combined, with a distractor pair; *quote*: quote a verse of the text by its number.
#
# Each case carries three rated example answers for the judge. Here they come from a fixed rubric (right 10,
# partly right 4–6, wrong 1–2), not from human graders — `meta["few_shot_scores"]` says so.

# %%
cases = make_offline_set(tok, context_tokens=CONTEXT_TOKENS, n_per_task=N_PER_TASK, seed=0)
if SMOKE:
    cases = [c for c in cases if c.task in ("retrieve", "multihop", "quote")]
for c in cases:
    print(f"{c.idx:11s} {c.meta['context_tokens']:5d} tokens  Q: {c.query[:80]}\n{'':11s} reference: {c.answer[:80]}")
print("\nrated examples of", cases[0].idx, "→", cases[0].few_shots)

# %% [markdown]
# ## 2. Generation through the model's own chat template
#
# LongAlign's evaluation script wraps every prompt in Llama-2's `[INST] … [/INST]`. A model trained with another
# template (ChatML here, GLM-4's or Llama-3's elsewhere) then answers in a format it never saw, and loses points
# for it. `generate.encode_prompt` renders the chat with `tokenizer.apply_chat_template`. A prompt longer than
# the window loses its **middle** — the start (instructions) and the end (the question) survive:

# %%
demo_ids, n_full = encode_prompt(tok, case_messages(cases[0].query, cases[0].context), max_input_tokens=120)
print(f"{n_full} tokens → {len(demo_ids)} after middle truncation:\n")
print(tok.decode(demo_ids))

# %% [markdown]
# Prompts are grouped by length into batches (left padding, `eval.batch_size`, `eval.max_batch_tokens`) and
# decoded greedily with a fixed seed. `longalign eval` also streams each batch to `predictions.jsonl`, so an
# interrupted run resumes. The four planted-fact tasks get an exact score (`benchmarks.score_exact`).

# %%
t0 = time.time()
gens = generate_replies(model, tok, [case_messages(c.query, c.context) for c in cases], max_new_tokens=MAX_NEW_TOKENS,
                        batch_size=4, seed=0, threads=THREADS)
gen_s = time.time() - t0
rows = [{"idx": c.idx, "task": c.task, "query": c.query, "answer": c.answer, "few_shots": c.few_shots,
         "prediction": g["prediction"], "exact": score_exact(c, g["prediction"])} for c, g in zip(cases, gens)]
for r in rows:
    print(f"{r['idx']:11s} exact={r['exact']}  → {r['prediction'][:110]!r}")
print(f"\n{len(rows)} answers in {gen_s:.1f}s")

# %% [markdown]
# ## 3. The judge prompt
#
# `judge.build_judge_prompt` fills a template (`longalign_lib/prompts/judge_default.txt`; `rating_first` is a
# shorter variant; `eval.judge_prompt_file` takes your own file with `{question} {reference} {answer}
# {examples}`). The rated examples are **shuffled for every run**, so a judge's bias towards the first or last
# example averages out over the two runs. The long document is not in it.

# %%
template = load_template("default")
prompt_a, order_a = build_judge_prompt(template, rows[0]["query"], rows[0]["answer"], rows[0]["prediction"],
                                       rows[0]["few_shots"], random.Random(0))
prompt_b, order_b = build_judge_prompt(template, rows[0]["query"], rows[0]["answer"], rows[0]["prediction"],
                                       rows[0]["few_shots"], random.Random(1))
print(prompt_a)
print("\nexample order, run 1:", order_a, " run 2:", order_b)

# %% [markdown]
# The judge must end with `[[n]]`. `judge.parse_rating` takes the last `[[n]]` in range 1–10 and, failing that,
# a few looser forms, and records which one matched; anything else is *unparseable*, and the case is asked again
# with a reminder (up to `eval.judge_max_attempts` tries). A run that never yields a rating is recorded as a
# failure, not silently scored.

# %%
for reply in ["The answer names the right code. [[9]]", "Mostly wrong.\nRating: 3", "[[12]]", "I cannot tell."]:
    print(f"{reply!r:45s} → {parse_rating(reply)}")

# %% [markdown]
# ## 4. Judging with the offline model — and why not to trust it
#
# Any `llm.py` backend can judge. Offline we only have the 135M model itself, so we let it try (reusing the
# loaded weights):

# %%
if JUDGE_BACKEND == "local" and JUDGE_BASE_URL is None and JUDGE_MODEL == MODEL:
    judge_client = make_client("local", JUDGE_MODEL, model_obj=model, tokenizer=tok, cache_dir=False, threads=THREADS)
else:
    judge_client = make_client("openai" if JUDGE_BASE_URL else JUDGE_BACKEND, JUDGE_MODEL, base_url=JUDGE_BASE_URL,
                               cache_dir=out / "judge_cache")
t0 = time.time()
judged = judge_items(judge_client, rows, load_template("rating_first"), runs=JUDGE_RUNS, max_attempts=2,
                     max_new_tokens=JUDGE_MAX_NEW_TOKENS, progress=False)
judge_s = time.time() - t0
for r, j in zip(rows, judged):
    r.update(score=j["score"], runs=j["runs"], failed=j["failed"], n_failed_runs=j["n_failed_runs"], usage=j["usage"],
             cost_usd=j["cost_usd"], proxy=proxy_scores(r["prediction"], r["answer"]))
    first = j["runs"][0]["attempts"][0]
    print(f"{r['idx']:11s} judge={j['score']}  first reply: {first['raw'][:90]!r}")
summary = summarize(rows)
print(f"\n{summary['judged']}/{summary['n']} cases rated; {summary['unparseable_replies']} of "
      f"{summary['judge_calls']} judge replies unparseable; {judge_s:.1f}s")

# %% [markdown]
# A 135M model is not a judge. Grading needs reading comprehension, comparison with a reference and calibrated
# numbers; at this size the model mostly ignores the required `[[n]]` format, and when it does give a number, the
# number tracks the wording of the prompt more than the quality of the answer. LongAlign (like LongBench-Chat)
# uses GPT-4, whose ratings the paper shows to agree with human graders. Treat every number in this section as
# a test of the plumbing, not a measurement.
#
# **Pointing the judge at a real model takes two settings** (CLI `--set`, or the parameters of this notebook):
#
# * an API: `eval.judge_backend=openai` and `eval.judge_model=gpt-4o` (the key comes from `$OPENAI_API_KEY`;
#   `anthropic` + a Claude model works the same way with `$ANTHROPIC_API_KEY`);
# * your own server (vLLM, llama.cpp, Ollama — anything speaking the OpenAI chat format):
#   `eval.judge_base_url=http://localhost:8000/v1` and `eval.judge_model=<the served model name>`.
#
# Replies are cached (`$LONGALIGN_HOME/llm_cache`), retried on 429/5xx, and their tokens and cost
# (`eval.judge_prices`) are recorded per case in `judgments.jsonl`.
#
# ## 5. The proxy scores, and agreement statistics
#
# Offline, a cheap stand-in is overlap with the reference: token F1 and ROUGE-L (`rouge-score` package). It is a
# **proxy**: a right answer in other words scores low, a wrong one that repeats the question's words scores
# high. Means come with percentile-bootstrap 95% intervals.

# %%
for r in rows:
    print(f"{r['idx']:11s} token F1 {r['proxy']['token_f1']:.2f}   ROUGE-L {r['proxy']['rouge_l']:.2f}   exact {r['exact']}")
ci = bootstrap_ci([r["proxy"]["rouge_l"] for r in rows])
print(f"\nROUGE-L mean {ci['mean']:.3f} (95% CI {ci['lo']:.3f}–{ci['hi']:.3f}, n={ci['n']}; few cases → wide)")

# %% [markdown]
# How far can the proxy be trusted? The paper answers this for its judge by correlating its ratings with human
# ones (Spearman, Kendall). We can ask the same of the proxy with the rated example answers of every case: their
# rubric scores play the human ratings.

# %%
shot_proxy, shot_score = [], []
for c in cases:
    for s in c.few_shots:
        shot_proxy.append(proxy_scores(s["answer"], c.answer)["rouge_l"])
        shot_score.append(s["score"])
agree = agreement(shot_proxy, shot_score)
print(f"proxy (ROUGE-L) vs rubric scores over {agree['n']} rated answers: Spearman {agree['spearman']:.2f} "
      f"(p={agree['spearman_p']:.3f}), Kendall {agree['kendall']:.2f}")

# %%
fig = scores_figure(rows, title="Offline judge (135M) and proxy per case — plumbing, not a measurement")
plots.save(fig, out / "judge_scores.png")
fig

# %% [markdown]
# ## 6. Needle in a haystack
#
# The needle is a made-up sentence planted at a relative **depth** (0% = first sentence, 100% = last) of filler
# cut to an exact **length** in tokens, at a sentence boundary. The model answers the question; a cell scores 1
# when the answer contains the key fact (`eval.needle_scorer=judge` asks the judge instead). Lengths that do not
# fit the model's window are skipped, never truncated — truncation could cut the needle out.

# %%
t0 = time.time()
needle = run_grid(make_generate_fn(model, tok, max_new_tokens=24, threads=THREADS), tok, NEEDLE_LENGTHS, NEEDLE_DEPTHS,
                  haystack=load_haystack(), window=model_window(model, tok), progress=False)
needle_s = time.time() - t0
for cell in needle["cells"]:
    print(f"{cell['length']:5d} tokens, depth {cell['depth']:.2f} (achieved {cell['achieved_depth']:.2f}) "
          f"score {cell['score']:.0f}: {cell['prediction'][:70]!r}")
fig = heatmap(needle)
plots.save(fig, out / "needle_heatmap.png")
fig

# %% [markdown]
# SmolLM2 has an 8k window, and short needles are easy for it; the interesting region is near the end of the
# window and after context extension (stage 4). On a GPU, set `NEEDLE_LENGTHS` up to the window (the `gpu-small`
# preset goes to 16k) — recall typically falls first in the middle depths of the longest contexts.

# %%
write_metrics(out, {"model": MODEL, "n_cases": len(rows), "exact_mean": bootstrap_ci(
    [r["exact"] for r in rows if r["exact"] is not None])["mean"], "generate_s": round(gen_s, 1),
    "judge_calls": summary["judge_calls"], "judge_rated": summary["judged"],
    "judge_unparseable": summary["unparseable_replies"], "proxy_rouge_l": summary["proxy_rouge_l"],
    "proxy_rubric_spearman": agree["spearman"], "proxy_rubric_n": agree["n"],
    "needle_cells": len(needle["cells"]), "needle_mean": needle["mean_score"],
    "needle_depth_error": max(abs(c["achieved_depth"] - c["depth"]) for c in needle["cells"]),
    "needle_png": str(out / "needle_heatmap.png"), "judge_png": str(out / "judge_scores.png"),
    "seconds": round(time.time() - t_start, 1)})
