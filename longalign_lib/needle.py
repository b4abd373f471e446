"""Needle in a haystack: plant one fact at a chosen depth of a long filler text, ask for it, map where recall fails.

Run as: longalign needle --preset cpu-demo [--set eval.needle_lengths=[512,1024]] [--needle-scorer judge]
Library:
    hay = Haystack(load_haystack(), tokenizer)            # default filler: the bundled KJV books (public domain)
    text, spans = hay.build(1024, [(0.5, NEEDLE)])        # 1024-token context, needle half-way in
    result = run_grid(generate_fn, tokenizer, [512, 1024], [0.0, 0.5, 1.0])
    fig = heatmap(result)

`Haystack` is also what benchmarks.py plants its verifiable facts with. The grid never truncates a context (that
could cut the needle out): lengths that do not fit the model's window are skipped and listed in needle.json.
"""
from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable
from pathlib import Path

from .io import LongAlignError, append_jsonl, read_jsonl

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Our own needle: a made-up fact that appears nowhere in the default haystack.
NEEDLE = "The secret ingredient in Grandmother Odile's plum cake is a spoonful of smoked cardamom."
QUESTION = "What is the secret ingredient in Grandmother Odile's plum cake?"
KEY_FACT = "smoked cardamom"
INSTRUCTION = "Answer the question using the text above. Reply in one short sentence."

_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+|\n\s*")


def load_haystack(directory: str | Path | None = None, pattern: str | None = None) -> str:
    """Concatenate the text files of `directory` (sorted by name); default: the bundled data/kjv_*.txt."""
    d = Path(directory) if directory else DATA_DIR
    pattern = pattern or ("kjv_*.txt" if directory is None else "*.txt")
    if not d.is_dir():
        raise LongAlignError(f"eval.needle_haystack_dir={str(d)!r}: not a directory; point it at a folder of .txt files")
    files = sorted(p for p in d.glob(pattern) if p.is_file())
    if not files:
        raise LongAlignError(f"{d}: no files match {pattern!r}; put some plain-text (.txt) files there")
    parts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 200:
        raise LongAlignError(f"{d}: only {len(text)} characters of text; a haystack needs at least a few pages")
    return text


