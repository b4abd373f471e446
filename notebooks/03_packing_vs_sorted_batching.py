# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 03 · Naive, sorted and packed batching — and the loss-weighting bias of packing
#
# A long-context SFT set mixes sequences of 200 and of 60,000 tokens. How they are grouped into batches decides
# two things: **how much of the hardware does useful work**, and **how much each sequence counts in the loss**.
#
# 1. *Naive batching* shuffles and pads each batch to its longest sequence. With data parallelism, every step
#    waits for the device that drew the longest sequence (the paper's Figure 3): the others sit idle.
# 2. *Sorted batching* (LongAlign) sorts by length, cuts consecutive groups and shuffles the groups: little
#    padding and little waiting, but a step holds only long or only short sequences — a biased gradient.
# 3. *Packing* concatenates sequences into rows of at most `max_pack_tokens` tokens; attention is kept inside
#    each sequence (`position_ids` restart at 0, `cu_seq_lens` bounds). LongAlign packs with next-fit in shuffled
#    order; global best-fit-decreasing (BFD) fills rows much better.
#
# Packing changes the loss: averaging tokens inside a pack, then over packs (the paper's L′, Eq. 3), gives a
# sequence more weight when its pack holds few target tokens. LongAlign's *loss weighting* fixes that; here it
# is exact for the whole optimizer step (all accumulation micro-batches and all ranks): each sequence's mean loss
# counts 1/M (Eq. 2).
#
# **What you will learn**
# - next-fit vs best-fit-decreasing packing, written in a few lines and checked against the library;
# - why a pack-mean loss (Eq. 3) weighs sequences unequally, and how scaling each sequence by K/(N_i·M) turns
#   every target token's weight into 1/(M·N_i) (Eq. 2) — on the paper's worked example;
# - what naive, sorted and packed batching do to padding, device idle time and step composition at scale — and
#   why BFD's full rows bring back sorted batching's step bias, and what mixing costs in fill.
#
# **Time**: ~30 s on 2 CPU cores in SMOKE (the default without a GPU); section 6 (real step times and a fitted
# cost model) is opt-in on a CPU (`MEASURE = True`, a few minutes) and on by default on a GPU.
#
# Library code: `longalign_lib.batching` (planners, weights, collators), `longalign_lib.simulate` (cost model,
# K-device simulation, timing). `longalign pack` writes the same plans, `batching.json` and figures.

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/03_packing_vs_sorted_batching"
MODEL = "smollm2-135m-instruct"
STAGE2_DIR = "../runs/notebooks/02_length_distribution/tokenized"  # notebook 02's dataset (else: the sample)
MAX_PACK_TOKENS = 2048  # row budget for the plans on the real data
BATCH_SIZE = 2  # sequences per micro-batch for naive / sorted
GRAD_ACCUM = 2
WORLD_SIZE = 2  # data-parallel ranks of the real-data plans
SIM_DEVICES = 8  # K devices in the simulation
SYNTH_N = 2000  # sequences of the SYNTHETIC LongAlign-10k + ShareGPT mix (as in notebook 02) at scale
SYNTH_MAX_LEN = 65_536
TIMED_STEPS = 3  # optimizer steps timed for real per plan
TIMING_MAX_TOKENS = 1024  # row budget while timing on this device
SEED = 0
MEASURE = None  # section 6, real step times + a fitted cost model; None: only on a GPU (minutes on a CPU)

# %%
import dataclasses
from pathlib import Path

import numpy as np
import torch

from longalign_lib import plots
from longalign_lib import simulate as sim
from longalign_lib.batching import (
    best_fit_decreasing,
    collate,
    effective_sequence_weights,
    fill_histogram_figure,
    loss_weight_figure,
    next_fit,
    plan_epoch,
    step_shares,
    step_token_weights,
)
from longalign_lib import inputs as I
from longalign_lib.config import BatchConfig, load_config
from longalign_lib.dataset import is_tokenized
from longalign_lib.io import LongAlignError, write_metrics
from longalign_lib.lengths import synthetic_longalign_sharegpt_mix
from longalign_lib.models import load_model_and_tokenizer, load_tokenizer

if SMOKE is None:
    SMOKE = not torch.cuda.is_available()
