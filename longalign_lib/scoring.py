"""Reference-overlap proxy scores and the statistics that summarise judge scores.

Usage:
    from longalign_lib.scoring import proxy_scores, bootstrap_ci, agreement
    proxy_scores("Ruth is David's great-grandmother.", reference)   # {'token_f1': .., 'rouge_l': ..}
    bootstrap_ci([7, 8, 5, 9])                                    # {'mean': 7.25, 'lo': .., 'hi': .., 'n': 4}
    agreement(judge_scores, human_scores)                         # Spearman / Kendall (scipy)

PROXY, not a judgement: token F1 and ROUGE-L count words shared with the reference answer. A correct answer in
other words scores low, a wrong one that copies the question's words scores high. Use them when no capable judge
is reachable (offline runs, CI); report them under their own names, never as "judge score".
"""
from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache

PROXY_LABEL = "proxy (reference overlap, not a judgement)"


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", (text or "").lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between lower-cased word tokens (0 when either side is empty)."""
    p, r = _tokens(prediction), _tokens(reference)
    if not p or not r:
        return 0.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_and_f1(predictions: list[str], references: list[str]) -> tuple[list[bool], list[float]]:
    """Per pair: exact (word for word, surrounding whitespace ignored) and token-F1.

    >>> exact_and_f1([" In the beginning ", "God said"], ["In the beginning", "And God said"])
    ([True, False], [1.0, 0.8])
    """
    pairs = list(zip(predictions, references, strict=True))
    return [p.strip() == r.strip() for p, r in pairs], [token_f1(p, r) for p, r in pairs]


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from the `rouge-score` package, with stemming."""
    if not (prediction or "").strip() or not (reference or "").strip():
        return 0.0
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def proxy_scores(prediction: str, reference: str) -> dict:
    """Both proxy scores in [0, 1], plus `proxy_10` = 1 + 9·ROUGE-L for plotting beside 1-10 judge ratings."""
    f1, rl = token_f1(prediction, reference), rouge_l(prediction, reference)
    return {"token_f1": round(f1, 4), "rouge_l": round(rl, 4), "proxy_10": round(1 + 9 * rl, 3)}


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean with a percentile bootstrap confidence interval (resampling cases with replacement)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    a = (1 - level) / 2
    lo, hi = means[int(a * (n_boot - 1))], means[int(round((1 - a) * (n_boot - 1)))]
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def agreement(scores, human) -> dict:
    """Rank agreement of automatic scores with human scores (pairs with a None on either side are dropped)."""
    from scipy import stats

    pairs = [(float(a), float(b)) for a, b in zip(scores, human, strict=False) if a is not None and b is not None]
    out = {"n": len(pairs), "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return out  # undefined for fewer than 3 pairs or a constant side
    xs, ys = zip(*pairs, strict=False)
    s, k = stats.spearmanr(xs, ys), stats.kendalltau(xs, ys)
    out.update(spearman=float(s.statistic), spearman_p=float(s.pvalue),
               kendall=float(k.statistic), kendall_p=float(k.pvalue))
    return out
