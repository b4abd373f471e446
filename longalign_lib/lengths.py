"""Stage 2 — the length distribution of a training set, and what it costs: statistics, buckets, compute share, plots.

Run as: longalign analyze --preset cpu-demo [--run-dir DIR]   (reads <run_dir>/tokenized; writes lengths.json, figures/)
Usage:
    from longalign_lib import lengths as L
    report = L.analyze({"long": long_lens, "short": short_lens}, {"long": long_tgt, "short": short_tgt}, max_length=65536)
    fig = L.length_histogram({"long": long_lens, "short": short_lens}, max_length=65536)
    demo = L.synthetic_longalign_sharegpt_mix(20_000)        # SYNTHETIC lengths (LongAlign-10k + ShareGPT shape)
    report = L.analyze(*demo.by_source(), max_length=65536)

Every function takes plain lists or numpy arrays of token counts, so notebooks and stage 3 can call them on any data.
The buckets are the paper's 0-8k, 8-16k, 16-32k, 32-64k and >64k scaled to a maximum length (max/8, max/4, max/2,
max): with max_length=2048 they are 0-256, 256-512, 512-1k, 1k-2k, >2k. A sequence of length L belongs to the bucket
(lo, hi] that holds it.

Why long sequences dominate step time: the linear layers cost ~2·N_params FLOPs per token (Σ L over a batch) but
causal attention costs ~2·n_layers·hidden·L² per sequence (Σ L²). One 64k sequence has the tokens of 64 1k chats
and the attention work of 4,096 of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import LongAlignError

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


def as_lengths(x, name: str = "lengths") -> np.ndarray:
    """A 1-d int64 array of non-negative token counts (a clear error for anything else)."""
    a = np.asarray(list(x) if not hasattr(x, "__len__") else x)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.number):
        raise LongAlignError(f"{name}: expected a flat list of token counts, got shape {a.shape} ({a.dtype})")
    if (a < 0).any():
        raise LongAlignError(f"{name}: token counts must be >= 0 (found {int(a.min())})")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------------------------- statistics
def length_stats(lengths) -> dict:
    """count, tokens (Σ), mean, std, min, p10…p99, max of token counts (None for an empty list)."""
    a = as_lengths(lengths)
    out: dict = {"count": int(a.size), "tokens": int(a.sum())}
    keys = ["mean", "std", "min", *[f"p{p}" for p in PERCENTILES], "max"]
    if a.size == 0:
        return {**out, **dict.fromkeys(keys)}
    pct = np.percentile(a, PERCENTILES)
    out.update({"mean": round(float(a.mean()), 2), "std": round(float(a.std()), 2), "min": int(a.min())})
    out.update({f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, pct, strict=True)})
    out["max"] = int(a.max())
    return out


def bucket_edges(max_length: int) -> list[int]:
    """Upper edges of the first four buckets: max/8, max/4, max/2, max (65536 → 8k, 16k, 32k, 64k)."""
    if not max_length or max_length < 8:
        raise LongAlignError(f"data.max_length={max_length}: need a maximum length of at least 8 tokens for buckets")
    return [max_length // 8, max_length // 4, max_length // 2, max_length]


def _fmt(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else (f"{n / 1000:.0f}k" if n >= 10_000 else str(n))


def bucket_labels(edges: list[int]) -> list[str]:
    """['0–8k', '8k–16k', '16k–32k', '32k–64k', '>64k'] for edges [8192, 16384, 32768, 65536]."""
    lows = [0, *edges[:-1]]
    return [f"{_fmt(lo)}–{_fmt(hi)}" for lo, hi in zip(lows, edges, strict=True)] + [f">{_fmt(edges[-1])}"]


def bucket_index(lengths, edges: list[int]) -> np.ndarray:
    """Bucket of each length: i such that edges[i-1] < L <= edges[i]; len(edges) for L > edges[-1]."""
    edges = list(edges)
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise LongAlignError(f"bucket edges must increase strictly, got {edges}")
    return np.searchsorted(np.asarray(edges, np.int64), as_lengths(lengths), side="left")


def bucket_table(lengths, edges: list[int]) -> list[dict]:
    """Per bucket: sequences, tokens (Σ L) and attention work (Σ L²), each as a count and as a share of the total."""
    a = as_lengths(lengths)
    idx = bucket_index(a, edges)
    sq = a.astype(np.float64) ** 2
    n_all, tok_all, sq_all = max(1, a.size), max(1, int(a.sum())), max(1.0, float(sq.sum()))
    lows = [0, *edges]
    highs = [*edges, None]
    rows = []
    for i, label in enumerate(bucket_labels(edges)):
        m = idx == i
        rows.append({"bucket": label, "lo": lows[i], "hi": highs[i], "sequences": int(m.sum()),
                     "tokens": int(a[m].sum()), "seq_share": round(float(m.sum()) / n_all, 6),
                     "token_share": round(int(a[m].sum()) / tok_all, 6),
                     "attention_share": round(float(sq[m].sum()) / sq_all, 6)})
    return rows


def target_stats(n_target, lengths=None) -> dict:
    """Statistics of target (trained-on) tokens; with `lengths`, also Σ target / Σ length and per-sequence ratios."""
    t = as_lengths(n_target, "n_target")
    out = length_stats(t)
    if lengths is not None:
        a = as_lengths(lengths)
        if a.size != t.size:
            raise LongAlignError(f"n_target has {t.size} entries but lengths has {a.size}")
        if (t > a).any():
            raise LongAlignError("n_target: a sequence has more target tokens than tokens")
        out["target_share"] = round(float(t.sum()) / max(1, int(a.sum())), 6)
        out["mean_target_fraction"] = round(float(np.mean(t / np.maximum(a, 1))), 6) if a.size else None
    return out


def compute_share(lengths_by_source: dict) -> dict:
    """Per source: share of sequences, of linear-layer work (Σ L) and of attention work (Σ L²) in the whole set."""
    arrays = {s: as_lengths(v, f"lengths[{s}]") for s, v in lengths_by_source.items()}
    n = max(1, sum(a.size for a in arrays.values()))
    lin = max(1, sum(int(a.sum()) for a in arrays.values()))
    att = max(1.0, sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays.values()))
    return {s: {"sequences": round(a.size / n, 6), "linear": round(int(a.sum()) / lin, 6),
                "attention": round(float((a.astype(np.float64) ** 2).sum()) / att, 6)} for s, a in arrays.items()}


def top_share(lengths, fraction: float = 0.1) -> dict:
    """How much of Σ L and Σ L² the longest `fraction` of the sequences carries (the long tail's weight)."""
    a = np.sort(as_lengths(lengths))[::-1].astype(np.float64)
    if a.size == 0:
        return {"fraction": fraction, "sequences": 0, "tokens": None, "attention": None}
    k = max(1, int(round(fraction * a.size)))
    return {"fraction": fraction, "sequences": k, "tokens": round(float(a[:k].sum() / max(1.0, a.sum())), 6),
            "attention": round(float((a[:k] ** 2).sum() / max(1.0, (a ** 2).sum())), 6)}


def attention_flops_share(lengths, n_params: float, n_layers: int, hidden: int) -> float:
    """Fraction of forward FLOPs spent in causal attention scores for these sequences (each run on its own).

    Per sequence of L tokens: linear layers ≈ 2·n_params·L; causal attention (QKᵀ and AV, half the square)
    ≈ 2·n_layers·hidden·L². E.g. a 7B Llama (32 layers, hidden 4096) at L=65536: about half the work is attention.
    """
    a = as_lengths(lengths).astype(np.float64)
    lin = 2.0 * n_params * a.sum()
    att = 2.0 * n_layers * hidden * (a ** 2).sum()
    return float(att / (lin + att)) if lin + att > 0 else 0.0


def random_batch_fill(lengths, batch_size: int, seed: int = 0) -> float:
    """Share of real (non-pad) tokens when random batches of `batch_size` are padded to their longest sequence.

    A property of the length distribution: the longer its tail, the more padding naive batching wastes. Stage 3
    (batching.py) compares naive, sorted and packed plans properly.
    """
    a = as_lengths(lengths)
    if a.size == 0:
        return 1.0
    perm = np.random.default_rng(seed).permutation(a.size)
    padded = sum(int(a[perm[i:i + batch_size]].max()) * len(perm[i:i + batch_size])
                 for i in range(0, a.size, batch_size))
    return float(a.sum()) / max(1, padded)


def analyze(lengths_by_source: dict, n_target_by_source: dict | None = None, max_length: int = 65536,
            edges: list[int] | None = None) -> dict:
    """Everything `lengths.json` holds, for {source: lengths} (and optionally {source: target tokens})."""
    edges = list(edges) if edges else bucket_edges(max_length)
    if not lengths_by_source:
        raise LongAlignError("analyze: no sequences given")
    arrays = {s: as_lengths(v, f"lengths[{s}]") for s, v in lengths_by_source.items()}
    targets = {s: as_lengths(v, f"n_target[{s}]") for s, v in (n_target_by_source or {}).items()}
    all_len = np.concatenate(list(arrays.values()))
    out: dict = {"max_length": max_length, "edges": edges, "buckets": bucket_labels(edges), "sources": {}}
    for s, a in arrays.items():
        entry = {"lengths": length_stats(a), "buckets": bucket_table(a, edges), "top10": top_share(a)}
        if s in targets:
            entry["targets"] = target_stats(targets[s], a)
        out["sources"][s] = entry
    out["all"] = {"lengths": length_stats(all_len), "buckets": bucket_table(all_len, edges), "top10": top_share(all_len)}
    if targets and set(targets) == set(arrays):
        out["all"]["targets"] = target_stats(np.concatenate([targets[s] for s in arrays]), all_len)
    out["compute_share"] = compute_share(arrays)
    out["over_max_length"] = int((all_len > max_length).sum())
    return out


# ----------------------------------------------------------------------------------------------- synthetic mix
@dataclass
class LengthMix:
    """Per-sequence token lengths, target tokens and source ("long" / "short") of a training mix."""

    lengths: np.ndarray
    n_target: np.ndarray
    source: np.ndarray
    synthetic: bool = True  # True: drawn from a model of the data, not measured

    def by_source(self) -> tuple[dict, dict]:
        """({source: lengths}, {source: target tokens}), long first: what analyze() and the figures take."""
        names = [s for s in ("long", "short") if (self.source == s).any()]
        return ({s: self.lengths[self.source == s] for s in names},
                {s: self.n_target[self.source == s] for s in names})


def synthetic_longalign_sharegpt_mix(n: int = 20_000, long_share: float = 0.5, max_length: int = 65_536,
                                     seed: int = 0) -> LengthMix:
    """SYNTHETIC lengths shaped like LongAlign's training mix — LongAlign-10k long instruction records plus
    ShareGPT short chats — for demos, simulations and benchmarks only: not measured data.

    long (`long_share` of the n sequences): log-normal around max_length/4 (16k for 64k), clipped to
    [max_length/16, max_length]; short: log-normal around max_length/100 (~650 for 64k), clipped to
    [32, max_length/8]; target tokens: a few hundred per long answer, 35-85 % of a short chat. Sequences come
    in shuffled order. The one synthetic mix of the cookbook (notebooks 02 and 03, `longalign pack`, simulate.py,
    bench/, tests).

    >>> m = synthetic_longalign_sharegpt_mix(1000, seed=1)
    >>> int((m.source == "long").sum()), bool(m.lengths.max() <= 65536), m.synthetic
    (500, True, True)
    """
    if not 0.0 <= long_share <= 1.0 or n < 0:
        raise LongAlignError(f"synthetic mix: n={n} and long_share={long_share} must be >= 0 and in [0, 1]")
    rng = np.random.default_rng(seed)
    n_long = int(round(n * long_share))
    n_short = n - n_long
    long_ = np.clip(rng.lognormal(np.log(max_length / 4), 0.55, n_long), max_length / 16, max_length).astype(np.int64)
    short = np.clip(rng.lognormal(np.log(max_length / 100), 0.9, n_short), 32, max_length / 8).astype(np.int64)
    long_t = np.minimum(np.clip(rng.lognormal(np.log(max_length / 200), 0.6, n_long), 8, None), long_ // 2)
    short_t = np.maximum(1, (short * rng.uniform(0.35, 0.85, n_short))).astype(np.int64)
    order = rng.permutation(n)
    lengths = np.concatenate([long_, short])[order]
    n_target = np.concatenate([long_t.astype(np.int64), short_t])[order]
    source = np.array(["long"] * n_long + ["short"] * n_short, dtype=object)[order]
    return LengthMix(lengths, n_target, source)


# ----------------------------------------------------------------------------------------------- figures
def _color(source: str, i: int) -> str:
    from . import plots  # matplotlib: imported only when a figure is drawn

    return plots.PALETTE.get(source, plots.CYCLE[(i + 2) % len(plots.CYCLE)])


def length_histogram(lengths_by_source: dict, max_length: int, edges: list[int] | None = None, bins: int = 40,
                     title: str | None = None):
    """Histogram of sequence lengths per source on a log x axis, bucket edges dashed (cf. LongAlign Fig. 3, left)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    edges = list(edges) if edges else bucket_edges(max_length)
    arrays = {s: as_lengths(v) for s, v in lengths_by_source.items() if len(v)}
    lo = max(1, min(int(a.min()) for a in arrays.values()))
    hi = max(max(int(a.max()) for a in arrays.values()), edges[-1])
    grid = np.logspace(np.log10(lo * 0.9), np.log10(hi * 1.1), bins + 1)
    fig, ax = plots.figure()
    for i, (s, a) in enumerate(arrays.items()):
        ax.hist(a, bins=grid, histtype="stepfilled", alpha=0.45, color=_color(s, i), edgecolor=_color(s, i),
                linewidth=1.2, label=f"{s} (n={a.size:,}, median {np.median(a):,.0f})")
    for e in edges:
        ax.axvline(e, color="#555555", linestyle="--", linewidth=0.8)
    for e, label in zip([0, *edges], bucket_labels(edges), strict=True):
        x = max(e, lo) * 1.05
        ax.text(x, 0.98, label, transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="#555555")
    ax.set_xscale("log")
    ax.set_xlabel("sequence length (tokens, log scale)")
    ax.set_ylabel("sequences")
    ax.set_title(title or f"Length distribution per source (max_length {max_length:,}; dashed: bucket edges)")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9))
    return fig


def length_cdf(lengths_by_source: dict, max_length: int, edges: list[int] | None = None, title: str | None = None):
    """CDFs: per-source share of sequences ≤ x, and for the whole set the share of tokens and of attention work."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    edges = list(edges) if edges else bucket_edges(max_length)
    arrays = {s: np.sort(as_lengths(v)) for s, v in lengths_by_source.items() if len(v)}
    fig, ax = plots.figure()
    for i, (s, a) in enumerate(arrays.items()):
        ax.step(a, np.arange(1, a.size + 1) / a.size, where="post", color=_color(s, i), linestyle="--",
                label=f"{s}: sequences")
    a = np.sort(np.concatenate(list(arrays.values()))).astype(np.float64)
    ax.step(a, np.arange(1, a.size + 1) / a.size, where="post", color="#333333", label="all: sequences")
    ax.step(a, np.cumsum(a) / a.sum(), where="post", color="#55a868", linewidth=2, label="all: tokens (Σ L)")
    ax.step(a, np.cumsum(a ** 2) / (a ** 2).sum(), where="post", color="#c44e52", linewidth=2,
            label="all: attention work (Σ L²)")
    for e in edges:
        ax.axvline(e, color="#555555", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("sequence length (tokens, log scale)")
    ax.set_ylabel("cumulative share (of sequences ≤ x)")
    ax.set_title(title or "Where sequences, tokens and attention work sit along the length axis")
    ax.legend(loc="best", fontsize=7)
    return fig


def bucket_share_figure(table: list[dict], title: str | None = None):
    """Grouped bars per length bucket: share of sequences, of tokens and of attention work (from bucket_table)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, ax = plots.figure()
    x = np.arange(len(table))
    series = [("seq_share", "sequences", "#8c8c8c"), ("token_share", "tokens (Σ L)", "#55a868"),
              ("attention_share", "attention work (Σ L²)", "#c44e52")]
    w = 0.27
    for j, (key, label, color) in enumerate(series):
        vals = [100 * r[key] for r in table]
        bars = ax.bar(x + (j - 1) * w, vals, w, label=label, color=color)
        for b, v in zip(bars, vals, strict=True):
            if v >= 0.5:
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x, [r["bucket"] for r in table])
    ax.set_xlabel("length bucket (tokens)")
    ax.set_ylabel("share of the whole set (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title or "Share of sequences, tokens and attention work per length bucket")
    ax.legend(loc="upper left")
    return fig


def target_vs_length(lengths_by_source: dict, n_target_by_source: dict, title: str | None = None,
                     max_points: int = 5000, seed: int = 0):
    """Scatter of target tokens against sequence length per source (log-log); the line y = x means all trained."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, ax = plots.figure()
    rng = np.random.default_rng(seed)
    top, bottom = 1, None
    for i, s in enumerate(lengths_by_source):
        a, t = as_lengths(lengths_by_source[s]), as_lengths(n_target_by_source[s], f"n_target[{s}]")
        if a.size == 0:
            continue
        if a.size > max_points:
            pick = rng.choice(a.size, max_points, replace=False)
            a, t = a[pick], t[pick]
        share = t.sum() / max(1, a.sum())
        ax.scatter(a, np.maximum(t, 1), s=10, alpha=0.5, color=_color(s, i),
                   label=f"{s}: {100 * share:.0f}% of tokens are targets")
        top = max(top, int(a.max()))
        bottom = int(a.min()) if bottom is None else min(bottom, int(a.min()))
    line = np.array([max(1.0, (bottom or 1) / 3), top * 1.2])
    ax.plot(line, line, color="#555555", linestyle="--", linewidth=0.8, label="every token a target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("target tokens (trained on)")
    ax.set_title(title or "Target tokens vs sequence length: long records train on a small share of their tokens")
    ax.legend(loc="upper left", fontsize=7)
    return fig


def save_figures(lengths_by_source: dict, n_target_by_source: dict | None, max_length: int, out_dir,
                 edges: list[int] | None = None, prefix: str = "lengths", note: str = "") -> dict:
    """The four figures of this stage as PNGs in `out_dir`; returns {name: path}."""
    import matplotlib.pyplot as plt

    from . import plots  # matplotlib: imported only when a figure is drawn

    out_dir = Path(out_dir)
    edges = list(edges) if edges else bucket_edges(max_length)
    all_len = np.concatenate([as_lengths(v) for v in lengths_by_source.values()])
    figs = {
        "histogram": length_histogram(lengths_by_source, max_length, edges,
                                      title=f"Length distribution per source{note} (dashed: bucket edges)"),
        "cdf": length_cdf(lengths_by_source, max_length, edges,
                          title=f"Sequences, tokens and attention work along the length axis{note}"),
        "bucket_share": bucket_share_figure(bucket_table(all_len, edges),
                                            title=f"Share per length bucket{note}"),
    }
    if n_target_by_source:
        figs["targets"] = target_vs_length(lengths_by_source, n_target_by_source,
                                           title=f"Target tokens vs sequence length{note}")
    paths = {}
    for name, fig in figs.items():
        paths[name] = plots.save(fig, out_dir / f"{prefix}_{name}.png")
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------- columns of a tokenized dataset
def dataset_columns(ds) -> tuple[dict, dict]:
    """({source: lengths}, {source: target tokens}) from a tokenized dataset (dataset.load_tokenized)."""
    table = ds.data
    length = np.asarray(table.column("length").to_numpy(), np.int64)
    n_target = np.asarray(table.column("n_target").to_numpy(), np.int64)
    source = np.asarray(table.column("source").to_pylist(), dtype=object)
    if getattr(ds, "_indices", None) is not None:  # a select()ed view: follow its index mapping
        idx = np.asarray(ds._indices.column(0).to_numpy())
        length, n_target, source = length[idx], n_target[idx], source[idx]
    order = list(dict.fromkeys(["long", "short", *sorted(set(source))]))
    lens = {s: length[source == s] for s in order if (source == s).any()}
    tgts = {s: n_target[source == s] for s in order if (source == s).any()}
    return lens, tgts
