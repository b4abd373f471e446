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
# We (1) draw a packed batch, (2) compute the weighted loss by hand and with the library's chunked loss, and
# (3) train the same data with naive, sorted, packed and packed+weighting batches: wall time and loss curves.
#
# Library code: `longalign_lib.batching` (plans, weights, collators), `longalign_lib.attention` (isolation),
# `longalign_lib.loss` (weighted chunked cross-entropy), `longalign_lib.train` (LongAlignTrainer).
# With `SMOKE = True` (CI, 2 CPU cores) the model is a 2-layer random model with SmolLM2's tokenizer; the full
# mode trains the real SmolLM2-135M-Instruct (use a GPU).

# %% tags=["parameters"]
SMOKE = False  # True: a tiny random model and a few short records (CPU, < 90 s)
OUT_DIR = "../runs/notebooks/04_long_context_sft"
MODEL = "smollm2-135m-instruct"  # any causal LM (HF id, local path)
N_RECORDS = 200  # verse-lookup records built from the KJV texts in data/
MAX_CONTEXT_TOKENS = 16000  # longest passages
PACK_TOKENS = 16384  # packed row capacity (and the model's window, raised by RoPE base scaling when needed)
BATCH_SIZE = 8  # sequences per micro-batch for naive / sorted
GRAD_ACCUM = 2
LR = 5e-5
ROPE_BASE_FACTOR = 8.0  # SmolLM2 was trained to 8k; 16k rows need a larger RoPE base (the paper: ×200 for 64k)

# %%
from pathlib import Path

import torch

from longalign_lib import batching, plots, train
from longalign_lib.config import load_config
from longalign_lib.formatting import format_records
from longalign_lib.io import write_metrics
from longalign_lib.loss import reference_weighted_ce
from longalign_lib.models import load_tokenizer

out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
device = "cuda" if torch.cuda.is_available() else "cpu"
if SMOKE:
    MODEL = "random:" + str(train.tiny_model_dir(out / "tiny_model"))
    N_RECORDS, MAX_CONTEXT_TOKENS, PACK_TOKENS, BATCH_SIZE, GRAD_ACCUM, LR = 12, 240, 512, 4, 1, 1e-3
    ROPE_BASE_FACTOR = 1.0
print("model:", MODEL, "| device:", device)

# %% [markdown]
# ## 1. Data: a real long-context task
# Each record is a KJV passage (a few verses up to `MAX_CONTEXT_TOKENS`) and the instruction to quote one of its
# verses; the answer is that verse. Long and short records mix as in LongAlign-10k + ShareGPT. Records are
# formatted with the model's chat template: only the answer tokens are targets.

# %%
tok = load_tokenizer(MODEL)
records = train.verse_lookup_records(N_RECORDS, min_tokens=200, max_tokens=MAX_CONTEXT_TOKENS, seed=0)
examples, fstats = format_records(records, tok, max_length=PACK_TOKENS)
rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels), "length": e.length, "n_target": e.n_target}
        for e in examples]
lengths = [r["length"] for r in rows]
print(f"{len(rows)} records, {sum(lengths):,} tokens, lengths {min(lengths)}..{max(lengths)}, "
      f"target tokens {sum(r['n_target'] for r in rows):,}")
print(records[0]["messages"][0]["content"][-160:], "\n→", records[0]["messages"][1]["content"])

# %% [markdown]
# ## 2. One packed batch
# The stage-3 plan packs sequences into rows of at most `PACK_TOKENS`. The collator returns `position_ids` that
# restart at 0 for every document and `cu_seq_lens` (document boundaries): the attention backend
# (`attention.resolve_implementation`) uses them so that a document never attends to its neighbours. The loss
# weights come from `batching.step_token_weights` with the *sequence* reduction: each sequence's target tokens
# weigh 1/(M·N_i), M = sequences in the step, N_i = its target tokens.

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
fig = train.packed_batch_figure(packed)
plots.save(fig, out / "packed_batch.png")
fig

# %% [markdown]
# ## 3. The weighted loss, by hand and by the library
# By hand: run each sequence of the row **alone** through the model, take the mean cross-entropy of its answer
# tokens, multiply by its weight N_i·w_i = 1/M. Library: one forward pass over the packed row (isolated attention)
# and `loss.weighted_chunked_ce` on the final hidden states (only answer positions reach the LM head, in chunks).

