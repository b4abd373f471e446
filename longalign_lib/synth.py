"""Self-Instruct long-document tasks and short chat data in the LongAlign-10k record format.

Run as: longalign synth --preset cpu-demo [--dry-run] [--resume]   (reads <run_dir>/corpus.jsonl,
        writes <run_dir>/long.jsonl, short.jsonl, synth_rejects.jsonl, synth.json)
Usage:
    from longalign_lib.synth import synth_document, parse_questions, import_sharegpt, magpie_records
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

Short data: `import_sharegpt` converts ShareGPT-style JSON/JSONL (`conversations` with from/value) into the
same format; `magpie_records` writes an offline short mix the Magpie way: the aligned model receives only its
chat template's user prefix, writes a user question itself, then answers it.
Resumable: records are appended one by one; --resume skips documents already written or rejected. The LLM
request cache makes a rerun free.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import SynthConfig
from .corpus import Document, detect_lang
from .formatting import RecordError, clean_messages
from .io import LongAlignError, append_jsonl, iter_jsonl, load_jsonl
from .llm import ContextTooLong, Deferred, Price, Reply, cost_of, run_sync
from .llm_batch import run_batched

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
TASK_TYPES = ("general", "summary", "reasoning", "extraction")
LANGS = ("en", "zh")
PLACEHOLDER_QUESTION_TOKENS = 30  # for --dry-run estimates of the answer calls
SCALE_RECORDS = 10_000  # --dry-run also prices a run of this size (the paper's LongAlign-10k)

# ----------------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------------
_PROMPTS: dict[str, str] = {}


def prompt_text(name: str) -> str:
    if name not in _PROMPTS:
        path = PROMPT_DIR / f"{name}.txt"
        if not path.exists():
            raise LongAlignError(f"{path}: prompt file missing (task types: {', '.join(TASK_TYPES)}; langs: en, zh)")
        _PROMPTS[name] = path.read_text(encoding="utf-8")
    return _PROMPTS[name]


def _fill(template: str, **values) -> str:
    """Fill {name} fields in one pass (a document's own braces, even '{n}', stay as they are).

    >>> _fill("{document}\\n\\nWrite {n}.", document="a {n} b", n=3)
    'a {n} b\\n\\nWrite 3.'
    """
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: str(values[m.group(0)[1:-1]]), template).strip()


def _doc_first(content: str, doc_text: str, cache: bool) -> dict:
    """A user message; with `cache`, marked with the length of its leading document (llm.py's cache_prefix)."""
    msg = {"role": "user", "content": content}
    doc = doc_text.strip()
    if cache and doc and content.startswith(doc):
        msg["cache_prefix"] = len(doc)
    return msg


def question_messages(doc_text: str, task_type: str, lang: str = "en", n: int = 5, cache: bool = False) -> list[dict]:
    """The request for `n` questions of one task type about the document (the document comes first).

    The question and the answer request of a document start with the same bytes (the document), so a
    provider's prompt cache can serve the second from the first; `cache=True` marks that prefix.
    """
    if task_type not in TASK_TYPES:
        raise LongAlignError(f"synth.task_types: unknown task type {task_type!r}; choose from {', '.join(TASK_TYPES)}")
    lang = lang if lang in LANGS else "en"
    content = _fill(prompt_text(f"questions_{lang}_{task_type}"), document=doc_text, n=n)
    return [_doc_first(content, doc_text, cache)]


def answer_messages(doc_text: str, question: str, lang: str = "en", cache: bool = False) -> list[dict]:
    """The request for an answer grounded in the document (the document first, as in `question_messages`)."""
    lang = lang if lang in LANGS else "en"
    return [_doc_first(_fill(prompt_text(f"answer_{lang}"), document=doc_text, question=question), doc_text, cache)]


def training_user_turn(doc_text: str, question: str) -> str:
    """The user turn of the training record (as in LongAlign-10k: the document, then the question)."""
    return f"{doc_text.rstrip()}\n\n{question.strip()}"


# ----------------------------------------------------------------------------------------------------------------
# parsing the model's question list
# ----------------------------------------------------------------------------------------------------------------
_CN_NUM = "一二三四五六七八九十"
ITEM = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:\*\*|__)?\s*"
    r"(?:(?:Q(?:uestion)?|问题|題目|题目)\s*[#]?\s*(?P<n1>\d{1,2})\s*[\.\):：、\-]?"
    r"|[\(\[（]?(?P<n2>\d{1,2})\s*[\.\)\]）:：、．](?!\d)"
    r"|(?P<n3>[" + _CN_NUM + r"]{1,2})\s*[、\.．:：]"
    r"|第(?P<n4>[\d" + _CN_NUM + r"]{1,2})[个題题][:：、.]?)"
    r"\s*(?:\*\*|__)?\s*(?P<body>.*)$"
)
BULLET = re.compile(r"^\s*[-*•·]\s+(?P<body>.+)$")
PREAMBLE = re.compile(r"^(here (are|is)|sure|certainly|okay|ok\b|below|以下|好的|当然|these are)", re.I)
ANSWER_TAIL = re.compile(r"\s*(?:\(|\[)?\s*(?:answer|ans\.?|a|答案|答)\s*[:：].*$", re.I)