if MEASURE is None:
    MEASURE = torch.cuda.is_available()
torch.set_num_threads(1)  # one thread: on a small shared CPU two threads that wait on each other are slower
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
TIMING_ACCUM = GRAD_ACCUM
if SMOKE:  # one micro-batch of at most 64 tokens per plan: SmolLM2 on 2 CPU cores is slow
    SYNTH_N, TIMED_STEPS, TIMING_MAX_TOKENS, TIMING_ACCUM = 1000, 1, 64, 1
_ = torch.manual_seed(SEED)

# %% [markdown]
# ## 1. The stage-2 data
# The tokenized set from notebook 02 (`input_ids`, `labels`, `length`, `n_target`), or the bundled
# LongAlign-10k sample tokenized the same way when notebook 02 has not run.

# %%
tok = load_tokenizer(MODEL)
# the resolver `longalign pack` and `longalign train` use: a given dataset, else the stage-1 records (here: the
# bundled sample) tokenized into <OUT_DIR>/tokenized
cfg = load_config("cpu-demo", [f"model.name={MODEL}", f"data.max_length={MAX_PACK_TOKENS}"])
ds, data_note = I.training_set(cfg, out, STAGE2_DIR if not SMOKE and is_tokenized(STAGE2_DIR) else None, tok)
lengths, n_target = np.asarray(ds["length"]), np.asarray(ds["n_target"])
labels = ds["labels"]
print(f"{data_note}: {len(ds)} sequences, lengths {sorted(lengths.tolist())}, target tokens {n_target.tolist()}")

# %% [markdown]
# ## 2. The core idea: packing, by hand
# Packing is bin packing: put sequences (items of `length` tokens) into rows (bins of `capacity` tokens) so that
# few rows are needed. **Next-fit** (what LongAlign does, in shuffled order) keeps one row open and starts a new
# one whenever the next sequence does not fit. **Best-fit-decreasing** (BFD) takes sequences longest first and puts
# each into the open row with the *least* room that still fits it. Both in a few lines, on a toy input:

# %%
toy, cap = [6, 3, 7, 4, 7, 6, 3, 4], 10
nf, room = [], 0  # next-fit: one open row; a sequence that does not fit opens the next row
for i, n in enumerate(toy):
    if not nf or n > room:
        nf.append([])
        room = cap
    nf[-1].append(i)
    room -= n
bfd, rooms = [], []  # best-fit-decreasing: longest first, into the open row with the least room that still fits
for i in sorted(range(len(toy)), key=lambda i: -toy[i]):
    fits = [r for r in range(len(bfd)) if rooms[r] >= toy[i]]
    if not fits:
        bfd.append([])
        rooms.append(cap)
    r = min(fits, key=lambda r: rooms[r]) if fits else len(bfd) - 1  # the tightest fit
    bfd[r].append(i)
    rooms[r] -= toy[i]
for name, rows in (("next-fit", nf), ("BFD", bfd)):
    print(f"{name:9s} {len(rows)} rows: {[[toy[i] for i in r] for r in rows]}  fill {sum(toy) / (len(rows) * cap):.0%}")
assert nf == next_fit(np.array(toy), cap), "next-fit by hand differs from batching.next_fit"
lib_bfd = best_fit_decreasing(np.array(toy), cap)  # compare row contents: ties may swap equal items
assert sorted(sorted(toy[i] for i in r) for r in bfd) == sorted(sorted(toy[i] for i in r) for r in lib_bfd), \
    "BFD by hand differs from the library"
print("✓ both equal the library (batching.next_fit, batching.best_fit_decreasing)")

# %% [markdown]
# *What you should see:* next-fit needs 6 rows (67 % full), BFD 4 — every row exactly full, the minimum for 40
# tokens in rows of 10. The library's BFD gives the same rows in O(n log n) — no scan over open rows — so it packs a million
# sequences in seconds.
#
# ## 3. Three plans for the same data
# `plan_epoch` is deterministic in (seed, epoch) and is re-run every epoch. A plan lists, per optimizer step,
# the micro-batches of every data-parallel rank (`step.ranks[rank][micro_step]`); a micro-batch lists rows of
# sequence indices (one per row when padded, several when packed).

