"""synth.py: the question parser on messy outputs, filters, ShareGPT import, Magpie, and the stage over real HTTP
(cache, dry run, resume after a kill)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longalign_lib.config import SynthConfig, load_config
from longalign_lib.corpus import Document
from longalign_lib.formatting import clean_messages
from longalign_lib.io import LongAlignError, read_jsonl, write_jsonl
from longalign_lib.short_data import convert_sharegpt, import_sharegpt, magpie_prefix
from longalign_lib.synth_cost import cost_table, mean_target_length
from longalign_lib.synth_parts import (
    check_answer,
    grounding,
    parse_questions,
    pick_question,
    question_messages,
    task_for,
)

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# the parser, on outputs shaped like what real models write
# ---------------------------------------------------------------------------------------------------------------
CHATTY = """Sure! Here are five questions about the document:

1. What did Ruth promise Naomi on the road to Judah?
2) Who was Boaz, and how was he related to Elimelech?
3. **Why did Naomi ask to be called Mara?**
4. What did Boaz do at the gate of the city
   before the elders?
5. How many measures of barley did Boaz give Ruth?

I hope these help! Let me know if you would like more."""

WITH_ANSWERS = """Q1: Which king held a feast for 180 days? A: King Ahasuerus.
Q2: Who refused to appear before the king? Answer: Queen Vashti
Question 3: What did Mordecai overhear at the king's gate?
Answer: A plot by two chamberlains.
**4.** What was the purpose of the lots (Pur) cast by Haman? - To choose a day.
"""

CHINESE = """好的，以下是五个问题：
一、路得为什么决定跟随拿俄米回到伯利恒？
二、波阿斯是如何对待路得的？
第3个：拿俄米的两个儿子叫什么名字？
问题4：城门口的长老们见证了什么事情？
5．请总结路得记第四章的主要内容。"""

MESSY = """```
1. What is a list?
2. What is a list?
3. How do you sort a list in place?
```
That is all I could come up with."""

NO_LIST = ("The document describes the json module. What does json.dumps return when given a dict? "
           "It also covers decoding. How are invalid documents reported to the caller?")

BULLETS = """### Questions
- Summarize the section about the JSONDecoder class.
- Describe how object_hook changes decoding.
* List the keyword arguments accepted by json.load.
• ok
"""

DEGENERATE = "1. 1. 1. 1.\n2.\n3. The document.\n*Truly understanding the instructions*"


def test_parser_chatty_numbered_list_with_wrapping_and_bold():
    qs = parse_questions(CHATTY)
    assert qs == ["What did Ruth promise Naomi on the road to Judah?",
                  "Who was Boaz, and how was he related to Elimelech?",
                  "Why did Naomi ask to be called Mara?",
                  "What did Boaz do at the gate of the city before the elders?",
                  "How many measures of barley did Boaz give Ruth?"]


def test_parser_drops_answers_the_model_added():
    qs = parse_questions(WITH_ANSWERS)
    assert qs == ["Which king held a feast for 180 days?", "Who refused to appear before the king?",
                  "What did Mordecai overhear at the king's gate?",
                  "What was the purpose of the lots (Pur) cast by Haman?"]


def test_parser_chinese_numbering():
    qs = parse_questions(CHINESE)
    assert len(qs) == 5
    assert qs[0] == "路得为什么决定跟随拿俄米回到伯利恒？" and qs[2] == "拿俄米的两个儿子叫什么名字？"
    assert qs[4] == "请总结路得记第四章的主要内容。"


def test_parser_duplicates_fences_and_fewer_than_asked():
    assert parse_questions(MESSY) == ["What is a list?", "How do you sort a list in place?"]


def test_parser_bare_questions_and_bullets():
    assert parse_questions(NO_LIST) == ["What does json.dumps return when given a dict?",
                                        "How are invalid documents reported to the caller?"]
    assert parse_questions(BULLETS) == ["Summarize the section about the JSONDecoder class.",
                                        "Describe how object_hook changes decoding.",
                                        "List the keyword arguments accepted by json.load."]


def test_parser_rejects_degenerate_output_and_caps_at_n():
    assert parse_questions(DEGENERATE) == []
    assert parse_questions("") == []
    many = "\n".join(f"{i}. What is item number {i} of the list?" for i in range(1, 9))
    assert len(parse_questions(many, n=5)) == 5


def test_pick_question_avoids_used_and_is_seeded():
    qs = parse_questions(CHATTY)
    a = pick_question(qs, random.Random(3))
    assert a == pick_question(qs, random.Random(3)) and a in qs
    from longalign_lib.synth_parts import norm_question

    used = {norm_question(q) for q in qs[:4]}
    assert pick_question(qs, random.Random(0), used) == qs[4]
    assert pick_question(qs, random.Random(0), {norm_question(q) for q in qs}) is None


# ---------------------------------------------------------------------------------------------------------------
# filters, prompts, planning
# ---------------------------------------------------------------------------------------------------------------
DOC = (ROOT / "data" / "kjv_ruth.txt").read_text()


def test_answer_filters_count_reasons():
    s = SynthConfig()
    good = ("Boaz took ten men of the elders of the city and asked the kinsman to redeem the parcel of land "
            "which was Elimelech's; the kinsman declined and drew off his shoe.")
    assert check_answer(good, DOC, s) is None
    assert check_answer("   ", DOC, s) == "empty_answer"
    assert check_answer("I'm sorry, but I cannot help with that request today.", DOC, s) == "refusal"
    assert check_answer("抱歉，我无法回答这个问题。", None, s) == "refusal"
    assert check_answer("Boaz.", DOC, s) == "too_short"
    assert check_answer("the land the land the land " * 10, DOC, s) == "repetitive"
    off = ("Quantum chromodynamics describes gluons binding quarks inside protons through color charge "
           "interactions observed at particle colliders worldwide.")
    assert check_answer(off, DOC, s) == "off_document"
    assert grounding(good, DOC) > 0.6 > grounding(off, DOC)


def test_prompts_follow_language_and_task():
    en = question_messages("DOC", "reasoning", "en", 5)[0]["content"]
    zh = question_messages("文档", "extraction", "zh", 5)[0]["content"]
    assert en.startswith("DOC") and "5 questions" in en and "{" not in en
    assert zh.startswith("文档") and "5个问题" in zh
    with pytest.raises(LongAlignError, match="task type"):
        question_messages("x", "poetry")
    s = SynthConfig()
    mix = [task_for(i, s) for i in range(8)]
    assert sorted(set(mix)) == sorted(s.task_types) and all(mix.count(t) == 2 for t in s.task_types)


def test_cost_table_levers():
    prices = SynthConfig().prices
    rows = cost_table(prices, 10_000, doc_tokens=16_000, answer_tokens=1024)
    assert len(rows) == 4 * len(prices) and rows[0]["calls"] == 20_000
    cost = {(r["model"], r["mode"], r["caching"]): r["cost_usd"] for r in rows}
    for m in prices:
        base = cost[(m, "interactive", False)]
        assert cost[(m, "batch", False)] == pytest.approx(base / 2, rel=1e-3)  # the batch discount
        assert cost[(m, "interactive", True)] < base  # the answer call reads the document from the cache
        assert cost[(m, "batch", True)] == cost[(m, "batch", False)]  # two batches hours apart: no cache hit
    # Anthropic bills a cache write at 1.25x: the read (0.1x) still saves ~0.8 of one document's input
    r = next(r for r in rows if r["model"] == "claude-haiku-4-5" and r["mode"] == "interactive" and r["caching"])
    assert r["cache_write_tokens"] == r["cache_read_tokens"] == 10_000 * 16_000
    saved = 10_000 * 16_000 * ((1.0 - 0.10) - (1.25 - 1.0)) / 1e6  # the read saves 0.9, the write costs 0.25
    assert cost[("claude-haiku-4-5", "interactive", False)] - r["cost_usd"] == pytest.approx(saved, abs=0.02)
    twice = cost_table(prices, 20_000, doc_tokens=16_000, answer_tokens=1024)
    assert twice[0]["cost_usd"] == pytest.approx(2 * rows[0]["cost_usd"], rel=1e-3)
    short = cost_table({"m": [1, 1, 0.1, 1.25]}, 10, doc_tokens=500)  # below 1,024 tokens nothing is cached
    assert short[1]["cost_usd"] == short[0]["cost_usd"]
    assert mean_target_length(1000, 3000, 1.0) == pytest.approx(2000)
    assert mean_target_length(8000, 64000, 2.0) > 36000


# ---------------------------------------------------------------------------------------------------------------
# short data
# ---------------------------------------------------------------------------------------------------------------
def test_import_sharegpt_json_and_jsonl(tmp_path):
    items = [
        {"id": "a", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello!"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "(greeting)"}, {"from": "human", "value": "2+2?"},
                                      {"from": "human", "value": "Quick."}, {"from": "gpt", "value": "4"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Anyone?"}, {"from": "gpt", "value": ""}]},
        {"id": "d", "conversations": [{"from": "narrator", "value": "x"}]},
        {"id": "e", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    (tmp_path / "s.json").write_text(json.dumps(items))
    recs, counts = import_sharegpt(tmp_path / "s.json")
    assert counts == {"kept": 3, "empty_answer": 1, "bad_role": 1}
    assert recs[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert recs[1]["messages"] == [{"role": "user", "content": "2+2?\n\nQuick."}, {"role": "assistant", "content": "4"}]
    assert all(clean_messages(r)[0] for r in recs) and recs[2]["meta"]["id"] == "sharegpt-s-e"
    write_jsonl(tmp_path / "s.jsonl", items[:2])
    recs2, _ = import_sharegpt(tmp_path / "s.jsonl")
    assert [r["messages"] for r in recs2] == [r["messages"] for r in recs[:2]]
    # a bad line is skipped and named (a7eda25 aborted the whole file); a U+2028 inside a string is no line break
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(items[0], ensure_ascii=False).replace("Hello!", "Hel\u2028lo!")
                                         .encode() + b"\n{not json\n" + json.dumps(items[4]).encode() + b"\n")
    bad = []
    recs3, counts3 = import_sharegpt(tmp_path / "bad.jsonl", bad=bad)
    assert len(recs3) == 2 and counts3 == {"kept": 2, "bad_line": 1} and recs3[0]["messages"][-1]["content"] == "Hel\u2028lo!"
    assert len(bad) == 1 and bad[0].startswith(f"{tmp_path / 'bad.jsonl'}:2: invalid JSON")
    (tmp_path / "bad.json").write_bytes(b'[{"conversations": "caf\xe9"}]')
    with pytest.raises(LongAlignError, match=r"bad.json: not valid UTF-8"):
        import_sharegpt(tmp_path / "bad.json")
    with pytest.raises(Exception, match="conversations"):
        convert_sharegpt({"text": "no turns"})


def test_magpie_with_the_real_model(smol_model_and_tokenizer, tmp_path):
    from longalign_lib.llm import make_client
    from longalign_lib.short_data import magpie_records

    model, tok = smol_model_and_tokenizer
    prefix = magpie_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n") and "<|im_start|>system" in prefix
    c = make_client("local", "smollm2-135m-instruct", cache_dir=tmp_path / "c", model_obj=model, tokenizer=tok,
                    threads=1)
    s = SynthConfig(short_question_tokens=24, short_max_new_tokens=24, min_answer_words=3)
    out, rej = tmp_path / "short.jsonl", tmp_path / "rej.jsonl"
    stats = magpie_records(c, tok, 1, s, out, rej, progress=False)
    recs = read_jsonl(out) if out.exists() else []
    rejects = read_jsonl(rej) if rej.exists() else []
    # SmolLM2-135M rambles: at a 24-token cap most self-written questions and answers are cut mid-sentence,
    # and those are rejected as `truncated` (before issue 22 they were kept as training data)
    assert stats["kept"] == len(recs) <= 1 and stats["attempts"] == len(recs) + len(rejects) <= 4
    assert stats["rejected"].get("truncated", 0) == stats["truncation"]["rejected"] >= 1
    assert all(r["truncated_step"] in ("question", "answer") for r in rejects if r["reason"] == "truncated")
    for r in recs:
        msgs, _ = clean_messages(r)
        assert msgs[0]["role"] == "user" and len(msgs[0]["content"]) >= 12 and r["meta"]["generator"] == "magpie"


# ---------------------------------------------------------------------------------------------------------------
# the stage over real HTTP
# ---------------------------------------------------------------------------------------------------------------
def _docs(n: int) -> list[dict]:
    lines = [x for x in (ROOT / "data" / "kjv_esther.txt").read_text().splitlines() if len(x) > 40]
    out = []
    for i in range(n):
        body = "\n".join(lines[i * 12:(i + 1) * 12])  # no blank line: the fake model finds the document
        out.append(Document(id=f"doc{i}", source="data", genre=["literature", "legal"][i % 2], lang="en",
                            title=f"Esther part {i}", text=body, license="public domain", n_tokens=len(body) // 4).to_dict())
    return out


def _text_of(content) -> str:
    return "".join(b["text"] for b in content) if isinstance(content, list) else content


def fake_model(body: dict, path: str) -> str:
    """Answers like an instruction-following model: a question list, or an answer quoting the document."""
    msgs = body.get("messages") or []
    prompt = _text_of(msgs[-1]["content"]) if msgs else ""  # Anthropic: the cache-marked blocks, rejoined
    doc = prompt.split("\n\n")[0]
    words = [w for w in doc.split() if w.isalpha() and len(w) > 3]
    if "numbered list" in prompt:
        return "Here are the questions:\n" + "\n".join(
            f"{k}. What does the passage say about {words[(k * 7) % len(words)]} and {words[(k * 11) % len(words)]}?"
            for k in range(1, 6)) + "\nThese cover the text."
    if "refuse-me" in prompt:
        return "I'm sorry, but I cannot answer questions about this document."
    return "According to the document, " + " ".join(words[:40]) + "."


def _cli(run_dir, server, cache, *extra, backend="openai"):
    url = server.openai_url if backend == "openai" else server.anthropic_url
    return ["synth", "--run-dir", str(run_dir), "--set", f"synth.backend={backend}", "--set", f"synth.base_url={url}",
            "--set", "synth.model=fake-model", "--set", "synth.n_short=0", "--set", f"synth.cache_dir={cache}",
            "--set", "synth.concurrency=2", "--set", "synth.max_new_tokens=64", "--set", "synth.n_questions=5",
            "--set", "synth.question_max_new_tokens=64",
            *extra]  # the paper's 5 questions (the cpu-demo preset asks for 3 to stay fast)


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_stage_over_http_records_cache_and_filters(llm_server, tmp_path, backend):
    from longalign_lib.cli import main

    llm_server.responder = fake_model
    docs = _docs(5)
    docs[3]["text"] = "refuse-me " + docs[3]["text"]
    write_jsonl(tmp_path / "run" / "corpus.jsonl", docs)
    share = tmp_path / "chats.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hello?"},
                                                     {"from": "gpt", "value": "Hi there, how can I help?"}]}]))
    args = _cli(tmp_path / "run", llm_server, tmp_path / "cache", "--set", f"synth.short_files=[{share}]",
                backend=backend)
    assert main(args) == 0
    assert llm_server.count == 10  # 2 calls per document
    long = read_jsonl(tmp_path / "run" / "long.jsonl")
    assert sorted(r["meta"]["doc_id"] for r in long) == ["doc0", "doc1", "doc2", "doc4"]
    for r in long:
        msgs, _ = clean_messages(r)
        m = r["meta"]
        assert msgs[0]["content"].startswith(docs[int(m["doc_id"][3:])]["text"][:50])
        assert msgs[0]["content"].endswith(m["question"]) and m["question"] in m["questions"]
        assert len(m["questions"]) == 5 and m["task_type"] in ("general", "summary", "reasoning", "extraction")
        assert m["answer_model"] == "fake-model" and m["usage"]["answer"]["output_tokens"] > 0
    rejects = read_jsonl(tmp_path / "run" / "synth_rejects.jsonl")
    assert [(r["doc_id"], r["reason"]) for r in rejects] == [("doc3", "refusal")]
    summary = json.loads((tmp_path / "run" / "synth.json").read_text())
    assert summary["long"]["rejected"] == {"refusal": 1} and summary["short"]["total"] == 1
    assert len(read_jsonl(tmp_path / "run" / "short.jsonl")) == 1
    assert (tmp_path / "run" / "figures" / "synth_mix.png").stat().st_size > 5000
    # second run, same cache: not a single request
    assert main(_cli(tmp_path / "run2", llm_server, tmp_path / "cache", backend=backend)
                + ["--set", f"synth.corpus_file={tmp_path / 'run' / 'corpus.jsonl'}"]) == 0
    assert llm_server.count == 10
    stage = json.loads((tmp_path / "run2" / "stages" / "synth.json").read_text())
    assert stage["metrics"]["requests"] == 0 and stage["metrics"]["cache_hits"] == 10
    assert read_jsonl(tmp_path / "run2" / "long.jsonl") != [] and \
        sorted(map(json.dumps, read_jsonl(tmp_path / "run2" / "long.jsonl"))) == sorted(map(json.dumps, long))


def test_prompts_put_the_document_first_identically_and_mark_it_for_the_cache(llm_server, tmp_path):
    """Anthropic: the question and the answer request of a document share a byte-identical, cache-marked first
    block (the document); the answer call reads it from the provider's cache. Caching off: no marker."""
    from longalign_lib.cli import main

    llm_server.responder = fake_model
    write_jsonl(tmp_path / "run" / "corpus.jsonl", _docs(2))
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", "--set", "synth.concurrency=1",
                     backend="anthropic")) == 0
    blocks = [b["messages"][0]["content"] for b in llm_server.bodies]
    assert len(blocks) == 4 and all(isinstance(b, list) and b[0]["cache_control"] for b in blocks)
    by_doc: dict = {}
    for b in blocks:
        by_doc.setdefault(b[0]["text"], []).append(b[1]["text"])
    assert len(by_doc) == 2 and all(len(v) == 2 for v in by_doc.values())  # question + answer per document
    summary = json.loads((tmp_path / "run" / "synth.json").read_text())
    assert summary["llm"]["cache_read_tokens"] > 0 and summary["llm"]["cache_write_tokens"] > 0
    llm_server.reset()
    assert main(_cli(tmp_path / "run2", llm_server, tmp_path / "cache2", "--set", "synth.prompt_caching=false",
                     "--set", f"synth.corpus_file={tmp_path / 'run' / 'corpus.jsonl'}", backend="anthropic")) == 0
    assert all(isinstance(b["messages"][0]["content"], str) for b in llm_server.bodies)


