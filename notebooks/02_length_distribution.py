# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 02 · The tokenized training set and its length distribution
#
# LongAlign trains on a mix of **long** instruction data (Self-Instruct tasks over 8k–64k-token documents) and
# **short** chat data (ShareGPT). Before batching anything, look at what that mix is made of:
#
# 1. turn the stage-1 records (`long.jsonl`, `short.jsonl`, `{"messages": [...]}`) into a tokenized `datasets`
#    Dataset: `input_ids`, `labels` (-100 outside the assistant turns), `length`, `n_target`, `source`. Nothing
#    is padded: LongAlign's released code stores every record padded to 65,536 int64 tokens; here a 300-token chat
#    takes 300 tokens on disk;
# 2. measure the length distribution per source, the share of sequences / tokens / attention work per length
#    bucket, and the target (trained-on) tokens per sequence;
# 3. see what the long tail means for batching and for the loss — the two problems stage 3 and stage 4 solve.
#
# **What you will learn**
# - how chat records become a tokenized, unpadded `datasets` Dataset (and that it round-trips exactly);
# - how to weigh a length distribution three ways — share of sequences, of tokens (Σ L, the linear layers' work)
#   and of attention work (Σ L²) — computed by hand on a toy list and checked against the library;
# - why the long tail decides batching efficiency (stage 3) and how much each record counts in the loss (stage 4).
#
# **Time**: ~25 s on 2 CPU cores (SMOKE, the default without a GPU); under a minute in full mode.
#
# Library code: `longalign_lib.dataset` (tokenize, mix, cache) and `longalign_lib.lengths` (statistics, figures).
# The same analysis runs as `longalign tokenize` + `longalign analyze` and writes `lengths.json` and the figures.

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/02_length_distribution"
MODEL = "smollm2-135m-instruct"  # its tokenizer and chat template are used
STAGE1_DIR = "../runs/notebooks/01_data_synthesis"  # notebook 01's output folder (else the bundled sample)
MAX_LENGTH = 2048  # the cpu-demo window; length buckets scale with it
LONG_RATIO = None  # e.g. 0.5 for a 50/50 mix of long and short records; None keeps all
NUM_PROC = 2
N_SYNTH = 20_000  # sequences of the SYNTHETIC paper-scale illustration in section 4 (half long, half short)
SYNTH_MAX_LENGTH = 65_536
BATCH_SIZE = 8  # for the naive-padding illustration
# (parameters, layers, hidden size) of two models, for the attention share of compute
MODEL_SHAPES = {"SmolLM2-135M": (135e6, 30, 576), "Llama-2-7B": (6.7e9, 32, 4096)}

# %%
from pathlib import Path

import numpy as np

from longalign_lib import inputs as I
from longalign_lib import lengths as L
from longalign_lib.config import load_config
from longalign_lib.dataset import build_dataset, find_record
from longalign_lib.formatting import IGNORE, clean_messages
from longalign_lib.io import write_metrics
from longalign_lib.models import load_tokenizer

if SMOKE is None:
    import torch

    SMOKE = not torch.cuda.is_available()
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
if SMOKE:
    N_SYNTH, NUM_PROC = 4_000, 1

# %% [markdown]
# ## 1. Tokenize the stage-1 records
# `build_dataset` validates each record (roles alternate, answers non-empty), renders it with the model's own chat
# template, tokenizes in `NUM_PROC` worker processes, and counts rejected and truncated records by reason. The
# result is cached next to the dataset: a second call with the same inputs, tokenizer and settings loads it.

# %%
stage1 = Path(STAGE1_DIR)
sets = [f"model.name={MODEL}", f"data.max_length={MAX_LENGTH}", f"data.num_proc={NUM_PROC}"]
if LONG_RATIO is not None:
    sets.append(f"data.long_ratio={LONG_RATIO}")
if not (stage1 / "short.jsonl").exists() and (stage1 / "short_magpie.jsonl").exists():
    sets.append(f"data.short_file={stage1 / 'short_magpie.jsonl'}")  # notebook 01 writes its short chats here
cfg = load_config("cpu-demo", sets)
# the same resolver `longalign tokenize` uses: long.jsonl / short.jsonl of a run folder, else the bundled sample
inputs, where = I.stage1_records(cfg, out if SMOKE else stage1)
print(where)

