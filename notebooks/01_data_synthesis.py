# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 01 · Long-document data synthesis (Self-Instruct)
#
# **What you will learn**
# - how to turn long documents into instruction data with Self-Instruct: a question list, one question picked,
#   an answer written with the document in view;
# - the two small algorithms that decide what is kept — parsing a model's question list, and scoring how well an
#   answer is grounded in its document — written by hand on toy inputs and checked against the library;
# - why each rejected document was rejected, and what the paper's 10k-document scale would cost.
#
# **Time**: ~60 s on 2 CPU cores (SMOKE, the default without a GPU: two short documents through the bundled
# SmolLM2-135M); minutes in full mode; seconds per document with an API model.
#
# LongAlign's first ingredient is **data**: long documents paired with instructions whose answers need the
# whole document. The paper collects 10k documents of 8k–64k tokens from nine sources and asks a strong model
# (Claude 2.1) to write the instruction and the answer — Self-Instruct over long inputs, with four task types
# (general, summary, multi-hop reasoning, information extraction). Its repository ships the data, not the
# generator; this notebook runs ours, step by step:
#
# 1. a **corpus** of long documents from sources present on any machine (Python's own sources and reference
#    topics, installed Debian documentation, public-domain books), cut or merged to a token range, genres even;
# 2. **one document end to end**: the prompt of each task type, the model's raw output, the questions the parser
#    finds in it, the question picked, the answer written with the document in view, the final record;
# 3. a **small batch** through the same code the CLI runs (`longalign synth`), with the filters' counts;
# 4. **short chat data**: ShareGPT import and Magpie-style self-generated questions;
# 5. what the **paper's 10k scale** costs per provider and model, and what each lever (Batch API, prompt
#    caching) saves.
#
# The default model is the offline SmolLM2-135M-Instruct: tiny, so expect clumsy questions and many
# rejections — the *pipeline* is what you learn here. Point `BACKEND`/`MODEL`/`BASE_URL` at a real model
# (an OpenAI-compatible vLLM server, the OpenAI or Anthropic API) to produce usable data.
# Library code: `longalign_lib.corpus`, `longalign_lib.llm`, `longalign_lib.synth`.

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/01_data_synthesis"
PRESET = "cpu-demo"
BACKEND = "local"  # local | openai | anthropic
MODEL = "smollm2-135m-instruct"  # e.g. gpt-4o-mini, claude-3-5-haiku-latest, or the model your vLLM serves
BASE_URL = None  # e.g. "http://localhost:8000/v1" for vLLM / llama.cpp / Ollama
SOURCES = ["stdlib", "pydoc_topics", "debian_docs", "data"]  # every genre at hand (`make demo` keeps to stdlib)
TASK_TYPES = ["general", "summary", "reasoning", "extraction"]  # the four Self-Instruct task types, in turn
N_DOCS = 6
MIN_TOKENS = 1000
MAX_TOKENS = 2000
MAX_NEW_TOKENS = 96
N_SHORT = 2
LOCAL_THREADS = 1  # torch CPU threads for local generation (1 is far faster on a machine shared with other jobs)
SCALE_DOCS = 10_000  # the paper's LongAlign-10k
CACHE_DIR = None  # LLM request cache; None: $LONGALIGN_HOME/llm_cache (a rerun makes no new request)

# %%
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import torch
from IPython.display import Markdown, display

from longalign_lib import plots
from longalign_lib.config import load_config
from longalign_lib.corpus import available_sources, build_corpus, corpus_figure, make_counter
from longalign_lib.io import read_jsonl, write_json, write_metrics
from longalign_lib.llm import make_client
from longalign_lib.models import load_model_and_tokenizer
from longalign_lib.synth import (
    LEVERS,
    TASK_TYPES,
    cost_figure,
    check_answer,
    content_units,
    cost_table,
    dry_run,
    grounding,
    import_sharegpt,
    magpie_prefix,
    magpie_records,
    mean_target_length,
    mix_figure,
    parse_questions,
    preview_record,
    question_messages,
    synth_document,
    synth_long,
    task_for,
)