# %%
base = BatchConfig(max_pack_tokens=MAX_PACK_TOKENS, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM,
                   world_size=WORLD_SIZE, seed=SEED)
cfgs = {"naive": dataclasses.replace(base, strategy="naive"),
        "sorted": dataclasses.replace(base, strategy="sorted"),
        "packed": dataclasses.replace(base, strategy="packed", packer="bfd", batch_size=1)}
plans = {k: plan_epoch(lengths, n_target, c, epoch=0, labels=labels) for k, c in cfgs.items()}
for k, p in plans.items():
    c = p.counters
    print(f"{k:7s} steps {c['steps']}, micro-batches {c['micro_batches']}, rows {c['rows']}, "
          f"fill {c['fill_rate']:.1%}, padding {c['padding_fraction']:.1%}, seq/row {c['seqs_per_row']:.2f}")
    for s in p.steps[:2]:
        print("   step", s.index, [[mb.packs for mb in rank] for rank in s.ranks])

# %% [markdown]
# A packed micro-batch is one row: `position_ids` restart at 0 for every sequence, `cu_seq_lens` marks the
# boundaries (for varlen attention kernels), and the first label of every sequence is -100 so nothing is predicted
# across a boundary. `loss_weights` carries each target token's weight.

# %%
pk = plans["packed"]
step0 = pk.steps[0]
w_seq = step_token_weights(step0, pk.n_target, "sequence")
mb0 = max(step0.micro_batches(), key=lambda m: m.n_sequences)
batch = collate(pk, mb0, ds, w_seq)
print({k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v for k, v in batch.items()})
print("cu_seq_lens", batch["cu_seq_lens"].tolist())
print("restarts of position_ids at", (batch["position_ids"][0] == 0).nonzero().flatten().tolist())

# %% [markdown]
# ## 4. The weighting bias, on this data
# For one optimizer step, each reduction gives every sequence a share of the step loss (its per-token weight
# times its target tokens; shares sum to 1). `sequence` gives each of the M sequences 1/M whatever its length or
# its pack-mates; `token` favours long answers; `pack_mean` favours sequences whose pack holds few target tokens.

# %%
wstep = max(pk.steps, key=lambda s: s.n_sequences)
shares = {r: effective_sequence_weights(wstep, r, pk.n_target) for r in ("token", "pack_mean", "sequence")}
for i in wstep.item_ids:
    print(f"seq {i}: N={pk.n_target[i]:4d}  " + "  ".join(f"{r} {shares[r][i]:.3f}" for r in shares))
plots.show(loss_weight_figure(wstep, pk.n_target, title=f"Share of the step loss per sequence — {len(ds)} sequences of the stage-2 data"),
           out / "loss_weights.png")

# %% [markdown]
# **The worked example, by hand.** Four sequences of 8 tokens, rows of 24 tokens, 2 micro-batches: one row holds
# three sequences, the other one. The paper's packed loss (Eq. 3) takes the mean over the target tokens of each
# pack, then the mean over the K packs: a token of sequence i weighs 1/(K·T_k), T_k = target tokens of its pack.
# LongAlign's fix replaces the mean inside a pack by a **sum** of token losses scaled by K/(N_i·M) (M sequences in
# the step, N_i target tokens of sequence i); the outer mean over K packs then leaves every target token the
# weight 1/K · K/(N_i·M) = 1/(M·N_i) — Eq. 2, where every sequence's mean loss counts 1/M.