# %%
from longalign_lib.models import load_model_and_tokenizer

model, _ = load_model_and_tokenizer(MODEL, dtype="fp32", device=device, attn_implementation="sdpa")  # isolated SDPA: fp32
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
print(f"by hand (one sequence at a time): {by_hand:.6f}")
print(f"library (packed, chunked):        {library:.6f}   relative difference {abs(library - by_hand) / by_hand:.1e}")
del model, wrapper

# %% [markdown]
# ## 4. Naive vs sorted vs packed vs packed+weighting, same data
# One epoch of the same records, four ways, through the same `LongAlignTrainer`:
# - **naive**: shuffled micro-batches of `BATCH_SIZE` sequences padded to the longest (pads cost compute);
# - **sorted**: sequences of similar length batched together (little padding; steps are all-long or all-short);
# - **packed**: rows of up to `PACK_TOKENS` tokens, loss = mean over each pack's tokens (the paper's biased L′);
# - **packed+weighting**: the same rows, each sequence weighted 1/(M·N_i) (the paper's fix).

# %%
strategies = {
    "naive": ["batching.strategy=naive", f"batching.batch_size={BATCH_SIZE}", "batching.loss_reduction=sequence"],
    "sorted": ["batching.strategy=sorted", f"batching.batch_size={BATCH_SIZE}", "batching.loss_reduction=sequence"],
    "packed": ["batching.strategy=packed", "batching.loss_reduction=pack_mean"],
    "packed+weighting": ["batching.strategy=packed", "batching.loss_reduction=sequence"],
}
common = [f"model.name={MODEL}", f"batching.max_pack_tokens={PACK_TOKENS}", f"batching.grad_accum={GRAD_ACCUM}",
          "train.epochs=1", "train.save_steps=0", f"train.lr={LR}", "train.warmup_ratio=0.1", "train.tensorboard=false",
          f"model.rope_base_factor={ROPE_BASE_FACTOR}", f"model.max_position_embeddings={max(PACK_TOKENS, 8192)}",
          "model.device=" + device]
logs, times, plans_info = {}, {}, {}
for name, sets in strategies.items():
    cfg_s = load_config("gpu-small" if not SMOKE else "cpu-demo", common + sets)
    res = train.train(cfg_s, out / "runs" / name.replace("+", "_"), dataset=rows, save_model=False)
    logs[name] = res["log"]
    times[name] = sum(r["step_s"] for r in res["log"])
    plans_info[name] = res["plans"][0]
    print(f"{name:17s} {len(res['log']):3d} steps  {times[name]:7.1f} s  padding {plans_info[name]['padding_fraction']:.2f}"
          f"  loss {res['log'][0]['loss']:.3f} → {res['log'][-1]['loss']:.3f}")
    del res
    if device == "cuda":
        torch.cuda.empty_cache()

# %%
fig = train.wall_time_figure(times, title=f"Training wall time, same {sum(lengths):,} tokens ({device})")
plots.save(fig, out / "wall_time.png")
fig

# %%
fig = train.loss_figure(logs, title="Loss vs training tokens (packed: pack-mean loss; others: sequence mean)",
                        x="tokens")
plots.save(fig, out / "loss_curves.png")
fig

# %% [markdown]
# Packing skips the padding that naive batching computes (its padding fraction is printed above), so it finishes
# the same data in a fraction of the time; sorting recovers most of that too but makes every step all-long or
# all-short. The un-weighted packed loss is a different (biased) quantity: it is plotted for completeness, and
# it is *not* comparable in value to the other three.

# %%
write_metrics(out, {
    "smoke": SMOKE, "device": device, "model": MODEL, "records": len(rows), "tokens": sum(lengths),
    "loss_by_hand": by_hand, "loss_library": library, "loss_rel_diff": abs(library - by_hand) / by_hand,
    "wall_s": times, "naive_over_packed": times["naive"] / times["packed+weighting"],
    "padding_fraction": {k: v["padding_fraction"] for k, v in plans_info.items()},
    "final_loss": {k: v[-1]["loss"] for k, v in logs.items()}, "first_loss": {k: v[0]["loss"] for k, v in logs.items()},
    "steps": {k: len(v) for k, v in logs.items()},
    "figures": [str(out / f) for f in ("packed_batch.png", "wall_time.png", "loss_curves.png")],
})