def _clean_question(q: str) -> str:
    q = q.strip()
    q = re.sub(r"^(?:\*\*|__)+|(?:\*\*|__)+$", "", q).strip()
    q = re.sub(r"^(?:question|q|问题)\s*[:：]\s*", "", q, flags=re.I)
    q = re.sub(r"\*\*(.+?)\*\*", r"\1", q)
    # keep the question and drop an answer the model added after it
    m = re.search(r"[?？]", q)
    if m and m.end() < len(q):
        tail = q[m.end():]
        if ANSWER_TAIL.match(tail) or re.match(r"\s*[-–—]\s", tail) or re.match(r"\s*\(", tail):
            q = q[: m.end()]
    q = ANSWER_TAIL.sub("", q) if not re.search(r"[?？]\s*$", q) and ANSWER_TAIL.search(q) and \
        ANSWER_TAIL.search(q).start() > 8 else q
    q = q.strip().strip('"“”\'`').strip()
    return re.sub(r"\s+", " ", q)


QUESTION_START = re.compile(
    r"^(what|who|whom|whose|which|when|where|why|how|is|are|was|were|do|does|did|can|could|should|would|will|"
    r"has|have|had|in what|according to|based on|summari[sz]e|describe|explain|list|give|compare|identify|name|"
    r"extract|find|provide|outline|state|trace|discuss|analy[sz]e|what's|in which|from the|using the)\b", re.I)
ZH_QUESTION = re.compile(r"什么|吗|如何|怎样|怎么|为什么|为何|哪|谁|多少|几|是否|请|总结|概述|概括|列出|说明|描述|比较")
LABEL = re.compile(r"^\s*(?:\*\*)?(?:question|q|问题)\s*(?:\*\*)?\s*[:：]\s*(?P<body>.+)$", re.I)
ANSWER_LINE = re.compile(r"^\s*(?:\*\*)?(?:answer|ans|a|答案|答|回答)\s*(?:\*\*)?\s*[:：]", re.I)


META_QUESTION = re.compile(  # a question to the user about the chat itself, not about the document
    r"\b(?:your (?:next|first|other|follow[- ]up) questions?|(?:any|more|other|further) questions?"
    r"|anything else|(?:can|may|shall) i (?:help|assist)|how can i (?:help|assist)|assist you"
    r"|(?:would|do) you (?:like|want) me to|shall i|what else can i|let me know)\b"
    r"|你(?:的)?下一个问题|还有(?:什么|其他)问题|需要我|我可以帮", re.I)