# %%
demo = plan_epoch([8, 8, 8, 8], None, BatchConfig(strategy="packed", max_pack_tokens=24, grad_accum=2))
packs = [p for mb in demo.steps[0].micro_batches() for p in mb.packs]
N = {i: int(demo.n_target[i]) for p in packs for i in p}  # target tokens per sequence
K, M = len(packs), len(N)
T = {i: sum(N[j] for j in p) for p in packs for i in p}  # target tokens of the pack holding i
eq3 = {i: 1 / (K * T[i]) for i in N}  # per-token weight of the pack mean
scaled = {i: (1 / K) * K / (N[i] * M) for i in N}  # sum inside the pack, scaled by K/(N_i·M); mean over K packs
print("packs:", packs, f" K={K} packs, M={M} sequences, N_i={N}")
print("Eq. 3 share of each sequence (N_i · weight):", {i: round(N[i] * eq3[i], 3) for i in N})
assert all(abs(scaled[i] - 1 / (M * N[i])) < 1e-12 for i in N)  # exactly 1/(M·N_i) per token
lib = {r: effective_sequence_weights(demo.steps[0], r, demo.n_target) for r in ("pack_mean", "sequence")}
assert all(abs(lib["pack_mean"][i] - N[i] * eq3[i]) < 1e-12 for i in N), "Eq. 3 by hand differs from the library"
assert all(abs(lib["sequence"][i] - 1 / M) < 1e-12 for i in N), "Eq. 2 by hand differs from the library"
tw = step_token_weights(demo.steps[0], demo.n_target, "sequence")
assert all(abs(tw[i] - 1 / (M * N[i])) < 1e-12 for i in N)
print("✓ by hand == batching.effective_sequence_weights / step_token_weights; after scaling, every sequence 1/M =", 1 / M)
max_pack_mean_share = max(lib["pack_mean"].values())

# %% [markdown]
# *What you should see:* under Eq. 3 the sequence alone in its pack takes **half** of the step (1/2) and the three
# sharing a pack 1/6 each; after the K/(N_i·M) scaling all four count 1/4.

# %% [markdown]
# ## 5. At scale: the synthetic LongAlign-10k + ShareGPT mix on K devices
# The real data above is small. To see the efficiency effects, plan the **synthetic** LongAlign-10k + ShareGPT
# length mix of notebook 02 (half long records around 16k tokens, half short chats around 650; no text, lengths
# only; `lengths.synthetic_longalign_sharegpt_mix`) into 64k rows and
# simulate K devices running each plan step by step with the cost model t = a·Σlen + b·Σlen² (+ c): synchronous
# data parallel, so each step lasts as long as its slowest device.

# %%
syn = synthetic_longalign_sharegpt_mix(SYNTH_N, seed=SEED, max_length=SYNTH_MAX_LEN)
syn_len, syn_nt = syn.lengths, syn.n_target
syn_cfg = BatchConfig(max_pack_tokens=SYNTH_MAX_LEN, batch_size=1, grad_accum=1, world_size=SIM_DEVICES, seed=SEED)
cost = sim.CostModel.from_config(syn_cfg)
res = sim.compare_strategies(syn_len, syn_nt, syn_cfg, cost=cost)
print(f"cost model (7B-class model on one H100, bf16): {cost}")
print(f"{'strategy':20s} {'fill':>7s} {'padding':>8s} {'steps':>6s} {'time (s)':>9s} {'idle':>6s}")
for k, (p, s) in res.items():
    print(f"{k:20s} {p.counters['fill_rate']:7.1%} {p.counters['padding_fraction']:8.1%} {len(p.steps):6d} "
          f"{s.total_time:9.0f} {s.idle_fraction:6.1%}")
bfd_fill, nf_fill = res["packed-bfd"][0].counters["fill_rate"], res["packed-next_fit"][0].counters["fill_rate"]

# %% [markdown]
# Why sorted batching is fast but biased: its steps are made of similar lengths, so one step trains only on long
# records and the next only on short chats — each optimizer step pulls the model towards one kind of data. Measure
# it as the **share of long records among the sequences of each optimizer step**: an unbiased plan keeps it near
# the mix's 50 %, step after step; the spread (std over steps) is the bias. "random" is the reference: steps of
# the same sizes as BFD's, drawn at random from the whole set.
#
# BFD is not innocent: it takes sequences longest first, so it fills rows with long records (four of ~16k fit a
# 64k row) and puts the short chats into the gaps and then into a few rows of their own. Its rows are long-only or
# short-only, and a step of 8 random such rows is almost as one-sided as a sorted step. `pack_mix="window"` (BFD
# inside shuffled windows of one step's worth of tokens, `batching.pack_mix` / `--set batching.pack_mix=window`)
# gives every window — and so every step — a random sample of the mix, and pays for it in fill: each window's last
# row is part-empty. Reordering BFD's rows cannot help: the short chats sit in too few rows to reach every step.

