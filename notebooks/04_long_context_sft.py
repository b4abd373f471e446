# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 04 · Long-context SFT: packing, isolation and loss weighting
#
# LongAlign trains on sequences from a few hundred to 64k tokens. Section 3.2 of the paper makes two points that
# this notebook reproduces at small scale:
#
# 1. **Packing** several sequences into one long row wastes no compute on padding, unlike naive batching; but the
#    sequences of a row must not attend to each other (document-isolated attention), and
# 2. a packed row's plain token-mean loss over-weights sequences that share a row with few target tokens:
#    **loss weighting** gives each sequence the weight it would have had on its own.
#
# **What you will learn**
# - the block-diagonal causal mask that isolates packed documents, built by hand and checked against the library;
# - that the packed, isolated, weighted loss equals running each sequence alone — and what goes wrong without
#   isolation (on the real SmolLM2, so the leak is visible);
# - one packed, isolated, weighted training step written from scratch in plain PyTorch, with the same gradients
#   as `LongAlignTrainer`;
# - that for the **same tokens** packing trains faster than naive batching (forward + backward tokens/s after a
#   warm-up, median of 3 — not wall time of runs with different numbers of optimizer steps);
# - that the recipe really trains: SmolLM2-135M learns to quote a verse exactly in a few steps, before vs after.
#
# **Time**: ~70 s on 2 CPU cores (SMOKE, the default without a GPU: the strategy comparison and the from-scratch
# step use a 2-layer random model with SmolLM2's tokenizer; the isolation check and the learning demo the real
# SmolLM2); full mode trains SmolLM2 at 16k (use a GPU).
#
# Library code: `longalign_lib.batching` (plans, weights, collators), `longalign_lib.attention` (isolation),
# `longalign_lib.loss` (weighted chunked cross-entropy), `longalign_lib.train` (LongAlignTrainer).

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/04_long_context_sft"
MODEL = "smollm2-135m-instruct"  # any causal LM (HF id, local path); SMOKE: a tiny random model, same tokenizer
N_RECORDS = 200  # verse-lookup records built from the KJV texts in data/
MAX_CONTEXT_TOKENS = 16000  # longest passages
PACK_TOKENS = 16384  # packed row capacity (and the model's window, raised by RoPE base scaling when needed)
BATCH_SIZE = 8  # sequences per micro-batch for naive / sorted
GRAD_ACCUM = 2
LR = 5e-5
ROPE_BASE_FACTOR = 8.0  # SmolLM2 was trained to 8k; 16k rows need a larger RoPE base (the paper: ×200 for 64k)
LEARN_MODEL = "smollm2-135m-instruct"  # section 6: the real model that learns the task
LEARN_TRAIN, LEARN_TEST = 6, 4  # short verse-lookup records (1–2 verses) to train on / to test before and after
LEARN_EPOCHS, LEARN_LR = 2, 1e-4
TIMED_STEPS = 8  # optimizer steps of each plan timed (forward + backward, median of 3 after a warm-up); None: all

# %%
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from longalign_lib import attention, batching, plots, train
from longalign_lib import simulate as sim
from longalign_lib.config import load_config
from longalign_lib.formatting import format_records
from longalign_lib.generate import reference_scores
from longalign_lib.io import write_metrics
from longalign_lib.loss import reference_weighted_ce
from longalign_lib.models import load_model_and_tokenizer, load_tokenizer

if SMOKE is None:
    SMOKE = not torch.cuda.is_available()
torch.set_num_threads(1)  # one thread: on a small shared CPU two threads that wait on each other are slower
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
device = "cuda" if torch.cuda.is_available() else "cpu"
if SMOKE:
    MODEL = "random:" + str(train.tiny_model_dir(out / "tiny_model"))
    N_RECORDS, MAX_CONTEXT_TOKENS, PACK_TOKENS, BATCH_SIZE, GRAD_ACCUM, LR = 8, 240, 512, 4, 1, 1e-3
    ROPE_BASE_FACTOR = 1.0
    # 4 records, one epoch (3 packed steps, ~12 s on one core) teach the format (3/3 exact after, 0/3 before; a
    # second epoch only drives the loss from 0.1 to 0.001 for 11 s more); 3 held-out verses, generated on CPU
    LEARN_TRAIN, LEARN_TEST, LEARN_EPOCHS = 4, 3, 1
    TIMED_STEPS = None  # the whole (tiny) epoch of each plan
