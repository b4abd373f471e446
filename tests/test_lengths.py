"""lengths.py: statistics, buckets and compute shares against independent counts; the analyze stage end to end."""
from __future__ import annotations

import json
import statistics
from argparse import Namespace
from fractions import Fraction

import numpy as np
import pytest

from longalign_lib import lengths as L
from longalign_lib.config import load_config
from longalign_lib.formatting import clean_messages, format_record
from longalign_lib.io import LongAlignError, read_jsonl

from .conftest import SAMPLE

# Lengths that sit on and next to every edge of the 2048 buckets (256, 512, 1024, 2048).
EDGE_CASES = [1, 255, 256, 257, 300, 512, 513, 1000, 1024, 1025, 2047, 2048, 2049, 9000]


def brute_bucket(n: int, edges: list[int]) -> int:
    lo = 0
    for i, hi in enumerate(edges):
        if lo < n <= hi or (i == 0 and n <= hi):
            return i
        lo = hi
    return len(edges)


def test_bucket_edges_scale_with_max_length():
    assert L.bucket_edges(65536) == [8192, 16384, 32768, 65536]
    assert L.bucket_labels(L.bucket_edges(65536)) == ["0–8k", "8k–16k", "16k–32k", "32k–64k", ">64k"]
    assert L.bucket_labels(L.bucket_edges(2048)) == ["0–256", "256–512", "512–1k", "1k–2k", ">2k"]
    with pytest.raises(LongAlignError, match="increase"):
        L.bucket_index([1], [10, 10])


def test_bucket_table_against_independent_count():
    edges = L.bucket_edges(2048)
    table = L.bucket_table(EDGE_CASES, edges)
    total_tok, total_sq = sum(EDGE_CASES), sum(n * n for n in EDGE_CASES)
    for i, row in enumerate(table):
        members = [n for n in EDGE_CASES if brute_bucket(n, edges) == i]
        assert row["sequences"] == len(members)
        assert row["tokens"] == sum(members)
        assert row["seq_share"] == pytest.approx(float(Fraction(len(members), len(EDGE_CASES))), abs=1e-6)
        assert row["token_share"] == pytest.approx(float(Fraction(sum(members), total_tok)), abs=1e-6)
        assert row["attention_share"] == pytest.approx(sum(n * n for n in members) / total_sq, abs=1e-6)
    assert [r["sequences"] for r in table] == [3, 3, 3, 3, 2]


def test_length_stats_match_statistics_module():
    rng = np.random.default_rng(0)
    data = [int(x) for x in rng.integers(1, 50_000, 301)]
    s = L.length_stats(data)
    q = statistics.quantiles(data, n=100, method="inclusive")  # same interpolation as numpy's default
    assert s["count"] == 301 and s["tokens"] == sum(data) and s["max"] == max(data) and s["min"] == min(data)
    assert s["mean"] == pytest.approx(statistics.fmean(data), abs=0.01)
    assert s["std"] == pytest.approx(statistics.pstdev(data), abs=0.01)
    for p in L.PERCENTILES:
        assert s[f"p{p}"] == pytest.approx(q[p - 1], abs=0.01)
    assert L.length_stats([])["count"] == 0 and L.length_stats([])["mean"] is None


