"""dataset.py: the tokenized set round-trips to the chat-templated text, caches, mixes deterministically, rejects clearly."""
from __future__ import annotations

import json
import shutil
from argparse import Namespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longalign_lib import dataset as D
from longalign_lib.config import DataConfig, load_config
from longalign_lib.formatting import IGNORE, RecordError, clean_messages, format_batch, format_record
from longalign_lib.io import LongAlignError, read_jsonl, write_jsonl

from .conftest import SAMPLE

BIG = 40_000  # no truncation of the sample's long records


@pytest.fixture(scope="module")
def sample():
    return read_jsonl(SAMPLE)


def chats(n: int, seed: int = 0) -> list[dict]:
    """Small varied chats (1-3 turns, some with a system message)."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog while naomi and ruth glean barley in the field".split()
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": " ".join(rng.choice(words, 3 + (i * 7 + t) % 25))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(words, 2 + (i * 5 + t) % 30))})
        out.append({"messages": msgs, "meta": {"i": i}})
    return out


def test_round_trip_decode_equals_chat_template(tmp_path, smol_tokenizer, sample):
    ds, summary = D.build_dataset({"sample": SAMPLE}, smol_tokenizer, DataConfig(max_length=BIG), tmp_path / "tok")
    assert summary["kept"] == len(sample) == len(ds) and not summary["cached"]
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int32"
    for row, rec in zip(ds, sample, strict=True):
        messages, _ = clean_messages(rec)
        text = smol_tokenizer.apply_chat_template(messages, tokenize=False)
        assert smol_tokenizer.decode(row["input_ids"]) == text
        ex = format_record(rec, smol_tokenizer, BIG)
        assert row["input_ids"] == ex.input_ids and row["labels"] == ex.labels
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])  # no padding
        assert row["n_target"] == sum(y != IGNORE for y in row["labels"]) > 0
        assert row["source"] == "sample" and row["origin"].startswith(str(SAMPLE))
        target_text = smol_tokenizer.decode([t for t, y in zip(row["input_ids"], row["labels"], strict=True) if y != IGNORE])
        assert target_text == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_format_batch_matches_format_record(smol_tokenizer, sample):
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
           {"messages": [{"role": "bot", "content": "x"}]}, {"nope": 1},
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "dangling"}]}]
    records = sample + chats(12) + bad
    for max_length, mode in ((None, "middle"), (300, "middle"), (300, "right"), (300, "skip")):
        got = format_batch(records, smol_tokenizer, max_length, mode)
        for rec, res in zip(records, got, strict=True):
            try:
                want = format_record(rec, smol_tokenizer, max_length, mode)
            except RecordError as e:
                assert isinstance(res, RecordError) and res.reason == e.reason
                continue
            assert (res.input_ids, res.labels, res.truncated, res.meta) == \
                   (want.input_ids, want.labels, want.truncated, want.meta)


def test_rejections_counted_by_reason_with_file_and_line(tmp_path, smol_tokenizer):
    good = chats(3)
    rows = [good[0], {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            good[1], {"messages": [{"role": "assistant", "content": "a"}]}, {"conversations": []}, good[2]]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, rows)
    ds, s = D.build_dataset([path], smol_tokenizer, DataConfig(max_length=BIG), tmp_path / "tok")
    assert len(ds) == 3 and s["kept"] == 3 and s["total"] == 6
    assert s["rejected"] == {"empty_answer": 1, "bad_order": 1, "bad_schema": 1}
    assert s["by_source"]["mixed"]["rejected"] == s["rejected"]
    assert s["errors"][0].startswith(f"{path}:2: ") and "empty" in s["errors"][0]
    assert ds["origin"] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert D.find_record({"mixed": path}, "mixed", ds["origin"][2]) == good[2]
    assert D.find_record({"records": good}, "records", "<records>:2") == good[1]


def _bad_input_file(path, kind: str):
    """Three good chats around one bad line of the given kind; returns (good records, bad line number or None)."""
    good = chats(3)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    if kind == "broken_json":
        lines.insert(1, b'{"messages": [')
        bad = 2
    elif kind == "invalid_utf8":
        lines.insert(2, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')  # latin-1, not UTF-8
        bad = 3
    elif kind == "line_separators":  # U+2028 / U+0085 inside strings: valid JSONL, as write_jsonl writes it
        good[1]["messages"][1]["content"] = "para one\u2028para two\x85end"
        lines[1] = json.dumps(good[1], ensure_ascii=False).encode()
        bad = None
    elif kind == "bom":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
        bad = None
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good, bad


@pytest.mark.parametrize("kind", ["broken_json", "invalid_utf8", "line_separators", "bom"])
def test_bad_input_loses_no_good_line_and_names_each_bad_one(tmp_path, smol_tokenizer, kind):
    """Fails on a7eda25: a broken line aborted the build, invalid UTF-8 was silently replaced (the record was
    trained on with U+FFFD), U+2028/U+0085 split one record into 3 "bad lines", and a BOM aborted at line 1."""
    path = tmp_path / "in.jsonl"
    good, bad = _bad_input_file(path, kind)
    ds, s = D.build_dataset([path], smol_tokenizer, DataConfig(max_length=BIG), tmp_path / "tok")
    assert s["kept"] == len(ds) == 3 and s["rejected"] == {}
    want = ["para one\u2028para two\x85end"] if kind == "line_separators" else []
    assert [m["content"] for r in good for m in r["messages"] if "\u2028" in m["content"]] == want
    for row, rec in zip(ds, good, strict=True):
        assert row["input_ids"] == format_record(rec, smol_tokenizer, BIG).input_ids
    if bad is None:
        assert s["bad_lines"] == []
    else:
        assert len(s["bad_lines"]) == 1 and s["bad_lines"][0].startswith(f"{path}:{bad}: ")
        assert ("not valid UTF-8" if kind == "invalid_utf8" else "invalid JSON") in s["bad_lines"][0]
        assert f"{path}:{bad}" not in ds["origin"]
    assert json.loads((tmp_path / "tok" / D.META_FILE).read_text())["summary"]["bad_lines"] == s["bad_lines"]


def test_a_file_with_no_good_line_is_one_error_and_writes_nothing(tmp_path, smol_tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"messages": [\n\xff\xfe\n')
    with pytest.raises(LongAlignError, match=rf"{path}: no line .* line 1: invalid JSON.*1 more bad line"):
        D.build_dataset([path], smol_tokenizer, DataConfig(), tmp_path / "tok")
    assert not (tmp_path / "tok").exists() and not list(tmp_path.glob(".tok*"))


def test_truncation_and_skip_are_reported(tmp_path, smol_tokenizer, sample):
    ds, s = D.build_dataset({"sample": SAMPLE}, smol_tokenizer, DataConfig(max_length=512), tmp_path / "a")
    assert s["truncated"] == {"over_max_length (middle)": 3} and max(ds["length"]) == 512
    assert sum(ds["truncated"]) == 3
    ds, s = D.build_dataset({"sample": SAMPLE}, smol_tokenizer, DataConfig(max_length=512, truncation="skip"),
                            tmp_path / "b")
    assert s["rejected"] == {"too_long": 3} and len(ds) == 2


def test_cache_rebuilds_only_when_inputs_tokenizer_or_settings_change(tmp_path, smol_tokenizer):
    path = tmp_path / "short.jsonl"
    write_jsonl(path, chats(6))
    cfg, out = DataConfig(max_length=BIG), tmp_path / "tok"
    _, s1 = D.build_dataset({"short": path}, smol_tokenizer, cfg, out)
    _, s2 = D.build_dataset({"short": path}, smol_tokenizer, cfg, out)
    assert not s1["cached"] and s2["cached"] and s1["key"] == s2["key"]
    _, s3 = D.build_dataset({"short": path}, smol_tokenizer, DataConfig(max_length=64), out)
    assert not s3["cached"]
    write_jsonl(path, chats(7))
    ds, s4 = D.build_dataset({"short": path}, smol_tokenizer, DataConfig(max_length=64), out)
    assert not s4["cached"] and len(ds) == 7
    tok2 = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok2.chat_template = smol_tokenizer.chat_template.replace("<|im_start|>system", "<|im_start|>system ")
    assert D.tokenizer_fingerprint(tok2) != D.tokenizer_fingerprint(smol_tokenizer)
    _, s5 = D.build_dataset({"short": path}, tok2, DataConfig(max_length=64), out)
    assert not s5["cached"]
    _, s6 = D.build_dataset({"short": path}, tok2, DataConfig(max_length=64), out, rebuild=True)
    assert not s6["cached"]


def test_parallel_build_equals_serial(tmp_path, smol_tokenizer):
    records = chats(40, seed=3)
    cfg = DataConfig(max_length=BIG)
    a, _ = D.build_dataset(records, smol_tokenizer, cfg, tmp_path / "one", num_proc=1, chunk_size=8)
    b, s = D.build_dataset(records, smol_tokenizer, cfg, tmp_path / "two", num_proc=2, chunk_size=8)
    assert s["num_proc"] == 2
    assert a.to_dict() == b.to_dict()


def test_mix_ratio_counts_and_determinism():
    long_, short = [f"L{i}" for i in range(10)], [f"S{i}" for i in range(100)]
    m = D.mix(long_, short, ratio=0.5, seed=1)
    assert sum(s == "long" for s, _ in m) == 10 and sum(s == "short" for s, _ in m) == 10
    assert m == D.mix(long_, short, ratio=0.5, seed=1) and m != D.mix(long_, short, ratio=0.5, seed=2)
    assert all(r.startswith("L") == (s == "long") for s, r in m)
    m = D.mix(long_, short, ratio=0.25, seed=0)  # long is scarce: keep all 10, take 30 short
    assert (sum(s == "long" for s, _ in m), sum(s == "short" for s, _ in m)) == (10, 30)
    m = D.mix(long_, short, ratio=0.2, seed=0)
    assert len(set(r for _, r in m)) == len(m)  # without replacement
    m = D.mix(long_, short, counts=(25, None), seed=0)  # upsampling repeats whole copies first
    longs = [r for s, r in m if s == "long"]
    assert len(longs) == 25 and all(longs.count(r) in (2, 3) for r in long_) and len(m) == 125
    assert len(D.mix(long_, short)) == 110
    assert [s for s, _ in D.mix(long_, short, ratio=1.0)] == ["long"] * 10
    with pytest.raises(LongAlignError, match="between 0 and 1"):
        D.mix(long_, short, ratio=1.5)
    with pytest.raises(LongAlignError, match="not both"):
        D.mix(long_, short, ratio=0.5, counts=(1, 1))


def test_build_mixes_long_and_short_by_ratio(tmp_path, smol_tokenizer):
    long_ = [{"messages": [{"role": "user", "content": "long doc " * 50 + str(i)},
                           {"role": "assistant", "content": "answer"}]} for i in range(4)]
    cfg = DataConfig(max_length=BIG, long_ratio=0.5, seed=7)
    ds, s = D.build_dataset({"long": long_, "short": chats(20)}, smol_tokenizer, cfg, tmp_path / "tok")
    assert s["mix"]["long"] == {"available": 4, "selected": 4} and s["mix"]["short"]["selected"] == 4
    assert sorted(ds["source"]) == ["long"] * 4 + ["short"] * 4
    again, _ = D.build_dataset({"long": long_, "short": chats(20)}, smol_tokenizer, cfg, tmp_path / "tok2")
    assert again["origin"] == ds["origin"]


def test_never_replaces_a_folder_it_did_not_write(tmp_path, smol_tokenizer):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(LongAlignError, match="refusing to replace"):
        D.build_dataset(chats(2), smol_tokenizer, DataConfig(), precious)
    assert (precious / "keep.txt").read_text() == "mine"


def test_load_tokenized_errors(tmp_path, smol_tokenizer):
    with pytest.raises(LongAlignError, match="no tokenized dataset"):
        D.load_tokenized(tmp_path / "missing")
    ds, _ = D.build_dataset(chats(3), smol_tokenizer, DataConfig(), tmp_path / "tok")
    ds.remove_columns(["labels"]).save_to_disk(str(tmp_path / "nolabels"))
    with pytest.raises(LongAlignError, match=r"lacks column\(s\) \['labels'\]"):
        D.load_tokenized(tmp_path / "nolabels")


def test_tokenize_stage_falls_back_to_sample_then_uses_stage1_files(tmp_path, sample):
    from longalign_lib.pipeline import run_one

    cfg = load_config("cpu-demo", ["data.max_length=4096", "data.mix_sample=false"])
    run = tmp_path / "run"
    r = run_one("tokenize", cfg, run, Namespace(rebuild=False))
    assert "fell back to the bundled sample" in r.report and r.metrics["records"] == 5
    summary = json.loads((run / "tokenize.json").read_text())
    assert summary["by_source"]["long"]["kept"] == 3 and summary["by_source"]["short"]["kept"] == 2
    shutil.rmtree(run)
    write_jsonl(run / "long.jsonl", sample[:3])
    write_jsonl(run / "short.jsonl", sample[3:] + chats(4))
    r = run_one("tokenize", cfg, run, Namespace(rebuild=False))
    assert "long.jsonl" in r.report and r.metrics["records"] == 9 and not r.metrics["cached"]
    r = run_one("tokenize", cfg, run, Namespace(rebuild=False))
    assert r.metrics["cached"]
    assert set(D.load_tokenized(run / "tokenized")["source"]) == {"long", "short"}


def _labels_loop(ids, offsets, spans):
    """The original one-token-at-a-time rule (formatting.py before vectorising), kept here as the oracle."""
    labels, si = [IGNORE] * len(ids), 0
    for t, (a, b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si == len(spans):
            break
        s, e = spans[si]
        if s <= a < e and b > a:
            labels[t] = ids[t]
    return labels


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=60),
       st.lists(st.integers(0, 150), max_size=8))
def test_vectorised_labels_match_the_token_loop(steps, cuts):
    """Monotone offsets with zero-width tokens and spans touching token edges: same labels as the loop."""
    from longalign_lib.formatting import labels_from_offsets

    offsets, pos = [], 0
    for gap, width in steps:
        pos += gap
        offsets.append((pos, pos + width))
    ids = list(range(100, 100 + len(offsets)))
    cuts = sorted(set(cuts))
    spans = [(a, b) for a, b in zip(cuts[0::2], cuts[1::2], strict=False) if b > a]
    assert labels_from_offsets(ids, offsets, spans) == _labels_loop(ids, offsets, spans)


def test_target_counts_are_what_the_loss_sees(tmp_path, smol_tokenizer):
    """A template that opens with the answer puts a target at position 0. Nothing precedes it, so the loss never
    trains it: the dataset's n_target and Example.n_target leave it out, exactly like the collator's weights."""
    import copy

    from longalign_lib.batching import collate_packed

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>\n"
                         "{% endif %}{% endfor %}")
    rec = {"messages": [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Hello, friend."}]}
    ex = format_record(rec, tok)
    assert ex.labels[0] != IGNORE  # the answer opens the text: position 0 is labelled
    ds, _ = D.build_dataset([rec], tok, DataConfig(), tmp_path / "tok", num_proc=1)
    seen = int((collate_packed([{"input_ids": ex.input_ids, "labels": ex.labels, "idx": 0}], 1.0)["loss_weights"]
                > 0).sum())
    print(f"loss sees {seen} targets; Example.n_target {ex.n_target}; dataset n_target {ds[0]['n_target']}")
    assert seen == sum(y != IGNORE for y in ex.labels[1:])
    assert ex.n_target == seen and ds[0]["n_target"] == seen


def test_training_set_is_what_tokenize_wrote_and_never_stale(tmp_path):
    """inputs.training_set (analyze, pack and train read through it): the tokenize output while its inputs and
    settings match; re-tokenized when a data setting changed; a clear error for a missing explicit folder."""
    from longalign_lib import inputs
    from longalign_lib.pipeline import run_one

    run = tmp_path / "run"
    cfg = load_config("cpu-demo", ["data.max_length=1024"])
    r = run_one("tokenize", cfg, run, Namespace(rebuild=False))
    ds, note = inputs.training_set(cfg, run)
    longest = max(ds["length"])
    assert "up to date" in note and len(ds) == r.metrics["records"] == 5 and longest == 1024
    ds2, note2 = inputs.training_set(load_config("cpu-demo", ["data.max_length=512"]), run)
    assert "tokenized it first" in note2 and max(ds2["length"]) == 512
    with pytest.raises(LongAlignError, match="no tokenized dataset here"):
        inputs.training_set(cfg, run, path=tmp_path / "nowhere")


def test_mix_sample_adds_the_bundled_sample_to_what_synth_kept(tmp_path):
    """data.mix_sample: the offline presets train on the bundled sample too, so a synth stage that rejected every
    cut reply (an empty long.jsonl) still leaves a trainable mix; without it only the run's own files are read."""
    from longalign_lib.config import load_config
    from longalign_lib.inputs import stage1_records

    (tmp_path / "long.jsonl").write_text("")  # synth kept nothing: every reply hit its cap
    (tmp_path / "short.jsonl").write_text("")
    off = load_config("cpu-demo", ["data.mix_sample=false"])
    found, note = stage1_records(off, tmp_path)
    assert [s for s, _ in found] == ["long", "short"] and "bundled sample" not in note
    on = load_config("cpu-demo")
    assert on.data.mix_sample and load_config("gpu-small").data.mix_sample
    found, note = stage1_records(on, tmp_path)
    assert [s for s, _ in found] == ["long", "short", "sample_long", "sample_short"]
    assert "data.mix_sample" in note and all(len(r) > 0 for s, r in found if s.startswith("sample_"))