if SMOKE is None:
    SMOKE = not torch.cuda.is_available()
torch.set_num_threads(1)  # one thread: on a small shared CPU two threads that wait on each other are slower
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
if SMOKE:  # short documents, short answers, two of them: < 90 s on 2 CPU cores
    N_DOCS, MIN_TOKENS, MAX_TOKENS, MAX_NEW_TOKENS, N_SHORT = 2, 250, 500, 40, 1
cfg = load_config(PRESET, [f"corpus.n_docs={N_DOCS}", f"corpus.min_tokens={MIN_TOKENS}",
                           f"corpus.max_tokens={MAX_TOKENS}", f"synth.max_new_tokens={MAX_NEW_TOKENS}",
                           f"synth.backend={BACKEND}", f"synth.model={MODEL}", f"synth.n_short={N_SHORT}",
                           f"corpus.sources=[{','.join(SOURCES)}]", f"synth.task_types=[{','.join(TASK_TYPES)}]"])
if SMOKE:
    cfg.synth.short_question_tokens, cfg.synth.short_max_new_tokens, cfg.synth.min_answer_words = 32, 32, 4

# %% [markdown]
# ## 1. A corpus of long documents
# Each source is optional except the Python standard library (always there). `make corpus-extras` installs
# more Debian documentation; `corpus.dirs` and `corpus.hf_datasets` add your own texts. Documents are cut at
# paragraph boundaries (long texts) or merged (short ones) to a target length drawn from
# `[min_tokens, max_tokens]`, and genres take turns so that none dominates.

# %%
for name, status in available_sources(cfg.corpus).items():
    print(f"{name:14s} {status}")

# %%
model, tok = load_model_and_tokenizer(cfg.model.name, dtype="fp32", device="cpu") if BACKEND == "local" else (None, None)
if tok is None:
    from longalign_lib.models import load_tokenizer

    tok = load_tokenizer(cfg.model.name)
docs, notes = build_corpus(cfg.corpus, make_counter(tok))
for d in docs:
    print(f"{d.id:24s} {d.genre:11s} {d.lang}  {d.n_tokens:6d} tokens  {d.title}")
# the genre mix of N_DOCS (2 in SMOKE) documents would be two bars of height 1: draw it for a corpus of at least
# 24 documents cut by the same rules (cheap: no model call), and synthesize from the first N_DOCS only
preview_cfg = dataclasses.replace(cfg.corpus, n_docs=max(N_DOCS, 24))
preview, _ = build_corpus(preview_cfg, make_counter(tok))
print(f"genre mix of a {len(preview)}-document corpus built the same way:", dict(Counter(d.genre for d in preview)))
assert len(preview) >= 24, "the preview corpus should hold at least 24 documents"
plots.show(corpus_figure(preview), out / "genre_mix.png")

# %% [markdown]
# ## 2. One document, end to end
# The model client is the same one the CLI uses: a persistent request cache (rerunning this notebook costs
# nothing), retries and bounded concurrency for API backends, token and cost accounting.
#
# First, the four task types. Each prompt puts the document first and the instruction last (models follow
# an instruction best when it comes right before they answer):

# %%
client = make_client(BACKEND, MODEL, base_url=BASE_URL, prices=cfg.synth.prices, cache_dir=CACHE_DIR,
                     **({"model_obj": model, "tokenizer": tok, "threads": LOCAL_THREADS, "prefix_cache": True}
                        if BACKEND == "local" else {}))
doc = docs[0]
for t in TASK_TYPES:
    prompt = question_messages(doc.text, t, doc.lang, cfg.synth.n_questions)[0]["content"]
    print(f"--- {t} ({len(prompt):,} characters; the instruction after the document) ---")
    print(prompt[len(doc.text):].strip(), "\n")

# %% [markdown]
# Now the real thing for this document, with the task type the batch would give it. `synth_document` returns
# a trace of every step:

# %%
task = task_for(0, cfg.synth)
trace = synth_document(client, doc, task, cfg.synth)
print(f"task type: {trace.task_type}   language: {trace.lang}\n")
print("raw model output:\n" + trace.raw_questions + "\n")
print("parsed questions:", json.dumps(trace.questions, ensure_ascii=False, indent=1))
print("\nchosen question:", trace.question)
print("\nanswer:", trace.answer)
print("\nfilter verdict:", trace.reason or "kept")
if trace.record:
    print(preview_record(trace.record))

# %% [markdown]
# *What you should see:* a numbered list (or something close), the questions the parser kept, one chosen, an
# answer, and the filter's verdict — `kept`, or the reason for the rejection (see section 3).
#
# Small models rarely follow the "numbered list" instruction cleanly, and even strong ones add preambles,
# bold markers or answers. The parser keeps only question-like items and drops duplicates; here it is on a
# typical messy reply:

# %%
messy = """Sure! Here are some questions:
1) **What does the document say about the kinsman?**
2. Who was Boaz? Answer: a relative of Elimelech.
3. Who was Boaz?
Question 4: Why did Naomi
   ask to be called Mara?
I hope this helps!"""
parse_questions(messy)

# %% [markdown]
# ## 3. The core ideas by hand: parse a question list, score grounding
# **Parsing.** The simplest parser keeps the lines that start with a number and end with a question mark. By hand
# on a clean list, it agrees with the library's `parse_questions` (which also handles the messy cases above):

# %%
clean = "1. Who is Boaz?\n2. Why did Naomi return to Bethlehem?\n3. What did Ruth glean in the fields?"
by_hand = [re.sub(r"^\s*\d+[.)]\s*", "", line).strip() for line in clean.splitlines()
           if re.match(r"^\s*\d+[.)]", line) and line.rstrip().endswith("?")]
print(by_hand)
assert by_hand == parse_questions(clean), "by-hand parse differs from synth.parse_questions"
print("✓ by hand == synth.parse_questions")

# %% [markdown]
# **Grounding.** An answer should say what the document says. The filter counts the answer's *content words*
# (≥ 4 letters, not stop words) that also occur in the document, after folding inflections with the Snowball
# stemmer — so "heavens" matches "heaven" and "God's" matches "God". Answers below `synth.min_grounding` are
# rejected as `off_document`. By hand:

# %%
from nltk.stem.snowball import EnglishStemmer  # noqa: E402

from longalign_lib.synth import STOP  # noqa: E402  (the library's stop words: "the", "were", "which", ...)

stem = EnglishStemmer().stem
toy_doc = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
toy_answers = {"on topic, inflected": "God's heavens and the earth were created; the earth had no forms.",
               "off topic": "Quantum chromodynamics binds quarks inside protons through gluon exchange."}
units = {}  # text → its content units: words of ≥ 4 characters ("'s" dropped), stop words out, stemmed
for name, text in {"document": toy_doc, **toy_answers}.items():
    words = re.findall(r"[a-z][a-z0-9_']{3,}", re.sub(r"['’]s\b", "", text.lower()))
    units[name] = [stem(w) for w in words if w not in STOP]
for label, ans in toy_answers.items():
    u = units[label]
    score = sum(x in set(units["document"]) for x in u) / len(u)
    print(f"{label:20s} units {u} → grounding {score:.2f} (library {grounding(ans, toy_doc):.2f})")
    assert abs(score - grounding(ans, toy_doc)) < 1e-9, "by-hand grounding differs from synth.grounding"
    assert u == content_units(ans)
print("✓ by hand == synth.grounding; threshold synth.min_grounding =", cfg.synth.min_grounding)

# %% [markdown]
# *What you should see:* the on-topic answer scores 1.00 although it writes "God's", "heavens" and "forms" where
# the document has "God", "heaven" and "form"; the off-topic one scores 0.00. (Matching exact words, as the filter
# used to, the on-topic answer scored 0.50 — and real answers from the demo model scored as low as 0.05 and were
# thrown away.)
#
# ## 4. A small batch through the pipeline
# `synth_long` is what `longalign synth` runs: documents in flight concurrently, each record appended to
# `long.jsonl` as soon as it is done (a killed run resumes with `--resume`), rejections with their reason in
# `synth_rejects.jsonl`. Before spending anything on an API, `--dry-run` prints the plan:

# %%
plan = dry_run(client, docs, cfg.synth, done=set())
print({k: plan[k] for k in ("documents", "calls", "input_tokens", "output_tokens", "cost_usd")},
      "| already cached question calls:", plan["questions"]["cached"])

# %%
for f in ("long.jsonl", "synth_rejects.jsonl"):
    (out / f).unlink(missing_ok=True)  # a fresh batch each run (the request cache makes the rerun free)
stats = synth_long(client, docs, cfg.synth, out / "long.jsonl", out / "synth_rejects.jsonl")
records = read_jsonl(out / "long.jsonl") if (out / "long.jsonl").exists() else []  # every document may be rejected
print(json.dumps(stats, indent=1))
print("client:", {k: v for k, v in client.stats.items() if k != "retry_reasons"})
mix_fig = mix_figure(records, stats["rejected"], stats["planned_task_types"])
if len(docs) < 6:  # a handful of documents: the bars are counts of this run, not a distribution
    mix_fig.suptitle(f"{len(docs)} documents (SMOKE): counts of this run, not a distribution — "
                     "full mode or `longalign synth` for a real mix", fontsize=9)
plots.show(mix_fig, out / "task_mix.png")

# %% [markdown]
# The records kept, and **why each rejected document was rejected** (the filters run in this order: no question
# parsed, duplicate question, empty answer, refusal, too short, repetitive, off the document):

# %%
for r in records[:3]:
    m = r["meta"]
    print(f"KEPT [{m['genre']}/{m['task_type']}] grounding {m['grounding']:.2f}\n   Q: {m['question']}\n"
          f"   A: {r['messages'][1]['content'][:300]}\n")
rejects = read_jsonl(out / "synth_rejects.jsonl") if (out / "synth_rejects.jsonl").exists() else []
by_id = {d.id: d for d in docs}
for j in rejects:
    why = j["reason"]
    if why == "off_document":
        why += (f": grounding {grounding(j['answer'], by_id[j['doc_id']].text):.2f} < synth.min_grounding "
                f"{cfg.synth.min_grounding}")
    elif why == "too_short":
        why += f": {len(j.get('answer', '').split())} words < synth.min_answer_words {cfg.synth.min_answer_words}"
    elif why == "no_questions":
        why += ": nothing question-like in the model's reply " + repr(j.get("raw_questions", "")[:120])
    print(f"REJECTED {j['doc_id']} [{j['task_type']}] — {why}\n   Q: {j.get('question')}\n"
          f"   A: {(j.get('answer') or '')[:200]!r}\n")
print(f"{len(records)} kept, {len(rejects)} rejected")

# %% [markdown]
# ## 5. Short chat data
# LongAlign mixes its long data with ShareGPT conversations so the model keeps its short-chat skills.
# `import_sharegpt` converts the ShareGPT layout (`conversations` with `from`/`value`); broken items are
# counted, not trained on:

# %%
sharegpt = [
    {"id": "ok", "conversations": [{"from": "human", "value": "What is a context window?"},
                                   {"from": "gpt", "value": "The number of tokens a model reads at once."}]},
    {"id": "lead-gpt", "conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Hi, 2+2?"},
                                         {"from": "gpt", "value": "4."}]},
    {"id": "no-answer", "conversations": [{"from": "human", "value": "Anyone?"}, {"from": "gpt", "value": ""}]},
]
(out / "sharegpt_sample.json").write_text(json.dumps(sharegpt))
short_imported, counts = import_sharegpt(out / "sharegpt_sample.json")
print(dict(counts))
print(json.dumps([r["messages"] for r in short_imported], indent=1))