def test_compute_share_top_share_and_flops():
    share = L.compute_share({"long": [1000, 3000], "short": [100, 100, 100, 100]})
    assert share["long"]["sequences"] == pytest.approx(2 / 6, abs=1e-6)
    assert share["long"]["linear"] == pytest.approx(4000 / 4400, abs=1e-6)
    assert share["long"]["attention"] == pytest.approx(10_000_000 / 10_040_000, abs=1e-6)
    top = L.top_share([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.1)
    assert top["sequences"] == 1 and top["tokens"] == pytest.approx(10 / 19, abs=1e-6)
    assert top["attention"] == pytest.approx(100 / 109, abs=1e-6)
    # 7B-like model at 64k: attention ≈ 2·32·4096·L² vs 2·6.7e9·L
    att = 2 * 32 * 4096 * 65536 ** 2
    assert L.attention_flops_share([65536], 6.7e9, 32, 4096) == pytest.approx(att / (att + 2 * 6.7e9 * 65536))
    assert L.attention_flops_share([10], 6.7e9, 32, 4096) < 1e-3


def test_random_batch_fill():
    assert L.random_batch_fill([5, 9, 1], 1) == 1.0
    assert L.random_batch_fill([7] * 8, 4) == 1.0
    assert L.random_batch_fill([100, 1], 2) == pytest.approx(101 / 200)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(LongAlignError, match=">= 0"):
        L.length_stats([3, -1])
    with pytest.raises(LongAlignError, match="more target tokens"):
        L.target_stats([5], [4])
    with pytest.raises(LongAlignError, match="2 entries"):
        L.target_stats([1, 2], [4])
    with pytest.raises(LongAlignError, match="no sequences"):
        L.analyze({})


def test_synthetic_mix_is_labelled_and_deterministic():
    a, b = L.synthetic_longalign_sharegpt_mix(900, 5 / 9, seed=3), L.synthetic_longalign_sharegpt_mix(900, 5 / 9, seed=3)
    assert a.synthetic is True and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("lengths", "n_target"))
    lens, tgts = a.by_source()
    assert list(lens) == ["long", "short"] and len(lens["long"]) == 500 and len(lens["short"]) == 400
    assert lens["long"].min() >= 65536 / 16 and lens["long"].max() <= 65536 and lens["short"].max() <= 8192
    assert all((tgts[s] <= lens[s]).all() and (tgts[s] >= 1).all() for s in lens)
    assert np.median(lens["long"]) > 10 * np.median(lens["short"])
    assert 0.3 < (a.source[:100] == "long").mean() < 0.8  # shuffled, not all long first
    with pytest.raises(LongAlignError, match="long_share"):
        L.synthetic_longalign_sharegpt_mix(10, long_share=1.5)


def test_figures_are_written(tmp_path):
    lens, tgts = L.synthetic_longalign_sharegpt_mix(600, seed=0).by_source()
    paths = L.save_figures(lens, tgts, 65536, tmp_path, note=" (synthetic)")
    assert set(paths) == {"histogram", "cdf", "bucket_share", "targets"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000


def test_analyze_stage_matches_independent_count(tmp_path, smol_tokenizer):
    """lengths.json from `longalign analyze` against lengths counted record by record with the chat template."""
    from longalign_lib.pipeline import run_one

    max_length = 2048
    cfg = load_config("cpu-demo", [f"data.max_length={max_length}"])
    run = tmp_path / "run"
    result = run_one("analyze", cfg, run, Namespace(tokenized=None))  # no tokenized set yet: builds it first
    out = json.loads((run / "lengths.json").read_text())
    assert "tokenized it first" in result.report

    records = read_jsonl(SAMPLE)
    by_source: dict[str, list[tuple[int, int]]] = {"long": [], "short": []}
    for rec in records:
        messages, _ = clean_messages(rec)
        full = len(smol_tokenizer(smol_tokenizer.apply_chat_template(messages, tokenize=False),
                                  add_special_tokens=False)["input_ids"])
        n = min(full, max_length)
        tgt = format_record(rec, smol_tokenizer, max_length).n_target
        by_source["short" if rec["meta"]["task_type"] == "short" else "long"].append((n, tgt))

    edges = [256, 512, 1024, 2048]
    assert out["edges"] == edges
    for src, pairs in by_source.items():
        lens = [n for n, _ in pairs]
        got = out["sources"][src]
        assert got["lengths"]["count"] == len(lens) and got["lengths"]["tokens"] == sum(lens)
        assert got["lengths"]["max"] == max(lens) and got["lengths"]["mean"] == pytest.approx(sum(lens) / len(lens), abs=0.01)
        assert [r["sequences"] for r in got["buckets"]] == [sum(brute_bucket(n, edges) == i for n in lens)
                                                              for i in range(5)]
        assert got["targets"]["tokens"] == sum(t for _, t in pairs)
    all_lens = [n for pairs in by_source.values() for n, _ in pairs]
    assert out["all"]["lengths"]["tokens"] == sum(all_lens) == result.metrics["tokens"]
    long_sq = sum(n * n for n, _ in by_source["long"])
    assert out["compute_share"]["long"]["attention"] == pytest.approx(long_sq / sum(n * n for n in all_lens), abs=1e-6)
    for name in ("histogram", "cdf", "bucket_share", "targets"):
        assert (run / "figures" / f"lengths_{name}.png").stat().st_size > 10_000
