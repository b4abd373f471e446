"""`longalign run`: chain the stages over one run directory, resumably, and write `report.md`.

Usage: longalign run --preset cpu-demo --run-dir runs/demo [--force] [--stages check,corpus]
Each finished stage leaves `<run_dir>/stages/<name>.json` (its StageResult: metrics, outputs, report section);
a rerun skips finished stages, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from .config import Config, save_config
from .io import LongAlignError, read_json, write_json, write_text
from .stages import NAMES, STAGES, StageResult, get


def _defaults(name: str) -> argparse.Namespace:
    """The stage's own flags at their defaults (for stages chained by `run` or called from notebooks)."""
    p = argparse.ArgumentParser()
    stage = get(name)
    if stage.add_arguments:
        stage.add_arguments(p)
    return p.parse_args([])


def run_one(name: str, cfg: Config, run_dir: Path, args: argparse.Namespace | None = None) -> StageResult:
    stage = get(name)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    merged = _defaults(name)
    if args is not None:
        for k, v in vars(args).items():
            setattr(merged, k, v)
    t0 = time.time()
    result = stage.run(cfg, run_dir, merged)
    if not isinstance(result, StageResult):
        raise TypeError(f"stage {name!r} returned {type(result).__name__}, not a StageResult")
    result = dataclasses.replace(result, stage=name, seconds=round(time.time() - t0, 2))
    if result.finished:  # a dry run or a non-zero rank marks nothing
        write_json(run_dir / "stages" / f"{name}.json", result.to_dict())
    return result


def run_all(cfg: Config, run_dir: Path, args=None, stages: list[str] | None = None,
            force: bool = False) -> dict[str, StageResult]:
    names = stages or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise LongAlignError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(NAMES)}")
    results: dict[str, StageResult] = {}
    for stage in STAGES:
        name = stage.name
        if name not in names:
            continue
        done = Path(run_dir) / "stages" / f"{name}.json"
        if done.exists() and not force:
            print(f"[longalign] {name}: done earlier, skipped (--force to redo)", flush=True)
            results[name] = dataclasses.replace(StageResult.from_dict(read_json(done)), reused=True)
            continue
        print(f"[longalign] {name}: {stage.help}", flush=True)
        results[name] = run_one(name, cfg, run_dir, args)
    write_report(cfg, Path(run_dir), results)
    return results


def write_report(cfg: Config, run_dir: Path, results: dict[str, StageResult]) -> Path:
    lines = [f"# LongAlign run report — `{run_dir}`", "",
             f"Preset `{cfg.preset}`, model `{cfg.model.name}`. Settings: `config.yaml`.", "",
             "| stage | seconds | headline |", "|---|---|---|"]
    for name, r in results.items():
        head = ", ".join(f"{k}={v}" for k, v in list(r.metrics.items())[:4] if not isinstance(v, (dict, list)))
        lines.append(f"| {name} | {r.seconds} | {head} |")
    for name, r in results.items():
        if r.report:
            lines += ["", f"## {name}", "", r.report.strip()]
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")
