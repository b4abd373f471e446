"""Needle in a haystack: plant one fact at a chosen depth of a long filler text, ask for it, map where recall fails.

Run as: longalign needle --preset cpu-demo [--set eval.needle_lengths=[512,1024]] [--needle-scorer judge]
Library:
    hay = Haystack(load_haystack(), tokenizer)            # default filler: the bundled KJV books (public domain)
    text, spans = hay.build(1024, [(0.5, NEEDLE)])        # 1024-token context, needle half-way in
    result = run_grid(generate_fn, tokenizer, [512, 1024], [0.0, 0.5, 1.0])
    fig = heatmap(result)

`Haystack` is also what benchmarks.py plants its verifiable facts with. The grid never truncates a context (that
could cut the needle out): lengths that do not fit the model's window are skipped and listed in needle.json.
Placement is by tokens: a needle asked at depth d has d × (filler tokens) before it to within DEPTH_TOLERANCE
(0.01), the context has the requested tokens to within LENGTH_TOLERANCE (0.5 %); snapping to a sentence boundary
is allowed only inside half that depth tolerance, else the needle goes in at the nearest word boundary. Every cell
of needle.json reports its `achieved_depth` and `achieved_length`.
"""
from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable
from pathlib import Path

from .io import LongAlignError, append_jsonl, data_dir, read_jsonl, write_jsonl
from .provenance import ReuseLog, digest, reuse_key

# Our own needle: a made-up fact that appears nowhere in the default haystack.
NEEDLE = "The secret ingredient in Grandmother Odile's plum cake is a spoonful of smoked cardamom."
QUESTION = "What is the secret ingredient in Grandmother Odile's plum cake?"
KEY_FACT = "smoked cardamom"
INSTRUCTION = "Answer the question using the text above. Reply in one short sentence."

DEPTH_TOLERANCE = 0.01  # |achieved − requested| token depth of a needle-grid cell (Haystack.build, tested)
LENGTH_TOLERANCE = 0.005  # |achieved − requested| context tokens, as a share of the request (tested)
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+|\n\s*")


