"""Chat-template tokenisation: LongAlign-10k `messages` records → `input_ids` + `labels` (assistant tokens only).

Usage:
    from longalign_lib.formatting import format_record, format_file
    ex = format_record(record, tokenizer, max_length=8192, truncation="middle")
    ex.input_ids, ex.labels            # labels == -100 outside every assistant turn
    examples, stats = format_file("data/sample_longalign.jsonl", tokenizer)
Run as: python -m longalign_lib.formatting FILE.jsonl [--model smollm2-135m-instruct] [--max-length N]

How labels are found: the tokenizer's own chat template renders the conversation; for each assistant turn the
template is rendered again up to that turn with the generation prompt (where the answer starts) and through it
(where it ends). Those character offsets, mapped through the tokenizer's offset mapping, give the assistant
spans. Each span covers the answer and the template's end-of-turn marker (e.g. `<|im_end|>`, `<|eot_id|>`,
`</s>`), but not the whitespace after it: the model learns to stop exactly as the template defines.
"""
from __future__ import annotations

import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from .io import LongAlignError, load_jsonl

IGNORE = -100
ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that cannot be trained on; `reason` is a short counter key (e.g. 'empty_answer')."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        """Target tokens as the loss sees them (see count_targets)."""
        return count_targets(self.labels)

    def row(self) -> dict:
        """The training row `train.train(..., dataset=[...])` takes: stage 2's columns, in memory."""
        return {"input_ids": list(self.input_ids), "labels": list(self.labels), "length": self.length,
                "n_target": self.n_target}


def count_targets(labels) -> int:
    """Target tokens of one sequence as the loss sees them: labels != -100 at positions 1.. — the one place where
    targets are counted (dataset `n_target`, Example.n_target, batch plans, loss weights). Position 0 is never a
    target: nothing precedes it, so no logit predicts it (the collators mask it too).

    >>> count_targets([7, -100, 8, 9])
    2
    """
    lab = np.asarray(labels)
    return int((lab[1:] != IGNORE).sum()) if lab.size else 0


@dataclass
class FormatStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped_trailing_user: int = 0
    errors: list = field(default_factory=list)  # "file:line: reason" for the first rejected records
    bad_lines: list = field(default_factory=list)  # "file:line: reason" for every line that was not JSON/UTF-8

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated,
                "dropped_trailing_user": self.dropped_trailing_user, "rejected": dict(self.rejected),
                "errors": list(self.errors), "bad_lines": list(self.bad_lines)}

    def merge(self, other: FormatStats) -> None:
        self.total += other.total
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped_trailing_user += other.dropped_trailing_user
        self.rejected.update(other.rejected)
        self.errors.extend(other.errors[: max(0, 20 - len(self.errors))])
        self.bad_lines.extend(other.bad_lines)


def clean_messages(record: dict) -> tuple[list[dict], bool]:
    """Validate and normalise a record's messages. Returns (messages, dropped_trailing_user).

    Rules: `messages` is a non-empty list; roles alternate user/assistant after an optional leading system
    message; content is a string; a trailing user turn with no answer is dropped; an empty or None assistant
    answer rejects the record; zero-width characters are stripped from answers (as LongAlign does).
    """
    msgs = record.get("messages") if isinstance(record, dict) else None
    if msgs is None and isinstance(record, dict) and "conversations" in record:
        raise RecordError("bad_schema", "field 'messages' missing (ShareGPT 'conversations' found: convert it with "
                                        "short_data.import_sharegpt)")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("bad_schema", "field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise RecordError("bad_schema", f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise RecordError("bad_role", f"messages[{i}].role={role!r}: must be one of {', '.join(ROLES)}")
        if role == "assistant":
            if content is None or not isinstance(content, str) or not ZERO_WIDTH.sub("", content).strip():
                raise RecordError("empty_answer", f"messages[{i}].content: assistant answer is empty or null")
            content = ZERO_WIDTH.sub("", content)
        elif not isinstance(content, str):
            raise RecordError("bad_schema", f"messages[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for j, m in enumerate(out[start:]):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError("bad_order", f"messages[{start + j}].role={m['role']!r}: expected {want!r} "
                                           "(roles alternate user/assistant after an optional system message)")
    dropped = False
    if out[-1]["role"] == "user":
        out = out[:-1]
        dropped = True
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no_answer", "the record has no assistant answer to train on")
    return out, dropped


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the chat template; return (text, [(start, end) char span of each assistant turn])."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LongAlignError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one "
                             "(tokenizer.chat_template = '...') or use an instruct model")
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(through):
            raise LongAlignError(
                f"the chat template of {tokenizer.name_or_path!r} renders earlier turns differently once later "
                "turns exist, so assistant spans cannot be located; use a template without history rewriting"
            )
        start, end = len(before), len(through)
        while end > start and text[end - 1].isspace():  # whitespace after the end-of-turn marker
            end -= 1
        spans.append((start, end))
    return text, spans