def test_magpie_through_a_server_takes_its_own_tokenizer_setting_checked_before_paying(llm_server, tmp_path,
                                                                                       capsys):
    from longalign_lib.cli import main

    llm_server.responder = fake_model
    write_jsonl(tmp_path / "run" / "corpus.jsonl", _docs(2))
    short = ["--set", "synth.n_short=1", "--set", "synth.short_backend=openai", "--set", "synth.short_model=smollm2"]
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", *short)) == 2
    assert "synth.short_tokenizer is not set" in capsys.readouterr().err
    assert llm_server.count == 0, "nothing paid before the prerequisite check"
    tides = "How do tides form along a coastline?"

    def served(body, path):  # a Magpie question over /v1/completions, then its answer over chat
        if path == "/v1/completions":
            return " " + tides
        if body["messages"][-1]["content"] == tides:
            return ("Tides form because the gravity of the moon and the sun pulls on the oceans, raising bulges "
                    "of water that sweep around the planet as it turns.")
        return fake_model(body, path)

    llm_server.responder = served
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", *short,
                     "--set", "synth.short_tokenizer=smollm2-135m-instruct")) == 0
    prompt = next(b["prompt"] for b in llm_server.bodies if "prompt" in b)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>user\n")  # SmolLM2's template
    assert read_jsonl(tmp_path / "run" / "short.jsonl")[0]["meta"]["generator"] == "magpie"