def is_meta_question(q: str) -> bool:
    """A question addressed to the user about the conversation ("What's your next question?", "Would you like
    me to ...?", "Anything else?") rather than about the document: never a training question.

    >>> is_meta_question("What's your next question?"), is_meta_question("What is the next step in the ritual?")
    (True, False)
    """
    return bool(META_QUESTION.search(q))


def is_question_like(q: str) -> bool:
    """A question or a request: ends with '?', starts like one (what/how/summarize/list ...), or reads as one in Chinese."""
    q = q.strip()
    return bool(q.endswith(("?", "？")) or QUESTION_START.match(q) or ZH_QUESTION.search(q))


def _plausible(q: str) -> bool:
    if len(q) < 8 or len(q) > 600:
        return False
    han = len(re.findall(r"[\u4e00-\u9fff]", q))
    if han < 4 and len(q.split()) < 3:
        return False
    if PREAMBLE.match(q) and not q.rstrip().endswith(("?", "？")):
        return False
    return is_question_like(q) and not is_meta_question(q)


def norm_question(q: str) -> str:
    """Normal form for duplicate detection: lower case, letters/digits/Han only."""
    return re.sub(r"[^0-9a-z\u4e00-\u9fff]+", "", q.lower())


def question_sentences(text: str) -> list[str]:
    """The sentences of `text` that end with a question mark (sentence ends: .!? + space, or 。！？)."""
    parts = re.split(r"(?<=[.!?])\s+|(?<=[。！？])|\n", text)
    return [p.strip() for p in parts if re.search(r"[?？][\"”'*]*$", p.strip())]


def parse_questions(text: str, n: int = 5) -> list[str]:
    """Questions from a model's reply: numbered lists in any common style, bullets, `Question:` labels, or bare
    lines/sentences ending in '?'.

    Tolerates preamble and closing prose, markdown bold, quotes, answers added after a question (same line or
    an `Answer:` line), items wrapped over two lines, Chinese numbering (一、 / 第1个 / 问题1：), fewer items
    than asked. Keeps only question-like items (a '?' or a request such as "Summarize ..."), drops duplicates,
    returns at most `n`, in the model's order.
    """
    text = re.sub(r"```[a-zA-Z]*", "", text or "").replace("\r\n", "\n")
    items: list[list[str]] = []
    current: list[str] | None = None
    for line in text.split("\n"):
        if not line.strip() or re.match(r"^\s*#{1,6}\s", line) or ANSWER_LINE.match(line):
            current = None  # blank line, markdown heading or an answer: the item is over
            continue
        m = ITEM.match(line)
        body = None
        if m and (m.group("body") or "").strip():
            body = m.group("body")
        else:
            for pat in (LABEL, BULLET):
                b = pat.match(line)
                if b:
                    body = b.group("body")
                    break
        if body is None and re.search(r"[?？][\"”'*]*\s*$", line) and (current is None or
                                                                      re.search(r"[?？]", current[-1])):
            qs = question_sentences(line)  # a bare line: its sentences that are questions
            items += [[q] for q in qs[:-1]]
            body = qs[-1] if qs else None
        if body is not None:
            current = [body]
            items.append(current)
        elif current is not None and not re.search(r"[?？]", current[-1]) and len(current) < 3:
            current.append(line.strip())  # a wrapped item
    candidates = [" ".join(parts) for parts in items]
    if not candidates:  # no list at all: take sentences that end with a question mark
        candidates = question_sentences(text)
    out: list[str] = []
    seen: set[str] = set()
    for c in candidates:
        q = _clean_question(c)
        key = norm_question(q)
        if not _plausible(q) or key in seen:
            continue
        seen.add(key)
        out.append(q)
        if len(out) >= n:
            break
    return out


def pick_question(questions: list[str], rng: random.Random, used: set[str] | None = None) -> str | None:
    """Pick one candidate at random among those not already used by another record; questions ending in '?'
    (or a clear request) are preferred."""
    used = used or set()
    fresh = [q for q in questions if norm_question(q) not in used]
    if not fresh:
        return None
    proper = [q for q in fresh if q.rstrip().endswith(("?", "？", ".", "。"))] or fresh
    return rng.choice(proper)


