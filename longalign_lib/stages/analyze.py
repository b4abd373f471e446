"""`longalign analyze`: length-distribution statistics and figures of the tokenized dataset → lengths.json.

Run as: longalign analyze --preset cpu-demo [--tokenized DIR] [--run-dir DIR]
"""
from __future__ import annotations

from pathlib import Path

from ..inputs import tokenized_dir, training_set
from ..io import write_json
from ..lengths import analyze, bucket_edges, dataset_columns, save_figures
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--tokenized", default=None, help="tokenized dataset folder (default: data.tokenized_dir or "
                                                     "<run_dir>/tokenized)")


def run(cfg, run_dir: Path, args) -> StageResult:
    run_dir = Path(run_dir)
    given = getattr(args, "tokenized", None)
    path = Path(given) if given else tokenized_dir(cfg, run_dir)
    ds, note = training_set(cfg, run_dir, given)
    where = note[0].upper() + note[1:] + ("" if note.endswith(".") else ".")
    lens, tgts = dataset_columns(ds)
    edges = list(cfg.data.buckets) if cfg.data.buckets else bucket_edges(cfg.data.max_length)
    result = analyze(lens, tgts, max_length=cfg.data.max_length, edges=edges)
    result["dataset"] = str(path)
    write_json(run_dir / "lengths.json", result)
    figs = save_figures(lens, tgts, cfg.data.max_length, run_dir / "figures", edges)
    a = result["all"]
    share = result["compute_share"]
    metrics = {"sequences": a["lengths"]["count"], "tokens": a["lengths"]["tokens"], "mean_len": a["lengths"]["mean"],
               "p50": a["lengths"]["p50"], "p90": a["lengths"]["p90"], "max_len": a["lengths"]["max"],
               "target_share": a.get("targets", {}).get("target_share"),
               "top10_attention_share": a["top10"]["attention"]}
    for s, v in share.items():
        metrics[f"{s}_token_share"] = v["linear"]
        metrics[f"{s}_attention_share"] = v["attention"]
    rows = ["| source | sequences | mean | p50 | p90 | max | target share | share of tokens | share of Σ L² |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s, e in result["sources"].items():
        st = e["lengths"]
        tshare = e.get("targets", {}).get("target_share")
        rows.append(f"| {s} | {st['count']:,} | {st['mean']:,.0f} | {st['p50']:,.0f} | {st['p90']:,.0f} | "
                    f"{st['max']:,} | {'' if tshare is None else f'{100 * tshare:.0f}%'} | "
                    f"{100 * share[s]['linear']:.0f}% | {100 * share[s]['attention']:.0f}% |")
    buckets = " · ".join(f"{r['bucket']}: {100 * r['seq_share']:.0f}% of sequences, {100 * r['token_share']:.0f}% "
                         f"of tokens" for r in a["buckets"] if r["sequences"])
    report = (f"{where} Buckets scale with max_length {cfg.data.max_length:,} (edges {edges}).\n\n" + "\n".join(rows)
              + f"\n\nBy bucket — {buckets}. The longest {a['top10']['sequences']:,} sequence(s) "
              f"({100 * a['top10']['sequences'] / max(1, a['lengths']['count']):.0f}% of them) carry "
              f"{100 * a['top10']['tokens']:.0f}% of the tokens and {100 * a['top10']['attention']:.0f}% of the attention work (Σ L²).\n\n"
              + "\n".join(f"![{n}]({p.relative_to(run_dir)})" for n, p in figs.items()))
    outputs = ["lengths.json", *[str(p.relative_to(run_dir)) for p in figs.values()]]
    return StageResult(metrics, outputs, report)