def test_dry_run_spends_nothing(llm_server, tmp_path, capsys):
    from longalign_lib.cli import main

    write_jsonl(tmp_path / "run" / "corpus.jsonl", _docs(4))
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", "--dry-run",
                     "--set", "synth.prices={fake-model: [1.0, 4.0]}")) == 0
    assert llm_server.count == 0 and not (tmp_path / "run" / "long.jsonl").exists()
    plan = json.loads((tmp_path / "run" / "synth_plan.json").read_text())
    assert plan["calls"] == 8 and plan["output_tokens"] == 8 * 64
    assert plan["cost_usd"] == pytest.approx((plan["input_tokens"] * 1.0 + plan["output_tokens"] * 4.0) / 1e6, rel=1e-3)
    printed = capsys.readouterr().out
    assert "8 calls" in printed and "| fake-model | batch | on |" in printed
    # the 10k-record estimate: interactive vs batch x caching, at this model's price
    rows = {(r["mode"], r["caching"]): r for r in plan["scale"]["rows"]}
    assert plan["scale"]["records"] == 10_000 and len(rows) == 4 and plan["scale"]["mean_doc_tokens"] > 0
    assert rows[("batch", False)]["cost_usd"] == pytest.approx(rows[("interactive", False)]["cost_usd"] / 2, rel=1e-3)