# ----------------------------------------------------------------------------------------------------------------
# answer filters
# ----------------------------------------------------------------------------------------------------------------
REFUSAL = re.compile(
    r"^\s*(?:i(?:'|’)?m sorry|i am sorry|sorry,|i cannot|i can(?:'|’)t|i can not|i'm unable|i am unable|"
    r"as an ai|i do not have access|i don't have access|unfortunately,? i (?:cannot|can't)|"
    r"抱歉|对不起|很抱歉|我无法|我不能|作为一个?人工智能)", re.I)
STOP = set("""the and for that this with from are was were have has had not but can will would should could into
about their there which what when where who whom whose they them then than these those also been being does did
your you its it's our out over under more most such only other some any each both very just like may might must
shall upon unto""".split())


@functools.lru_cache(maxsize=1)
def _stem():
    from nltk.stem.snowball import EnglishStemmer  # pure-Python Snowball; needs no downloaded data

    return functools.lru_cache(maxsize=65536)(EnglishStemmer().stem)


def content_units(text: str) -> list[str]:
    """English content words, stemmed, and Chinese character bigrams: what `grounding` compares.

    A content word has ≥ 4 letters and is not a stop word; a possessive 's is dropped and the Snowball English
    stemmer folds inflections, so "heavens" matches "heaven" and "created" matches "creates".

    >>> content_units("The heavens were created; God's people rejoiced.")
    ['heaven', 'creat', 'peopl', 'rejoic']
    """
    text = re.sub(r"['’]s\b", "", text.lower())
    stem = _stem()
    words = [stem(w) for w in re.findall(r"[a-z][a-z0-9_']{3,}", text) if w not in STOP]
    han = re.findall(r"[\u4e00-\u9fff]", text)
    return words + ["".join(han[i:i + 2]) for i in range(len(han) - 1)]


def grounding(answer: str, document: str) -> float:
    """Share of the answer's content units (stemmed words, Han bigrams) that also occur in the document
    (1.0 = fully grounded; an answer without content units counts as grounded).

    >>> grounding("The heavens and the earth were created.", "In the beginning God created the heaven and the earth.")
    1.0
    """
    units = content_units(answer)
    if not units:
        return 1.0
    doc = set(content_units(document))
    return sum(u in doc for u in units) / len(units)


def repetition(text: str) -> float:
    """1 − distinct word 3-grams / all 3-grams (0 = no repetition); Chinese by characters."""
    toks = text.split() if len(text.split()) > 8 else list(text)
    grams = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
    return 0.0 if len(grams) < 6 else 1 - len(set(grams)) / len(grams)


def check_answer(answer: str, document: str | None, scfg) -> str | None:
    """None if the answer passes the filters, else the reason (a counter key)."""
    a = (answer or "").strip()
    if not a:
        return "empty_answer"
    if REFUSAL.match(a):
        return "refusal"
    han = len(re.findall(r"[\u4e00-\u9fff]", a))
    size = han + len(re.sub(r"[\u4e00-\u9fff]", " ", a).split())
    if size < scfg.min_answer_words:
        return "too_short"
    if repetition(a) > scfg.max_repetition:
        return "repetitive"
    if document is not None and len(content_units(a)) >= 5 and grounding(a, document) < scfg.min_grounding:
        return "off_document"
    return None


# ----------------------------------------------------------------------------------------------------------------
# replies cut by the token cap
# ----------------------------------------------------------------------------------------------------------------
def retry_cap(cap: int, scfg) -> int | None:
    """The larger token cap a truncated reply is regenerated with (synth.retry_truncated_factor), or None: reject it.

    >>> retry_cap(64, SynthConfig(retry_truncated_factor=2.0)), retry_cap(64, SynthConfig())
    (128, None)
    """
    f = float(getattr(scfg, "retry_truncated_factor", 0) or 0)
    if f == 0:
        return None
    if not f > 1:
        raise LongAlignError(f"synth.retry_truncated_factor={f}: use 0 (reject replies cut at the token cap) or a "
                             "factor > 1 (regenerate them once with a cap that much larger, e.g. 2)")
    return int(math.ceil(cap * f))