print("model:", MODEL, "| device:", device, "| SMOKE:", SMOKE)

# %% [markdown]
# ## 1. Data: a real long-context task
# Each record is a KJV passage (a few verses up to `MAX_CONTEXT_TOKENS`) and the instruction to quote one of its
# verses; the answer is that verse. Long and short records mix as in LongAlign-10k + ShareGPT. Records are
# formatted with the model's chat template: only the answer tokens are targets.

# %%
tok = load_tokenizer(MODEL)
records = train.verse_lookup_records(N_RECORDS, min_tokens=200, max_tokens=MAX_CONTEXT_TOKENS, seed=0)
examples, fstats = format_records(records, tok, max_length=PACK_TOKENS)
rows = [e.row() for e in examples]
lengths = [r["length"] for r in rows]
print(f"{len(rows)} records, {sum(lengths):,} tokens, lengths {min(lengths)}..{max(lengths)}, "
      f"target tokens {sum(r['n_target'] for r in rows):,}")
print(records[0]["messages"][0]["content"][-160:], "\n→", records[0]["messages"][1]["content"])

# %% [markdown]
# ## 2. The core idea: a block-diagonal causal mask
# Three documents of 3, 4 and 3 tokens packed into one row of 10. Causal attention lets token i see tokens j ≤ i;
# **isolated** attention also requires i and j to belong to the same document. The document boundaries travel as
# `cu_seq_lens` = [0, 3, 7, 10] (cumulative lengths). By hand, then checked against the library:

# %%
cu = [0, 3, 7, 10]
doc_of = [d for d in range(len(cu) - 1) for _ in range(cu[d], cu[d + 1])]
mask_by_hand = torch.tensor([[doc_of[i] == doc_of[j] and j <= i for j in range(10)] for i in range(10)])
lib_mask = attention.block_causal_mask(torch.tensor(cu, dtype=torch.int32), batch=1, length=10)[0, 0]
assert torch.equal(mask_by_hand, lib_mask), "by-hand mask differs from attention.block_causal_mask"
print("✓ by hand == attention.block_causal_mask;", int(mask_by_hand.sum()), "allowed pairs instead of",
      int(torch.ones(10, 10).tril().sum()), "for plain causal attention")
fig, axes = plots.figure(1, 2, figsize=(8, 3.6))
for ax, (m, title) in zip(axes, ((torch.ones(10, 10).tril().bool(), "plain causal: documents see each other"),
                                 (mask_by_hand, "isolated: block-diagonal causal")), strict=True):
    ax.imshow(m.numpy(), cmap="Greens", vmin=0, vmax=1.4)
    ax.set_title(title)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.grid(False)
    for b in cu[1:-1]:
        ax.axhline(b - 0.5, color="#c44e52", lw=1)
        ax.axvline(b - 0.5, color="#c44e52", lw=1)
plots.show(fig, out / "block_mask.png")

# %% [markdown]
# *What you should see:* three green triangles on the diagonal on the right; on the left the lower triangle is
# full, so document 2 reads documents 0 and 1. Efficient kernels never build this matrix: varlen/flash kernels take
# `cu_seq_lens`, SDPA/flex take a block mask (`attention.resolve_implementation` picks one); `position_ids` also
# restart at 0 for every document.
#
# ## 3. One packed batch
# The stage-3 plan packs sequences into rows of at most `PACK_TOKENS`. The loss weights come from
# `batching.step_token_weights` with the *sequence* reduction: each sequence's target tokens weigh 1/(M·N_i),
# M = sequences in the step, N_i = its target tokens.