def test_resume_after_kill_has_no_duplicates_and_no_losses(llm_server, tmp_path):
    """Kill the CLI mid-run (SIGKILL), rerun with --resume: every document exactly once, finished work kept."""
    from longalign_lib.cli import main

    llm_server.responder = fake_model
    llm_server.push(delay=0.25, times=200)  # slow answers so the kill lands mid-run
    n = 10
    write_jsonl(tmp_path / "run" / "corpus.jsonl", _docs(n))
    out = tmp_path / "run" / "long.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "longalign_lib.cli",
                             *_cli(tmp_path / "run", llm_server, tmp_path / "cache")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240  # generous: a loaded shared machine starts Python slowly
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = out.read_text().splitlines()
    assert 3 <= len(before) < n, "the kill must land mid-run"
    sent_before = llm_server.count
    llm_server.queue.clear()
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", "--resume")) == 0
    after = read_jsonl(out)
    ids = [r["meta"]["doc_id"] for r in after]
    assert sorted(ids) == [f"doc{i}" for i in range(n)] and len(set(ids)) == n
    assert [json.dumps(r, ensure_ascii=False) for r in after[: len(before)]] == \
        [json.dumps(json.loads(line), ensure_ascii=False) for line in before]
    # finished documents were not asked again (their answers were in the file, their calls in the cache)
    assert llm_server.count - sent_before <= 2 * (n - len(before))


