"""`longalign run`: chain the built stages over one run directory, resumably, and write `report.md`.

Usage: longalign run --preset cpu-demo --run-dir runs/demo [--force] [--stages check,corpus]
Each finished stage leaves `<run_dir>/stages/<name>.json` (its metrics, outputs and report section); a rerun
skips finished stages, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import Config, save_config
from .io import LongAlignError, read_json, write_json, write_text


def _defaults(name: str) -> argparse.Namespace:
    """The stage's own flags at their defaults (for stages chained by `run` or called from notebooks)."""
    from .cli import stage_arguments

    p = argparse.ArgumentParser()
    if stage_arguments(name):
        stage_arguments(name)(p)
    return p.parse_args([])


def run_one(name: str, cfg: Config, run_dir: Path, args: argparse.Namespace | None = None) -> dict:
    from .cli import stage_runner

    runner = stage_runner(name)
    if runner is None:
        raise LongAlignError(f"stage '{name}' is not built yet")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    merged = _defaults(name)
    if args is not None:
        for k, v in vars(args).items():
            setattr(merged, k, v)
    t0 = time.time()
    result = runner(cfg, run_dir, merged) or {}
    result.setdefault("metrics", {})
    result["stage"] = name
    result["seconds"] = round(time.time() - t0, 2)
    if not (result.get("dry_run") or result.get("rank_only")):  # a dry run or a non-zero rank marks nothing
        write_json(run_dir / "stages" / f"{name}.json", result)
    return result


def run_all(cfg: Config, run_dir: Path, args=None, stages: list[str] | None = None, force: bool = False) -> dict:
    from .cli import STAGES, stage_runner

    names = stages or [n for n in STAGES if stage_runner(n) is not None]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise LongAlignError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    results = {}
    for name in names:
        done = Path(run_dir) / "stages" / f"{name}.json"
        if done.exists() and not force:
            print(f"[longalign] {name}: done earlier, skipped (--force to redo)", flush=True)
            results[name] = read_json(done)
            continue
        print(f"[longalign] {name}: {STAGES[name][1]}", flush=True)
        results[name] = run_one(name, cfg, run_dir, args)
    write_report(cfg, Path(run_dir), results)
    return {"metrics": {n: r.get("metrics", {}) for n, r in results.items()}, "report": str(Path(run_dir) / "report.md")}


def write_report(cfg: Config, run_dir: Path, results: dict) -> Path:
    lines = [f"# LongAlign run report — `{run_dir}`", "",
             f"Preset `{cfg.preset}`, model `{cfg.model.name}`. Settings: `config.yaml`.", "",
             "| stage | seconds | headline |", "|---|---|---|"]
    for name, r in results.items():
        m = r.get("metrics", {})
        head = ", ".join(f"{k}={v}" for k, v in list(m.items())[:4] if not isinstance(v, (dict, list)))
        lines.append(f"| {name} | {r.get('seconds', '')} | {head} |")
    for name, r in results.items():
        if r.get("report"):
            lines += ["", f"## {name}", "", r["report"].strip()]
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")