tok = load_tokenizer(MODEL)
ds, summary = build_dataset(inputs, tok, cfg.data, out / "tokenized", num_proc=NUM_PROC)
print(ds)
print({k: summary[k] for k in ("total", "kept", "rejected", "truncated", "tokens", "target_tokens", "cached")})

# %% [markdown]
# **Round trip.** Decoding a row's `input_ids` gives back exactly the chat-templated conversation, and its target
# tokens decode to the assistant turns (each with the template's end-of-turn token). The shortest record is checked
# here; `tests/test_dataset.py` checks every record of the sample.

# %%
row = ds[int(np.argmin(ds.with_format("numpy")["length"]))]
record = find_record(inputs, row["source"], row["origin"])  # origin: "file:line" of the input record
messages, _ = clean_messages(record)
round_trip = tok.decode(row["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
print("decode(input_ids) == chat template text:", round_trip)
print(repr(tok.decode([t for t, y in zip(row["input_ids"], row["labels"], strict=True) if y != IGNORE])))

# %% [markdown]
# ## 2. The core idea on a toy list: three ways to weigh a length distribution
# Count each bucket's **sequences**, its **tokens** (Σ L: what the linear layers process) and its **attention
# work** (Σ L²: causal attention compares every token with the ones before it). Five lengths, buckets up to
# 512 / 1024 / 2048 / 4096 / above:

# %%
toy_lengths, toy_edges = [100, 300, 600, 1500, 4000], [512, 1024, 2048, 4096]
bounds = [0, *toy_edges, float("inf")]
by_hand = []
for lo, hi in zip(bounds, bounds[1:]):
    inside = [n for n in toy_lengths if lo < n <= hi]
    by_hand.append((len(inside) / len(toy_lengths), sum(inside) / sum(toy_lengths),
                    sum(n * n for n in inside) / sum(n * n for n in toy_lengths)))
    print(f"({lo:>5}, {hi:>5}]: {100 * by_hand[-1][0]:3.0f}% of sequences  {100 * by_hand[-1][1]:5.1f}% of tokens  "
          f"{100 * by_hand[-1][2]:5.1f}% of attention work")
lib_rows = L.bucket_table(toy_lengths, toy_edges)
assert all(abs(a - r[k]) < 1e-6 for (sq, tk, at), r in zip(by_hand, lib_rows, strict=True)
           for a, k in ((sq, "seq_share"), (tk, "token_share"), (at, "attention_share")))
print("✓ by hand == lengths.bucket_table")

# %% [markdown]
# *What you should see:* the 4000-token sequence is 20 % of the sequences, 62 % of the tokens and 85 % of the
# attention work. That is the whole story of long-context training data in one line.
#
# ## 3. The length distribution of this set
# `lengths.analyze` takes plain length lists per source. Buckets follow the paper's 0–8k / 8–16k / 16–32k / 32–64k
# / >64k, scaled to the maximum length (here 2048 → 0–256 / … / >2k).

# %%
lens, tgts = L.dataset_columns(ds)  # {source: lengths}, {source: target tokens}
real = L.analyze(lens, tgts, max_length=MAX_LENGTH)
for s, e in real["sources"].items():
    st, tg = e["lengths"], e["targets"]
    print(f"{s:>6}: n={st['count']:4d}  mean={st['mean']:8.1f}  p50={st['p50']:7.0f}  max={st['max']:6d}  "
          f"target share={100 * tg['target_share']:.1f}%")
print("compute share by source:", real["compute_share"])
real_figs = L.save_figures(lens, tgts, MAX_LENGTH, out, prefix="real", note=f" — {ds.num_rows} records")

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(str(real_figs["histogram"])), Image(str(real_figs["targets"])))

# %% [markdown]
# With a handful of records the shape is hard to read: the long records sit at the truncation limit and the
# short chats are a few hundred tokens. The picture that matters appears at the paper's scale.
#
# ## 4. At paper scale (SYNTHETIC lengths, for illustration)
# `lengths.synthetic_longalign_sharegpt_mix` draws lengths shaped like LongAlign's training mix — LongAlign-10k
# long records log-normal around 16k (4k–64k), ShareGPT short chats around 650 tokens. It is the cookbook's one
# synthetic mix: notebook 03, `longalign pack` and the planning benchmark use it too. **These numbers are
# synthetic**, not measured; run the same cells on your own stage-1 output to see its real shape.

# %%
syn = L.synthetic_longalign_sharegpt_mix(N_SYNTH, long_share=0.5, max_length=SYNTH_MAX_LENGTH, seed=0)
syn_lens, syn_tgts = syn.by_source()  # {"long": lengths, "short": lengths}, and their target tokens
paper = L.analyze(syn_lens, syn_tgts, max_length=SYNTH_MAX_LENGTH)
syn_figs = L.save_figures(syn_lens, syn_tgts, SYNTH_MAX_LENGTH, out, prefix="synthetic", note=" — SYNTHETIC")
display(Image(str(syn_figs["histogram"])))

# %% [markdown]
# The histogram has the shape of the paper's Figure 3 (left): two humps a decade and a half apart on the log axis.
# Now weigh each sequence by what it costs. Every token passes the linear layers once (work ∝ Σ L), but causal
# attention compares every token with all earlier ones (work ∝ Σ L²):

# %%
for r in paper["all"]["buckets"]:
    print(f"SYNTHETIC {r['bucket']:>8}: {100 * r['seq_share']:5.1f}% of sequences  {100 * r['token_share']:5.1f}% of tokens  "
          f"{100 * r['attention_share']:5.1f}% of attention work")
cs = paper["compute_share"]
print(f"SYNTHETIC long records: {100 * cs['long']['sequences']:.0f}% of sequences, {100 * cs['long']['linear']:.0f}% of tokens, "
      f"{100 * cs['long']['attention']:.1f}% of attention work")
all_syn = np.concatenate(list(syn_lens.values()))
attn_share = {name: L.attention_flops_share(all_syn, *shape) for name, shape in MODEL_SHAPES.items()}
print("SYNTHETIC mix, share of forward FLOPs in attention:", {k: f"{100 * v:.0f}%" for k, v in attn_share.items()})
display(Image(str(syn_figs["bucket_share"])), Image(str(syn_figs["cdf"])))

# %% [markdown]
# **What it means for batching.** Draw `BATCH_SIZE` records at random and pad them to the longest: with this
# spread of lengths most of the batch is padding, because almost every random batch holds a long record. Sorting
# by length or packing several sequences into one row (stage 3, `notebooks/03_packing_vs_sorted_batching.py`)
# removes the padding; and because the long tail dominates step time, how the long records are spread over GPUs
# and steps decides the idle time of data-parallel workers.

# %%
fill = L.random_batch_fill(all_syn, BATCH_SIZE, seed=0)
fill_real = L.random_batch_fill(np.concatenate(list(lens.values())), min(BATCH_SIZE, ds.num_rows), seed=0)
print(f"SYNTHETIC mix, random batches of {BATCH_SIZE} padded to the longest: {100 * fill:.0f}% real tokens "
      f"({100 * (1 - fill):.0f}% padding); on this notebook's real set: {100 * fill_real:.0f}%")

# %% [markdown]
# **What it means for the loss.** A long record trains on a few hundred answer tokens out of tens of thousands of
# tokens; a short chat trains on most of its few hundred. Under a plain token mean (every target token weighs the
# same) a record counts in proportion to its number of target tokens N_i, so whichever side has the longer
# *answers* dominates the gradient — the cell below computes which one it is on this mix. Packing adds a second
# bias (a pack-mean loss favours sequences whose pack holds few target tokens: notebook 03); the paper's loss
# weighting (stage 4) gives every sequence the same weight 1/M instead.

# %%
display(Image(str(syn_figs["targets"])))
med = {s: paper["sources"][s]["targets"]["p50"] for s in ("long", "short")}
for s in ("long", "short"):
    t = paper["sources"][s]["targets"]
    print(f"SYNTHETIC {s:>5}: median {t['p50']:.0f} target tokens per record, {100 * t['target_share']:.1f}% of its tokens")
tot = {s: float(np.sum(syn_tgts[s])) for s in ("long", "short")}
long_share_token_mean = tot["long"] / (tot["long"] + tot["short"])
long_share_sequence = len(syn_tgts["long"]) / (len(syn_tgts["long"]) + len(syn_tgts["short"]))
heavier = "long records" if long_share_token_mean > long_share_sequence else "short chats"
grad_share = long_share_token_mean if heavier == "long records" else 1 - long_share_token_mean
rec_share = long_share_sequence if heavier == "long records" else 1 - long_share_sequence
verdict = "dominate" if grad_share > 0.75 else "lean: a little more than their share of the records, no domination"
print(f"token mean: a median long record counts {med['long'] / med['short']:.1f}× a median short chat; long records "
      f"get {100 * long_share_token_mean:.0f}% of the gradient ({100 * long_share_sequence:.0f}% of the records) "
      f"→ {heavier} {100 * grad_share:.0f}% of the gradient for {100 * rec_share:.0f}% of the records: {verdict}."
      f"\nsequence weighting (1/M each): long records get {100 * long_share_sequence:.0f}%.")
assert heavier == "short chats" and not verdict.startswith("dominate"), "the text below describes a mild lean"

# %% [markdown]
# *What you should see:* the medians are close (≈ 320 target tokens per long record, ≈ 370 per short chat), so a
# token mean gives the short chats a little more than their share of the records (≈ 59 % of the gradient for 50 %
# of the records) — a mild lean, not domination. The larger distortion in packed training is the pack-mean one
# (notebook 03: a sequence alone in its pack took half of a step); the sequence weighting removes both. On a real
# mix the lean goes whichever way the answer lengths go — check it on your data before choosing a reduction.
#
# ## Takeaways
# - Store sequences unpadded: lengths vary by two orders of magnitude.
# - Count three ways: a few long sequences are a small share of the data but most of the tokens and almost all of
#   the attention work.
# - Random batches of such a mix are mostly padding (stage 3), and a token-mean loss weighs records by their
#   answer lengths, not equally (stage 4).
#
# ## Exercises
# 1. With `toy_lengths`, what share of the attention work does the single longest sequence take if you double its
#    length to 8000? Use `L.bucket_table` with edges `[512, 1024, 2048, 8192]`.
# 2. On the SYNTHETIC mix, what share of all records is longer than 8k tokens, and what share of the attention work
#    do they carry? (`L.bucket_table(all_syn, [8192, 16384, 32768, 65536])`)
#
# Solutions (collapsed in JupyterLab; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
t2 = L.bucket_table([100, 300, 600, 1500, 8000], [512, 1024, 2048, 8192])
share = t2[3]["attention_share"]
assert abs(share - 8000 ** 2 / sum(n * n for n in [100, 300, 600, 1500, 8000])) < 1e-6 and share > 0.95
print(f"1. {100 * share:.1f}% of the attention work")

# %% tags=["solution"] jupyter={"source_hidden": true}
t3 = L.bucket_table(all_syn, [8192, 16384, 32768, 65536])
over8k_seq, over8k_attn = 1 - t3[0]["seq_share"], 1 - t3[0]["attention_share"]
assert abs(over8k_seq - float(np.mean(all_syn > 8192))) < 1e-6 and over8k_attn > over8k_seq
print(f"2. {100 * over8k_seq:.0f}% of the records, {100 * over8k_attn:.1f}% of the attention work")

# %%
metrics_file = write_metrics(out, {
    "records": summary["kept"], "rejected": sum(summary["rejected"].values()), "tokens": summary["tokens"],
    "round_trip": bool(round_trip), "real_long_share_of_tokens": real["compute_share"].get("long", {}).get("linear"),
    "synthetic_long_attention_share": cs["long"]["attention"], "synthetic_long_seq_share": cs["long"]["sequences"],
    "synthetic_random_batch_fill": fill, "attention_flops_share": attn_share, "smoke": SMOKE,
    "synthetic_median_targets": med, "synthetic_long_share_token_mean": long_share_token_mean,
    "figures": {**{f"real_{k}": str(v) for k, v in real_figs.items()},
                **{f"synthetic_{k}": str(v) for k, v in syn_figs.items()}},
})