def test_stage_errors_are_clear(tmp_path):
    from longalign_lib.stages.synth import run as run_stage

    cfg = load_config("cpu-demo", ["synth.corpus_file=/nonexistent/corpus.jsonl"])
    with pytest.raises(LongAlignError, match="corpus_file"):
        run_stage(cfg, tmp_path, None)
    (tmp_path / "corpus.jsonl").write_text('{"id": "x", "genre": "code"}\n')
    with pytest.raises(LongAlignError, match=r"corpus.jsonl:1: field 'text' missing"):
        run_stage(load_config("cpu-demo"), tmp_path, None)


def test_grounding_is_robust_to_inflection():
    """An on-topic answer that inflects the document's words (plural, possessive, tense) is grounded: the filter
    compares stems, not exact words (exact words scored such an answer 0.05 and rejected it as off_document)."""
    doc = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    answer = "God's heavens and the earth were created first; the earth had no forms and was a void."
    assert grounding(answer, doc) > 0.8
    assert check_answer(answer, doc, SynthConfig(min_answer_words=4)) is None


def test_parser_rejects_questions_to_the_user_about_the_chat():
    reply = ("1. What's your next question?\n2. Who was Boaz, and how was he related to Elimelech?\n"
             "3. Do you have any other questions about the text?\n4. Would you like me to summarize chapter 2?\n"
             "5. What is the next thing Naomi asks Ruth to do?")
    assert parse_questions(reply) == ["Who was Boaz, and how was he related to Elimelech?",
                                      "What is the next thing Naomi asks Ruth to do?"]
    assert parse_questions("What's your next question?") == []