# %%
cfg = load_config("gpu-small" if not SMOKE else "cpu-demo", [
    f"model.name={MODEL}", f"batching.max_pack_tokens={PACK_TOKENS}", f"batching.grad_accum={GRAD_ACCUM}",
    "batching.strategy=packed", "batching.loss_reduction=sequence"])
plan = batching.plan_epoch(lengths, [r["n_target"] for r in rows], cfg.batching, epoch=0)
pairs = [(s, m) for s in plan.steps for m in s.ranks[0]]
counts = [m.n_sequences if m.n_sequences <= 8 else 1 for _, m in pairs]
step, mb = pairs[counts.index(max(counts))]  # a row holding several (at most 8, to stay readable) documents
weights = batching.step_token_weights(step, plan.n_target, "sequence")
packed = batching.collate(plan, mb, rows, weights)
print(f"plan: {len(plan.steps)} steps, fill {plan.counters['fill_rate']:.3f}; this row: {packed['input_ids'].shape[1]} tokens, "
      f"{len(packed['cu_seq_lens']) - 1} documents, cu_seq_lens={packed['cu_seq_lens'].tolist()}")
plots.show(train.packed_batch_figure(packed), out / "packed_batch.png")

# %% [markdown]
# ## 4. The weighted loss: by hand, by the library, and without isolation
# By hand: run each sequence of the row **alone** through the model, take the mean cross-entropy of its answer
# tokens, multiply by its weight N_i·w_i. Library: one forward pass over the packed row (isolated attention) and
# `loss.weighted_chunked_ce` on the final hidden states (only answer positions reach the LM head, in chunks).
# Without isolation: the same packed row as one plain causal sequence (no `position_ids` restart, no boundaries).
# This check runs on the real SmolLM2 even in SMOKE: a random 2-layer model barely reads its context, so a leak
# would change its loss by ~1e-4 and teach nothing; a trained model is thrown off by its neighbours' text.

# %%
ISO_MODEL = LEARN_MODEL if SMOKE else MODEL  # same tokenizer as the tiny SMOKE model, real weights
model, _ = load_model_and_tokenizer(ISO_MODEL, dtype="fp32", device=device, attn_implementation="sdpa")  # isolated SDPA: fp32
model.eval()
exs = batching.materialize(plan, mb, rows)
with torch.no_grad():
    by_hand = 0.0
    for ex in exs:
        ids = torch.tensor([ex["input_ids"]], device=device)
        lab = torch.tensor([ex["labels"]], device=device)
        lab[0, 0] = -100
        n_i = int((lab[0, 1:] != -100).sum())
        mean_ce = reference_weighted_ce(model(ids, use_cache=False).logits, lab) / n_i
        by_hand += float(mean_ce) * weights[ex["idx"]] * n_i
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in packed.items()}
    wrapper = train.ChunkedLossLM(model, chunk_tokens=1024)
    library = float(wrapper(**{k: batch[k] for k in ("input_ids", "labels", "loss_weights", "position_ids",
                                                        "cu_seq_lens", "max_seqlen")})["loss"])
    leaky = float(wrapper(**{k: batch[k] for k in ("input_ids", "labels", "loss_weights")})["loss"])
rel = abs(library - by_hand) / by_hand
print(f"by hand (one sequence at a time): {by_hand:.6f}")
print(f"library (packed, isolated):       {library:.6f}   relative difference {rel:.1e}")
print(f"packed WITHOUT isolation:         {leaky:.6f}   relative difference {abs(leaky - by_hand) / by_hand:.1e}")
leak = abs(leaky - by_hand) / by_hand
assert rel < 1e-4, "the packed isolated loss should equal the sequences run alone"
assert leak > 100 * max(rel, 1e-6) and leak > 1e-2, f"the leak should be visible on a trained model: {leak:.1e}"
iso_model = model if ISO_MODEL == LEARN_MODEL else None  # section 6 trains the same SmolLM2: load it once
del model, wrapper

