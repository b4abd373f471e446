"""`longalign run`: chain the stages over one run directory, resumably, rerunning what changed; write `report.md`.

Usage: longalign run --preset cpu-demo --run-dir runs/demo [--force] [--stages check,corpus] [--set train.lr=1e-5]
Each finished stage leaves `<run_dir>/stages/<name>.json` (its StageResult) with a fingerprint of what it was
computed from: the settings it declares (stages.STAGES: `settings`), the size and time of any file those settings
name, and the fingerprints of the earlier stages it reads (`reads`). A rerun reuses a stage whose fingerprint is
unchanged and reruns it otherwise, and with it every stage downstream; an interrupted run resumes where it
stopped. `--force` reruns everything selected. Stage flags (e.g. --synthetic-n) are not part of the fingerprint.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from .config import Config, save_config
from .io import LongAlignError, read_json, write_json, write_text
from .stages import STAGES, StageResult
from .stages import get as get_stage  # called with this module's STAGES, so a swapped registry is honoured


def _defaults(name: str) -> argparse.Namespace:
    """The stage's own flags at their defaults (for stages chained by `run` or called from notebooks)."""
    p = argparse.ArgumentParser()
    stage = get_stage(name, STAGES)
    if stage.add_arguments:
        stage.add_arguments(p)
    return p.parse_args([])


def _setting(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise LongAlignError(f"stage setting {key!r} is not in the configuration")
        node = node[part]
    return node


def _file_stamps(value, out: dict) -> dict:
    """(size, mtime) of every existing file a setting names (e.g. data.long_file): editing it reruns the stage."""
    if isinstance(value, dict):
        for v in value.values():
            _file_stamps(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _file_stamps(v, out)
    elif isinstance(value, str) and value and len(value) < 4096:
        p = Path(value).expanduser()
        if p.is_file():
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def _marker(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{name}.json"


def _saved(run_dir: Path, name: str) -> StageResult | None:
    m = _marker(run_dir, name)
    return StageResult.from_dict(read_json(m)) if m.exists() else None


def fingerprint(name: str, cfg: Config, run_dir: Path, upstream: dict[str, StageResult] | None = None) -> str:
    """What stage `name`'s result depends on, hashed: its settings, the files they name, and for each upstream
    stage it reads, that stage's fingerprint and the (size, time) of the files it wrote (from `upstream`, else from
    its marker in `run_dir`; "" for one that never finished)."""
    stage = get_stage(name, STAGES)
    tree = cfg.to_dict()
    settings = {k: _setting(tree, k) for k in stage.settings}
    ups = {}
    for u in stage.reads:
        r = (upstream or {}).get(u) or _saved(run_dir, u)
        ups[u] = "" if r is None else [r.fingerprint, _file_stamps([str(Path(run_dir) / o) for o in r.outputs], {})]
    payload = {"stage": name, "settings": settings, "files": _file_stamps(settings, {}), "reads": ups}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_one(name: str, cfg: Config, run_dir: Path, args: argparse.Namespace | None = None,
            upstream: dict[str, StageResult] | None = None) -> StageResult:
    stage = get_stage(name, STAGES)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    merged = _defaults(name)
    if args is not None:
        for k, v in vars(args).items():
            setattr(merged, k, v)
    fp = fingerprint(name, cfg, run_dir, upstream)
    t0 = time.time()
    result = stage.run(cfg, run_dir, merged)
    if not isinstance(result, StageResult):
        raise TypeError(f"stage {name!r} returned {type(result).__name__}, not a StageResult")
    result = dataclasses.replace(result, stage=name, seconds=round(time.time() - t0, 2), fingerprint=fp)
    if result.finished:  # a dry run or a non-zero rank marks nothing
        write_json(_marker(run_dir, name), result.to_dict())
    return result


def run_all(cfg: Config, run_dir: Path, args=None, stages: list[str] | None = None,
            force: bool = False) -> dict[str, StageResult]:
    """Run the selected stages (default: all) in recipe order, reusing each one whose fingerprint is unchanged."""
    known = [s.name for s in STAGES]
    names = stages or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LongAlignError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(known)}")
    run_dir = Path(run_dir)
    results: dict[str, StageResult] = {}
    for stage in STAGES:
        name = stage.name
        if name not in names:
            continue
        fp = fingerprint(name, cfg, run_dir, results)
        saved = _saved(run_dir, name)
        if saved is not None and saved.fingerprint == fp and not force:
            print(f"[longalign] {name}: done earlier, skipped (settings and inputs unchanged; --force to redo)",
                  flush=True)
            results[name] = dataclasses.replace(saved, reused=True)
        else:
            why = "" if saved is None else " (settings or inputs changed since it ran)" if not force else " (--force)"
            print(f"[longalign] {name}: {stage.help}{why}", flush=True)
            results[name] = run_one(name, cfg, run_dir, args, upstream=results)
    write_report(cfg, run_dir, results)
    return results


def write_report(cfg: Config, run_dir: Path, results: dict[str, StageResult]) -> Path:
    reused = [n for n, r in results.items() if r.reused]
    lines = [f"# LongAlign run report — `{run_dir}`", "",
             f"Preset `{cfg.preset}`, model `{cfg.model.name}`. Settings: `config.yaml`.", "",
             ("Reused from an earlier run (settings and inputs unchanged): " + ", ".join(reused) + "."
              if reused else "Every stage ran in this invocation."), "",
             "| stage | ran / reused | seconds | headline |", "|---|---|---|---|"]
    for name, r in results.items():
        head = ", ".join(f"{k}={v}" for k, v in list(r.metrics.items())[:4] if not isinstance(v, (dict, list)))
        lines.append(f"| {name} | {'reused' if r.reused else 'ran'} | {r.seconds} | {head} |")
    for name, r in results.items():
        if r.report:
            lines += ["", f"## {name}" + (" (reused)" if r.reused else ""), "", r.report.strip()]
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")
