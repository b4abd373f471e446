"""Self-Instruct long-document tasks and short chat data in the LongAlign-10k record format.

Run as: longalign synth --preset cpu-demo [--dry-run] [--resume]   (reads <run_dir>/corpus.jsonl,
        writes <run_dir>/long.jsonl, short.jsonl, synth_rejects.jsonl, synth.json)
Usage:
    from longalign_lib.synth import synth_document, synth_long
    trace = synth_document(client, doc, task_type="summary")    # every step: prompt, raw output, questions, answer
    trace.record                                                # {"messages": [...], "meta": {...}} or None
    trace.reason                                                # why it was rejected (counted in synth.json)

Long data (the paper's Self-Instruct, §3.1): per document, one of four task types (general, summary, multi-hop
reasoning, information extraction), balanced over the corpus; the model writes five questions as a numbered
list (prompts/questions_<lang>_<task>.txt, English or Chinese following the document), the parser extracts
them from whatever the model actually wrote, one is picked, and the model answers it with the document in
front of it (prompts/answer_<lang>.txt). The training record is user = document + question,
assistant = answer. Filters count why a document yields no record: no_questions, duplicate_question,
empty_answer, refusal, too_short, repetitive, off_document (the answer shares too little with the document),
too_long_for_model, truncated.

Truncated replies: a reply cut at its token cap (Reply.truncated, finish_reason "length") is never trained on.
An answer (long or Magpie) or a Magpie question cut by the cap is rejected with reason `truncated`; with
`synth.retry_truncated_factor` > 1 it is first regenerated once with the cap multiplied by that factor (counted in
synth.json under `truncation.retried`). A cut question list keeps only its complete lines (the item on the cut
line is dropped; counted as `truncation.question_lists_cut`); nothing left is `truncated`.

Short data (ShareGPT import, Magpie generation) is in short_data.py, the dry-run plan and cost levers in
synth_cost.py, the prompts, parser and filters shared by all three in synth_parts.py.
Resumable: records are appended one by one; --resume skips documents already written or rejected. The LLM
request cache makes a rerun free.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import SynthConfig
from .corpus import Document, detect_lang
from .formatting import RecordError, clean_messages
from .io import append_jsonl
from .llm import Deferred, run_sync
from .llm_batch import run_batched
from .reply import ContextTooLong

# Moved out of this module (one job per file); re-exported here because notebooks and tests import them from synth.
from .short_data import convert_sharegpt, import_sharegpt, magpie_prefix, magpie_records  # noqa: F401
from .synth_cost import LEVERS, cost_figure, cost_table, dry_run, lever_table, mean_target_length  # noqa: F401
from .synth_parts import (  # noqa: F401  (also re-exported: notebook 01 and the tests import these from synth)
    LANGS,
    STOP,
    TASK_TYPES,
    answer_messages,
    check_answer,
    complete_lines,
    content_units,
    doc_seed,
    done_ids,
    grounding,
    norm_question,
    parse_questions,
    pick_question,
    question_messages,
    retry_cap,
    start_streams,
    sum_usage,
    task_for,
    training_user_turn,
    truncation_summary,
    uncut_reply,
)


# ----------------------------------------------------------------------------------------------------------------
# one document, end to end
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """Every step of one document's synthesis (what notebook 01 shows)."""

    doc_id: str
    task_type: str
    lang: str
    question_prompt: list[dict]
    raw_questions: str = ""
    questions: list[str] = field(default_factory=list)
    question: str | None = None
    answer_prompt: list[dict] | None = None
    answer: str = ""
    record: dict | None = None
    reason: str | None = None
    usage: dict = field(default_factory=dict)
    cost_usd: float = 0.0
    cached: bool = True
    attempts: int = 0  # question-list samples drawn (synth.question_attempts caps it)
    retries: int = 0  # replies regenerated with a larger cap because the first was cut (retry_truncated_factor)
    questions_cut: bool = False  # the question list used was cut by its cap (only its complete lines were parsed)
    truncated_step: str | None = None  # "questions" or "answer" when reason == "truncated"


