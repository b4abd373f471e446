# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 05 · Evaluation you can trust: an LLM judge, how reliable it is, and whether a difference is real
#
# LongAlign grades long-context answers the **LongBench-Chat** way: a judge model compares each answer with a
# reference answer, calibrated by a few answers that humans already rated, and gives a rating 1–10 as `[[n]]`.
# The paper's GPT-4 judge agrees with humans at Spearman **0.844** (two humans agree at 0.817), and the paper's
# improvements are 0.2–0.45 points. Two questions decide whether such numbers mean anything: *how well does the
# judge agree with people*, and *is a difference larger than the noise*?
#
# **What you will learn**
# - how the judge prompt is built (the prompt printed here is exactly the one the judge reads) and how `[[n]]` is
#   parsed — written by hand and checked against the library;
# - **probability-weighted ratings**: reading the judge's whole distribution over 1..10 at the rating position, so
#   even a 135M judge that never writes `[[n]]` gives a score for every answer;
# - why **correlation is not agreement** (Spearman vs weighted κ, Krippendorff's α, Scott's π, leniency), with
#   Spearman and a bootstrap confidence interval computed by hand and checked against the library;
# - an agreement table with CIs for the offline judge, and how far a 135M judge is from GPT-4;
# - where the word-overlap **proxy** fails (an exactly right answer with a low token F1);
# - what a CI on a 50-item benchmark looks like, and a paired test of two runs (with vs without the document).
#
# **Time**: about 70 s on 2 CPU cores (SMOKE, the default without a GPU; the needle grid is opt-in there);
# about a minute on a GPU with the full settings.
#
# Library code: `longalign_lib.judge`, `longalign_lib.rating_probs`, `longalign_lib.agreement`,
# `longalign_lib.longbench_chat`, `longalign_lib.benchmarks`, `longalign_lib.generate`, `longalign_lib.needle`.
# The same steps run as `longalign eval`, `longalign judge` (and `longalign judge --compare RUN_A RUN_B`),
# `longalign needle`.

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/05_judge_evaluation"
MODEL = "smollm2-135m-instruct"  # the evaluated model: a HF id or local path of any chat model
JUDGE_MODEL = "smollm2-135m-instruct"  # the local judge (probability-weighted ratings need its logits)
CONTEXT_TOKENS = 1200  # length of each benchmark context
N_PER_TASK = 2  # cases per task type (retrieve, count, order, multihop, quote)
MAX_NEW_TOKENS = 48
JUDGE_RUNS = 2  # each answer judged this many times, rated examples reshuffled (SMOKE: 1)
JUDGE_LBC = None  # judge the LongBench-Chat folder too (None: only outside SMOKE)
N_BOOT = 1000  # bootstrap resamples for the confidence intervals
RUN_NEEDLE = None  # None: only outside SMOKE (a short-context needle grid on CPU is all 1.0 and teaches little)
NEEDLE_LENGTHS = [512, 1024, 2048, 4096]
NEEDLE_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
LBC_DIR = "../data/longbench_chat_sample"  # a folder in the LongBench-Chat layout (download the real one)

# %%
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from longalign_lib import agreement as ag
from longalign_lib import plots
from longalign_lib.benchmarks import make_offline_set, score_exact
from longalign_lib.generate import case_messages, generate_replies, generate_reply, model_window
from longalign_lib.io import write_metrics
from longalign_lib.judge import GPT4_HUMAN, build_judge_prompt, judge_items, load_template, meta_eval_items, parse_rating
from longalign_lib.longbench_chat import load_longbench_chat
from longalign_lib.models import load_model_and_tokenizer
from longalign_lib.rating_probs import LocalRatingScorer
from longalign_lib.scoring import proxy_scores

t_start = time.time()
if SMOKE is None:
    SMOKE = not torch.cuda.is_available()
if RUN_NEEDLE is None:
    RUN_NEEDLE = not SMOKE
torch.set_num_threads(1)  # one thread: on a small shared CPU two threads that wait on each other are slower
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
if JUDGE_LBC is None:
    JUDGE_LBC = not SMOKE
