"""corpus.py: sources (dirs, stdlib, pydoc topics, shipped data, HF datasets on disk), shaping, genre balance."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from longalign_lib import corpus
from longalign_lib.config import CorpusConfig, load_config
from longalign_lib.corpus import (
    SourceMissing,
    build_corpus,
    detect_lang,
    draw_target,
    load_corpus,
    make_counter,
)
from longalign_lib.io import LongAlignError, read_jsonl

FIELDS = {"id", "source", "genre", "lang", "title", "text", "license"}


@pytest.fixture(scope="module")
def count(smol_tokenizer):
    return make_counter(smol_tokenizer)


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "docs"
    (d / "pkg").mkdir(parents=True)
    rng = random.Random(0)
    words = "river stone light harbour engine ledger meadow signal copper lantern orbit valley".split()
    for i in range(6):  # short notes: must be merged
        paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(3)]
        (d / f"note{i}.md").write_text(f"# Note {i}\n\n" + "\n\n".join(paras))
    big = "\n\n".join(" ".join(rng.choice(words) for _ in range(80)) + "." for _ in range(120))
    (d / "book.txt").write_text(big)  # one long text: must be cut
    code = "\n\n".join(f"def f{i}(x):\n    '''Return x plus {i}.'''\n    return x + {i}\n" for i in range(300))
    (d / "pkg" / "mod.py").write_text(code)
    (d / "image.png").write_bytes(b"\x89PNG not text")
    return d


def test_dir_source_shapes_lengths_and_balances_genres(text_dir, count):
    cfg = CorpusConfig(sources=[], dirs=[str(text_dir)], n_docs=6, min_tokens=300, max_tokens=900, seed=1,
                       max_chunks_per_doc=3)
    docs, notes = build_corpus(cfg, count, progress=False)
    assert notes[f"dir:{text_dir}#code"] == notes[f"dir:{text_dir}#text"] == "ok" and len(docs) == 6
    for d in docs:
        assert 300 <= d.n_tokens <= 900, d.n_tokens
        assert abs(count(d.text) - d.n_tokens) <= 0.1 * d.n_tokens  # the recorded count is the real one
        assert FIELDS <= set(d.to_dict()) and d.lang == "en"
    assert len({d.id for d in docs}) == 6
    genres = Counter(d.genre for d in docs)
    assert genres == {"code": 3, "text": 3}  # even genres
    assert any("(+" in d.title for d in docs), "short notes are merged into one document"
    per_origin = Counter(d.title.split(" (+")[0] for d in docs)
    assert max(per_origin.values()) <= 3  # max_chunks_per_doc
    again, _ = build_corpus(cfg, count, progress=False)
    assert [d.id for d in again] == [d.id for d in docs]  # deterministic for a seed


def test_builtin_sources_stdlib_pydoc_and_data(count):
    cfg = CorpusConfig(sources=["stdlib", "pydoc_topics", "data"], n_docs=6, min_tokens=500, max_tokens=1500)
    docs, notes = build_corpus(cfg, count, progress=False)
    assert notes == {"stdlib": "ok", "pydoc_topics": "ok", "data": "ok"}
    assert Counter(d.genre for d in docs) == {"code": 2, "reference": 2, "literature": 2}
    assert all(500 <= d.n_tokens <= 1500 for d in docs)
    code = next(d for d in docs if d.genre == "code")
    assert code.text.startswith("# file: Lib/") and code.license == "PSF-2.0"
    lit = next(d for d in docs if d.genre == "literature")
    assert lit.title.startswith("King James Bible") and lit.license == "public domain"


def test_optional_source_missing_is_a_note(monkeypatch, count):
    def absent(rng):
        raise SourceMissing("Vim help files not installed")
        yield  # pragma: no cover

    monkeypatch.setitem(corpus.SOURCES, "vim_docs", absent)
    cfg = CorpusConfig(sources=["vim_docs", "data"], n_docs=2, min_tokens=300, max_tokens=800)
    docs, notes = build_corpus(cfg, count, progress=False)
    assert notes["vim_docs"].startswith("skipped: Vim help") and notes["data"] == "ok" and len(docs) == 2


def test_debian_docs_expand_to_installed_ones(count):
    cfg = CorpusConfig(sources=["debian_docs"], n_docs=4, min_tokens=300, max_tokens=1200)
    names = [n for n, _ in corpus.resolve_sources(cfg)]
    assert names == corpus.DEBIAN_DOCS
    status = corpus.available_sources(cfg)
    if all(v != "ok" for v in status.values()):
        pytest.skip(f"no Debian documentation on this machine: {status}")
    docs, notes = build_corpus(cfg, count, progress=False)
    assert docs and all(d.genre in ("manual", "legal") for d in docs)
    assert {k for k, v in notes.items() if v == "ok"} == {k for k, v in status.items() if v == "ok"}


def test_hf_dataset_saved_to_disk(tmp_path, count):
    import datasets

    texts = [("第一章 " + "长文本对齐需要大量的长指令数据。" * 40), "short English text " * 200]
    datasets.Dataset.from_dict({"body": texts, "name": ["zh-doc", "en-doc"]}).save_to_disk(str(tmp_path / "ds"))
    spec = {"path": str(tmp_path / "ds"), "text_column": "body", "title_column": "name", "genre": "wiki"}
    cfg = CorpusConfig(sources=[], hf_datasets=[spec], n_docs=2, min_tokens=100, max_tokens=300,
                       max_chunks_per_doc=1)
    docs, _ = build_corpus(cfg, count, progress=False)
    assert {d.title for d in docs} == {"zh-doc", "en-doc"} and {d.genre for d in docs} == {"wiki"}
    assert {d.title: d.lang for d in docs} == {"zh-doc": "zh", "en-doc": "en"}
    bad = CorpusConfig(sources=[], hf_datasets=[{**spec, "text_column": "text"}], n_docs=1)
    with pytest.raises(LongAlignError, match="no column 'text'; columns: body, name"):
        build_corpus(bad, count, progress=False)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(LongAlignError, match="unknown source 'wikipedia'"):
        build_corpus(CorpusConfig(sources=["wikipedia"]))
    with pytest.raises(LongAlignError, match="not a directory"):
        build_corpus(CorpusConfig(sources=[], dirs=[str(tmp_path / "nope")]))
    with pytest.raises(LongAlignError, match="min_tokens"):
        build_corpus(CorpusConfig(min_tokens=5000, max_tokens=100))
    (tmp_path / "c.jsonl").write_text('{"id": "a", "genre": "code", "text": "x"}\n{"id": "b", "text": "y"}\n')
    with pytest.raises(LongAlignError, match=r"c.jsonl:2: field 'genre' missing"):
        load_corpus(tmp_path / "c.jsonl")


def test_length_sampling_upsamples_long_documents():
    rng = random.Random(0)
    flat = [draw_target(rng, 1000, 9000, 1.0) for _ in range(4000)]
    up = [draw_target(rng, 1000, 9000, 2.0) for _ in range(4000)]
    assert min(flat + up) >= 1000 and max(flat + up) <= 9000
    assert abs(sum(flat) / len(flat) - 5000) < 200
    assert sum(up) / len(up) > sum(flat) / len(flat) + 500  # long documents are more likely


def test_detect_lang():
    assert detect_lang("长上下文对齐的训练数据由长文档构成。") == "zh"
    assert detect_lang("Long-context alignment needs long documents (长文档).") == "en"


def test_corpus_stage_cli(tmp_path):
    from longalign_lib.cli import main

    run = tmp_path / "run"
    assert main(["corpus", "--run-dir", str(run), "--set", "corpus.sources=[stdlib,data]",
                 "--set", "corpus.n_docs=4", "--set", "corpus.max_tokens=2000"]) == 0
    rows = read_jsonl(run / "corpus.jsonl")
    assert len(rows) == 4 and all(FIELDS <= set(r) for r in rows)
    stage = json.loads((run / "stages" / "corpus.json").read_text())
    assert stage["metrics"]["n_docs"] == 4 and stage["metrics"]["genre_code"] == 2
    assert (run / "figures" / "corpus_genres.png").stat().st_size > 5000
    assert load_config("cpu-demo").corpus.max_tokens <= 6000
