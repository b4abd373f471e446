"""Toy training data and models for demos, tests and benchmarks: a checkable long-context task and a tiny model.

Usage:
    from longalign_lib.toy_data import verse_lookup_records, tiny_model_dir
    records = verse_lookup_records(100, min_tokens=200, max_tokens=4000)   # LongAlign-format records (KJV verses)
    model = "random:" + str(tiny_model_dir("runs/tiny_model"))              # 2-layer random model, trains on CPU
tests/conftest.py builds its fixtures with these; notebook 04 and bench/ train on them.

>>> recs = verse_lookup_records(3, min_tokens=60, max_tokens=200, seed=1)
>>> [m["role"] for m in recs[0]["messages"]], recs[0]["meta"]["task"]
(['user', 'assistant'], 'verse_lookup')
>>> all(r["messages"][1]["content"] in r["messages"][0]["content"] for r in recs)   # the answer is in the context
True
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

from .io import data_dir
from .models import load_tokenizer, resolve


def verse_lookup_records(n: int, min_tokens: int = 200, max_tokens: int = 4000, long_fraction: float = 0.5,
                         seed: int = 0, books: tuple[str, ...] = ("kjv_genesis.txt", "kjv_ruth.txt", "kjv_esther.txt")):
    """LongAlign-format records with a real, checkable long-context task: quote one verse of a KJV passage.

    Each record: user = a run of consecutive verses ("c:v text" lines) + "Quote verse c:v exactly.";
    assistant = that verse's text. Context sizes are drawn log-uniformly between `min_tokens` and `max_tokens`
    (≈4 characters per token) for the long share, and 1–6 verses for the short share: a LongAlign-like mix of
    long and short sequences for training demos and benchmarks (public-domain text shipped in data/).
    """
    data = data_dir()
    verses = []
    for b in books:
        for line in (data / b).read_text(encoding="utf-8").splitlines():
            m = re.match(r"^(\d+:\d+) (.+)$", line.strip())
            if m:
                verses.append((b.removeprefix("kjv_").removesuffix(".txt").title(), m.group(1), m.group(2)))
    rng = random.Random(seed)
    out = []
    for _i in range(n):
        if rng.random() < long_fraction:
            chars = int(4 * math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        else:
            chars = sum(len(v[2]) + 8 for v in verses[:rng.randint(1, 6)])
        start = rng.randrange(len(verses))
        window, used = [], 0
        j = start
        while used < chars and j < len(verses) and (not window or verses[j][0] == window[0][0]):
            window.append(verses[j])
            used += len(verses[j][2]) + 8
            j += 1
        book, ref, text = window[rng.randrange(len(window))]
        context = "\n".join(f"{r} {t}" for _, r, t in window)
        out.append({"messages": [
            {"role": "user", "content": f"Here is a passage of the Book of {book} (KJV).\n\n{context}\n\n"
                                        f"Quote verse {ref} exactly."},
            {"role": "assistant", "content": text}], "meta": {"task": "verse_lookup", "ref": f"{book} {ref}",
                                                                "verses": len(window)}})
    return out


def tiny_model_dir(out_dir: str | Path, base: str = "smollm2-135m-instruct", hidden: int = 64, layers: int = 2,
                   heads: int = 4, kv_heads: int = 2) -> Path:
    """A folder with a small random-init config of `base`'s architecture and `base`'s real tokenizer.

    Load it as `random:<folder>`: tests and SMOKE notebooks train it in seconds on CPU.
    """
    from transformers import AutoConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(base)
    cfg = AutoConfig.from_pretrained(resolve(base))
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    cfg.intermediate_size = hidden * 2
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = hidden // heads
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out
