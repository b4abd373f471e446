"""Agreement statistics: each checked against a value computed by hand here, and against scipy / scikit-learn /
krippendorff where they implement it; bootstrap CIs, the paired comparison and the permutation test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from longalign_lib import agreement as ag

X = [1, 2, 3, 4, 5]
Y = [2, 1, 4, 3, 5]


def test_spearman_and_kendall_by_hand_and_scipy():
    from scipy import stats

    # rank differences -1, 1, -1, 1, 0: rho = 1 - 6*4 / (5*(25-1)) = 0.8
    assert ag.spearman(X, Y) == pytest.approx(0.8)
    # 10 pairs, (1,2) and (3,4) discordant: tau = (8 - 2) / 10
    assert ag.kendall(X, Y) == pytest.approx(0.6)
    rng = np.random.default_rng(3)
    a, b = rng.integers(1, 11, 40), rng.integers(1, 11, 40)  # with ties
    assert ag.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert ag.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)
    assert math.isnan(ag.spearman([1, 2, 3], [4, 4, 4]))  # a constant side: undefined, not 0
    assert ag.spearman([1, None, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)  # None pairs dropped


def test_weighted_kappa_by_hand_and_sklearn():
    from sklearn.metrics import cohen_kappa_score

    a, b = [1, 2, 3], [1, 2, 4]
    # quadratic weights: observed sum of (a-b)^2 = 1; expected = (1/n) sum_ij (a_i - b_j)^2 = 21/3 = 7
    assert ag.weighted_kappa(a, b) == pytest.approx(1 - 1 / 7)
    rng = np.random.default_rng(0)
    h = rng.integers(1, 11, 60)
    j = np.clip(h + rng.integers(-2, 3, 60), 1, 10)
    assert ag.weighted_kappa(j, h) == pytest.approx(cohen_kappa_score(j, h, weights="quadratic", labels=list(range(1, 11))))
    assert ag.weighted_kappa(j, h, weights="linear") < ag.weighted_kappa(j, h)  # small disagreements cost less
    # probability-weighted ratings are rounded half up before kappa
    assert ag.to_rating([0.2, 6.5, 6.49, 10.7]).tolist() == [1, 7, 6, 10]


def test_krippendorff_alpha_by_hand():
    a, b = [1, 2, 3], [1, 2, 4]
    # interval alpha, 2 coders, n = 6 pooled values: D_o = (1/6)*2*1; D_e = 2*(6*35 - 13^2)/(6*5)
    d_o, d_e = 2 / 6, 2 * (6 * 35 - 13 ** 2) / 30
    assert ag.krippendorff_alpha(a, b) == pytest.approx(1 - d_o / d_e)
    assert ag.krippendorff_alpha([3, 5, 7, 9], [3, 5, 7, 9]) == pytest.approx(1.0)


def test_scotts_pi_by_hand_and_fleiss_identity():
    # P_o = 3/4; pooled shares 3/8, 5/8 -> P_e = 34/64
    assert ag.scotts_pi([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    # with two raters, Fleiss' kappa equals Scott's pi: compute Fleiss' form from category counts per item
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 3, 30), rng.integers(0, 3, 30)
    counts = np.stack([(a == k).astype(int) + (b == k).astype(int) for k in range(3)], axis=1)
    p_i = (np.sum(counts ** 2, axis=1) - 2) / 2
    p_bar, p_k = p_i.mean(), counts.sum(axis=0) / 60
    fleiss = (p_bar - np.sum(p_k ** 2)) / (1 - np.sum(p_k ** 2))
    assert ag.scotts_pi(a, b) == pytest.approx(fleiss)
    assert ag.bin_scores([1, 3, 3.5, 3.6, 6.5, 7, 10]).tolist() == [0, 0, 0, 1, 1, 2, 2]
    # binned: 2 vs 3 (both low) agree, 6 vs 7 (mid vs high) disagree
    assert ag.binned_pi([2, 6, 9], [3, 7, 9]) == pytest.approx(ag.scotts_pi([0, 1, 2], [0, 2, 2]))


def test_leniency_auc_point_biserial():
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    assert ag.leniency([7, 8, 9], [5, 8, 6]) == pytest.approx((2 + 0 + 3) / 3)
    s, c = [1, 2, 3, 4], [0, 1, 0, 1]
    # (correct, wrong) pairs: 2>1, 2<3, 4>1, 4>3 -> 3 of 4
    assert ag.auc(s, c) == pytest.approx(0.75) == roc_auc_score(c, s)
    # r_pb = (M1 - M0) / s_n * sqrt(p q), s_n the population sd: (3 - 2) / sqrt(1.25) * 0.5
    assert ag.point_biserial(s, c) == pytest.approx(0.5 / math.sqrt(1.25))
    assert ag.point_biserial(s, c) == pytest.approx(stats.pearsonr(c, s).statistic)
    assert math.isnan(ag.auc([1, 2, 3], [1, 1, 1]))


def test_bootstrap_ci_by_hand_and_report():
    # the bootstrap by hand: resample pairs with one seeded generator, take percentiles
    rng = np.random.default_rng(0)
    j = rng.integers(1, 11, 25).astype(float)
    h = np.clip(j + rng.normal(0, 2, 25), 1, 10)
    out = ag.bootstrap_stat(ag.leniency, j, h, n_boot=500, seed=4)
    idx = np.random.default_rng(4).integers(0, 25, size=(500, 25))
    means = np.array([np.mean(j[i] - h[i]) for i in idx])
    assert out["lo"] == pytest.approx(np.quantile(means, 0.025)) and out["hi"] == pytest.approx(np.quantile(means, 0.975))
    assert out["lo"] < out["value"] < out["hi"] and out["n_boot_valid"] == 500
    rep = ag.reliability_report(j, h, n_boot=200)
    assert set(ag.STATISTICS) <= set(rep) and rep["n"] == 25
    assert rep["spearman"]["value"] == pytest.approx(ag.spearman(j, h))
    assert rep["leniency"]["value"] == pytest.approx(float(np.mean(j - h)))
    # a judge that is 3 points more generous orders perfectly but does not agree
    h7 = np.minimum(h, 7)
    gen = ag.reliability_report(h7 + 3, h7, n_boot=100)
    assert gen["spearman"]["value"] > 0.95 and gen["leniency"]["value"] > 2 and gen["weighted_kappa"]["value"] < 0.75
    table = ag.markdown_table(rep)
    assert "| spearman |" in table and "–" in table
    small = ag.reliability_report([5], [6])
    assert small["spearman"]["value"] is None and small["spearman"]["lo"] is None


def test_binary_report():
    rep = ag.binary_report([8, 9, 2, 3, 7, 1], [1, 1, 0, 0, 1, 0], n_boot=200)
    assert rep["auc"]["value"] == 1.0 and rep["mean_correct"] == 8.0 and rep["mean_wrong"] == 2.0
    assert rep["n_correct"] == 3 and rep["point_biserial"]["value"] > 0.9


def test_permutation_p_exact_by_hand():
    assert ag.permutation_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    # d = [2, -1]: |mean| of the 4 sign patterns: 0.5, 1.5, 1.5, 0.5 -> P(>= 0.5) = 1
    assert ag.permutation_p([2.0, -1.0]) == pytest.approx(1.0)
    # large n: a Monte-Carlo estimate near the exact normal-theory answer for a clear effect
    assert ag.permutation_p(np.ones(40) + np.linspace(-0.1, 0.1, 40), n_perm=2000) < 0.01


def test_paired_compare_items_and_repetitions():
    a = {"q1": [7, 8], "q2": [5, 5], "q3": [6, 7], "q4": [9, 9], "only_a": [3]}
    b = {"q1": [6, 6], "q2": [5, 4], "q3": [6, 6], "q4": [7, 8], "only_b": 2}
    out = ag.paired_compare(a, b, n_boot=500)
    d = np.array([1.5, 0.5, 0.5, 1.5])
    assert out["n"] == 4 and out["only_a"] == 1 and out["only_b"] == 1
    assert out["mean_diff"] == pytest.approx(d.mean()) and out["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert out["ci"][0] <= out["mean_diff"] <= out["ci"][1] and out["p_value"] == pytest.approx(2 / 16)
    assert out["wins_a"] == 4 and out["wins_b"] == 0
    # judge noise counts: the same item means with noisier repetitions give a wider interval
    noisy_a = {"q1": [5.5, 9.5], "q2": [3, 7], "q3": [4, 9], "q4": [7, 11]}
    wide = ag.paired_compare(noisy_a, b, n_boot=500)
    assert wide["mean_diff"] == pytest.approx(out["mean_diff"])
    assert wide["ci"][1] - wide["ci"][0] > out["ci"][1] - out["ci"][0]


def test_by_bucket():
    rows = ag.by_bucket([1, 2, 3, None, 5], [100, 900, 1500, 2000, 9000], edges=[1000, 4000])
    assert [(r["lo"], r["hi"], r["n"]) for r in rows] == [(0, 1000, 2), (1000, 4000, 1), (4000, None, 1)]
    assert rows[0]["mean"] == pytest.approx(1.5) and rows[2]["mean"] == 5.0


def test_agreement_figure(tmp_path):
    from longalign_lib import plots

    rep = ag.reliability_report([7, 8, 3, 5], [8, 9, 2, 6], n_boot=50)
    png = plots.save(ag.agreement_figure([7, 8, 3, 5], [8, 9, 2, 6], rep), tmp_path / "a.png", close=True)
    assert png.stat().st_size > 5000