# %%
is_long = syn.source == "long"
mixes = {"packed-bfd+window": dataclasses.replace(syn_cfg, strategy="packed", packer="bfd", balance="none",
                                                  pack_mix="window", pack_window=1)}
for k, c in mixes.items():
    p = plan_epoch(syn_len, syn_nt, c, epoch=0)
    res[k] = (p, sim.simulate(p, cost, k))
shares_per_step = {k: step_shares(res[k][0], is_long) for k in
                   ("naive", "sorted", "packed-next_fit", "packed-bfd", "packed-bfd+balance", "packed-bfd+window")}


def random_steps(sizes, rng):
    """Long-record share of steps of these sizes drawn at random from the whole set (no plan at all)."""
    perm, at, out_ = rng.permutation(len(syn_len)), 0, []
    for n in sizes:
        out_.append(float(is_long[perm[at:at + n]].mean()))
        at += n
    return np.array(out_)


rng_r = np.random.default_rng(SEED)
sizes = {k: [s_.n_sequences for s_ in res[k][0].steps] for k in shares_per_step}
shares_per_step["random"] = random_steps(sizes["packed-bfd"], rng_r)  # one draw with BFD's step sizes, for the plot
# chance alone gives some spread (a step of 8 long-only rows holds ~30 sequences): compare each plan with random
# steps of ITS sizes, averaged over 50 draws — a ratio of 1 is as mixed as chance
chance = {k: float(np.mean([np.std(random_steps(sizes[k], rng_r)) for _ in range(50)])) for k in sizes}
bias = {k: float(np.std(v)) for k, v in shares_per_step.items()}
ratio = {k: bias[k] / chance[k] for k in chance}
print(f"{'plan':20s} {'fill':>6s} {'steps':>6s} {'std of long share':>18s} {'÷ chance':>9s} {'modelled time (s)':>18s}")
for k in chance:
    p_, s_ = res[k]
    print(f"{k:20s} {p_.counters['fill_rate']:6.1%} {len(p_.steps):6d} {bias[k]:18.3f} {ratio[k]:9.2f} "
          f"{s_.total_time:18.0f}")
fig, axes = plots.figure(2, 1, figsize=(8, 5.2), sharex=True)
for k in ("naive", "sorted", "packed-next_fit"):
    axes[0].plot(np.arange(len(shares_per_step[k])) / len(shares_per_step[k]), shares_per_step[k], marker="o", ms=3, lw=0.8, color=plots.PALETTE[k.split("-")[0]],
                 label=f"{k} (std {bias[k]:.2f})")
for k, col in (("packed-bfd", plots.PALETTE["packed"]), ("packed-bfd+window", plots.CYCLE[4]), ("random", "#888888")):
    axes[1].plot(np.arange(len(shares_per_step[k])) / len(shares_per_step[k]), shares_per_step[k], marker="o", ms=3, lw=0.8, color=col, label=f"{k} (std {bias[k]:.2f})")
for ax in axes:
    ax.axhline(is_long.mean(), color="#444444", lw=0.6, ls=":")
    ax.set_ylabel("long records\nin the step")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="upper right")
axes[1].set_xlabel("position in the epoch (step / steps; naive makes ~6× more, smaller steps)")
axes[0].set_title(f"Long-record share per optimizer step — synthetic mix, {SYNTH_N} sequences, {SIM_DEVICES} rows a step")
plots.show(fig, out / "step_composition.png")
# the lesson, checked: BFD is biased like sorted, next-fit and the windowed BFD are as mixed as random steps
assert ratio["packed-bfd"] > 2.5 and ratio["sorted"] > 2.5, ratio
assert ratio["packed-bfd+window"] < 1.6 and ratio["packed-next_fit"] < 1.6, ratio
window_fill = res["packed-bfd+window"][0].counters["fill_rate"]
assert nf_fill < window_fill < bfd_fill, (nf_fill, window_fill, bfd_fill)

