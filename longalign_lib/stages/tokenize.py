"""`longalign tokenize`: mix the stage-1 records and tokenize them into a `datasets` Dataset (cached by content).

Run as: longalign tokenize --preset cpu-demo [--rebuild] [--set data.max_length=4096] [--run-dir DIR]
"""
from __future__ import annotations

from pathlib import Path

from ..dataset import build_dataset
from ..inputs import stage1_records, tokenized_dir
from ..io import bad_lines_note, write_json
from ..models import load_tokenizer
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--rebuild", action="store_true", help="tokenize again even if the cached dataset matches")


def run(cfg, run_dir: Path, args) -> StageResult:
    run_dir = Path(run_dir)
    records, where = stage1_records(cfg, run_dir)
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    out_dir = tokenized_dir(cfg, run_dir)
    ds, summary = build_dataset(records, tok, cfg.data, out_dir, num_proc=cfg.data.num_proc,
                                rebuild=bool(getattr(args, "rebuild", False)))
    summary["where"] = where
    write_json(run_dir / "tokenize.json", summary)
    import pyarrow.compute as pc  # heavy: only when the stage runs

    metrics = {"records": summary["kept"], "rejected": sum(summary["rejected"].values()),
               "truncated": sum(summary["truncated"].values()), "tokens": summary["tokens"],
               "target_tokens": summary["target_tokens"], "max_len": pc.max(ds.data.column("length")).as_py(),
               "mean_len": round(summary["tokens"] / max(1, summary["kept"]), 1), "cached": summary["cached"],
               "bad_lines": summary.get("bad_lines", [])}
    rows = ["| source | records | kept | truncated | tokens | target tokens | rejected |", "|---|---|---|---|---|---|---|"]
    for src, s in summary["by_source"].items():
        rej = ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "—"
        rows.append(f"| {src} | {s['total']} | {s['kept']} | {s['truncated']} | {s['tokens']:,} | "
                    f"{s['target_tokens']:,} | {rej} |")
    mixed = ""
    if summary.get("mix") and "long" in summary["mix"]:
        m = summary["mix"]
        mixed = (f"\n\nMix (seed {m['seed']}): {m['long']['selected']}/{m['long']['available']} long, "
                 f"{m['short']['selected']}/{m['short']['available']} short records.")
    elif summary.get("mix"):
        mixed = f"\n\nMix skipped: {summary['mix']['skipped']}."
    report = (f"{where} Tokenized with `{cfg.model.name}`'s chat template, max_length {cfg.data.max_length} "
              f"(truncation: {cfg.data.truncation}), no padding: {summary['kept']} sequences, "
              f"{summary['tokens']:,} tokens ({summary['target_tokens']:,} trained on) in `{out_dir}`"
              f"{' (cached: inputs unchanged)' if summary['cached'] else ''}.{mixed}\n\n" + "\n".join(rows)
              + bad_lines_note(summary.get("bad_lines", [])))
    return StageResult(metrics, ["tokenize.json", str(out_dir)], report)