# ---------------------------------------------------------------------------------------------------------------
# replies cut at the token cap are never training data (issue 22, point 2)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_answers_cut_at_the_cap_are_rejected_as_truncated_or_regenerated(llm_server, tmp_path, backend):
    """The fake answers run ~45 words: with max_new_tokens=20 every answer ends mid-sentence at the cap (OpenAI
    finish_reason "length", Anthropic stop_reason "max_tokens"); the question list (~63 words) is cut at 30 in its
    third item. Fails on a7eda25: the five cut answers were kept as records."""
    from longalign_lib.cli import main

    llm_server.responder = fake_model
    llm_server.cap_words = True
    write_jsonl(tmp_path / "corpus.jsonl", _docs(5))
    capped = ["--set", "synth.max_new_tokens=20", "--set", "synth.question_max_new_tokens=30",
              "--set", f"synth.corpus_file={tmp_path / 'corpus.jsonl'}"]
    run = tmp_path / "run"
    assert main(_cli(run, llm_server, tmp_path / "cache", *capped, backend=backend)) == 0
    assert llm_server.count == 10
    assert not (run / "long.jsonl").exists() or read_jsonl(run / "long.jsonl") == []
    rejects = read_jsonl(run / "synth_rejects.jsonl")
    assert [(r["reason"], r["truncated_step"]) for r in rejects] == [("truncated", "answer")] * 5
    assert all(len(r["answer"].split()) == 20 for r in rejects)  # what the cap left: kept out of training
    assert all(1 <= len(r["questions"]) <= 2 for r in rejects)  # only the question lines before the cut
    summary = json.loads((run / "synth.json").read_text())
    assert summary["long"]["rejected"] == {"truncated": 5}
    assert summary["long"]["truncation"] == {"rejected": 5, "retried": 0, "question_lists_cut": 5,
                                             "retry_truncated_factor": 0.0}
    stage = json.loads((run / "stages" / "synth.json").read_text())
    assert stage["metrics"]["reject_truncated"] == 5 and stage["metrics"]["truncated_rejected"] == 5
    assert "5 long and 0 Magpie replies rejected as truncated" in stage["report"]

    # asked for: each cut reply is regenerated once with 4x the cap (80 and 120 words), which the answers fit
    run2 = tmp_path / "run2"
    retry = [*capped, "--set", "synth.retry_truncated_factor=4"]
    assert main(_cli(run2, llm_server, tmp_path / "cache", *retry, backend=backend)) == 0
    stage = json.loads((run2 / "stages" / "synth.json").read_text())
    assert stage["metrics"]["cache_hits"] >= 5  # the cut question lists come from the cache, the larger caps are new
    assert stage["metrics"]["truncated_retried"] == 10 and stage["metrics"]["truncated_rejected"] == 0
    sent = llm_server.count
    long = read_jsonl(run2 / "long.jsonl")
    assert len(long) == 5 and all(r["meta"]["truncation_retries"] == 2 for r in long)
    assert all(r["messages"][1]["content"].endswith(".") and len(r["messages"][1]["content"].split()) > 20
               for r in long)
    assert all(len(r["meta"]["questions"]) == 5 and not r["meta"]["questions_cut"] for r in long)
    assert all(r["meta"]["answer_max_new_tokens"] == 80 for r in long)
    summary = json.loads((run2 / "synth.json").read_text())
    assert summary["long"]["truncation"] == {"rejected": 0, "retried": 10, "question_lists_cut": 0,
                                             "retry_truncated_factor": 4.0}
    # the same run again: every reply, cut or not, is in the cache
    assert main(_cli(tmp_path / "run3", llm_server, tmp_path / "cache", *retry, backend=backend)) == 0
    assert llm_server.count == sent
    assert sorted(map(json.dumps, read_jsonl(tmp_path / "run3" / "long.jsonl"))) == sorted(map(json.dumps, long))