async def asynth_document(client, doc: Document, task_type: str, scfg, used: set[str] | None = None,
                          answer_client=None) -> Trace:
    """Self-Instruct one document (coroutine). The result's `record` is None when a filter rejected it."""
    lang = doc.lang if doc.lang in LANGS else detect_lang(doc.text)
    seed = doc_seed(doc.id, scfg.seed)
    answer_client = answer_client or client
    cache = use_cache_marker(scfg)
    tr = Trace(doc.id, task_type, lang, question_messages(doc.text, task_type, lang, scfg.n_questions, cache))
    q_cap = scfg.question_max_new_tokens or scfg.max_new_tokens
    for attempt in range(max(1, scfg.question_attempts)):  # a fresh sample when no question could be parsed
        def ask(cap, s=seed + attempt):
            return client.achat(tr.question_prompt, seed=s, max_new_tokens=cap, temperature=scfg.temperature)

        try:
            r, sent = await uncut_reply(ask, q_cap, scfg)
        except ContextTooLong:
            tr.reason = "too_long_for_model"
            return tr
        u = tr.usage.setdefault("questions", {"input_tokens": 0, "output_tokens": 0})
        for k, v in sum_usage(sent).items():
            u[k] = u.get(k, 0) + v
        tr.retries += len(sent) - 1
        tr.raw_questions = r.text
        tr.attempts = attempt + 1
        tr.cost_usd += sum(x.cost_usd for x in sent)
        tr.cached &= all(x.cached for x in sent)
        tr.questions_cut = r.truncated  # the item on the cut line may be half a question: parse whole lines only
        tr.questions = parse_questions(complete_lines(r.text) if r.truncated else r.text, scfg.n_questions)
        if tr.questions:
            break
    if not tr.questions:
        tr.reason = "truncated" if tr.questions_cut else "no_questions"
        tr.truncated_step = "questions" if tr.questions_cut else None
        return tr
    tr.question = pick_question(tr.questions, random.Random(seed), used)
    if tr.question is None:
        tr.reason = "duplicate_question"
        return tr
    tr.answer_prompt = answer_messages(doc.text, tr.question, lang, cache)

    def answer(cap):
        return answer_client.achat(tr.answer_prompt, max_new_tokens=cap, temperature=scfg.answer_temperature,
                                   seed=seed)

    try:
        a, sent = await uncut_reply(answer, scfg.max_new_tokens, scfg)
    except ContextTooLong:
        tr.reason = "too_long_for_model"
        return tr
    tr.answer, tr.usage["answer"] = a.text.strip(), sum_usage(sent)
    tr.retries += len(sent) - 1
    tr.cost_usd += sum(x.cost_usd for x in sent)
    tr.cached &= all(x.cached for x in sent)
    if a.truncated:  # cut at the cap: ends mid-sentence, never a training answer
        tr.reason, tr.truncated_step = "truncated", "answer"
        return tr
    tr.reason = check_answer(tr.answer, doc.text, scfg)
    if tr.reason:
        return tr
    record = {
        "messages": [{"role": "user", "content": training_user_turn(doc.text, tr.question)},
                     {"role": "assistant", "content": tr.answer}],
        "meta": {"id": f"long-{doc.id}", "kind": "long", "doc_id": doc.id, "source": doc.source, "genre": doc.genre,
                 "lang": lang, "title": doc.title, "license": doc.license, "doc_tokens": doc.n_tokens,
                 "task_type": task_type, "questions": tr.questions, "question": tr.question,
                 "question_attempts": tr.attempts, "questions_cut": tr.questions_cut,
                 "truncation_retries": tr.retries, "answer_finish_reason": a.finish_reason,
                 "answer_max_new_tokens": retry_cap(scfg.max_new_tokens, scfg) if len(sent) > 1 else scfg.max_new_tokens,
                 "question_index": tr.questions.index(tr.question), "backend": client.backend_name,
                 "question_model": r.model or client.model, "answer_model": a.model or answer_client.model,
                 "usage": tr.usage, "cost_usd": round(tr.cost_usd, 6),
                 "grounding": round(grounding(tr.answer, doc.text), 3)},
    }
    try:
        clean_messages(record)
    except RecordError as e:
        tr.reason = e.reason
        return tr
    tr.record = record
    return tr


def synth_document(client, doc: Document, task_type: str = "general", scfg=None, used=None) -> Trace:
    """Sync wrapper of `asynth_document` (notebooks, one document)."""
    return run_sync(asynth_document(client, doc, task_type, scfg or SynthConfig(), used))


def synth_long(client, docs: list[Document], scfg, out: Path, rejects: Path, resume: bool = False,
               progress: bool = True) -> dict:
    """Self-Instruct every document; append each record to `out` (rejections to `rejects`) as it completes."""
    from tqdm.auto import tqdm

    done, used = start_streams(out, rejects, resume)
    todo = [(i, d) for i, d in enumerate(docs) if d.id not in done]
    counts: Counter = Counter()
    tasks: Counter = Counter()
    cut: Counter = Counter()  # truncation: replies regenerated with a larger cap, question lists cut by theirs
    t0 = time.time()

    async def go():
        async with client.session():
            gate = asyncio.Semaphore(max(1, client.concurrency))  # documents in flight
            bar = tqdm(total=len(todo), desc="self-instruct", disable=not progress)

            async def one(i, doc):
                async with gate:
                    try:
                        tr = await asynth_document(client, doc, task_for(i, scfg), scfg, used)
                    except Deferred:  # batch mode: this document waits for the next batch
                        counts["deferred"] += 1
                        bar.update(1)
                        return
                cut["retried"] += tr.retries
                cut["question_lists_cut"] += tr.questions_cut
                if tr.record is not None:
                    q = norm_question(tr.question)
                    if q in used:  # a concurrent document picked the same question first
                        tr.record, tr.reason = None, "duplicate_question"
                    else:
                        used.add(q)
                if tr.record is not None:
                    append_jsonl(out, tr.record)
                    counts["kept"] += 1
                    tasks[tr.task_type] += 1
                else:
                    append_jsonl(rejects, {"doc_id": doc.id, "task_type": tr.task_type, "reason": tr.reason,
                                           "raw_questions": tr.raw_questions[:1000], "questions": tr.questions,
                                           "question": tr.question, "answer": tr.answer[:500],
                                           **({"truncated_step": tr.truncated_step} if tr.truncated_step else {})})
                    counts[tr.reason] += 1
                bar.update(1)

            try:
                await asyncio.gather(*(one(i, d) for i, d in todo))
            finally:
                bar.close()

    run_sync(go())
    planned = Counter(task_for(i, scfg) for i in range(len(docs)))
    return {"docs": len(docs), "skipped_done": len(docs) - len(todo), "processed": len(todo),
            "planned_task_types": dict(planned),
            "kept": counts.pop("kept", 0), "deferred": counts.pop("deferred", 0), "rejected": dict(counts),
            "truncation": truncation_summary(cut, counts, scfg),
            "task_types": dict(tasks), "seconds": round(time.time() - t0, 1)}