class Haystack:
    """A long filler text, tokenized once, that contexts of an exact token budget are cut from.

    Cuts and insertions happen at sentence/line boundaries, so no word is split and the planted sentences read
    naturally. Shorter haystacks are repeated until they are long enough.
    """

    def __init__(self, text: str, tokenizer):
        self.tokenizer = tokenizer
        self._base = text.strip()
        self._set_text(self._base)

    def _set_text(self, text: str) -> None:
        self.text = text
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.starts = [a for a, _ in enc["offset_mapping"]]
        self.boundaries = [0] + [m.end() for m in _BOUNDARY.finditer(text)] + [len(text)]

    @property
    def n_tokens(self) -> int:
        return len(self.starts)

    def n(self, text: str) -> int:
        """Token count of `text` on its own (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _char_of_token(self, t: int) -> int:
        return self.starts[t] if t < len(self.starts) else len(self.text)

    def _snap(self, char: int) -> int:
        """The last boundary at or before `char`."""
        i = bisect.bisect_right(self.boundaries, char) - 1
        return self.boundaries[max(i, 0)]

    def build(self, n_tokens: int, insertions: list[tuple[float, str]] = (), start_token: int = 0,
              word_fallback: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """A context of about `n_tokens` tokens with each `(depth, sentence)` planted at that relative depth.

        Depth 0.0 puts the sentence first, 1.0 last; in between it goes at the sentence boundary nearest to that
        share of the filler's tokens, or, with `word_fallback`, the nearest word boundary when sentences are long
        for the context (exact depth for the needle grid; benchmarks keep whole sentences). Returns (text, [(start_char, end_char) of each planted sentence]).
        """
        if n_tokens <= 0:
            raise LongAlignError(f"context length must be positive, got {n_tokens}")
        for d, _ in insertions:
            if not 0.0 <= d <= 1.0:
                raise LongAlignError(f"needle depth {d} is outside [0, 1]; use fractions like 0.25")
        planted = sum(self.n(s) + 1 for _, s in insertions)
        budget = n_tokens - planted
        if budget < 8:
            raise LongAlignError(f"context length {n_tokens} leaves no room for filler around {planted} planted tokens")
        while self.n_tokens < start_token + budget + 1:
            self._set_text(self.text + "\n\n" + self._base)
        a = self._snap(self._char_of_token(start_token))
        a_tok = bisect.bisect_left(self.starts, a)
        b = self._snap(self._char_of_token(a_tok + budget))
        if b <= a:
            b = self._char_of_token(a_tok + budget)
        body = self.text[a:b].strip()
        # token offsets inside the body, to place depths by tokens (not characters)
        enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        bounds = [0] + [m.end() for m in _BOUNDARY.finditer(body)] + [len(body)]
        where = []
        for order, (d, sentence) in enumerate(insertions):
            if d <= 0.0:
                pos = 0
            elif d >= 1.0:
                pos = len(body)
            else:
                target = starts[min(int(round(d * len(starts))), len(starts) - 1)]
                i = bisect.bisect_right(bounds, target)
                pos = min(bounds[max(i - 1, 0)], bounds[min(i, len(bounds) - 1)], key=lambda b: abs(b - target))
                if word_fallback and abs(pos - target) > 0.04 * len(body):  # sentences too long for this context: a word boundary
                    words = [0] + [m.end() for m in re.finditer(r"\s+", body)]
                    j = bisect.bisect_right(words, target)
                    pos = min(words[max(j - 1, 0)], words[min(j, len(words) - 1)], key=lambda b: abs(b - target))
            where.append((pos, order, sentence))
        out, spans, cur = "", [None] * len(where), 0
        for pos, order, sentence in sorted(where):
            out += body[cur:pos]
            if out and not out[-1].isspace():
                out += " "
            spans[order] = (len(out), len(out) + len(sentence))
            out += sentence
            cur = pos
        rest = body[cur:]
        if rest and out and not rest[0].isspace() and not out[-1].isspace():
            out += " "
        return out + rest, spans


def token_depth(tokenizer, text: str, span: tuple[int, int]) -> float:
    """Where a planted sentence sits, in tokens: filler tokens before it / all filler tokens (0 = first, 1 = last)."""
    n = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    before, planted = n(text[: span[0]]), n(text[span[0]:span[1]])
    return min(1.0, before / max(n(text) - planted, 1))  # tokens merge at the seams: clamp the last place to 1


def needle_prompt(context: str, question: str = QUESTION, instruction: str = INSTRUCTION) -> list[dict]:
    """The chat messages the model sees: the long context, then the question (one user turn)."""
    return [{"role": "user", "content": f"{context}\n\n{question} {instruction}"}]


def contains_fact(prediction: str, key_fact: str) -> float:
    """1.0 when the answer contains the key fact (case, punctuation and spacing ignored), else 0.0."""
    norm = lambda s: " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())  # noqa: E731
    return 1.0 if norm(key_fact) and norm(key_fact) in norm(prediction) else 0.0


GenerateFn = Callable[[list[list[dict]]], list[str]]


def run_grid(generate_fn: GenerateFn, tokenizer, lengths: list[int], depths: list[float], *,
             haystack: str | None = None, needle: str = NEEDLE, question: str = QUESTION, key_fact: str = KEY_FACT,
             window: int | None = None, reserve: int = 64, scorer: Callable[[str, dict], float] | None = None,
             cells_file: str | Path | None = None, batch: int = 4, progress: bool = True,
             model_label: str | None = None) -> dict:
    """Run the lengths × depths grid; returns the needle.json dict.

    `generate_fn(list of message lists) -> list of replies` is any model: generate.make_generate_fn(model, tok),
    an llm.py client (generate.client_generate_fn), or a stub. `window`: the model's context size; lengths with
    length + `reserve` (template + answer tokens) over it are skipped, never truncated. `scorer(prediction, cell)`
    defaults to contains_fact(prediction, key_fact). `cells_file`: stream finished cells there and resume from it
    (cells of another needle or `model_label` are redone).
    """
    from tqdm.auto import tqdm

    if key_fact.lower() not in needle.lower():
        raise LongAlignError(f"the key fact {key_fact!r} does not occur in the needle {needle!r}; the score would "
                             "always be 0. Set eval.needle_key_fact to words of eval.needle_text")
    hay = Haystack(haystack if haystack is not None else load_haystack(), tokenizer)
    fits = [n for n in lengths if window is None or n + reserve <= window]
    skipped = [n for n in lengths if n not in fits]
    done = {}
    if cells_file and Path(cells_file).exists():
        for c in read_jsonl(cells_file, allow_partial_last_line=True):
            if c.get("needle") == needle and c.get("model") == model_label:
                done[(c["length"], c["depth"])] = c
    todo = []
    for n in fits:
        for d in depths:
            if (n, d) in done:
                continue
            text, [span] = hay.build(n, [(d, needle)])
            todo.append({"length": n, "depth": d, "context": text, "span": span})
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="needle grid", disable=not progress)
    chunks = [[c for c in todo if c["length"] == n][i:i + batch]  # one length per batch: no padding
              for n in fits for i in range(0, sum(c["length"] == n for c in todo), batch)]
    for chunk in chunks:
        replies = generate_fn([needle_prompt(c["context"], question) for c in chunk])
        for c, reply in zip(chunk, replies, strict=False):
            cell = {"length": c["length"], "depth": c["depth"], "needle": needle, "model": model_label,
                    "tokens": hay.n(c["context"]), "measured_depth": round(token_depth(tokenizer, c["context"], c["span"]), 4),
                    "prediction": reply}
            cell["score"] = float(scorer(reply, cell) if scorer else contains_fact(reply, key_fact))
            done[(c["length"], c["depth"])] = cell
            if cells_file:
                append_jsonl(cells_file, cell)
        bar.update(len(chunk))
    bar.close()
    cells = [done[(n, d)] for n in fits for d in depths]
    mean = sum(c["score"] for c in cells) / len(cells) if cells else None
    return {"needle": needle, "question": question, "key_fact": key_fact, "lengths": fits, "depths": list(depths),
            "skipped_lengths": skipped, "window": window, "cells": cells, "mean_score": mean,
            "seconds": round(time.time() - t0, 2)}


def score_matrix(result: dict) -> list[list[float]]:
    """Scores as rows = depths, columns = lengths (the heatmap's layout)."""
    by = {(c["length"], c["depth"]): c["score"] for c in result["cells"]}
    return [[by.get((n, d), float("nan")) for n in result["lengths"]] for d in result["depths"]]


def heatmap(result: dict, title: str | None = None):
    """The standard needle figure: context length (x) × needle depth (y), green = found, red = missed."""
    import numpy as np

    from . import plots

    m = np.array(score_matrix(result), dtype=float)
    fig, ax = plots.figure(figsize=(1.2 + 1.0 * max(len(result["lengths"]), 2), 1.0 + 0.55 * max(len(result["depths"]), 2)))
    ax.grid(False)
    im = ax.imshow(m, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [f"{n:,}" for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if 0.25 < m[i, j] < 0.85 else "white")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0% = start of context)")
    mean = result.get("mean_score")
    ax.set_title(title or f"Needle in a haystack — mean score {mean:.2f}" if mean is not None else "Needle in a haystack")
    fig.colorbar(im, ax=ax, label="score (1 = key fact recalled)", fraction=0.046, pad=0.04)
    return fig