if SMOKE:
    CONTEXT_TOKENS, N_PER_TASK, MAX_NEW_TOKENS, N_BOOT, JUDGE_RUNS = 300, 1, 16, 200, 1
model, tok = load_model_and_tokenizer(MODEL)
judge_model, judge_tok = (model, tok) if JUDGE_MODEL == MODEL else load_model_and_tokenizer(JUDGE_MODEL)
print(f"SMOKE={SMOKE}; {MODEL}: window {model_window(model, tok)} tokens; outputs in {out.resolve()}")

# %% [markdown]
# ## 1. A benchmark whose answers are known exactly
#
# The benchmark format is LongBench-Chat's (`idx, query, context, answer, few_shots[{answer, score}]`,
# documented in `longalign_lib/benchmarks.py`). Offline we build one from the bundled King James books: made-up
# sentences are **planted** in the text, so every answer is exact — *retrieve* a vault code among distractors,
# *count* a repeated sentence, *order* four events, *multihop* (combine two facts), *quote* a verse.
# Each case carries three rated example answers for the judge; here their ratings come from a fixed rubric
# (right 10, partly right 4–6, wrong 1–2), not from people — `meta["few_shot_scores"]` says so.

# %%
cases = make_offline_set(tok, context_tokens=CONTEXT_TOKENS, n_per_task=N_PER_TASK, seed=0)
if SMOKE:  # the four tasks with exact answers only (quotation has none)
    cases = [c for c in cases if c.task != "quote"]
for c in cases:
    print(f"{c.idx:11s} {c.meta['context_tokens']:5d} tokens  Q: {c.query[:70]}  → {c.answer[:40]}")

# %% [markdown]
# ## 2. Answers through the model's own chat template — with and without the document
#
# Prompts are rendered by `tokenizer.apply_chat_template`; a prompt longer than the window loses its **middle**
# (the instruction at the start and the question at the end survive), and each answer records how many tokens
# were cut. As a **control**, every question is also asked *without* its document: an answer that is right
# without reading tests prior knowledge, not long-context use.

# %%
t0 = time.time()
with_doc = generate_replies(model, tok, [case_messages(c.query, c.context) for c in cases],
                            max_new_tokens=MAX_NEW_TOKENS, batch_size=4, seed=0, progress=False)
no_doc = generate_replies(model, tok, [case_messages(c.query) for c in cases], max_new_tokens=MAX_NEW_TOKENS,
                          batch_size=4, seed=0, progress=False)
gen_s = time.time() - t0
rows = []
for c, g, n in zip(cases, with_doc, no_doc):
    rows.append({"idx": c.idx, "task": c.task, "query": c.query, "answer": c.answer, "few_shots": c.few_shots,
                 "prediction": g["prediction"], "exact": score_exact(c, g["prediction"]),
                 "no_doc_prediction": n["prediction"], "no_doc_exact": score_exact(c, n["prediction"]),
                 "n_prompt_tokens": g["n_prompt_tokens"], "cut": g["n_prompt_tokens"] - g["n_input_tokens"]})
    print(f"{c.idx:11s} exact={rows[-1]['exact']}  no-doc exact={rows[-1]['no_doc_exact']}  cut={rows[-1]['cut']}  "
          f"→ {g['prediction'][:70]!r}")
print(f"\n{2 * len(rows)} answers in {gen_s:.1f}s")

# %% [markdown]
# *What you should see:* short answers, some right (`exact=1.0`) on retrieval, most wrong on counting and
# ordering — a 135M model is weak at long-context reasoning. `cut=0`: these contexts fit the 8k window.
#
# ## 3. The judge prompt — exactly as the judge reads it
#
# `judge.build_judge_prompt` fills a template (here the bundled `rating_first`; `default` asks for a short
# reason first; `eval.judge_prompt_file` takes your own). The rated examples are **shuffled for every run**, so
# a bias towards the first or last example averages out. The long document is never in it. For a local judge
# the chat template wraps the prompt and the reply is **prefilled with `[[`**: the next token *is* the rating.