async def uncut_reply(send, cap: int, scfg) -> tuple[Reply, list[Reply]]:
    """`await send(max_new_tokens)` → Reply; a reply cut at `cap` is sent once more with `retry_cap(cap)` when the
    user asked for it. Returns (the reply to use, every reply received, so usage and cost add up). The caller still
    checks `.truncated` on the result: a reply cut twice is rejected, never kept."""
    r = await send(cap)
    sent = [r]
    bigger = retry_cap(cap, scfg) if r.truncated else None
    if bigger:
        r = await send(bigger)
        sent.append(r)
    return r, sent


def complete_lines(text: str) -> str:
    """What is left of a reply cut mid-line by the token cap: the text up to its last line break.

    >>> complete_lines("1. Who is Esther?\\n2. Why did Mordecai ref")
    '1. Who is Esther?'
    >>> complete_lines("1. Who is Es")
    ''
    """
    return text[: text.rfind("\n")].rstrip() if "\n" in text else ""


def _sum_usage(replies: list[Reply]) -> dict:
    out: dict = {"input_tokens": 0, "output_tokens": 0}
    for r in replies:
        for k, v in r.usage.items():
            out[k] = out.get(k, 0) + v
    return out


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


def task_for(index: int, scfg) -> str:
    """Task types balanced over the corpus order (a seeded rotation of synth.task_types)."""
    types = list(scfg.task_types)
    for t in types:
        if t not in TASK_TYPES:
            raise LongAlignError(f"synth.task_types: unknown task type {t!r}; choose from {', '.join(TASK_TYPES)}")
    random.Random(scfg.seed).shuffle(types)
    return types[index % len(types)]


def _doc_seed(doc_id: str, seed: int) -> int:
    return int(hashlib.sha1(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16)


async def asynth_document(client, doc: Document, task_type: str, scfg, used: set[str] | None = None,
                          answer_client=None) -> Trace:
    """Self-Instruct one document (coroutine). The result's `record` is None when a filter rejected it."""
    lang = doc.lang if doc.lang in LANGS else detect_lang(doc.text)
    seed = _doc_seed(doc.id, scfg.seed)
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
        for k, v in _sum_usage(sent).items():
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
    tr.answer, tr.usage["answer"] = a.text.strip(), _sum_usage(sent)
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


def done_ids(*paths: Path) -> tuple[set[str], set[str]]:
    """(ids already handled, questions already used) from earlier output files."""
    ids, used = set(), set()
    for p in paths:
        if p.exists():
            for _, row in iter_jsonl(p, allow_partial_last_line=True):
                meta = row.get("meta", row) if isinstance(row, dict) else {}
                if meta.get("doc_id"):
                    ids.add(meta["doc_id"])
                if meta.get("id"):
                    ids.add(meta["id"])
                if meta.get("question"):
                    used.add(norm_question(meta["question"]))
    return ids, used


def _start_streams(out: Path, rejects: Path, resume: bool):
    """Fresh output streams unless resuming; returns what earlier runs already finished (see done_ids)."""
    if not resume:
        for p in (out, rejects):
            p.unlink(missing_ok=True)
    return done_ids(out, rejects)


def synth_long(client, docs: list[Document], scfg, out: Path, rejects: Path, resume: bool = False,
               progress: bool = True) -> dict:
    """Self-Instruct every document; append each record to `out` (rejections to `rejects`) as it completes."""
    from tqdm.auto import tqdm

    done, used = _start_streams(out, rejects, resume)
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


def truncation_summary(cut: Counter, rejected: Counter, scfg) -> dict:
    """synth.json's `truncation` block: replies cut by their cap that were rejected, regenerated, or (question
    lists) trimmed to their complete lines, and the retry factor in force."""
    return {"rejected": int(rejected.get("truncated", 0)), "retried": int(cut.get("retried", 0)),
            "question_lists_cut": int(cut.get("question_lists_cut", 0)),
            "retry_truncated_factor": float(getattr(scfg, "retry_truncated_factor", 0) or 0)}


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


# ----------------------------------------------------------------------------------------------------------------
# short data: ShareGPT import and Magpie-style generation
# ----------------------------------------------------------------------------------------------------------------
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

    done, used = _start_streams(out, rejects, resume)
    prefix = magpie_prefix(tokenizer)
    stops = [s for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>") if s in tokenizer.get_vocab()]
    counts: Counter = Counter()
    cut: Counter = Counter()
    kept = sum(1 for _ in iter_jsonl(out, allow_partial_last_line=True)) if out.exists() else 0
    attempts = 0

    async def draw(rid: str):
        """One Magpie item's calls: (question, question replies, answer replies, reason or None, cut step or None);
        the last reply of each list is the one used (an earlier one was cut and regenerated with a larger cap)."""
        seed = _doc_seed(rid, scfg.seed)
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
                                       "usage": {"question": _sum_usage(qs), "answer": _sum_usage(ans)}}}
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