# %% [markdown]
# *What you should see:* by hand and library agree to ~1e-7 (float rounding); without isolation the loss is a
# different number (several percent here) — every document after the first is read in the context of its
# neighbours and at shifted positions, which is not the data you meant to train on.
#
# ## 4b. One training step from scratch
# What the trainer does for one optimizer step, in plain PyTorch: for each packed row of the step, concatenate the
# sequences, restart `position_ids` at 0 for each (transformers then keeps every document's attention to itself),
# mask the first label of each document, weight each answer token 1/(M·N_i), and **sum** the weighted token losses
# over all rows before one backward-accumulated gradient. Only the plan's choice of rows comes from the library.
# The same step through `LongAlignTrainer.training_step` must give the same gradients.

# %%
# a tiny random model on the CPU in fp32 (in full mode too): the lesson is the arithmetic, and CPU fp32 makes the
# two paths bit-comparable (no bf16 autocast, TF32 or fused kernels); the 8 shortest records, rows of 512 tokens
TINY = "random:" + str(train.tiny_model_dir(out / "tiny_model"))
step_data = sorted(rows, key=lambda r: r["length"])[:8]
assert max(r["length"] for r in step_data) <= 512, "need short records for the from-scratch step"
step_cfg = load_config("cpu-demo", [f"model.name={TINY}", "batching.max_pack_tokens=512", "batching.grad_accum=2",
                                    "batching.strategy=packed", "batching.loss_reduction=sequence",
                                    "train.max_steps=1", "train.save_steps=0", "train.tensorboard=false",
                                    "train.bf16=false", "train.fused_kernels=none", "model.dtype=fp32",
                                    "model.device=cpu"])
trainer, _ = train.build_trainer(step_cfg, out / "runs" / "one_step", dataset=step_data, quiet=True, device="cpu")
lm = trainer.model.lm
step_rows = [[step_data[i] for i in row] for mb in trainer.plan_batches.plans[0].steps[0].micro_batches()
             for row in mb.packs]  # the plan's first optimizer step: which sequences share each row
# ---- from scratch: ~20 lines of plain PyTorch
lm.zero_grad(set_to_none=True)
M = sum(len(r) for r in step_rows)  # sequences in the step
for row in step_rows:  # one packed row per micro-batch
    ids, pos, lab, w = [], [], [], []
    for r in row:
        n_i = sum(1 for t in r["labels"][1:] if t != -100)  # target tokens of this sequence
        ids += r["input_ids"]
        pos += list(range(len(r["input_ids"])))  # restart: isolated attention, positions from 0
        lab += [-100] + r["labels"][1:]  # never predict a document's first token from the previous one
        w += [0.0] + [1.0 / (M * n_i)] * (len(r["labels"]) - 1)  # Eq. 2: every sequence counts 1/M
    ids, pos, lab, w = (torch.tensor([x]) for x in (ids, pos, lab, w))
    logits = lm(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), lab[:, 1:].flatten(),
                                           ignore_index=-100, reduction="none")
    (ce * w[:, 1:].flatten()).sum().backward()  # a SUM over rows: gradients accumulate, no division
grad_hand = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}
# ---- the library: the same step through LongAlignTrainer
lm.zero_grad(set_to_none=True)
for i in range(trainer.plan_batches.grad_accum):
    trainer.training_step(trainer.model, trainer.plan_batches[i])
grad_err = max(float((p.grad - grad_hand[n]).abs().max() / p.grad.abs().max().clamp_min(1e-12))
               for n, p in lm.named_parameters() if p.grad is not None)
assert max(len(r) for r in step_rows) >= 2, "the step should pack several sequences into a row"
print(f"{len(step_rows)} rows, M={M} sequences, {len(grad_hand)} parameter tensors; "
      f"largest relative gradient difference {grad_err:.1e}")