# %%
template = load_template("rating_first")
scorer = LocalRatingScorer(judge_model, judge_tok)
prompt, order = build_judge_prompt(template, rows[0]["query"], rows[0]["answer"], rows[0]["prediction"],
                                   rows[0]["few_shots"], random.Random(0))
print(judge_tok.decode(scorer.prompt_ids([{"role": "user", "content": prompt}])))

# %% [markdown]
# ## 4. Parsing `[[n]]`, by hand
#
# A capable judge writes its rating as `[[n]]`. The rule: take the **last** `[[n]]` whose n is within 1–10.
# `judge.parse_rating` reads only `[[n]]`: looser forms (`n/10`) would match the prompt's own labels ("rated 5/10") when a judge echoes them, and a `[[n]]` copied from the prompt is skipped too.

# %%
replies = ["The answer names the right code. [[9]]", "[[3]] at first; on reflection [[7]]", "[[12]]",
           "Rating: 4", "I cannot tell."]
for r in replies:
    found = [float(m) for m in re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", r)]  # every [[n]] ...
    found = [v for v in found if 1 <= v <= 10]  # ... within 1-10
    by_hand = found[-1] if found else None  # the last one wins
    lib = parse_rating(r, strict=True)[0]
    assert by_hand == lib, (r, lib)
    print(f"{r!r:42s} by hand {by_hand}   library (strict) {lib}   library (loose) {parse_rating(r)}")
print("✓ by-hand [[n]] parsing == judge.parse_rating(strict=True)")

# %% [markdown]
# What does the 135M judge write when asked? One short generation shows it:

# %%
reply = generate_reply(judge_model, judge_tok, [{"role": "user", "content": prompt}], max_new_tokens=12)
print(repr(reply), "→ parsed:", parse_rating(reply))

# %% [markdown]
# *What you should see:* usually no `[[n]]` at all. A small judge does not follow the format — so we do not ask
# it to write one.
#
# ## 5. Probability-weighted ratings
#
# Instead of sampling one digit, read the judge's **distribution** over 1..10 at the rating position and report
# its expectation, Σ r·p(r). SmolLM2 writes 10 as two tokens "1" "0", so p(10) = p("1")·p("0" | "1") and
# p(1) = p("1")·(1 − p("0" | "1")). `mass` — the probability that sat on any valid rating — says how much the
# judge itself believed it was giving one. (OpenAI-compatible servers return the same information as
# `logprobs`/`top_logprobs`; `rating_probs.OpenAIRatingScorer` reads it.)

# %%
d = scorer.distribution([{"role": "user", "content": prompt}])
by_hand = sum(r * p for r, p in d["probs"].items())
assert abs(by_hand - d["expected"]) < 1e-9 and abs(sum(d["probs"].values()) - 1) < 1e-9
print(f"mass on 1..10: {d['mass']:.3f}; expectation {d['expected']:.2f} (by hand {by_hand:.2f}); mode {d['mode']}")
fig, axd = plots.figure(figsize=(6, 3))
axd.bar(list(d["probs"]), list(d["probs"].values()), color=plots.CYCLE[0])
axd.axvline(d["expected"], color=plots.CYCLE[3], ls="--", label=f"expectation {d['expected']:.2f}")
axd.set_xticks(range(1, 11))
axd.set_xlabel("rating")
axd.set_ylabel("p (renormalised over 1..10)")
axd.set_title(f"The judge's rating distribution for {rows[0]['idx']}")
axd.legend()
plots.show(fig, out / "rating_distribution.png")

# %% [markdown]
# ## 6. Judge three sets, each score recording its method
#
# * the model's answers of section 2 (exact correctness known);
# * **meta-evaluation**: every rubric-rated example answer of the offline set, judged **leave-one-out** (its own
#   rating is never among the few-shot examples it sees);
# * the LongBench-Chat fixture in `data/longbench_chat_sample` — the real file layout (`test_cases.json`,
#   `few_shots.json`); point `LBC_DIR` at the downloaded LongBench-Chat folder to judge the real human-rated
#   answers the same way.

# %%
t0 = time.time()
judge = lambda items: judge_items(None, items, template, runs=JUDGE_RUNS, scorer=scorer, progress=False)  # noqa: E731
pred_j = judge(rows)
meta_items = meta_eval_items(cases)
for it in meta_items:  # exact correctness of each rated example answer, for the verifiable tasks
    it["exact"] = score_exact(next(c for c in cases if c.idx == it["idx"].split("#")[0]), it["prediction"])
meta_j = judge(meta_items)
lbc_cases = load_longbench_chat(LBC_DIR)
lbc_items = meta_eval_items(lbc_cases)
print(f"{LBC_DIR}: {len(lbc_cases)} questions, {len(lbc_items)} rated answers; first: {lbc_cases[0].query!r}")
lbc_j = judge(lbc_items) if JUDGE_LBC else []
judge_s = time.time() - t0
methods = sorted({r["score_method"] for r in pred_j + meta_j + lbc_j})
print(f"{len(pred_j) + len(meta_j) + len(lbc_j)} answers judged x {JUDGE_RUNS} runs in {judge_s:.1f}s; "
      f"score methods: {methods}; unrated: {sum(r['score'] is None for r in pred_j + meta_j + lbc_j)}")
for it, r in list(zip(meta_items, meta_j))[:6]:
    print(f"{it['idx']:13s} rubric {it['human_score']:>4}  judge {r['score']:.2f}  runs "
          f"{[round(x['rating'], 2) for x in r['runs']]}")

# %% [markdown]
# *What you should see:* every answer rated (`unrated: 0`), method `prob_weighted`, and judge scores squeezed
# around 4 (about 3.8–4.5) whether the rubric says 1 or 10: the 135M judge hedges and barely reads the answer.
#
# ## 7. Correlation is not agreement
#
# Spearman's ρ is Pearson's r computed on **ranks** — it asks whether the judge *orders* answers like the
# reference. A judge that adds 3 to every rating orders them perfectly and agrees with none of them. Chance-
# corrected agreement asks whether the two give the *same* ratings beyond what their rating habits alone would
# produce: quadratic-weighted Cohen's κ, Krippendorff's α, Scott's π on low / mid / high bins; **leniency** is
# the mean of judge − reference.

# %%
ref = np.array([2, 3, 4, 5, 5, 6, 7])
lenient = ref + 3
# average ranks, ties sharing the mean of their positions; Spearman = Pearson correlation of the ranks
rank_len = np.array([np.sum(lenient < v) + (np.sum(lenient == v) + 1) / 2 for v in lenient])
rank_ref = np.array([np.sum(ref < v) + (np.sum(ref == v) + 1) / 2 for v in ref])
rho_by_hand = np.corrcoef(rank_len, rank_ref)[0, 1]
assert abs(rho_by_hand - ag.spearman(lenient, ref)) < 1e-12
toy = ag.reliability_report(lenient, ref, n_boot=200)
print(f"Spearman by hand {rho_by_hand:.3f} = library {ag.spearman(lenient, ref):.3f}; weighted κ "
      f"{toy['weighted_kappa']['value']:.3f}; Krippendorff α {toy['krippendorff_alpha']['value']:.3f}; leniency "
      f"{toy['leniency']['value']:+.1f}")
print("✓ by-hand Spearman == agreement.spearman")

# %% [markdown]
# ### A bootstrap confidence interval, by hand
#
# Resample the items with replacement (the judge and reference score of an item stay together), recompute the
# statistic, repeat; the 2.5 % and 97.5 % quantiles bound a 95 % interval. Few items → wide interval.

# %%
js = np.array([r["score"] for r in meta_j])
hs = np.array([it["human_score"] for it in meta_items], dtype=float)
idx = np.random.default_rng(7).integers(0, len(js), size=(N_BOOT, len(js)))
boot = np.array([ag.spearman(js[i], hs[i]) for i in idx])
boot = boot[~np.isnan(boot)]
lo_hand, hi_hand = np.quantile(boot, [0.025, 0.975])
lib_ci = ag.bootstrap_stat(ag.spearman, js, hs, n_boot=N_BOOT, seed=7)
assert abs(lo_hand - lib_ci["lo"]) < 1e-12 and abs(hi_hand - lib_ci["hi"]) < 1e-12
print(f"Spearman {lib_ci['value']:.3f}, 95% CI by hand {lo_hand:.3f} – {hi_hand:.3f} = library "
      f"{lib_ci['lo']:.3f} – {lib_ci['hi']:.3f} ({len(js)} items)")
print("✓ by-hand bootstrap CI == agreement.bootstrap_stat")

# %% [markdown]
# ## 8. The agreement table: how reliable is this judge?

# %%
pj = [proxy_scores(it["prediction"], it["answer"])["proxy_10"] for it in meta_items]
rep_meta = ag.reliability_report(js, hs, n_boot=N_BOOT)
rep_proxy = ag.reliability_report(pj, hs, n_boot=N_BOOT)
rep_lbc = ag.reliability_report([r["score"] for r in lbc_j], [it["human_score"] for it in lbc_items],
                                n_boot=N_BOOT) if lbc_j else None
ver = [(r["score"], it["exact"]) for r, it in zip(meta_j, meta_items) if it["exact"] is not None]
sep = ag.binary_report([s for s, _ in ver], [e for _, e in ver], n_boot=N_BOOT)
print(f"Offline set, {rep_meta['n']} rubric-rated answers judged leave-one-out by {JUDGE_MODEL}:\n")
print(ag.markdown_table(rep_meta, "judge vs rubric"))
print("\nThe word-overlap proxy on the same answers:\n")
print(ag.markdown_table(rep_proxy, "proxy vs rubric"))
if rep_lbc:
    print(f"\nLongBench-Chat folder {LBC_DIR} ({rep_lbc['n']} answers):\n")
    print(ag.markdown_table(rep_lbc, "judge vs ratings"))
print(f"\nSeparating right from wrong answers ({sep['n']} verifiable, {sep['n_correct']} right):\n")
print(ag.markdown_table({k: sep[k] for k in ("auc", "point_biserial")}, "judge vs exact"))
rho = rep_meta["spearman"]["value"]
print(f"\nHow far from a judge you can trust: Spearman {rho:.2f} (CI {rep_meta['spearman']['lo']:.2f} to "
      f"{rep_meta['spearman']['hi']:.2f}) against the paper's GPT-4 {GPT4_HUMAN['spearman']} — a gap of "
      f"{GPT4_HUMAN['spearman'] - rho:.2f}. Do not read this judge's numbers as measurements.")

# %%
plots.show(ag.agreement_figure(js, hs, rep_meta, title=f"{JUDGE_MODEL} vs rubric (leave-one-out)",
                               xlabel="rubric rating"), out / "agreement.png")

# %% [markdown]
# *What you should see:* wide intervals (a dozen items); for the judge a Spearman near 0 (here slightly
# negative) whose interval includes 0, weighted κ 0 (every rating rounds to 4), a negative leniency (the rubric
# has many 10s, the judge gives none), an AUC whose interval includes 0.5. The overlap proxy does better here
# (Spearman ≈ 0.6) — partly because the rubric's right answers repeat the reference's words. That is the honest
# state of a 135M judge, roughly a full point of Spearman below GPT-4; the table is the tool you would use to
# qualify a real judge (GPT-4o, a 70B model behind vLLM) before trusting its numbers.
#
# ## 9. The proxy's weakness, on its own examples
#
# Token F1 and ROUGE-L count words shared with the reference. A fully right answer that says more than the
# reference is punished:

# %%
weak = sorted(((proxy_scores(it["prediction"], it["answer"])["token_f1"], it) for it in meta_items
               if it["exact"] == 1.0), key=lambda t: t[0])
f1, it = weak[0]
print(f"reference: {it['answer']!r}\nanswer:    {it['prediction']!r}\nexact: 1.0 (right), rubric {it['human_score']}, "
      f"token F1 {f1:.2f}")
assert f1 < 0.5

# %% [markdown]
# ## 10. Is a difference real? Paired comparison and what a CI on 50 items looks like
#
# The same judge, the same items, two runs: answers **with** the document (A) vs **without** it (B). The paired
# test resamples items *and* each item's judge repetitions, so judge noise widens the interval; the permutation
# test flips the sign of each item's difference.

# %%
nodoc_items = [{**r, "prediction": r["no_doc_prediction"]} for r in rows]
nodoc_j = judge(nodoc_items)
cmp = ag.paired_compare({r["idx"]: [x["rating"] for x in r["runs"]] for r in pred_j},
                        {r["idx"]: [x["rating"] for x in r["runs"]] for r in nodoc_j}, n_boot=N_BOOT)
print(f"with − without document: {cmp['mean_diff']:+.2f} (95% CI {cmp['ci'][0]:+.2f} to {cmp['ci'][1]:+.2f}), "
      f"permutation p = {cmp['p_value']:.2f}, n = {cmp['n']}; exact with doc "
      f"{np.mean([r['exact'] for r in rows if r['exact'] is not None]):.2f}, without "
      f"{np.mean([r['no_doc_exact'] for r in rows if r['no_doc_exact'] is not None]):.2f}")

# %% [markdown]
# And the scale of the problem: with the spread of ratings a real judge gives (a standard deviation of about
# 2.5 points, as the paper's per-question scores suggest), how wide is a 95 % CI on the mean of a 50-item
# benchmark?

# %%
rng = np.random.default_rng(0)
widths = []
for n in (10, 25, 50, 100, 200):
    sim = np.clip(rng.normal(6.0, 2.5, n), 1, 10)
    b = sim[rng.integers(0, n, size=(N_BOOT, n))].mean(axis=1)
    widths.append((n, float(np.quantile(b, 0.975) - np.quantile(b, 0.025))))
for n, w in widths:
    print(f"{n:4d} items: 95% CI width ≈ {w:.2f} points")
fig, axw = plots.figure(figsize=(5.5, 3.2))
axw.plot([n for n, _ in widths], [w / 2 for _, w in widths], marker="o", label="half-width of the 95% CI")
axw.axhspan(0.2, 0.45, color=plots.CYCLE[1], alpha=0.2, label="the paper's improvements (0.2–0.45)")
axw.set_xscale("log")
axw.set_xlabel("items in the benchmark")
axw.set_ylabel("rating points")
axw.legend()
plots.show(fig, out / "ci_width.png")

# %% [markdown]
# *What you should see:* at 50 items the half-width is about 0.6 points — larger than the paper's differences.
# Unpaired, they would be noise; a **paired** test over the same items (and several judge runs) is what can
# resolve them. And above, with only 4–5 items, the bootstrap interval and the permutation p can disagree: the
# percentile bootstrap is too narrow for tiny samples, and an exact permutation p cannot go below 2/2ⁿ
# (0.125 for 4 items) — trust neither on so few items.
#
# ## 11. Needle in a haystack (opt-in on CPU)

# %%
needle = None
if RUN_NEEDLE:
    from longalign_lib.generate import make_generate_fn
    from longalign_lib.needle import heatmap, load_haystack, run_grid

    needle = run_grid(make_generate_fn(model, tok, max_new_tokens=24), tok, NEEDLE_LENGTHS, NEEDLE_DEPTHS,
                      haystack=load_haystack(), window=model_window(model, tok), progress=False)
    plots.show(heatmap(needle), out / "needle_heatmap.png")
else:
    print("skipped (SMOKE): set RUN_NEEDLE = True, or run `longalign needle` on a GPU")

# %% [markdown]
# ## Takeaways
# - Ask a small judge for its **rating distribution**, not a sampled digit: every answer gets a score, and the
#   score records the method that produced it (`prob_weighted` or `parsed`).
# - Report a judge's reliability before its numbers: rank correlation **and** chance-corrected agreement
#   (κ_w, α, π) **and** leniency, each with a bootstrap CI; offline, the AUC against exact answers.
# - The 135M judge is far from GPT-4's 0.844; the overlap proxy fails on right answers in other words.
# - A benchmark of 50 items cannot resolve 0.2–0.45-point differences without a paired test; use
#   `longalign judge --compare RUN_A RUN_B`.
# - Controls: note truncation per item, look at scores by length, and check what the model answers without
#   the document.
#
# ## Exercises
# 1. Compute Kendall's τ for `lenient` vs `ref` by counting concordant and discordant pairs (ties count as
#    neither; use τ-a), and compare with `ag.kendall` (τ-b, tie-corrected). Equal when there are no ties?
# 2. A judge that adds +2 to every rating of `meta_j`: which of Spearman, weighted κ, leniency change?
# 3. With a rating standard deviation of 2.5, about how many items give a 95 % CI half-width of 0.2 points?
#    (Normal approximation: n ≈ (1.96 · 2.5 / 0.2)².) Check with the bootstrap.
#
# Solutions (collapsed in JupyterLab; click the dots to open; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
def tau_a(x, y):
    """(concordant − discordant) / all pairs; a tied pair counts as neither."""
    n = len(x)
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)