# %% [markdown]
# *What you should see:* sorted and global BFD jump between all-long and mostly-short steps (std ≈ 0.3, three to
# four times what chance gives steps of their sizes); naive, next-fit and the windowed BFD spread about as much
# as chance (ratio ≈ 1; naive's steps hold 8 sequences, so chance alone spreads them by ≈ 0.18). BFD trades step mixing
# for fill; the window gets most of the fill back (≈ 97 % vs ≈ 83 % for next-fit and ≈ 99.8 % for global BFD)
# with random-like steps. Cost balancing (`balance=cost`, on by default with several ranks) groups rows of similar
# cost into a step and keeps part of the bias: it is a speed choice, made after the mixing.

# %% [markdown]
# Best-fit-decreasing over the whole set (sorted once, O(n log n), no windows) fills 64k rows almost completely;
# next-fit in shuffled order, what LongAlign does, leaves about a fifth of every row empty:

# %%
plots.show(fill_histogram_figure({k: res[k][0] for k in ("packed-next_fit", "packed-bfd")},
                                 title=f"Row fill at 64k — synthetic LongAlign-10k + ShareGPT mix, {SYNTH_N} sequences"),
           out / "pack_fill.png")

# %% [markdown]
# The paper's Figure 3, as data: a timeline per device (a smaller synthetic set so the bars stay readable).
# Red is time a device waits for the slowest one. Packing cuts waiting; grouping packs of similar modelled cost
# into the same step (`balance=cost`) cuts it further — at the price of less random steps, like sorted batching.
#
# On this small set sorted batching can look *faster* than BFD. That is the tail, not the method: ~130 sequences
# make only about 20 packed rows, two full steps of 8 and a last step of a few rows, where most devices wait a
# whole step; the sorted groups happen to fill their steps. On the 2,000-sequence set above the tail is one step
# in ~40 and BFD wins (table above). The cell checks the explanation: drop the tail (`drop_last`) and BFD is faster.

# %%
g = synthetic_longalign_sharegpt_mix(16 * SIM_DEVICES, seed=SEED + 1, max_length=SYNTH_MAX_LEN)
g_len, g_nt = g.lengths, g.n_target
small = sim.compare_strategies(g_len, g_nt, syn_cfg, cost=cost)
plots.show(sim.gantt_figure([small[k][1] for k in ("naive", "sorted", "packed-bfd", "packed-bfd+balance")],
                            title=f"{SIM_DEVICES} devices, synthetic LongAlign-10k + ShareGPT mix of {len(g_len)} sequences"),
           out / "gantt.png")
bfd_small = small["packed-bfd"][0]
tail_rows = sum(1 for _ in bfd_small.steps[-1].micro_batches())
print(f"BFD: {len(bfd_small.steps)} steps, last one {tail_rows} rows on {SIM_DEVICES} devices")
full_only = {}  # the same plans without their last, incomplete step: real tokens per modelled second
for k in ("sorted", "packed-bfd"):
    p_ = plan_epoch(g_len, g_nt, dataclasses.replace(sim.strategy_variants(syn_cfg)[k], drop_last=True))
    full_only[k] = sum(st.tokens for st in p_.steps) / sim.simulate(p_, cost, k).total_time
print("tokens per modelled second: with the tail " + ", ".join(
    f"{k} {sum(st.tokens for st in small[k][0].steps) / small[k][1].total_time:,.0f}" for k in full_only)
      + "; full steps only " + ", ".join(f"{k} {v:,.0f}" for k, v in full_only.items()))
assert tail_rows < SIM_DEVICES and full_only["packed-bfd"] > full_only["sorted"], (tail_rows, full_only)

# %%
plots.show(sim.idle_bar_figure({k: s.summary() for k, (_, s) in res.items()},
                               title=f"Modelled epoch time on {SIM_DEVICES} devices — synthetic mix, {SYNTH_N} sequences"),
           out / "idle.png")

# %% [markdown]
# ## 6. Real step times on this device (opt-in on a CPU: `MEASURE = True`)
# Now run the three plans for real: forward + backward of SmolLM2 for the first steps of each plan (all ranks'
# micro-batches one after another, no optimizer update), with the `sequence` loss weights. Packed rows go in
# with `position_ids` only, and transformers keeps each packed sequence's attention to itself. Every plan gets
# one untimed warm-up micro-batch (allocation, kernel choice) and every micro-batch time is the **median of 3
# runs**. The measured micro-batch times calibrate the cost model for this device (non-negative least squares) —
# when they carry enough signal; `calibrate` refuses samples that cannot determine the constants.