def load_haystack(directory: str | Path | None = None, pattern: str | None = None) -> str:
    """Concatenate the text files of `directory` (sorted by name); default: the bundled data/kjv_*.txt."""
    d = Path(directory) if directory else data_dir()
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
        self.word_ends = [m.start() for m in re.finditer(r"\s+", text)] + [len(text)]

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

    def _word_end(self, char: int) -> int:
        """The end of the last whole word at or before `char` (the start of the whitespace after it)."""
        i = bisect.bisect_right(self.word_ends, char) - 1
        return self.word_ends[i] if i >= 0 else char

    def build(self, n_tokens: int, insertions: list[tuple[float, str]] = (), start_token: int = 0,
              word_fallback: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """A context of `n_tokens` tokens with each `(depth, sentence)` planted at that token depth.

        Depth 0.0 puts the sentence first, 1.0 last; in between it goes where that share of the filler's tokens lies
        before it: at a sentence boundary when one is within half of DEPTH_TOLERANCE of that token, else (with
        `word_fallback`, the needle grid) at the nearest word boundary — the achieved token depth is within
        DEPTH_TOLERANCE of the request and the context within LENGTH_TOLERANCE of `n_tokens` (tested). Without
        `word_fallback` (benchmarks: whole sentences only) the nearest sentence boundary, wherever it is.
        Returns (text, [(start_char, end_char) of each planted sentence]).
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
        while self.n_tokens < start_token + budget + budget // 8 + 64:  # room to lengthen the body while fitting
            self._set_text(self.text + "\n\n" + self._base)
        a = self._snap(self._char_of_token(start_token))
        a_tok = bisect.bisect_left(self.starts, a)
        end_tok = a_tok + budget
        best = None
        for _ in range(6):  # end the body on a whole word; move the end by the miss (tokens merge at the seams)
            b = self._word_end(self._char_of_token(end_tok))
            if b <= a:
                b = self._char_of_token(end_tok)
            text, spans = self._plant(self.text[a:b].strip(), insertions, word_fallback)
            got = self.n(text)
            if best is None or abs(got - n_tokens) < abs(best[0] - n_tokens):
                best = (got, text, spans)
            if got == n_tokens:
                break
            end_tok += n_tokens - got
        return best[1], best[2]

    def _plant(self, body: str, insertions, word_fallback: bool) -> tuple[str, list[tuple[int, int]]]:
        """Insert each (depth, sentence) into `body` at that share of its tokens (see build)."""
        enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        n = len(starts)
        tok_at = lambda c: bisect.bisect_left(starts, c)  # noqa: E731  (tokens of body before char c)
        bounds = [0] + [m.end() for m in _BOUNDARY.finditer(body)] + [len(body)]
        words = [0] + [m.start() for m in re.finditer(r"\s+", body)] + [len(body)]
        where = []
        for order, (d, sentence) in enumerate(insertions):
            if d <= 0.0:
                pos = 0
            elif d >= 1.0:
                pos = len(body)
            else:
                t = d * n  # the token the sentence should precede
                i = bisect.bisect_right(bounds, starts[min(int(round(t)), n - 1)])
                pos = min(bounds[max(i - 1, 0)], bounds[min(i, len(bounds) - 1)], key=lambda c: abs(tok_at(c) - t))
                if word_fallback and abs(tok_at(pos) - t) > 0.5 * DEPTH_TOLERANCE * n:
                    j = bisect.bisect_right(words, starts[min(int(round(t)), n - 1)])
                    pos = min(words[max(j - 2, 0):j + 2], key=lambda c: abs(tok_at(c) - t))
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
    """Where a planted sentence sits in `text` as the model reads it: the tokens of `text` that end at or before the
    sentence / all tokens outside it (a token that straddles its edge counts as the sentence's). 0 = first, 1 = last.
    """
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    a, b = span
    before = sum(1 for _, e in offsets if e <= a)
    after = sum(1 for s, _ in offsets if s >= b)
    return before / max(before + after, 1)


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
             model_label: str | None = None, reuse: dict | None = None) -> dict:
    """Run the lengths × depths grid; returns the needle.json dict. Each cell reports the `achieved_depth` (token
    depth of the needle, needle.token_depth) and `achieved_length` (context tokens) next to the requested ones;
    `max_depth_error` / `max_length_error` sum them up against DEPTH_TOLERANCE / LENGTH_TOLERANCE.

    `generate_fn(list of message lists) -> list of replies` is any model: generate.make_generate_fn(model, tok),
    an llm.py client (generate.client_generate_fn), or a stub. `window`: the model's context size; lengths with
    length + `reserve` (template + answer tokens) over it are skipped, never truncated. `scorer(prediction, cell)`
    defaults to contains_fact(prediction, key_fact). `cells_file`: stream finished cells there and resume from it.
    Each cell carries its reuse key (provenance.reuse_key): the needle, question, key fact and haystack text, plus
    `reuse` (what the caller knows produced it: the model's weights fingerprint, generation settings, scorer;
    default {"model": model_label}). A cell is reused only when its key is unchanged; the result counts
    `reused` / `recomputed` cells and why (`recompute_why`), and stale cells are dropped from `cells_file`.
    """
    from tqdm.auto import tqdm

    if key_fact.lower() not in needle.lower():
        raise LongAlignError(f"the key fact {key_fact!r} does not occur in the needle {needle!r}; the score would "
                             "always be 0. Set eval.needle_key_fact to words of eval.needle_text")
    haystack_text = haystack if haystack is not None else load_haystack()
    hay = Haystack(haystack_text, tokenizer)
    fits = [n for n in lengths if window is None or n + reserve <= window]
    skipped = [n for n in lengths if n not in fits]
    key = reuse_key(needle={"needle": needle, "question": question, "key_fact": key_fact,
                            "haystack": digest(haystack_text)},
                    run=reuse if reuse is not None else {"model": model_label})
    log = ReuseLog()
    done = {}
    if cells_file and Path(cells_file).exists():
        old = read_jsonl(cells_file, allow_partial_last_line=True)
        grid = {(n, d) for n in fits for d in depths}
        for c in old:
            at = (c.get("length"), c.get("depth"))
            if at in grid and at not in done and log.check(c.get("reuse"), key):
                done[(c["length"], c["depth"])] = c
        keep = [c for c in old if (c.get("reuse") or {}).get("key") == key["key"]]
        if len(keep) < len(old):  # cells of another model, needle or settings: out of the file
            write_jsonl(cells_file, keep)
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
            cell = {"length": c["length"], "depth": c["depth"], "needle": needle, "model": model_label, "reuse": key,
                    "achieved_length": hay.n(c["context"]),
                    "achieved_depth": round(token_depth(tokenizer, c["context"], c["span"]), 4), "prediction": reply}
            cell["score"] = float(scorer(reply, cell) if scorer else contains_fact(reply, key_fact))
            done[(c["length"], c["depth"])] = cell
            if cells_file:
                append_jsonl(cells_file, cell)
        bar.update(len(chunk))
    bar.close()
    cells = [done[(n, d)] for n in fits for d in depths]
    mean = sum(c["score"] for c in cells) / len(cells) if cells else None
    placed = [c for c in cells if "achieved_depth" in c]  # (cells resumed from an older file may lack them)
    return {"needle": needle, "question": question, "key_fact": key_fact, "lengths": fits, "depths": list(depths),
            "skipped_lengths": skipped, "window": window, "cells": cells, "mean_score": mean,
            "depth_tolerance": DEPTH_TOLERANCE, "length_tolerance": LENGTH_TOLERANCE,
            "max_depth_error": max((abs(c["achieved_depth"] - c["depth"]) for c in placed), default=None),
            "max_length_error": max((abs(c["achieved_length"] - c["length"]) / c["length"] for c in placed),
                                    default=None),
            "seconds": round(time.time() - t0, 2), "reused": log.reused, "recomputed": log.recomputed,
            "recompute_why": dict(log.why)}


def score_matrix(result: dict) -> list[list[float]]:
    """Scores as rows = depths, columns = lengths (the heatmap's layout)."""
    by = {(c["length"], c["depth"]): c["score"] for c in result["cells"]}
    return [[by.get((n, d), float("nan")) for n in result["lengths"]] for d in result["depths"]]


def heatmap(result: dict, title: str | None = None):
    """The standard needle figure: context length (x) × needle depth (y), green = found, red = missed."""
    import numpy as np

    from . import plots  # matplotlib: imported only when a figure is drawn

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


def heatmap_panels(panels: dict, lengths, depths, title: str | None = None, cell_label: str = "score"):
    """Several needle grids side by side (e.g. before and after training): `panels` maps a panel title to a
    depths × lengths matrix of mean scores (NaN: not run). Every panel has both axis labels; one colour bar
    for all; the value of each cell is printed large enough to read, in a colour that stands out on its cell.

    >>> import numpy as np
    >>> fig = heatmap_panels({"before": np.array([[1.0, np.nan]]), "after": np.array([[0.5, 0.0]])}, [2048, 4096], [0.5])
    >>> [ax.get_xlabel() for ax in fig.axes[:2]], fig.axes[-1].get_ylabel()
    (['context length (tokens)', 'context length (tokens)'], 'score (1 = found, 0 = missed)')
    """
    import numpy as np

    from . import plots  # matplotlib: imported only when a figure is drawn

    names = list(panels)
    fig, axes = plots.figure(1, len(names), figsize=(1.2 + 2.9 * len(names), 3.6), squeeze=False, sharey=True)
    im = None
    for ax, name in zip(axes[0], names, strict=True):
        m = np.asarray(panels[name], dtype=float)
        im = ax.imshow(m, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}k" if n >= 1024 else str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(False)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m[i, j]
                ax.text(j, i, "not run" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=6.5 if np.isnan(v) else 8.5, color="#555555" if np.isnan(v) else
                        ("black" if 0.25 < v < 0.85 else "white"))
    axes[0, 0].set_ylabel("needle depth (0% = start)", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), label=f"{cell_label} (1 = found, 0 = missed)", fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

