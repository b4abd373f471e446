"""Judge reliability: how far a judge's ratings agree with reference ratings, and whether a difference is real.

Usage:
    from longalign_lib.agreement import reliability_report, binary_report, paired_compare, by_bucket
    rep = reliability_report(judge_scores, human_scores)     # Spearman, Kendall, κ_w, α, Scott's π, leniency + CIs
    rep = binary_report(judge_scores, exact_correct)         # AUC, point-biserial: does the rating separate 1 from 0?
    cmp = paired_compare({"q1": [7, 8], ...}, {"q1": [6, 6], ...})   # run A − run B, bootstrap CI + permutation p
    rows = by_bucket(scores, input_tokens, edges=[1000, 4000])      # mean score per input-length bucket

Why several numbers. A rank correlation (Spearman, Kendall) asks whether the judge *orders* answers like the
reference does; it is blind to a judge that rates everything 3 points too high. Chance-corrected agreement asks
whether the two give the *same* ratings beyond what their rating habits alone would produce: quadratic-weighted
Cohen's κ (scikit-learn) on ratings rounded to 1..10, Krippendorff's α (interval level, the `krippendorff`
package), and Scott's π on ratings binned to low / mid / high (1-3, 4-6, 7-10), as "Judging the Judges"
(Thakur et al., 2025) recommends. Leniency is the mean of judge − reference: positive = the judge is generous.
Every statistic comes with a percentile bootstrap CI over items (pairs resampled together).

Offline the reference can be exact correctness (verifiable tasks): `binary_report` gives the ROC AUC (probability
that a right answer gets a higher rating than a wrong one) and the point-biserial correlation.
"""
from __future__ import annotations

import math

import numpy as np

from .scoring import bootstrap_ci

LOW_MID_HIGH = (3.5, 6.5)  # bin edges: 1-3 low, 4-6 mid, 7-10 high
RATING_LABELS = list(range(1, 11))