# %%
timing, fitted = {}, None
if not MEASURE:
    print("MEASURE is off (no GPU): set MEASURE = True in the first cell to time SmolLM2 here (minutes on a CPU).")
else:
    model, _ = load_model_and_tokenizer(MODEL, dtype="fp32" if not torch.cuda.is_available() else "auto")
    device = next(model.parameters()).device
    tcfg = dataclasses.replace(base, max_pack_tokens=TIMING_MAX_TOKENS, world_size=1, grad_accum=TIMING_ACCUM,
                               overlong="truncate", truncate_side="middle")
    for k in ("naive", "sorted", "packed"):
        c = dataclasses.replace(tcfg, strategy=k, batch_size=1 if k == "packed" else BATCH_SIZE)
        tp = plan_epoch(lengths, n_target, c, epoch=0, labels=labels)
        timing[k] = sim.measure_step_times(model, tp, ds, n_steps=TIMED_STEPS, pad_id=tok.pad_token_id or 0,
                                           warmup=1, repeats=3)  # untimed first call, median of 3
        t = timing[k]
        print(f"{k:7s} {len(t['steps'])} steps, {len(t['micro'])} micro-batches, {t['tokens']} real tokens "
              f"({t['computed_tokens']} computed), {sum(t['steps']):.2f} s → {t['tokens_per_s']:.0f} tokens/s on {device}")

# %% [markdown]
# Reading the numbers: on a GPU, padded rows cost compute for nothing and packed rows do not, so packing shows
# up as more real tokens per second; on a small shared CPU with a handful of short micro-batches the times are
# dominated by noise and fixed overheads. A ranking of the plans from a few micro-batches is not a measurement:
# compare the spread of the three repeats with the gaps between plans before reading anything into it.
# The fit below needs at least two micro-batches per constant, three different sizes, and times that grow with
# tokens; otherwise `calibrate` says why and nothing is fitted. Only a fit that passes, from many steps
# (`TIMED_STEPS`) of long rows (`TIMING_MAX_TOKENS`), is worth passing to `longalign pack` with
# `--set batching.cost_a=… --set batching.cost_b=… --set batching.cost_c=…`.

# %%
fit_refused = None
samples = [m for t in timing.values() for m in t["micro"]]
if timing:
    try:
        fitted = sim.calibrate(samples)
        print("calibrated for this device:", fitted)
    except LongAlignError as e:  # too few / one-size / non-growing samples: no constants to hand on
        fit_refused = str(e)
        print("no cost model fitted:", e)
if fitted:
    fig, ax = plots.figure(figsize=(5.5, 4))
    for k, t in timing.items():
        ax.scatter([fitted.a * x + fitted.b * x2 + fitted.c for x, x2, _ in t["micro"]], [s for *_, s in t["micro"]],
                   color=plots.PALETTE[k], label=k, s=30)
    lim = max(s for *_, s in samples) * 1.1
    ax.plot([0, lim], [0, lim], color="#888888", lw=0.8, ls="--")
    ax.set_xlabel("modelled micro-batch time (s)")
    ax.set_ylabel("measured micro-batch time (s)")
    ax.set_title(f"Cost model calibrated on {device}")
    ax.legend()
    plots.show(fig, out / "calibration.png")