# ----------------------------------------------------------------------------------------------------------------
# cost planning
# ----------------------------------------------------------------------------------------------------------------
def mean_target_length(lo: int, hi: int, upsample: float) -> float:
    """Expected document length under corpus.draw_target's density ∝ L^(a−1) on [lo, hi]."""
    a = float(upsample)
    if hi <= lo:
        return float(lo)
    return a / (a + 1) * (hi ** (a + 1) - lo ** (a + 1)) / (hi ** a - lo ** a)


LEVERS = (("interactive", False), ("interactive", True), ("batch", False), ("batch", True))
MIN_CACHE_TOKENS = 1024  # shortest prefix either provider caches (Anthropic's Haiku models need 2,048)


def cost_table(prices: dict, n_docs: int, doc_tokens: float, question_tokens: int = 200, answer_tokens: int = 1024,
               prompt_overhead: int = 120, levers=LEVERS, batch_discount: float = 0.5) -> list[dict]:
    """Cost of Self-Instruct at scale per model and lever (interactive/batch × prompt caching off/on).

    Two calls per document (the question list, then the answer), the document first in both. With caching the
    question call writes the document to the provider's prompt cache and the answer call, sent right after it,
    reads it. In batch mode the two calls sit in two batches hours apart, beyond the cache's lifetime (5 min to
    1 h), so caching saves nothing there and synth does not mark the document (see `use_cache_marker`). Output
    tokens are upper bounds (the max_new_tokens of each call). Each row: model, mode, caching, calls, tokens,
    cost_usd, saving (share saved against interactive without caching).
    """
    q_in = doc_tokens + prompt_overhead
    a_in = doc_tokens + prompt_overhead + PLACEHOLDER_QUESTION_TOKENS
    cacheable = doc_tokens >= MIN_CACHE_TOKENS
    rows = []
    for model, p in prices.items():
        price = Price.parse(p, model)
        base = None
        for mode, caching in levers:
            hit = caching and cacheable and mode == "interactive"
            usage = {"input_tokens": n_docs * (q_in + a_in), "output_tokens": n_docs * (question_tokens + answer_tokens),
                     "cache_write_tokens": n_docs * doc_tokens if hit else 0,
                     "cache_read_tokens": n_docs * doc_tokens if hit else 0}
            usd = cost_of(usage, price, batch=mode == "batch", batch_discount=batch_discount)
            if mode == "interactive" and not caching:
                base = usd
            rows.append({"model": model, "mode": mode, "caching": caching, "calls": 2 * n_docs,
                         **{k: int(v) for k, v in usage.items()},
                         "usd_per_1M": [price.input, price.output, price.cache_read, price.cache_write],
                         "cost_usd": round(usd, 2),
                         "saving": round(1 - usd / base, 3) if base else 0.0})
    return rows


