"""Short chat data in the LongAlign-10k record format: ShareGPT import and Magpie-style generation.

Run as: longalign synth --preset cpu-demo   (synth.short_files are imported, synth.n_short Magpie records written
        to <run_dir>/short.jsonl next to the long ones)
Usage:
    from longalign_lib.short_data import import_sharegpt, magpie_records
    records, counts = import_sharegpt("sharegpt.json")   # counts: kept and each rejection reason
    stats = magpie_records(client, tokenizer, 100, cfg.synth, out, rejects)   # {kept, attempts, rejected, ...}

`import_sharegpt` converts ShareGPT-style JSON/JSONL (`conversations` with from/value) into the same format;
`magpie_records` writes an offline short mix the Magpie way: the aligned model receives only its chat template's
user prefix, writes a user question itself, then answers it. The answers pass the same filters as long ones
(synth_parts.check_answer); a reply cut at its token cap is never kept. Resumable like the long data.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from .formatting import RecordError, clean_messages
from .io import LongAlignError, append_jsonl, iter_jsonl, load_jsonl
from .llm import run_sync
from .reply import ContextTooLong
from .synth_parts import (
    check_answer,
    doc_seed,
    norm_question,
    start_streams,
    sum_usage,
    truncation_summary,
    uncut_reply,
)

ROLE_MAP = {"human": "user", "user": "user", "prompter": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
            "system": "system"}


def _sharegpt_rows(path: Path, bad: list | None = None):
    """(where, item) of a ShareGPT JSON array or JSONL file. JSONL is read with io.load_jsonl: a bad line is
    skipped and appended to `bad` ("file:line: reason"); a JSON array must parse as a whole."""
    raw = path.read_bytes()
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise LongAlignError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save "
                                 "the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise LongAlignError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
        for i, row in enumerate(data):
            yield f"item {i}", row
    else:
        f = load_jsonl(path)
        if bad is not None:
            bad += f.bad_lines()
        for line, row in f.rows:
            yield f"line {line}", row


def convert_sharegpt(row: dict) -> dict:
    """One ShareGPT item ({"conversations": [{"from", "value"}]}) or messages record → a LongAlign-10k record.

    Raises RecordError with a counter reason. Leading assistant turns are dropped; consecutive turns of the
    same role are merged.
    """
    if not isinstance(row, dict):
        raise RecordError("bad_schema", "expected a JSON object")
    conv = row.get("conversations", row.get("conversation"))
    if conv is None and "messages" in row:
        conv = [{"from": m.get("role"), "value": m.get("content")} for m in row["messages"] if isinstance(m, dict)]
    if not isinstance(conv, list) or not conv:
        raise RecordError("bad_schema", "field 'conversations' (or 'messages') missing or empty")
    msgs: list[dict] = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RecordError("bad_schema", f"conversations[{k}] is not an object")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        role = ROLE_MAP.get(who)
        if role is None:
            raise RecordError("bad_role", f"conversations[{k}].from={who!r}: expected human/gpt/system")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise RecordError("bad_schema", f"conversations[{k}].value must be a string")
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + value
        else:
            msgs.append({"role": role, "content": value})
    body = [m for m in msgs if m["role"] != "system"]
    while body and body[0]["role"] == "assistant":
        body.pop(0)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    record = {"messages": system + body}
    record["messages"], _ = clean_messages(record)
    return record


def import_sharegpt(path: str | Path, limit: int | None = None, bad: list | None = None) -> tuple[list[dict], Counter]:
    """ShareGPT-style JSON or JSONL → (records, counts of kept/rejected reasons). JSONL lines that are not UTF-8 or
    not JSON are skipped, counted as `bad_line` and appended to `bad` ("file:line: reason")."""
    path = Path(path)
    if not path.exists():
        raise LongAlignError(f"{path}: file not found (synth.short_files)")
    out, counts, skipped = [], Counter(), []
    for where, row in _sharegpt_rows(path, skipped):
        try:
            rec = convert_sharegpt(row)
        except RecordError as e:
            counts[e.reason] += 1
            continue
        rid = row.get("id") if isinstance(row, dict) else None
        rec["meta"] = {"id": f"sharegpt-{path.stem}-{rid if rid is not None else where.split()[-1]}", "kind": "short",
                       "source": f"sharegpt:{path.name}", "where": where}
        out.append(rec)
        counts["kept"] += 1
        if limit and len(out) >= limit:
            break
    if skipped:
        counts["bad_line"] += len(skipped)
        if bad is not None:
            bad += skipped
    return out, counts


def magpie_prefix(tokenizer) -> str:
    """The chat template's text up to where a user message starts (what Magpie feeds the aligned model)."""
    mark = "\u2063MAGPIE\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=False)
    if mark not in text:
        raise LongAlignError(f"chat template of {tokenizer.name_or_path!r} does not render the user message; "
                             "Magpie needs a standard chat template")
    return text[: text.index(mark)]