assert len(grad_hand) == sum(1 for p in lm.parameters() if p.grad is not None) and grad_err < 1e-4
print("✓ from scratch == LongAlignTrainer.training_step (same gradients)")
del trainer, lm

# %% [markdown]
# ## 5. Naive vs sorted vs packed vs packed+weighting, the same tokens
# One full epoch of the same records, four ways, through the same `LongAlignTrainer` — so every strategy trains on
# exactly the same tokens (checked below):
# - **naive**: shuffled micro-batches of `BATCH_SIZE` sequences padded to the longest (pads cost compute);
# - **sorted**: sequences of similar length batched together (little padding; steps are all-long or all-short);
# - **packed**: rows of up to `PACK_TOKENS` tokens, loss = mean over each pack's tokens (the paper's biased L′);
# - **packed+weighting**: the same rows, each sequence weighted 1/(M·N_i) (the paper's fix).
#
# The strategies make different numbers of optimizer steps from the same tokens (a packed row holds fewer tokens
# than a micro-batch of `BATCH_SIZE` padded sequences here), and each optimizer step has a fixed cost, so the wall
# time of the training runs compares unequal work. The speed comparison below therefore times **forward +
# backward only**, micro-batch by micro-batch (`simulate.measure_plans`: one untimed warm-up micro-batch per
# plan, then the median of 3 runs of each, the runs of all plans interleaved), on the same model, and reports real
# tokens per second. The spread of the 3 runs is printed: when it is as large as the gaps between plans (a busy
# shared CPU), the ranking is noise, not a measurement. The two packed
# arms run the same rows (weights differ, compute does not), so `packed` stands for both.

# %%
strategies = {
    "naive": ["batching.strategy=naive", f"batching.batch_size={BATCH_SIZE}", "batching.loss_reduction=sequence"],
    "sorted": ["batching.strategy=sorted", f"batching.batch_size={BATCH_SIZE}", "batching.loss_reduction=sequence"],
    "packed": ["batching.strategy=packed", "batching.loss_reduction=pack_mean"],
    "packed+weighting": ["batching.strategy=packed", "batching.loss_reduction=sequence"],
}
common = [f"model.name={MODEL}", f"batching.max_pack_tokens={PACK_TOKENS}",
          f"batching.grad_accum={GRAD_ACCUM}", "train.epochs=1", "train.max_steps=-1", "train.save_steps=0",
          f"train.lr={LR}", "train.warmup_ratio=0.1", "train.tensorboard=false",
          f"model.rope_base_factor={ROPE_BASE_FACTOR}", f"model.max_position_embeddings={max(PACK_TOKENS, 8192)}",
          "model.device=" + device]
logs, times, tokens, computed, plans_info = {}, {}, {}, {}, {}
# warm-up: one untimed optimizer step first, so the first strategy does not pay for CUDA start-up, allocation and
# kernel choice (in full mode naive used to run first, cold)
train.train(load_config("gpu-small" if not SMOKE else "cpu-demo", common + strategies["naive"] + ["train.max_steps=1"]),
            out / "runs" / "warmup", dataset=rows, save_model=False, quiet=True)
for name, sets in strategies.items():
    cfg_s = load_config("gpu-small" if not SMOKE else "cpu-demo", common + sets)
    res = train.train(cfg_s, out / "runs" / name.replace("+", "_"), dataset=rows, save_model=False, quiet=True)
    logs[name] = res["log"]
    times[name] = sum(r["step_s"] for r in res["log"])  # training wall time (optimizer steps included)
    tokens[name] = sum(r["tokens"] for r in res["log"])
    computed[name] = sum(r["computed_tokens"] for r in res["log"])
    plans_info[name] = res["plans"][0]
    print(f"{name:17s} {len(res['log']):3d} optimizer steps  {tokens[name]:6,} tokens ({computed[name]:6,} computed)"
          f"  training wall time {times[name]:6.2f} s")
    del res
    if device == "cuda":
        torch.cuda.empty_cache()