def labels_from_offsets(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Token t is a target iff its first character lies inside an assistant span (and it covers any text)."""
    if not ids:
        return []
    off = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(ids))
    a, b = off[0::2], off[1::2]
    inside = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        inside |= (a >= s) & (a < e)
    inside &= b > a
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def encode_batch(tokenizer, texts: list[str]) -> list[tuple[list[int], list]]:
    """[(input_ids, offsets)] for many texts, without special tokens, in one call.

    For a fast tokenizer this goes straight to the Rust `encode_batch` (same ids as `tokenizer(text)`, less
    Python overhead per text); otherwise, or when the backend has padding/truncation switched on, through
    `tokenizer(...)`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if texts and backend is not None and backend.padding is None and backend.truncation is None \
            and _backend_agrees(tokenizer, backend, texts[0]):
        return [(e.ids, e.offsets) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


_AGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend_agrees(tokenizer, backend, text: str) -> bool:
    """Once per tokenizer: does the Rust backend give the same ids/offsets as `tokenizer(...)`? (A subclass may
    pre-process text in Python; then the batch shortcut is not taken.)"""
    try:
        return _AGREES[tokenizer]
    except (KeyError, TypeError):
        pass
    ref = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    e = backend.encode(text, add_special_tokens=False)
    ok = list(e.ids) == list(ref["input_ids"]) and [tuple(o) for o in e.offsets] == \
        [tuple(o) for o in ref["offset_mapping"]]
    try:
        _AGREES[tokenizer] = ok
    except TypeError:
        pass
    return ok


def tokenize_with_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    return ids, labels_from_offsets(ids, offsets, spans)


def _truncate(ids: list[int], labels: list[int], max_length: int, mode: str) -> tuple[list[int], list[int]]:
    excess = len(ids) - max_length
    if mode == "right":
        return ids[:max_length], labels[:max_length]
    # middle: cut the middle of the longest prompt (non-target) run, keeping its head and tail
    best, run_start = (0, 0), None
    for i, y in enumerate(labels + [0]):
        if y == IGNORE and run_start is None:
            run_start = i
        elif y != IGNORE and run_start is not None:
            if i - run_start > best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    a, b = best
    if b - a <= excess + 16:  # not enough prompt to cut from: fall back to right truncation
        return ids[:max_length], labels[:max_length]
    keep = (b - a) - excess
    head = keep // 2
    cut_from, cut_to = a + head, a + head + excess
    return ids[:cut_from] + ids[cut_to:], labels[:cut_from] + labels[cut_to:]


def format_record(record: dict, tokenizer, max_length: int | None = None, truncation: str = "middle") -> Example:
    """One record → Example; raises RecordError (with a counter reason) when the record must be rejected."""
    if truncation not in ("middle", "right", "skip"):
        raise LongAlignError(f"data.truncation={truncation!r}: choose middle, right or skip")
    messages, dropped = clean_messages(record)
    ids, labels = tokenize_with_labels(tokenizer, messages)
    return _finish(record, ids, labels, dropped, max_length, truncation)


def _finish(record: dict, ids: list[int], labels: list[int], dropped: bool, max_length, truncation) -> Example:
    truncated = False
    if max_length and len(ids) > max_length:
        if truncation == "skip":
            raise RecordError("too_long", f"{len(ids)} tokens > data.max_length={max_length} (truncation=skip)")
        ids, labels = _truncate(ids, labels, max_length, truncation)
        truncated = True
        if all(y == IGNORE for y in labels):
            raise RecordError("no_target_after_truncation", "truncation removed every answer token")
    meta = dict(record.get("meta") or {})
    meta["dropped_trailing_user"] = dropped
    return Example(ids, labels, truncated, meta)


def format_batch(records: list, tokenizer, max_length: int | None = None, truncation: str = "middle") -> list:
    """Same as `[format_record(r, ...) for r in records]`, except that a rejected record gives its RecordError in
    its place (nothing is raised for it) and the texts go through the tokenizer in one batched call (faster)."""
    if truncation not in ("middle", "right", "skip"):
        raise LongAlignError(f"data.truncation={truncation!r}: choose middle, right or skip")
    out: list = [None] * len(records)
    todo = []
    for k, rec in enumerate(records):
        try:
            messages, dropped = clean_messages(rec)
        except RecordError as e:
            out[k] = e
            continue
        text, spans = assistant_char_spans(tokenizer, messages)
        todo.append((k, spans, dropped, text))
    encoded = encode_batch(tokenizer, [t[3] for t in todo]) if todo else []
    for (k, spans, dropped, _), (ids, offsets) in zip(todo, encoded, strict=True):
        try:
            out[k] = _finish(records[k], ids, labels_from_offsets(ids, offsets, spans), dropped, max_length,
                             truncation)
        except RecordError as e:
            out[k] = e
    return out


def _format_numbered(numbered, tokenizer, max_length, truncation, where: str, strict: bool = False):
    """Format (line, record) pairs; rejections are counted by reason with `where:line` for the first 20."""
    stats, examples = FormatStats(), []
    for line, rec in numbered:
        stats.total += 1
        try:
            ex = format_record(rec, tokenizer, max_length, truncation)
        except RecordError as e:
            if strict:
                raise LongAlignError(f"{where}:{line}: {e}") from None
            stats.rejected[e.reason] += 1
            if len(stats.errors) < 20:
                stats.errors.append(f"{where}:{line}: {e}")
            continue
        stats.kept += 1
        stats.truncated += ex.truncated
        stats.dropped_trailing_user += ex.meta["dropped_trailing_user"]
        ex.meta.setdefault("line", line)
        examples.append(ex)
    return examples, stats


def format_records(records, tokenizer, max_length=None, truncation="middle", source: str = "<records>",
                   first_line: int = 1):
    """Format many records; returns (examples, FormatStats). Rejections are counted by reason, never trained on."""
    return _format_numbered(enumerate(records, start=first_line), tokenizer, max_length, truncation, source)


def format_file(path: str | Path, tokenizer, max_length=None, truncation="middle", strict: bool = False):
    """Format a LongAlign-10k-format JSONL file. With `strict`, the first bad record or line raises file:line:
    reason; otherwise lines that are not UTF-8/JSON are skipped and listed in stats.bad_lines (io.load_jsonl)."""
    f = load_jsonl(path)
    if strict and f.bad:
        raise LongAlignError(str(f.bad[0]))
    examples, stats = _format_numbered(f.rows, tokenizer, max_length, truncation, str(path), strict)
    stats.bad_lines = f.bad_lines()
    return examples, stats


def label_segments(tokenizer, ex: Example) -> list[tuple[str, bool]]:
    """[(decoded text, is_target)] runs — for showing the label mask (notebook 00, plots.label_mask_figure)."""
    runs: list[tuple[list[int], bool]] = []
    for tid, y in zip(ex.input_ids, ex.labels, strict=True):
        tgt = y != IGNORE
        if runs and runs[-1][1] == tgt:
            runs[-1][0].append(tid)
        else:
            runs.append(([tid], tgt))
    return [(tokenizer.decode(ids), tgt) for ids, tgt in runs]


if __name__ == "__main__":
    import argparse
    import json
    import sys

    from .models import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--truncation", default="middle")
    a = ap.parse_args()
    try:
        load_jsonl(a.file)  # a missing or unreadable file fails here, before the tokenizer is loaded
        exs, st = format_file(a.file, load_tokenizer(a.model), a.max_length, a.truncation)
    except LongAlignError as e:
        raise SystemExit(f"python -m longalign_lib.formatting: error: {e}") from None
    for bad in st.bad_lines:
        print(f"skipped {bad}", file=sys.stderr)
    print(json.dumps({**st.to_dict(), "lengths": [e.length for e in exs], "n_target": [e.n_target for e in exs]}))