ta = tau_a(lenient, ref)  # the question's arrays: ref has a tie (two 5s), and so has lenient
assert ta < ag.kendall(lenient, ref) <= 1  # τ-b divides by fewer pairs when there are ties
no_ties = np.array([1, 3, 2, 5, 4]), np.array([1, 2, 3, 4, 5])
assert abs(tau_a(*no_ties) - ag.kendall(*no_ties)) < 1e-12  # no ties: τ-a = τ-b
print(f"1. lenient vs ref (one tied pair): τ-a = {ta:.3f} < τ-b = {ag.kendall(lenient, ref):.3f} (library); "
      f"without ties they agree: τ-a = τ-b = {tau_a(*no_ties):.3f}")

# %% tags=["solution"] jupyter={"source_hidden": true}
shifted = np.minimum(js + 2, 10)
r2 = ag.reliability_report(shifted, hs, n_boot=50)
assert abs(r2["spearman"]["value"] - rep_meta["spearman"]["value"]) < 1e-9  # ranks unchanged (no value reached 10)
assert abs(r2["leniency"]["value"] - rep_meta["leniency"]["value"] - 2) < 1e-9
print(f"2. Spearman {rep_meta['spearman']['value']:.3f} → {r2['spearman']['value']:.3f} (ranks unchanged); "
      f"leniency {rep_meta['leniency']['value']:+.2f} → {r2['leniency']['value']:+.2f} (+2); κ_w "
      f"{rep_meta['weighted_kappa']['value']:.3f} → {r2['weighted_kappa']['value']:.3f} (depends on the values)")

