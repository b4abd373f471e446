"""Needle placement by position, scoring with copying / non-copying model stubs, window, resume, heatmap."""
from __future__ import annotations

import re

import pytest

from longalign_lib.io import LongAlignError, read_json, read_jsonl
from longalign_lib.needle import (
    KEY_FACT,
    NEEDLE,
    Haystack,
    contains_fact,
    heatmap,
    load_haystack,
    run_grid,
    score_matrix,
    token_depth,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.fixture(scope="module")
def hay(smol_tokenizer):
    return Haystack(load_haystack(), smol_tokenizer)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth(hay, smol_tokenizer, depth):
    text, [(a, b)] = hay.build(3000, [(depth, NEEDLE)])
    assert text[a:b] == NEEDLE and text.count(NEEDLE) == 1
    n = len(smol_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 2900 <= n <= 3010
    assert abs(token_depth(smol_tokenizer, text, (a, b)) - depth) < 0.03
    if depth == 0.0:
        assert text.startswith(NEEDLE)
    if depth == 1.0:
        assert text.endswith(NEEDLE)
    if 0.0 < depth < 1.0:  # inserted between sentences, not inside a word
        assert text[a - 1].isspace() and text[b].isspace()


def test_several_insertions_keep_their_order_and_short_haystacks_repeat(smol_tokenizer):
    small = Haystack("One sentence here. Another one there.\n" * 20, smol_tokenizer)
    text, spans = small.build(800, [(0.2, "FIRST."), (0.8, "SECOND."), (0.8, "THIRD.")])
    starts = [a for a, _ in spans]
    assert starts == sorted(starts) and [text[a:b] for a, b in spans] == ["FIRST.", "SECOND.", "THIRD."]
    assert len(smol_tokenizer(text, add_special_tokens=False)["input_ids"]) > 700


def test_bad_depth_and_key_fact_are_clear_errors(hay, smol_tokenizer):
    with pytest.raises(LongAlignError, match="outside"):
        hay.build(500, [(1.5, NEEDLE)])
    with pytest.raises(LongAlignError, match="key fact"):
        run_grid(lambda m: [""] * len(m), smol_tokenizer, [256], [0.5], key_fact="saffron buns", progress=False)


def test_haystack_dir_errors(tmp_path):
    with pytest.raises(LongAlignError, match="no files"):
        load_haystack(tmp_path)
    with pytest.raises(LongAlignError, match="not a directory"):
        load_haystack(tmp_path / "nope")


def copier(messages_list):
    """A model stub that copies the sentence holding the fact out of the context (empty if there is none)."""
    out = []
    for msgs in messages_list:
        context = msgs[-1]["content"].rsplit("\n\n", 1)[0]  # the question comes after the last blank line
        m = re.search(r"[^.\n]*Grandmother Odile[^.]*\.", context)
        out.append(m.group(0).strip() if m else "")
    return out


def test_grid_scores_one_with_a_copying_model_and_zero_without(smol_tokenizer, tmp_path):
    lengths, depths = [256, 600], [0.0, 0.5, 1.0]
    good = run_grid(copier, smol_tokenizer, lengths, depths, progress=False)
    assert good["mean_score"] == 1.0 and len(good["cells"]) == 6
    assert all(c["prediction"].endswith(NEEDLE) for c in good["cells"])
    bad = run_grid(lambda ms: ["I could not find it in the text."] * len(ms), smol_tokenizer, lengths, depths,
                   progress=False)
    assert bad["mean_score"] == 0.0 and score_matrix(bad) == [[0.0, 0.0]] * 3
    # the copier scores 0 when the needle is absent: plant something else
    other = run_grid(copier, smol_tokenizer, [256], [0.5], needle="The lighthouse keeper is named Brann.",
                     key_fact="Brann", progress=False)
    assert other["mean_score"] == 0.0


def test_window_skips_lengths_and_cells_resume(smol_tokenizer, tmp_path):
    cells = tmp_path / "cells.jsonl"
    calls = []

    def counting(ms):
        calls.append(len(ms))
        return copier(ms)

    r = run_grid(counting, smol_tokenizer, [256, 512, 4096], [0.0, 1.0], window=1024, reserve=64,
                 cells_file=cells, progress=False)
    assert r["lengths"] == [256, 512] and r["skipped_lengths"] == [4096] and sum(calls) == 4
    assert len(read_jsonl(cells)) == 4

    def fail(ms):
        raise AssertionError("finished cells must not be regenerated")

    again = run_grid(fail, smol_tokenizer, [256, 512], [0.0, 1.0], cells_file=cells, progress=False)
    assert again["mean_score"] == 1.0


def test_contains_fact_ignores_case_and_punctuation():
    assert contains_fact("It is SMOKED, cardamom!", KEY_FACT) == 1.0
    assert contains_fact("cardamom, smoked", KEY_FACT) == 0.0
    assert contains_fact("", KEY_FACT) == 0.0


def test_heatmap_png(tmp_path, smol_tokenizer):
    from longalign_lib import plots

    r = run_grid(copier, smol_tokenizer, [256, 400], [0.0, 0.5, 1.0], progress=False)
    r["cells"][1]["score"] = 0.0
    fig = heatmap(r)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("context length") and len(ax.get_yticklabels()) == 3
    png = plots.save(fig, tmp_path / "h.png", close=True)
    assert png.stat().st_size > 10_000


def test_needle_stage_with_the_offline_model(tmp_path):
    """`longalign needle` end to end on the real SmolLM2: writes needle.json + heatmap, measured depths match."""
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    cfg = load_config("cpu-demo", ["eval.needle_lengths=[160, 100000]", "eval.needle_depths=[0.0, 1.0]",
                                   "eval.needle_max_new_tokens=12"])
    res = run_one("needle", cfg, tmp_path)
    data = read_json(tmp_path / "needle.json")
    assert data["skipped_lengths"] == [100000] and data["window"] == 8192
    assert [c["achieved_depth"] for c in data["cells"]] == [0.0, 1.0]
    assert all(isinstance(c["prediction"], str) for c in data["cells"])
    assert res.metrics["cells"] == 2 and (tmp_path / "figures" / "needle_heatmap.png").stat().st_size > 5_000


def test_needle_depth_and_length_within_the_stated_tolerance(hay, smol_tokenizer):
    """Every cell of a grid: the needle sits within DEPTH_TOLERANCE (0.01) of the requested token depth and the
    context has the requested number of tokens to within LENGTH_TOLERANCE (0.5 %) — and run_grid reports both."""
    worst_d, worst_n = 0.0, 0.0
    for n in (256, 512, 1000, 3000):
        for d in (0.0, 0.03, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97, 1.0):
            text, [(a, b)] = hay.build(n, [(d, NEEDLE)])
            assert text[a:b] == NEEDLE
            got = len(smol_tokenizer(text, add_special_tokens=False)["input_ids"])
            worst_d = max(worst_d, abs(token_depth(smol_tokenizer, text, (a, b)) - d))
            worst_n = max(worst_n, abs(got - n) / n)
    print(f"worst depth error {worst_d:.4f}, worst length error {worst_n:.2%}")
    assert worst_d <= 0.01 and worst_n <= 0.005
    r = run_grid(copier, smol_tokenizer, [512], [0.1, 0.5], progress=False)
    for c in r["cells"]:
        assert abs(c["achieved_depth"] - c["depth"]) <= 0.01 and abs(c["achieved_length"] - 512) <= 0.005 * 512
    assert r["depth_tolerance"] == 0.01 and r["length_tolerance"] == 0.005
    assert r["max_depth_error"] <= 0.01 and r["max_length_error"] <= 0.005