def use_cache_marker(scfg) -> bool:
    """Mark the document for the provider's prompt cache: caching on and interactive (see `cost_table`)."""
    return bool(scfg.prompt_caching) and getattr(scfg, "mode", "interactive") == "interactive"


def dry_run(client, docs: list[Document] | None, scfg, done: set[str], corpus_cfg=None) -> dict:
    """Calls, tokens and cost of the long-data synthesis before spending anything; needs no API key.

    docs: the corpus synth would read (its texts are counted), or None when no corpus was built yet: the plan is
    then made for the size the settings ask for — min(corpus.n_docs, synth.max_docs) documents of the mean length
    corpus.draw_target gives for corpus.min_tokens/max_tokens/upsample_long — without building anything.
    client: an LLMClient to count tokens with and to tell which question calls are already cached, or None:
    tokens are then approximated (~4 characters per token, what API backends use anyway) and price comes from
    synth.prices; `questions.cached` is None (not checked).
    """
    from .llm import messages_tokens, price_for

    qp = {"max_new_tokens": scfg.question_max_new_tokens or scfg.max_new_tokens, "temperature": scfg.temperature}
    backend = client.backend_name if client is not None else scfg.backend
    model = client.model if client is not None else scfg.model
    price = client.price if client is not None else (price_for(model, scfg.prices) if backend != "local" else None)
    count = client.count_tokens if client is not None else messages_tokens
    placeholder = "?" * (PLACEHOLDER_QUESTION_TOKENS * 4)

    def priced(calls: int, cached, tin: int, tout: int) -> dict:
        usage = {"input_tokens": int(tin), "output_tokens": int(tout)}
        return {"calls": calls, "cached": cached, **usage, "cost_usd": round(cost_of(usage, price), 6)}

    if docs is None:  # estimate from the requested size: no corpus, no client
        if corpus_cfg is None:
            raise LongAlignError("dry_run: give the corpus documents or the corpus settings (corpus_cfg)")
        n_req = min(corpus_cfg.n_docs, scfg.max_docs) if scfg.max_docs else corpus_cfg.n_docs
        mean_doc = mean_target_length(corpus_cfg.min_tokens, corpus_cfg.max_tokens, corpus_cfg.upsample_long)
        types = [task_for(i, scfg) for i in range(max(1, len(scfg.task_types)))]
        q_over = sum(messages_tokens(question_messages("", t, "en", scfg.n_questions)) for t in types) / len(types)
        a_over = messages_tokens(answer_messages("", placeholder, "en"))
        n = n_req
        q_est = priced(n, None, n * (mean_doc + q_over), n * qp["max_new_tokens"])
        a_est = priced(n, None, n * (mean_doc + a_over), n * scfg.max_new_tokens)
        source = (f"requested size, no corpus built: {n} documents (corpus.n_docs={corpus_cfg.n_docs}"
                  f"{f', synth.max_docs={scfg.max_docs}' if scfg.max_docs else ''}) of ~{mean_doc:,.0f} tokens "
                  f"(the mean for corpus.min_tokens={corpus_cfg.min_tokens}, max_tokens={corpus_cfg.max_tokens}, "
                  f"upsample_long={corpus_cfg.upsample_long})")
        skipped = 0
    else:
        todo = [(i, d) for i, d in enumerate(docs) if d.id not in done]
        n, skipped = len(todo), len(docs) - len(todo)
        q_batch = [question_messages(d.text, task_for(i, scfg), d.lang, scfg.n_questions) for i, d in todo]
        if client is not None:  # the seed is part of each request's cache key
            q_est = {"calls": 0, "cached": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
            for (_, d), msgs in zip(todo, q_batch, strict=True):
                e = client.estimate([msgs], seed=_doc_seed(d.id, scfg.seed), **qp)
                for k in q_est:
                    q_est[k] += e[k]
        else:
            q_est = priced(n, None, sum(count(m) for m in q_batch), n * qp["max_new_tokens"])
        a_msgs = [answer_messages(d.text, placeholder, d.lang) for _, d in todo]
        a_est = priced(n, None if client is None else 0, sum(count(m) for m in a_msgs), n * scfg.max_new_tokens)
        mean_doc = sum(count([{"role": "user", "content": d.text}]) for d in docs) / max(1, len(docs))
        source = f"the corpus: {len(docs)} documents"
    total = {k: q_est[k] + a_est[k] for k in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    total["cost_usd"] = round(total["cost_usd"], 6)
    # the same run at the paper's scale, under each lever, at this model's price (or every listed price)
    key = _price_key(model, scfg.prices)
    prices = {model: scfg.prices[key]} if key else dict(scfg.prices)
    scale = cost_table(prices, SCALE_RECORDS, mean_doc, question_tokens=qp["max_new_tokens"],
                       answer_tokens=scfg.max_new_tokens, batch_discount=scfg.batch_discount)
    return {"documents": n, "skipped_done": skipped, "estimated_from": source, "backend": backend,
            "extra_question_calls_at_most": n * (max(1, scfg.question_attempts) - 1),
            "model": model, "price_per_1M": [price.input, price.output] if price else None, "questions": q_est,
            "answers": a_est, **total, "mode": scfg.mode, "prompt_caching": scfg.prompt_caching,
            "scale": {"records": SCALE_RECORDS, "mean_doc_tokens": round(mean_doc), "rows": scale}}


def _price_key(model: str, prices: dict) -> str | None:
    keys = [k for k in prices if model == k or model.startswith(k) or model.split("/")[-1].startswith(k)]
    return max(keys, key=len) if keys else None


def lever_table(rows: list[dict]) -> str:
    """Markdown table of `cost_table` rows: model, lever, cost, saving."""
    lines = ["| model | mode | prompt caching | cost (USD) | saving |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {'on' if r['caching'] else 'off'} | {r['cost_usd']:,.2f} | "
                     f"{r['saving']:.0%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def mix_figure(records: list[dict], rejected: dict | None = None, planned: dict | None = None):
    """Task-type mix (planned per document vs kept records), and the rejection reasons."""
    from matplotlib.ticker import MaxNLocator

    from . import plots

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


def lever_label(mode: str, caching: bool) -> str:
    return f"{mode}{' + prompt caching' if caching else ''}"


def cost_figure(rows: list[dict], n_docs: int):
    """Grouped bars of `cost_table` rows: per model, the cost under each lever (interactive/batch × caching)."""
    from . import plots

    models = list(dict.fromkeys(r["model"] for r in rows))
    levers = list(dict.fromkeys((r["mode"], r["caching"]) for r in rows))
    cost = {(r["model"], r["mode"], r["caching"]): r["cost_usd"] for r in rows}
    fig, ax = plots.figure(figsize=(8.5, 3.8))
    width = 0.8 / max(1, len(levers))
    for k, (mode, caching) in enumerate(levers):
        xs = [i + (k - (len(levers) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [cost[(m, mode, caching)] for m in models], width, label=lever_label(mode, caching),
               hatch="//" if caching else None, edgecolor="white")
    ax.set_xticks(range(len(models)), models, rotation=15)
    ax.set_ylabel("USD (output at its max_new_tokens cap)")
    ax.set_title(f"Self-Instruct cost for {n_docs:,} long documents (2 calls each), list prices")
    ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


def preview_record(record: dict, chars: int = 300) -> str:
    """The record as JSON with long contents shortened in the middle (for printing)."""
    def cut(text: str) -> str:
        return text if len(text) <= chars else f"{text[: chars // 2]} …[{len(text) - chars:,} chars]… {text[-chars // 2:]}"

    r = {"messages": [{**m, "content": cut(m["content"])} for m in record["messages"]], "meta": dict(record["meta"])}
    return json.dumps(r, ensure_ascii=False, indent=1)