# %% [markdown]
# Without a chat dataset, **Magpie** makes one from the aligned model itself: it receives only its chat
# template's user prefix (below) and, continuing it, writes a user's question; then it answers that question.

# %%
print(repr(magpie_prefix(tok)))
mstats = magpie_records(client, tok, N_SHORT, cfg.synth, out / "short_magpie.jsonl", out / "short_rejects.jsonl")
short_magpie = read_jsonl(out / "short_magpie.jsonl") if (out / "short_magpie.jsonl").exists() else []
print(mstats)
for r in short_magpie:
    print("Q:", r["messages"][0]["content"][:200], "\nA:", r["messages"][1]["content"][:200], "\n")

# %% [markdown]
# ## 6. What the paper's scale costs, and what each lever saves
# Two calls per document (questions, then the answer), the document sent both times. Document length follows
# the `paper` preset (8k–64k tokens, long documents upsampled); output tokens are counted at their
# `max_new_tokens` caps, so these are upper bounds. Two levers change the bill without changing a single token
# of the data:
# - **Batch API** (`synth.mode=batch`; OpenAI Batch, Anthropic Message Batches): the same requests at half the
#   price, answered within 24 h. Self-Instruct becomes two batches (all question lists, then all answers);
#   `longalign synth` keeps the batch ids in the run directory and resumes them after an interruption.
# - **Prompt caching** (`synth.prompt_caching`): both prompts put the document first, byte for byte the same, so
#   the answer call reads it from the provider's cache: OpenAI does this by itself for prefixes of 1,024+ tokens
#   (cached input at 10–50 % of the price), Anthropic when the document block carries `cache_control` (a write
#   costs 1.25×, a read 0.1× the input price).
#
# They do not add up here: the two batches are hours apart, longer than a prompt cache lives (5 min – 1 h).
# List prices (USD per 1M tokens: input, output, cache read, cache write) are `synth.prices`, read on
# 2026-11-30 — OpenAI: developers.openai.com/api/docs/pricing (as quoted on 2026-11-06 by APIs.io and in GitHub
# Docs' models-and-pricing table); Anthropic: docs.anthropic.com/en/docs/about-claude/pricing (Haiku/Sonnet
# 4.5 as listed on 2026-03-21 by deploybase.ai). Check the providers' pages before you spend;
# docs/howto.md lists the sources.

# %%
paper = load_config("paper")
mean_doc = mean_target_length(paper.corpus.min_tokens, paper.corpus.max_tokens, paper.corpus.upsample_long)
rows = cost_table(cfg.synth.prices, SCALE_DOCS, mean_doc, question_tokens=200, answer_tokens=paper.synth.max_new_tokens,
                  batch_discount=cfg.synth.batch_discount)
write_json(out / "cost_table.json", rows)
cost = {(r["model"], r["mode"], r["caching"]): r for r in rows}
models = list(dict.fromkeys(r["model"] for r in rows))
display(Markdown(
    f"Mean document length: **{mean_doc:,.0f} tokens**; {SCALE_DOCS:,} records, {2 * SCALE_DOCS:,} calls.\n\n"
    "| model | USD / 1M in · out · cache read · write | interactive | + prompt caching | batch | batch + caching |\n"
    "|---|---|---:|---:|---:|---:|\n"
    + "\n".join(f"| {m} | {' · '.join(f'{x:g}' for x in cost[(m, 'interactive', False)]['usd_per_1M'])} | "
                + " | ".join(f"{cost[(m, mode, c)]['cost_usd']:,.2f}"
                             + (f" (−{cost[(m, mode, c)]['saving']:.0%})" if cost[(m, mode, c)]['saving'] else "")
                             for mode, c in LEVERS) + " |" for m in models)))
plots.show(cost_figure(rows, SCALE_DOCS), out / "cost_10k.png")

# %% [markdown]
# The check below recomputes one cell of the table by hand: the answer call's copy of the document moves from
# the input price to the cache-read price, the question call's copy from the input price to the cache-write
# price (OpenAI bills no write, so its write price is the input price).