assert len(set(tokens.values())) == 1, f"strategies trained different tokens: {tokens}"

# %%
tmodel, _ = load_model_and_tokenizer(MODEL, dtype="fp32" if device == "cpu" else "auto", device=device)
if device == "cuda":  # as training runs at this length (gradient checkpointing): 8 padded 16k rows do not fit without
    tmodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
# the same memory budget per micro-batch: a packed row may hold as many tokens as a padded naive micro-batch
# (BATCH_SIZE × the longest sequence), within the model's window — else packing pays for more, smaller calls
time_row = max(PACK_TOKENS, min(BATCH_SIZE * max(lengths), max(PACK_TOKENS, 8192)))
tplans = {name: batching.plan_epoch(lengths, [r["n_target"] for r in rows], load_config(
              "gpu-small" if not SMOKE else "cpu-demo",
              common + sets + ([f"batching.max_pack_tokens={time_row}"] if name == "packed" else [])).batching)
          for name, sets in list(strategies.items())[:3]}  # packed+weighting runs packed's rows: same compute
print(f"timing rows: packed up to {time_row:,} tokens; naive/sorted {BATCH_SIZE} sequences padded to the longest")
# one warm-up micro-batch per plan, then 3 rounds that each time every micro-batch of every plan once (interleaved,
# so a change in machine load hits all plans alike); each micro-batch's time is the median of its 3 runs
timed = sim.measure_plans(tmodel, tplans, rows, n_steps=TIMED_STEPS, pad_id=tok.pad_token_id or 0, warmup=1,
                          repeats=3)
fb = {}
for name, t in timed.items():
    spread = max(max(r) / min(r) for r in t["runs"])  # the worst ratio of slowest to fastest run of a micro-batch
    fb[name] = {"s": sum(t["steps"]), "tokens": t["tokens"], "computed": t["computed_tokens"],
                "tokens_per_s": t["tokens_per_s"], "micro_batches": len(t["micro"]), "steps": len(t["steps"]),
                "max_run_spread": spread}
    print(f"{name:17s} {len(t['steps']):3d} steps, {len(t['micro']):3d} micro-batches: {t['tokens']:6,} real tokens "
          f"({t['computed_tokens']:6,} computed) in {fb[name]['s']:6.2f} s → {t['tokens_per_s']:8,.0f} real tokens/s"
          f"  (runs of one micro-batch differ by up to {spread:.1f}×)")
del tmodel
if TIMED_STEPS is None:  # the whole epoch: every plan timed the same tokens
    assert len({v["tokens"] for v in fb.values()}) == 1, fb
# padding is computed for nothing: naive computes more tokens than it trains, packing computes only real ones
assert fb["naive"]["computed"] > fb["naive"]["tokens"] and fb["packed"]["computed"] == fb["packed"]["tokens"]

# %%
fig, (ax1, ax2) = plots.figure(1, 2, figsize=(10, 3.8))
names = list(fb)
colors = [plots.PALETTE.get(n, plots.CYCLE[0]) for n in names]
ax1.bar(names, [fb[n]["computed"] for n in names], color=colors)
ax1.set_ylabel("tokens computed (padding included)")
ax1.set_title(f"Same {fb['naive']['tokens']:,} real tokens")
ax2.bar(names, [fb[n]["tokens_per_s"] for n in names], color=colors)
ax2.set_ylabel("real tokens / s (forward + backward)")
ax2.set_title(f"Throughput, median of 3 after a warm-up ({device})")
for ax, vals in ((ax1, [fb[n]["computed"] for n in names]), (ax2, [fb[n]["tokens_per_s"] for n in names])):
    for i, v in enumerate(vals):
        ax.annotate(f"{v:,.1f}" if v < 100 else f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=15)
plots.show(fig, out / "wall_time.png")

