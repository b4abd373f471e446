"""The per-item pieces every synthesis path shares: prompts, question parsing, answer filters, truncation retries.

Used by synth.py (long Self-Instruct records), short_data.py (Magpie short records) and synth_cost.py (the dry-run
plan); they import it, never each other's internals. Most names are also importable from `longalign_lib.synth`.
Usage:
    from longalign_lib.synth_parts import question_messages, parse_questions, check_answer
    msgs = question_messages(doc_text, "summary", "en", n=5)   # the question-list prompt, document first
    questions = parse_questions(reply.text, n=5)               # the questions in whatever layout the model wrote
    check_answer(answer, doc_text, cfg.synth)                  # None, or why the answer is rejected

Also here: the task type and seed of each item (`task_for`, `doc_seed`), and the resumable output streams with
their counts (`done_ids`, `start_streams`, `truncation_summary`).
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections import Counter
from pathlib import Path

from .config import SynthConfig  # noqa: F401  (the retry_cap doctest uses it)
from .io import LongAlignError, iter_jsonl
from .reply import Reply

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
TASK_TYPES = ("general", "summary", "reasoning", "extraction")
LANGS = ("en", "zh")

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


def sum_usage(replies: list[Reply]) -> dict:
    """Token usage of several replies added key by key."""
    out: dict = {"input_tokens": 0, "output_tokens": 0}
    for r in replies:
        for k, v in r.usage.items():
            out[k] = out.get(k, 0) + v
    return out


# ----------------------------------------------------------------------------------------------------------------
# one item: its task type, its seed
# ----------------------------------------------------------------------------------------------------------------
def task_for(index: int, scfg) -> str:
    """Task types balanced over the corpus order (a seeded rotation of synth.task_types)."""
    types = list(scfg.task_types)
    for t in types:
        if t not in TASK_TYPES:
            raise LongAlignError(f"synth.task_types: unknown task type {t!r}; choose from {', '.join(TASK_TYPES)}")
    random.Random(scfg.seed).shuffle(types)
    return types[index % len(types)]


def doc_seed(doc_id: str, seed: int) -> int:
    """A per-document random seed: stable across runs and independent of document order."""
    return int(hashlib.sha1(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------------------------
# resumable output streams and their counts
# ----------------------------------------------------------------------------------------------------------------
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


def start_streams(out: Path, rejects: Path, resume: bool):
    """Fresh output streams unless resuming; returns what earlier runs already finished (see done_ids)."""
    if not resume:
        for p in (out, rejects):
            p.unlink(missing_ok=True)
    return done_ids(out, rejects)


def truncation_summary(cut: Counter, rejected: Counter, scfg) -> dict:
    """synth.json's `truncation` block: replies cut by their cap that were rejected, regenerated, or (question
    lists) trimmed to their complete lines, and the retry factor in force."""
    return {"rejected": int(rejected.get("truncated", 0)), "retried": int(cut.get("retried", 0)),
            "question_lists_cut": int(cut.get("question_lists_cut", 0)),
            "retry_truncated_factor": float(getattr(scfg, "retry_truncated_factor", 0) or 0)}
