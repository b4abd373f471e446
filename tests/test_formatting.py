"""formatting.py: labels cover exactly the assistant spans, token by token, for two real chat templates."""
from __future__ import annotations

import json
import re

import pytest

from longalign_lib.formatting import (
    IGNORE,
    RecordError,
    assistant_char_spans,
    clean_messages,
    format_file,
    format_record,
    format_records,
)
from longalign_lib.io import LongAlignError, read_jsonl
from longalign_lib.models import load_tokenizer

from .conftest import SAMPLE

# A Llama-3-style template (header tokens, trimmed content, <|eot_id|> ends each turn), written for this test.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def expected_spans_chatml(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Independent oracle: find each '<|im_start|>assistant\\n' + content + '<|im_end|>' in the rendered text."""
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = "<|im_start|>assistant\n"
        i = text.index(head + m["content"] + "<|im_end|>", pos) + len(head)
        j = i + len(m["content"]) + len("<|im_end|>")
        spans.append((i, j))
        pos = j
    return spans


def expected_spans_llama3(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        i = text.index(head + body, pos) + len(head)
        spans.append((i, i + len(body)))
        pos = i + len(body)
    return spans


def check_token_by_token(tok, record, oracle):
    messages, _ = clean_messages(record)
    ex = format_record(record, tok)
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]
    spans = oracle(text, messages)
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        inside = any(s <= a < e for s, e in spans)
        assert (ex.labels[t] != IGNORE) == inside, f"token {t} {tok.decode([ex.input_ids[t]])!r}"
        if inside:
            assert ex.labels[t] == ex.input_ids[t]
    # the target tokens, run by run, decode to exactly the answers plus the end-of-turn marker
    runs, cur = [], []
    for tid, y in zip(ex.input_ids, ex.labels, strict=True):
        if y != IGNORE:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == [text[s:e] for s, e in spans]
    return ex


@pytest.mark.parametrize("line", range(5))
def test_smollm2_chatml_labels_token_by_token(smol_tokenizer, line):
    record = read_jsonl(SAMPLE)[line]
    ex = check_token_by_token(smol_tokenizer, record, expected_spans_chatml)
    assert ex.n_target > 5
    assert smol_tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE]).endswith("<|im_end|>")


@pytest.mark.parametrize("line", range(5))
def test_llama3_template_labels_token_by_token(llama3_tokenizer, line):
    record = read_jsonl(SAMPLE)[line]
    ex = check_token_by_token(llama3_tokenizer, record, expected_spans_llama3)
    assert llama3_tokenizer.convert_ids_to_tokens(ex.input_ids[0]) == "<|begin_of_text|>"
    assert ex.labels[0] == IGNORE


def test_labels_exclude_whitespace_after_end_of_turn(smol_tokenizer):
    rec = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
    text, spans = assistant_char_spans(smol_tokenizer, clean_messages(rec)[0])
    assert [text[s:e] for s, e in spans] == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


def test_validation_rules():
    with pytest.raises(RecordError) as e:
        clean_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]})
    assert e.value.reason == "empty_answer"
    with pytest.raises(RecordError) as e:
        clean_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \u200b "}]})
    assert e.value.reason == "empty_answer"
    with pytest.raises(RecordError) as e:
        clean_messages({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]})
    assert e.value.reason == "bad_order"
    with pytest.raises(RecordError) as e:
        clean_messages({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]})
    assert e.value.reason == "bad_order"
    with pytest.raises(RecordError) as e:
        clean_messages({"messages": [{"role": "tool", "content": "q"}]})
    assert e.value.reason == "bad_role"
    with pytest.raises(RecordError) as e:
        clean_messages({"conversations": []})
    assert "ShareGPT" in str(e.value)
    msgs, dropped = clean_messages({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a\u200bb\ufeff"}, {"role": "user", "content": "unanswered"}]})
    assert dropped and len(msgs) == 3 and msgs[-1]["content"] == "ab"


def test_rejections_are_counted_not_trained(smol_tokenizer):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    only_user = {"messages": [{"role": "user", "content": "q"}]}
    exs, st = format_records([good, bad, good, only_user], smol_tokenizer, source="x.jsonl")
    assert len(exs) == 2 and st.kept == 2 and st.total == 4
    assert st.rejected == {"empty_answer": 1, "no_answer": 1}
    assert st.errors[0].startswith("x.jsonl:2:")


def _long_record(n_words=600):
    doc = " ".join(f"word{i}" for i in range(n_words))
    return {"messages": [{"role": "user", "content": doc + "\nQuestion: what is the last word?"},
                         {"role": "assistant", "content": f"The last word is word{n_words - 1}."}]}


def test_middle_truncation_keeps_head_tail_and_answer(smol_tokenizer):
    rec = _long_record()
    full = format_record(rec, smol_tokenizer)
    ex = format_record(rec, smol_tokenizer, max_length=300, truncation="middle")
    assert ex.truncated and ex.length == 300
    assert ex.n_target == full.n_target  # the answer survives intact
    assert ex.input_ids[:50] == full.input_ids[:50] and ex.input_ids[-80:] == full.input_ids[-80:]


def test_right_truncation_and_skip(smol_tokenizer):
    rec = _long_record()
    answer_first = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi! " * 200}]}
    ex = format_record(answer_first, smol_tokenizer, max_length=100, truncation="right")
    assert ex.length == 100 and ex.truncated and ex.n_target > 50
    exs, st = format_records([rec], smol_tokenizer, max_length=300, truncation="right")
    assert st.rejected == {"no_target_after_truncation": 1}  # right truncation cut the whole answer
    exs, st = format_records([rec, rec], smol_tokenizer, max_length=300, truncation="skip")
    assert exs == [] and st.rejected == {"too_long": 2}
    with pytest.raises(LongAlignError):
        format_record(rec, smol_tokenizer, truncation="sideways")


def test_format_file_errors_name_file_and_line(smol_tokenizer, tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    p.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": None}]}) + "\n")
    with pytest.raises(LongAlignError, match=re.escape(f"{p}:2:")):
        format_file(p, smol_tokenizer, strict=True)
    exs, st = format_file(p, smol_tokenizer)
    assert st.kept == 1 and st.rejected == {"empty_answer": 1}
    p.write_text(good + "\n{not json\n")
    with pytest.raises(LongAlignError, match=re.escape(f"{p}:2: invalid JSON")):
        format_file(p, smol_tokenizer, strict=True)
    exs, st = format_file(p, smol_tokenizer)  # not strict: the bad line is skipped and named, the good one kept
    assert st.kept == len(exs) == 1 and st.bad_lines[0].startswith(f"{p}:2: invalid JSON")


def test_no_chat_template_is_a_clear_error(smol_tokenizer):
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.chat_template = None
    with pytest.raises(LongAlignError, match="no chat template"):
        format_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, tok)