# %% tags=["solution"] jupyter={"source_hidden": true}
n_needed = int(np.ceil((1.96 * 2.5 / 0.2) ** 2))
sim = rng.normal(6.0, 2.5, n_needed)
b = sim[rng.integers(0, n_needed, size=(300, n_needed))].mean(axis=1)
half = (np.quantile(b, 0.975) - np.quantile(b, 0.025)) / 2
assert 0.17 < half < 0.23, half
print(f"3. about {n_needed} items; bootstrap half-width {half:.3f}")

# %%
metrics_file = write_metrics(out, {
    "model": MODEL, "judge_model": JUDGE_MODEL, "smoke": SMOKE, "n_cases": len(rows), "generate_s": round(gen_s, 1),
    "judge_s": round(judge_s, 1), "score_methods": methods,
    "judged": len(pred_j) + len(meta_j) + len(lbc_j), "unrated": sum(r["score"] is None for r in pred_j + meta_j + lbc_j),
    "meta_n": rep_meta["n"], "lbc_items": len(lbc_items), "lbc_judged": len(lbc_j),
    "judge_vs_rubric": {s: rep_meta[s] for s in ag.STATISTICS}, "proxy_vs_rubric": {s: rep_proxy[s] for s in ag.STATISTICS},
    "auc_judge_exact": sep["auc"], "gpt4_spearman": GPT4_HUMAN["spearman"],
    "proxy_weak_f1": f1, "compare_doc_vs_nodoc": cmp, "ci_width_50": dict(widths)[50],
    "needle_cells": len(needle["cells"]) if needle else 0,
    "figures": [str(out / f) for f in ("rating_distribution.png", "agreement.png", "ci_width.png")],
    "seconds": round(time.time() - t_start, 1)})