# %% [markdown]
# *What you should see:* every strategy trained the same number of real tokens; naive batching **computed** more
# (its padding, left) and packing only real tokens. Whether that shows up as speed depends on the device: on a GPU
# with long rows packing runs ~3× more real tokens per second than naive (full mode of this notebook; the same in
# `docs/reproduction.md` and `docs/performance.md`). On this CPU, with a 2-layer model and rows of a few hundred
# tokens, it may not: per-call costs of the isolated-attention path (documents passed as `cu_seq_lens`) weigh as
# much as the ~30 % padding saved at this size. The numbers above measure this device, with their spread; they
# are not evidence about the GPU case, and the notebook asserts nothing about their order.
# The training wall times printed further up are not the comparison: they include a different number of
# optimizer updates per strategy. The pack-mean loss
# (`packed`) is a different, biased quantity, so its loss values are not comparable with the other three.
#
# ## 6. The real model learns: SmolLM2 answers in the data's format
# Same recipe (packed rows, 1/(M·N_i) weights, `LongAlignTrainer`), now on the real SmolLM2-135M-Instruct with
# short verse-lookup records (passages of one or two verses): `LEARN_TRAIN` records to train on for
# `LEARN_EPOCHS` epochs, `LEARN_TEST` held-out records (other passages, other verses) to test on. Before and after,
# the model answers the held-out questions greedily; an answer is *exact* when it is the verse, word for word, and
# token-F1 gives partial credit.

# %%
learn = [r for r in train.verse_lookup_records(20 * (LEARN_TRAIN + LEARN_TEST), long_fraction=0.0, seed=1)
         if r["meta"]["verses"] <= 2][: LEARN_TRAIN + LEARN_TEST]
learn_train, learn_test = learn[:LEARN_TRAIN], learn[LEARN_TRAIN:]
if iso_model is not None:  # loaded in section 4 (fp32, this device), not trained since
    lm, ltok, iso_model = iso_model, load_tokenizer(LEARN_MODEL), None
else:
    lm, ltok = load_model_and_tokenizer(LEARN_MODEL, dtype="fp32", device=device)
# room for the longest expected verse and a few tokens more: a longer reply cannot be exact anyway
answer_tokens = max(len(ltok(r["messages"][1]["content"])["input_ids"]) for r in learn_test) + 8


before = reference_scores(lm, ltok, learn_test, max_new_tokens=answer_tokens)
print(f"before training: {sum(before['exact'])}/{len(learn_test)} exact, mean token-F1 {np.mean(before['f1']):.2f}")
lex, _ = format_records(learn_train, ltok)
lrows = [e.row() for e in lex]
lcfg = load_config("cpu-demo" if device == "cpu" else "gpu-small", [
    f"model.name={LEARN_MODEL}", "batching.strategy=packed", "batching.loss_reduction=sequence",
    "batching.max_pack_tokens=256", "batching.grad_accum=1", f"train.epochs={LEARN_EPOCHS}",
    "train.max_steps=-1", f"train.lr={LEARN_LR}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
    "train.save_steps=0", "train.tensorboard=false", "model.device=" + device])
lres = train.train(lcfg, out / "runs" / "learn", dataset=lrows, save_model=False, model=lm, tok=ltok, quiet=True)
lm = lres["trainer"].model.lm.eval()
after = reference_scores(lm, ltok, learn_test, max_new_tokens=answer_tokens)
print(f"after training:  {sum(after['exact'])}/{len(learn_test)} exact, mean token-F1 {np.mean(after['f1']):.2f}")
for q, b, a, r in list(zip(learn_test, before['predictions'], after['predictions'], learn_test, strict=True))[:3]:
    print(f"\n{q['meta']['ref']}\n  before: {b[:120]!r}\n  after:  {a[:120]!r}\n  verse:  {r['messages'][1]['content'][:120]!r}")
loss_fig = train.loss_figure({"packed+weighting": lres["log"]},
                             title=f"SmolLM2-135M on verse quoting: {len(lres['log'])} steps, "
                                   f"{sum(r['tokens'] for r in lres['log']):,} tokens")