def synth_long_batched(client, docs: list[Document], scfg, out: Path, rejects: Path, state_dir: Path,
                       resume: bool = False, progress: bool = True) -> dict:
    """`synth_long` through the provider's Batch API: round 1 sends every question request as one batch, round 2
    the answers (and fresh question samples where none parsed); each round's results fill the request cache and
    the documents finish from it. Batch ids live in `state_dir`; a rerun resumes them (llm_batch.py)."""
    total = {"kept": 0, "rejected": Counter(), "task_types": Counter(), "cut": Counter(), "seconds": 0.0}
    first: dict = {}

    def step():
        st = synth_long(client, docs, scfg, out, rejects, resume=resume or bool(first), progress=progress)
        first.setdefault("stats", st)
        total["kept"] += st["kept"]
        total["rejected"].update(st["rejected"])
        total["task_types"].update(st["task_types"])
        total["cut"].update({k: st["truncation"][k] for k in ("retried", "question_lists_cut")})
        total["seconds"] += st["seconds"]
        return st

    _, rounds = run_batched(client, step, state_dir, "synth", poll_s=scfg.batch_poll_s, retry=scfg.batch_retry,
                            max_attempts=scfg.batch_max_attempts, progress=progress)
    st = dict(first["stats"])
    st.update(kept=total["kept"], rejected=dict(total["rejected"]), task_types=dict(total["task_types"]),
              truncation=truncation_summary(total["cut"], total["rejected"], scfg),
              deferred=0, seconds=round(total["seconds"], 1), batch_rounds=rounds)
    return st


def use_cache_marker(scfg) -> bool:
    """Mark the document for the provider's prompt cache: caching on and interactive (see `cost_table`)."""
    return bool(scfg.prompt_caching) and getattr(scfg, "mode", "interactive") == "interactive"


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def mix_figure(records: list[dict], rejected: dict | None = None, planned: dict | None = None):
    """Task-type mix (planned per document vs kept records), and the rejection reasons."""
    from matplotlib.ticker import MaxNLocator

    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, (a1, a2) = plots.figure(1, 2, figsize=(10, 3.8))
    tasks = Counter(r["meta"].get("task_type", "?") for r in records)
    planned = dict(planned or {})
    names = list(TASK_TYPES) + sorted((set(tasks) | set(planned)) - set(TASK_TYPES))
    xs = range(len(names))
    if planned:
        a1.bar([x - 0.2 for x in xs], [planned.get(t, 0) for t in names], width=0.4, color=plots.PALETTE["prompt"],
               edgecolor="#888", label="planned (documents)")
    a1.bar([x + (0.2 if planned else 0) for x in xs], [tasks[t] for t in names], width=0.4 if planned else 0.7,
           color=plots.PALETTE["long"], label="kept records")
    a1.set_xticks(list(xs), names)
    a1.set_title(f"Task-type mix ({len(records)} kept records)")
    a1.set_ylabel("count")
    a1.yaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_ylim(0, max([1, *tasks.values(), *planned.values()]) * 1.25)
    a1.legend(loc="upper center", ncol=2)
    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    rej = dict(rejected or {})
    if rej:
        keys = sorted(rej, key=lambda k: -rej[k])
        a2.barh(keys, [rej[k] for k in keys], color=plots.PALETTE["short"])
        a2.invert_yaxis()
    else:
        a2.text(0.5, 0.5, "no document rejected", ha="center", va="center", transform=a2.transAxes)
    a2.set_title("Filter: rejection reasons")
    a2.set_xlabel("documents")
    fig.tight_layout()
    return fig


def preview_record(record: dict, chars: int = 300) -> str:
    """The record as JSON with long contents shortened in the middle (for printing)."""
    def cut(text: str) -> str:
        return text if len(text) <= chars else f"{text[: chars // 2]} …[{len(text) - chars:,} chars]… {text[-chars // 2:]}"

    r = {"messages": [{**m, "content": cut(m["content"])} for m in record["messages"]], "meta": dict(record["meta"])}
    return json.dumps(r, ensure_ascii=False, indent=1)