# %%
m = models[0]
p_in, p_out, p_read, p_write = cost[(m, "interactive", False)]["usd_per_1M"]
doc_usd = SCALE_DOCS * mean_doc / 1e6
by_hand = cost[(m, "interactive", False)]["cost_usd"] - doc_usd * (p_in - p_read) - doc_usd * (p_in - p_write)
assert abs(by_hand - cost[(m, "interactive", True)]["cost_usd"]) < 0.02, (by_hand, cost[(m, "interactive", True)])
assert abs(cost[(m, "batch", False)]["cost_usd"] - cost[(m, "interactive", False)]["cost_usd"] / 2) < 0.02
print(f"{m}: caching saves ${cost[(m, 'interactive', False)]['cost_usd'] - by_hand:,.2f}, batch saves "
      f"${cost[(m, 'interactive', False)]['cost_usd'] - cost[(m, 'batch', False)]['cost_usd']:,.2f} per {SCALE_DOCS:,} records")

# %% [markdown]
# ## Takeaways
# - Self-Instruct over long documents is two calls per document: a question list (one question picked) and an
#   answer written with the whole document in view; the record trains on document + question → answer.
# - Cheap filters decide what is kept: parse robustly, then reject empty, refusing, short, repetitive and
#   ungrounded answers — and keep the reason for every rejection.
# - Grounding must survive inflection (stems, not exact words), or good answers are thrown away.
# - A tiny local model shows the pipeline; real data needs a real model (`BACKEND`, `MODEL`).
#
# ## Exercises
# 1. Write a question list in the style "Q1: …? / Q2: …?" and check that `parse_questions` finds both questions.
# 2. Using `grounding`, find the smallest number of made-up words you must add to the on-topic toy answer to push
#    it below `synth.min_grounding`.
#
# Solutions (collapsed in JupyterLab; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
qs = parse_questions("Q1: Who gleaned in the field of Boaz?\nQ2: Where did Naomi's family go during the famine?")
assert qs == ["Who gleaned in the field of Boaz?", "Where did Naomi's family go during the famine?"], qs
print("1.", qs)

# %% tags=["solution"] jupyter={"source_hidden": true}
base_answer = toy_answers["on topic, inflected"]
extra = 0
while grounding(base_answer + " " + " ".join(f"zorblax{i}" for i in range(extra)), toy_doc) >= cfg.synth.min_grounding:
    extra += 1
assert extra > 0 and check_answer(base_answer + " " + " ".join(f"zorblax{i}" for i in range(extra)), toy_doc,
                                  cfg.synth) == "off_document"
print(f"2. {extra} made-up words push it below {cfg.synth.min_grounding} (the answer has {len(content_units(base_answer))} content units)")

# %%
genres = Counter(d.genre for d in docs)
metrics_file = write_metrics(out, {
    "backend": BACKEND, "model": MODEL, "n_docs": len(docs), "n_genres": len(genres),
    "doc_tokens": [d.n_tokens for d in docs], "walk_task": trace.task_type,
    "walk_raw_chars": len(trace.raw_questions), "walk_questions": len(trace.questions),
    "walk_reason": trace.reason or "kept", "long_kept": len(records), "long_rejected": stats["rejected"],
    "task_types": stats["task_types"], "sharegpt_kept": counts.get("kept", 0), "magpie_kept": len(short_magpie),
    "requests": client.stats["requests"], "cache_hits": client.stats["cache_hits"],
    "mean_doc_tokens_paper": round(mean_doc),
    "cost_10k": {m: cost[(m, "interactive", False)]["cost_usd"] for m in models},
    "cost_10k_levers": {f"{m}|{mode}|{'cache' if c else 'nocache'}": cost[(m, mode, c)]["cost_usd"]
                        for m in models for mode, c in LEVERS},
    "rejected_reasons": [j["reason"] for j in rejects], "smoke": SMOKE,
    "genre_png": str(out / "genre_mix.png"), "task_png": str(out / "task_mix.png"), "cost_png": str(out / "cost_10k.png"),
})