def test_retry_factor_must_be_zero_or_above_one(tmp_path, llm_server):
    from longalign_lib.cli import main

    write_jsonl(tmp_path / "corpus.jsonl", _docs(1))
    assert main(_cli(tmp_path / "run", llm_server, tmp_path / "cache", "--set", "synth.retry_truncated_factor=0.5",
                     "--set", f"synth.corpus_file={tmp_path / 'corpus.jsonl'}")) == 2
    assert llm_server.count == 0


def test_magpie_rejects_cut_questions_and_answers(llm_server, smol_tokenizer, tmp_path):
    """Magpie over /v1/completions: a self-written question cut at short_question_tokens and an answer cut at
    short_max_new_tokens are rejected as `truncated`, or regenerated with a larger cap when asked. Fails on
    a7eda25 (both were kept)."""
    from longalign_lib.llm import make_client
    from longalign_lib.short_data import magpie_records

    def served(body, path):
        if path == "/v1/completions":
            return f"What are three good habits for a student starting university number {body.get('seed')}?"
        return ("Three good habits are keeping a weekly plan, reviewing notes on the day of each lecture, "
                "and sleeping enough before exams so that memory can consolidate what was learned.")

    llm_server.responder = served
    llm_server.cap_words = True
    client = make_client("openai", "served", base_url=llm_server.openai_url, cache_dir=tmp_path / "cache")
    out, rej = tmp_path / "short.jsonl", tmp_path / "rej.jsonl"
    s = SynthConfig(short_question_tokens=6, short_max_new_tokens=64, min_answer_words=3)
    stats = magpie_records(client, smol_tokenizer, 1, s, out, rej, progress=False)
    assert stats["kept"] == 0 and stats["rejected"] == {"truncated": 4} and stats["truncation"]["rejected"] == 4
    assert {r["truncated_step"] for r in read_jsonl(rej)} == {"question"}
    s = SynthConfig(short_question_tokens=64, short_max_new_tokens=12, min_answer_words=3)
    stats = magpie_records(client, smol_tokenizer, 1, s, out, rej, progress=False)
    assert stats["kept"] == 0 and stats["rejected"] == {"truncated": 4}
    assert {r["truncated_step"] for r in read_jsonl(rej)} == {"answer"}
    s = SynthConfig(short_question_tokens=64, short_max_new_tokens=12, min_answer_words=3, retry_truncated_factor=3)
    stats = magpie_records(client, smol_tokenizer, 2, s, out, rej, progress=False)
    recs = read_jsonl(out)
    assert stats["kept"] == len(recs) == 2 and stats["truncation"] == {
        "rejected": 0, "retried": 2, "question_lists_cut": 0, "retry_truncated_factor": 3.0}
    assert all(r["messages"][1]["content"].endswith("learned.") and r["meta"]["truncation_retries"] == 1
               for r in recs)