loss_fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
plots.show(loss_fig, out / "learn_loss.png")

# %% [markdown]
# *What you should see:* before training the model talks *about* the passage ("The passage you're referring to is
# from …") and scores no exact answer; after a handful of steps on other passages it answers with a verse, word for
# word, and token-F1 rises; the loss falls. It learned the data's *format* (answer = the verse, nothing else), not
# the answers: the test verses were never trained on. Picking the right verse out of a long passage is a harder
# skill — tried with 8 longer records and 18 steps, the 135M model quoted real but wrong verses (0 of 6 exact);
# that is what long-context SFT at scale (full mode, `gpu-small`) is for.
#
# ## Takeaways
# - Isolation is a mask (or `cu_seq_lens` for varlen kernels) plus restarting `position_ids`: packed sequences
#   then train exactly as if alone.
# - Weighting each target token 1/(M·N_i) over the whole step gives every sequence the same weight, whatever its
#   pack-mates.
# - Compare strategies on equal work: same tokens, then time and tokens/s; packing wins by not computing padding.
#
# ## Exercises
# 1. How many (query, key) pairs does isolation allow for documents of lengths n_1…n_k? Check your formula
#    against `attention.block_causal_mask` for `cu = [0, 5, 6, 14]`.
# 2. In section 3's packed row, what do the per-token loss weights of the whole step sum to over all target
#    tokens of that row? And over the whole step?
#
# Solutions (collapsed in JupyterLab; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
cu2 = [0, 5, 6, 14]
n = np.diff(cu2)
allowed = int(attention.block_causal_mask(torch.tensor(cu2, dtype=torch.int32), 1, cu2[-1]).sum())
assert allowed == int(sum(k * (k + 1) // 2 for k in n))
print(f"1. Σ n_i(n_i+1)/2 = {allowed} pairs (plain causal: {cu2[-1] * (cu2[-1] + 1) // 2})")

# %% tags=["solution"] jupyter={"source_hidden": true}
row_sum = float(packed["loss_weights"].sum())
m_row = sum(1 for i in mb.packs[0] if plan.n_target[i] > 0)
assert abs(row_sum - m_row / step.n_sequences) < 1e-5  # each of the row's sequences contributes N_i · 1/(M·N_i)
step_sum = sum(weights[i] * plan.n_target[i] for i in step.item_ids)
assert abs(step_sum - 1) < 1e-9
print(f"2. the row: {row_sum:.4f} = {m_row} sequences / M={step.n_sequences}; the whole step: {step_sum:.4f}")

# %%
metrics_file = write_metrics(out, {
    "smoke": SMOKE, "device": device, "model": MODEL, "records": len(rows), "tokens": sum(lengths),
    "loss_by_hand": by_hand, "loss_library": library, "loss_rel_diff": rel, "loss_no_isolation": leaky,
    "loss_leak_rel": leak, "iso_model": ISO_MODEL, "one_step_grad_rel_err": grad_err,
    "wall_s": times, "trained_tokens": tokens, "computed_tokens": computed, "forward_backward": fb,
    "tokens_per_s": {k: v["tokens_per_s"] for k, v in fb.items()},
    "padding_fraction": {k: v["padding_fraction"] for k, v in plans_info.items()},
    "final_loss": {k: v[-1]["loss"] for k, v in logs.items()}, "first_loss": {k: v[0]["loss"] for k, v in logs.items()},
    "steps": {k: len(v) for k, v in logs.items()},
    "learn": {"exact_before": int(sum(before["exact"])), "exact_after": int(sum(after["exact"])), "n_test": len(learn_test),
              "f1_before": float(np.mean(before["f1"])), "f1_after": float(np.mean(after["f1"])),
              "loss_first": lres["log"][0]["loss"], "loss_last": lres["log"][-1]["loss"], "steps": len(lres["log"])},
    "figures": [str(out / f) for f in ("block_mask.png", "packed_batch.png", "wall_time.png", "learn_loss.png")],
})