def _clean(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Pairs where both sides are numbers (None / NaN dropped), as two float arrays."""
    xs, ys = [], []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isnan(x) or math.isnan(y):
            continue
        xs.append(x)
        ys.append(y)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _varies(*arrays) -> bool:
    return all(len(a) >= 2 and np.ptp(a) > 0 for a in arrays)


# ---------------------------------------------------------------- single statistics (nan when undefined)
def spearman(a, b) -> float:
    """Spearman's rank correlation (scipy; ties get average ranks)."""
    from scipy import stats

    x, y = _clean(a, b)
    return float(stats.spearmanr(x, y).statistic) if len(x) >= 3 and _varies(x, y) else float("nan")


def kendall(a, b) -> float:
    """Kendall's τ-b (scipy; corrected for ties)."""
    from scipy import stats

    x, y = _clean(a, b)
    return float(stats.kendalltau(x, y).statistic) if len(x) >= 3 and _varies(x, y) else float("nan")


def to_rating(x) -> np.ndarray:
    """Ratings rounded half up and clipped to the integers 1..10 (a probability-weighted 6.5 becomes 7)."""
    return np.clip(np.floor(np.asarray(x, dtype=float) + 0.5), 1, 10).astype(int)


def weighted_kappa(a, b, weights: str = "quadratic") -> float:
    """Cohen's κ with quadratic (or linear) disagreement weights over the 1..10 scale (scikit-learn)."""
    from sklearn.metrics import cohen_kappa_score

    x, y = _clean(a, b)
    if len(x) < 2:
        return float("nan")
    rx, ry = to_rating(x), to_rating(y)
    if len(set(rx) | set(ry)) < 2:
        return float("nan")
    return float(cohen_kappa_score(rx, ry, labels=RATING_LABELS, weights=weights))


def krippendorff_alpha(a, b, level: str = "interval") -> float:
    """Krippendorff's α for the two raters (the `krippendorff` package); level: nominal | ordinal | interval."""
    import krippendorff

    x, y = _clean(a, b)
    if len(x) < 2 or len(set(x) | set(y)) < 2:
        return float("nan")
    return float(krippendorff.alpha(reliability_data=np.vstack([x, y]), level_of_measurement=level))


def bin_scores(x, edges=LOW_MID_HIGH) -> np.ndarray:
    """Bin index of each score: the number of edges it exceeds (default 0 = 1-3, 1 = 4-6, 2 = 7-10)."""
    x = np.asarray(x, dtype=float)
    return (x[:, None] > np.asarray(edges, dtype=float)[None, :]).sum(axis=1)


def scotts_pi(a, b) -> float:
    """Scott's π for two raters on categories: (P_o − P_e) / (1 − P_e), P_e from the pooled category shares.

    >>> round(scotts_pi([0, 0, 1, 1], [0, 1, 1, 1]), 4)   # P_o = 3/4, shares 3/8 and 5/8, P_e = 34/64
    0.4667
    """
    x, y = np.asarray(list(a)), np.asarray(list(b))
    if len(x) == 0 or len(x) != len(y):
        return float("nan")
    p_o = float(np.mean(x == y))
    cats, counts = np.unique(np.concatenate([x, y]), return_counts=True)
    shares = counts / (2 * len(x))
    p_e = float(np.sum(shares ** 2))
    return float("nan") if p_e >= 1.0 else (p_o - p_e) / (1 - p_e)


def binned_pi(a, b, edges=LOW_MID_HIGH) -> float:
    """Scott's π on scores binned low / mid / high."""
    x, y = _clean(a, b)
    return scotts_pi(bin_scores(x, edges), bin_scores(y, edges)) if len(x) else float("nan")


def leniency(a, b) -> float:
    """Mean of a − b: how much more generous rater a is than rater b, in rating points."""
    x, y = _clean(a, b)
    return float(np.mean(x - y)) if len(x) else float("nan")


def auc(scores, correct) -> float:
    """ROC AUC of scores for separating correct (1) from wrong (0) answers (scikit-learn); 0.5 = no better than chance."""
    from sklearn.metrics import roc_auc_score

    s, c = _clean(scores, correct)
    if len(set(c.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(c.astype(int), s))


def point_biserial(scores, correct) -> float:
    """Point-biserial correlation of scores with 0/1 correctness (scipy; Pearson's r with a binary variable)."""
    from scipy import stats

    s, c = _clean(scores, correct)
    return float(stats.pointbiserialr(c, s).statistic) if len(s) >= 3 and _varies(s, c) else float("nan")


# ---------------------------------------------------------------- bootstrap over items
def bootstrap_stat(fn, a, b, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """fn(a, b) with a percentile bootstrap CI, resampling item pairs together. Resamples on which the
    statistic is undefined (a constant side) are left out; `n_boot_valid` says how many counted."""
    x, y = _clean(a, b)
    value = fn(x, y) if len(x) else float("nan")
    out = {"value": _num(value), "lo": None, "hi": None, "n": int(len(x)), "n_boot_valid": 0}
    if len(x) < 2:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    vals = np.array([fn(x[i], y[i]) for i in idx], dtype=float)
    vals = vals[~np.isnan(vals)]
    if len(vals):
        q = (1 - level) / 2
        out.update(lo=float(np.quantile(vals, q)), hi=float(np.quantile(vals, 1 - q)), n_boot_valid=int(len(vals)))
    return out


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


STATISTICS = {
    "spearman": spearman,
    "kendall": kendall,
    "weighted_kappa": weighted_kappa,
    "krippendorff_alpha": krippendorff_alpha,
    "scotts_pi_binned": binned_pi,
    "leniency": leniency,
}


def reliability_report(judge, reference, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Every agreement statistic of `judge` against `reference` (human ratings, or a second judge), with CIs.

    Returns {n, judge_mean, reference_mean, <statistic>: {value, lo, hi, n, n_boot_valid}, ...}; a statistic
    that is undefined (fewer than 3 pairs, a constant side) has value None.
    """
    x, y = _clean(judge, reference)
    out = {"n": int(len(x)), "judge_mean": _num(float(np.mean(x))) if len(x) else None,
           "reference_mean": _num(float(np.mean(y))) if len(y) else None}
    for name, fn in STATISTICS.items():
        out[name] = bootstrap_stat(fn, x, y, n_boot=n_boot, level=level, seed=seed)
    return out


def binary_report(scores, correct, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Does a rating separate right (1) from wrong (0) answers? AUC and point-biserial r with CIs, plus the mean
    rating of each group."""
    s, c = _clean(scores, correct)
    return {"n": int(len(s)), "n_correct": int(c.sum()), "mean_correct": _num(float(s[c == 1].mean())) if (c == 1).any() else None,
            "mean_wrong": _num(float(s[c == 0].mean())) if (c == 0).any() else None,
            "auc": bootstrap_stat(auc, s, c, n_boot=n_boot, level=level, seed=seed),
            "point_biserial": bootstrap_stat(point_biserial, s, c, n_boot=n_boot, level=level, seed=seed)}


def report_rows(report: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(statistic, value, lo, hi) rows of a reliability/binary report, for a table."""
    return [(k, v["value"], v["lo"], v["hi"]) for k, v in report.items() if isinstance(v, dict) and "value" in v]


def markdown_table(report: dict, title: str = "statistic") -> str:
    """A report as a markdown table with 95% CIs."""
    fmt = lambda v: "–" if v is None else f"{v:+.3f}" if v < 0 else f"{v:.3f}"  # noqa: E731
    lines = [f"| {title} | value | 95% CI |", "|---|---|---|"]
    for name, v, lo, hi in report_rows(report):
        lines.append(f"| {name} | {fmt(v)} | {fmt(lo)} – {fmt(hi)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- is a difference real?
def _per_item(x) -> list[float]:
    vals = [float(v) for v in (x if isinstance(x, (list, tuple)) else [x]) if v is not None]
    return [v for v in vals if not math.isnan(v)]


def paired_compare(a: dict, b: dict, n_boot: int = 2000, n_perm: int = 10000, level: float = 0.95,
                   seed: int = 0) -> dict:
    """Run A − run B on the items both scored: {idx: score or [score per judge repetition]} each.

    mean_diff: mean over items of (mean of A's repetitions − mean of B's). Its CI comes from a two-level
    bootstrap: items resampled with replacement, then each item's repetitions resampled within it (so judge
    noise widens the interval). effect_size: Cohen's d_z = mean_diff / sd of the per-item differences, with
    its CI from the same resamples. p_value: two-sided paired permutation test (each item's difference flips
    sign with probability 1/2; exact enumeration up to 16 items).
    """
    keys = [k for k in a if k in b and _per_item(a[k]) and _per_item(b[k])]
    ra = [np.asarray(_per_item(a[k])) for k in keys]
    rb = [np.asarray(_per_item(b[k])) for k in keys]
    n = len(keys)
    out = {"n": n, "only_a": sum(k not in b for k in a), "only_b": sum(k not in a for k in b),
           "mean_a": None, "mean_b": None, "mean_diff": None, "ci": [None, None], "effect_size": None,
           "effect_size_ci": [None, None], "p_value": None, "wins_a": 0, "wins_b": 0, "ties": 0}
    if n == 0:
        return out
    d = np.array([x.mean() - y.mean() for x, y in zip(ra, rb, strict=True)])
    sd = d.std(ddof=1) if n > 1 else 0.0
    out.update(mean_a=float(np.mean([x.mean() for x in ra])), mean_b=float(np.mean([y.mean() for y in rb])),
               mean_diff=float(d.mean()), effect_size=float(d.mean() / sd) if sd > 0 else None,
               wins_a=int((d > 0).sum()), wins_b=int((d < 0).sum()), ties=int((d == 0).sum()))
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    diffs, dzs = np.empty(n_boot), np.full(n_boot, np.nan)
    for t in range(n_boot):
        items = rng.integers(0, n, size=n)
        db = np.array([rng.choice(ra[i], size=len(ra[i])).mean() - rng.choice(rb[i], size=len(rb[i])).mean()
                       for i in items])
        diffs[t] = db.mean()
        s = db.std(ddof=1)
        if s > 0:
            dzs[t] = db.mean() / s
    q = (1 - level) / 2
    out["ci"] = [float(np.quantile(diffs, q)), float(np.quantile(diffs, 1 - q))]
    dzs = dzs[~np.isnan(dzs)]
    if len(dzs) and out["effect_size"] is not None:
        out["effect_size_ci"] = [float(np.quantile(dzs, q)), float(np.quantile(dzs, 1 - q))]
    out["p_value"] = permutation_p(d, n_perm=n_perm, seed=seed)
    return out


def permutation_p(d, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of mean(d) = 0 (exact for ≤ 16 items).

    >>> permutation_p([1.0, 1.0, 1.0])   # all 8 sign patterns: |mean| ≥ 1 only for +++ and ---
    0.25
    """
    d = np.asarray(d, dtype=float)
    n = len(d)
    obs = abs(d.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
    means = np.abs((signs * d[None, :]).mean(axis=1))
    hits = int(np.sum(means >= obs - 1e-12))
    return hits / len(means) if n <= 16 else (hits + 1) / (len(means) + 1)


# ---------------------------------------------------------------- controls
def by_bucket(values, lengths, edges, seed: int = 0) -> list[dict]:
    """Mean of `values` (with bootstrap CI) per length bucket: [0, e1), [e1, e2), ..., [e_last, ∞)."""
    bounds = [0, *sorted(edges), None]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        vals = [v for v, n in zip(values, lengths, strict=True)
                if v is not None and n is not None and n >= lo and (hi is None or n < hi)]
        ci = bootstrap_ci(vals, seed=seed)
        rows.append({"lo": lo, "hi": hi, "n": ci["n"], "mean": ci["mean"], "ci": [ci["lo"], ci["hi"]]})
    return rows


def agreement_figure(judge, reference, report: dict | None = None, title: str | None = None,
                     xlabel: str = "reference rating", ylabel: str = "judge rating"):
    """Judge vs reference ratings (jittered dots) with the diagonal; the text box lists ρ, κ_w and leniency."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    x, y = _clean(reference, judge)
    fig, ax = plots.figure(figsize=(4.8, 4.2))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=len(x))
    ax.scatter(x + jitter, y, s=22, alpha=0.7, color=plots.CYCLE[0])
    ax.plot([1, 10], [1, 10], color="grey", lw=1, ls="--", label="perfect agreement")
    ax.set_xlim(0.5, 10.5)
    ax.set_ylim(0.5, 10.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if report:
        fmt = lambda k: "–" if report[k]["value"] is None else f"{report[k]['value']:.2f}"  # noqa: E731
        ax.text(0.03, 0.97, f"n = {report['n']}\nSpearman {fmt('spearman')}\nκ_w {fmt('weighted_kappa')}\n"
                f"leniency {fmt('leniency')}", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_title(title or "Judge vs reference")
    ax.legend(loc="lower right", fontsize=7)
    return fig