# %% [markdown]
# ## Takeaways
# - Packing removes padding; BFD fills rows far better than next-fit (≈ 99 % vs ≈ 83 % at 64k here) — but global
#   BFD's rows are long-only or short-only, so its steps are as one-sided as sorted batching's; BFD inside shuffled
#   windows (`pack_mix=window`) keeps ≈ 97 % fill with steps as mixed as random ones.
# - With data parallelism, a step lasts as long as its slowest device: packing (and cost balancing) cuts the idle
#   time that naive batching wastes; sorted batching cuts it too, but each step is then all-long or all-short.
# - A pack-mean loss gives a sequence more weight the fewer target tokens its pack holds; weighting every target
#   token 1/(M·N_i) over the whole optimizer step gives every sequence the same 1/M.
#
# ## Exercises
# 1. Run next-fit (`batching.next_fit`) on `toy` sorted longest first (next-fit-decreasing). How many rows? Is it as good as BFD?
#    Why not?
# 2. In the worked example, add a fifth sequence of 16 tokens (`[8, 8, 8, 8, 16]`, rows of 24). Which sequence gets
#    the largest Eq. 3 share now, and what does Eq. 2 give each?
# 3. Under the `token` reduction (a plain token mean over the step), what share does a sequence with N_i target
#    tokens get? Check it with `effective_sequence_weights` on the five-sequence step of exercise 2 (the four
#    equal sequences of the worked example would hide the answer: with equal N_i every reduction gives 1/M).
#
# Solutions (collapsed in JupyterLab; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
nfd = next_fit(np.array(sorted(toy, reverse=True)), cap)
print("1. next-fit-decreasing:", len(nfd), "rows;", [[sorted(toy, reverse=True)[i] for i in r] for r in nfd])
assert len(nf) > len(nfd) == 5 > len(bfd)  # sorting helps, but next-fit never goes back to a row it has left

# %% tags=["solution"] jupyter={"source_hidden": true}
d5 = plan_epoch([8, 8, 8, 8, 16], None, BatchConfig(strategy="packed", max_pack_tokens=24, grad_accum=2))
e3 = effective_sequence_weights(d5.steps[0], "pack_mean", d5.n_target)
e2 = effective_sequence_weights(d5.steps[0], "sequence", d5.n_target)
print("2. packs", [p for mb in d5.steps[0].micro_batches() for p in mb.packs], "Eq. 3:",
      {i: round(v, 3) for i, v in e3.items()}, "Eq. 2:", {i: round(v, 3) for i, v in e2.items()})
assert all(abs(v - 1 / 5) < 1e-12 for v in e2.values()) and max(e3.values()) > 1 / 5

# %% tags=["solution"] jupyter={"source_hidden": true}
tok_share = effective_sequence_weights(d5.steps[0], "token", d5.n_target)
N5 = {i: int(d5.n_target[i]) for i in tok_share}
assert len(set(N5.values())) > 1  # unequal N_i, or the check proves nothing
assert all(abs(tok_share[i] - N5[i] / sum(N5.values())) < 1e-12 for i in N5)  # N_i / Σ N_j: long answers weigh more
assert max(tok_share.values()) > 1 / len(N5) > min(tok_share.values())
print("3. token mean: share N_i / Σ_j N_j =", {i: round(v, 3) for i, v in tok_share.items()})

# %%
metrics_file = write_metrics(out, {
    "data": data_note, "sequences": int(len(lengths)),
    "plans": {k: {x: p.counters[x] for x in ("steps", "fill_rate", "padding_fraction", "seqs_per_row")}
              for k, p in plans.items()},
    "sequence_shares_sum": float(sum(shares["sequence"].values())),
    "sequence_share_spread": float(max(shares["sequence"].values()) - min(shares["sequence"].values())),
    "demo_pack_mean_max_share": float(max_pack_mean_share),
    "synthetic_n": SYNTH_N, "bfd_fill_64k": float(bfd_fill), "next_fit_fill_64k": float(nf_fill),
    "idle": {k: float(s.idle_fraction) for k, (_, s) in res.items()},
    "modelled_time_s": {k: float(s.total_time) for k, (_, s) in res.items()},
    "timing": {k: {"tokens_per_s": t["tokens_per_s"], "step_s": t["steps"], "micro_batches": len(t["micro"])}
               for k, t in timing.items()},
    "calibrated": fitted.to_dict() if fitted else None, "calibration_refused": fit_refused,
    "step_long_share_std": bias, "step_long_share_vs_chance": ratio, "window_fill_64k": float(window_fill), "measured": bool(MEASURE), "smoke": SMOKE,
    "toy_rows": {"next_fit": len(nf), "bfd": len(bfd)},
    "figures": [str(out / f) for f in ("loss_weights.png", "pack_fill.png", "gantt.png", "idle.png",
                                       "step_composition.png", *(["calibration.png"] if timing else []))],
})
