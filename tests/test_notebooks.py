"""Every notebook in notebooks/ runs headless with papermill in SMOKE mode and writes a sensible metrics.json."""
from __future__ import annotations

from pathlib import Path

import pytest

from longalign_lib.notebook_runner import execute

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))

# What each notebook's metrics.json must show (keys it must hold; a check over the values).
CHECKS = {
    "01_data_synthesis": lambda m: m["n_docs"] == 2 and m["walk_raw_chars"] > 0 and m["long_kept"] + sum(
        m["long_rejected"].values()) == m["n_docs"] and m["sharegpt_kept"] == 2 and m["requests"] + m["cache_hits"] > 0
    and 0 < m["cost_10k"]["gpt-4o-mini"] < m["cost_10k"]["claude-3-5-haiku"] and all(
        Path(m[k]).stat().st_size > 10_000 for k in ("genre_png", "task_png", "cost_png")),
    "04_long_context_sft": lambda m: m["loss_rel_diff"] < 1e-4 < abs(m["loss_no_isolation"] - m["loss_by_hand"])
    and m["loss_leak_rel"] > 1e-2 and m["one_step_grad_rel_err"] < 1e-4
    and all(v["tokens_per_s"] > 0 for v in m["forward_backward"].values())
    and m["padding_fraction"]["packed"] == 0 < m["padding_fraction"]["naive"] and all(v > 0 for v in m["wall_s"].values())
    and len(set(m["trained_tokens"].values())) == 1 and m["computed_tokens"]["naive"] > m["computed_tokens"]["packed"]
    and m["learn"]["loss_last"] < m["learn"]["loss_first"] and m["learn"]["f1_after"] > m["learn"]["f1_before"] + 0.2
    and m["learn"]["exact_after"] >= m["learn"]["exact_before"]
    and all(Path(f).stat().st_size > 10_000 for f in m["figures"]),
    "05_judge_evaluation": lambda m: m["n_cases"] >= 4 and m["score_methods"] == ["prob_weighted"]
    and m["unrated"] == 0 and m["meta_n"] >= 12 and m["lbc_items"] == 9
    and m["judge_vs_rubric"]["spearman"]["n"] == m["meta_n"]
    and m["judge_vs_rubric"]["spearman"]["lo"] <= m["judge_vs_rubric"]["spearman"]["hi"]
    and m["proxy_weak_f1"] < 0.5 and m["compare_doc_vs_nodoc"]["n"] == m["n_cases"] and 0.8 < m["ci_width_50"] < 2.0
    and all(Path(f).stat().st_size > 10_000 for f in m["figures"]),
    "00_setup_check": lambda m: m["records"] == 5 and m["reply_chars"] > 0 and m["n_params"] > 1e8 and m["toy_labels_match"]
    and Path(m["label_mask_png"]).stat().st_size > 10_000,
    "03_packing_vs_sorted_batching": lambda m: abs(m["sequence_shares_sum"] - 1) < 1e-9
    and m["sequence_share_spread"] < 1e-9 and abs(m["demo_pack_mean_max_share"] - 0.5) < 1e-9
    and m["bfd_fill_64k"] >= 0.98 > m["next_fit_fill_64k"] + 0.05 and m["idle"]["packed-bfd"] < m["idle"]["naive"]
    and m["step_long_share_vs_chance"]["packed-bfd"] > 2.5 < m["step_long_share_vs_chance"]["sorted"]
    and m["step_long_share_vs_chance"]["packed-bfd+window"] < 1.6
    and m["next_fit_fill_64k"] < m["window_fill_64k"] < m["bfd_fill_64k"]
    and m["toy_rows"]["bfd"] < m["toy_rows"]["next_fit"] and all(t["tokens_per_s"] > 0 for t in m["timing"].values())
    and len(m["figures"]) >= 5 and all(Path(f).stat().st_size > 10_000 for f in m["figures"]),
    "02_length_distribution": lambda m: m["records"] == 5 and m["round_trip"] and m["rejected"] == 0
    and 0.9 < m["real_long_share_of_tokens"] < 1 and m["synthetic_long_attention_share"] > 0.95
    and 0 < m["synthetic_random_batch_fill"] < 0.6 and len(m["figures"]) == 8
    and 0.3 < m["synthetic_long_share_token_mean"] < 0.7
    and all(Path(p).stat().st_size > 10_000 for p in m["figures"].values()),
}


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke(nb, tmp_path):
    """SMOKE run: every cell runs, including the toy-vs-library asserts and the exercise solutions."""
    metrics = execute(nb, smoke=True, out_dir=tmp_path / nb.stem)
    check = CHECKS.get(nb.stem)
    assert check is not None, f"add a metrics check for {nb.stem} to tests/test_notebooks.py"
    assert check(metrics), metrics


@pytest.mark.parametrize("nb", [p for p in NOTEBOOKS if p.stem[:2] in ("00", "01", "02", "03", "04", "05")],
                         ids=lambda p: p.stem)
def test_chapter_structure(nb):
    """A chapter: what you will learn, SMOKE on automatically without a GPU, takeaways, 2–4 exercises with solution
    cells (tagged `solution`; the SMOKE run above executes their asserts)."""
    import jupytext

    cells = jupytext.read(nb, fmt="py:percent").cells
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    solutions = [c for c in cells if "solution" in c.metadata.get("tags", [])]
    assert "What you will learn" in text and "## Takeaways" in text and "## Exercises" in text
    assert "SMOKE = None" in params.source, "SMOKE should default to None (auto: on without CUDA)"
    assert 2 <= len(solutions) <= 4 and all("assert" in c.source for c in solutions)
    assert "torch.set_num_threads(1)" in "\n".join(c.source for c in cells) or nb.stem.startswith("02")