def magpie_records(client, tokenizer, n: int, scfg, out: Path, rejects: Path, resume: bool = False,
                   progress: bool = True) -> dict:
    """Generate `n` short (question, answer) records Magpie-style and append them to `out`.

    A question or answer cut at its cap (short_question_tokens, short_max_new_tokens) is rejected as `truncated`
    (after one regeneration with a larger cap when synth.retry_truncated_factor > 1). Returns {kept, attempts,
    rejected: {reason: n}, truncation: {rejected, retried, ...}}.
    """
    from tqdm.auto import tqdm

    done, used = start_streams(out, rejects, resume)
    prefix = magpie_prefix(tokenizer)
    stops = [s for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>") if s in tokenizer.get_vocab()]
    counts: Counter = Counter()
    cut: Counter = Counter()
    kept = sum(1 for _ in iter_jsonl(out, allow_partial_last_line=True)) if out.exists() else 0
    attempts = 0

    async def draw(rid: str):
        """One Magpie item's calls: (question, question replies, answer replies, reason or None, cut step or None);
        the last reply of each list is the one used (an earlier one was cut and regenerated with a larger cap)."""
        seed = doc_seed(rid, scfg.seed)
        question, qs, ans, step = "", [], [], None

        def ask(cap):
            return client.acomplete(prefix, max_new_tokens=cap, temperature=1.0, top_p=0.95, seed=seed, stop=stops)

        try:
            q, qs = await uncut_reply(ask, scfg.short_question_tokens, scfg)
            question = q.text.strip()
            reason = None
            if q.truncated:  # the question itself was cut mid-sentence
                reason, step = "truncated", "question"
            elif len(question) < 12:
                reason = "too_short_question"
            elif norm_question(question) in used:
                reason = "duplicate_question"
            if reason is None:
                def answer(cap):
                    return client.achat([{"role": "user", "content": question}], max_new_tokens=cap,
                                        temperature=scfg.answer_temperature, seed=seed)

                a, ans = await uncut_reply(answer, scfg.short_max_new_tokens, scfg)
                if a.truncated:  # cut at the cap: ends mid-sentence, never a training answer
                    reason, step = "truncated", "answer"
                else:
                    reason = check_answer(a.text, None, scfg)
        except ContextTooLong:
            reason = "too_long_for_model"
        return question, qs, ans, reason, step

    async def go():
        nonlocal kept, attempts
        async with client.session():
            bar = tqdm(total=n, initial=min(kept, n), desc="magpie", disable=not progress)
            k = 0
            while kept < n and attempts < n * 4:
                # a wave of items drawn concurrently (a batched local model decodes them together), then kept
                # in item order: the same records as drawing them one by one
                wave = []
                while len(wave) < max(1, min(client.concurrency, n - kept, n * 4 - attempts)):
                    rid = f"magpie-{scfg.seed}-{k}"
                    k += 1
                    if rid not in done:
                        wave.append(rid)
                results = await asyncio.gather(*(draw(rid) for rid in wave))
                for rid, (question, qs, ans, reason, step) in zip(wave, results, strict=True):
                    if kept >= n:
                        break
                    attempts += 1
                    cut["retried"] += max(0, len(qs) - 1) + max(0, len(ans) - 1)
                    if reason is None and norm_question(question) in used:
                        reason = "duplicate_question"  # an earlier item of the same wave asked it
                    if reason:
                        counts[reason] += 1
                        append_jsonl(rejects, {"id": rid, "reason": reason, "question": question[:300],
                                               **({"truncated_step": step, "answer": ans[-1].text[:300] if ans else ""}
                                                  if step else {})})
                        continue
                    q, a = qs[-1], ans[-1]
                    record = {"messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": a.text.strip()}],
                              "meta": {"id": rid, "kind": "short", "source": "magpie", "generator": "magpie",
                                       "model": a.model or client.model, "truncation_retries": len(qs) + len(ans) - 2,
                                       "finish_reason": {"question": q.finish_reason, "answer": a.finish_reason},
                                       "usage": {"question": sum_usage(qs), "answer": sum_usage(ans)}}}
                    try:
                        clean_messages(record)
                    except RecordError as e:
                        counts[e.reason] += 1
                        append_jsonl(rejects, {"id": rid, "reason": e.reason, "question": question[:300]})
                        continue
                    used.add(norm_question(question))
                    append_jsonl(out, record)
                    kept += 1
                    bar.update(1)
            bar.close()

    run_sync(go())
    return {"kept": kept, "attempts": attempts, "rejected": dict(counts),
            "truncation": truncation_summary(cut, counts, scfg)}
