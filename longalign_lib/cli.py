"""`longalign <stage>`: one subcommand per recipe stage (the registry in stages/), plus `run` and `config`.

Run as: longalign --help | longalign <stage> --preset cpu-demo [--set section.key=value ...] [--run-dir DIR]

Each stage's driver and flags live in longalign_lib/stages/<stage>.py; `stages.STAGES` lists them in recipe order.
`longalign run` chains them (pipeline.py) and accepts every stage's flags: a flag two stages define identically
(e.g. `--resume`, from stages.base.add_resume_flag) is one flag; two different flags under one name are an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from . import pipeline
from .config import list_presets, load_config
from .io import LongAlignError
from .stages import STAGES, Stage


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-demo", help=f"preset name ({', '.join(list_presets())}) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--run-dir", default=None, help="folder for every artifact of this run (default: preset's run_dir)")


def _signature(a: argparse.Action) -> tuple:
    return (type(a), a.dest, a.default, a.type, a.choices, a.help, a.nargs, a.const, a.metavar)


def add_stage_flags(p: argparse.ArgumentParser, stages: tuple[Stage, ...] = STAGES) -> dict[str, str]:
    """Add every stage's own flags to `p` (the `run` parser): {option: owning stage}. A flag defined identically
    by several stages is added once; a flag that differs from another stage's, or from one `p` already has,
    raises ValueError naming both owners."""
    owners: dict[str, tuple[str, tuple]] = {o: ("run", _signature(a)) for a in p._actions for o in a.option_strings}
    for stage in stages:
        if stage.add_arguments is None:
            continue
        scratch = argparse.ArgumentParser(add_help=False)
        stage.add_arguments(scratch)
        fresh = False
        for a in scratch._actions:
            for o in a.option_strings:
                if o in owners and owners[o][1] != _signature(a):
                    raise ValueError(f"flag {o} of stage {stage.name!r} clashes with the one of {owners[o][0]!r}: "
                                     "rename one, or share one definition (see stages.base.add_resume_flag)")
                fresh = fresh or o not in owners
                owners.setdefault(o, (stage.name, _signature(a)))
        if fresh:  # identical duplicates are replaced by an equal definition ("resolve"), nothing else changes
            group = p.add_argument_group(f"{stage.name} flags")
            group.conflict_handler = "resolve"
            stage.add_arguments(group)
    return {o: s for o, (s, _) in owners.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longalign", description="LongAlign cookbook: long-context alignment, stage by stage.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", metavar="<stage>")
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        _common(p)
        if stage.add_arguments:
            stage.add_arguments(p)
    p = sub.add_parser("run", help="chain every stage over one run directory (resumable) and write report.md")
    _common(p)
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. check,corpus")
    add_stage_flags(p)  # `run` accepts every stage's own flags too
    p = sub.add_parser("config", help="print the resolved configuration as YAML")
    _common(p)
    return ap


def _print_skipped_lines(stage: str, metrics: dict) -> None:
    """Each input line a stage skipped (metrics["bad_lines"]: "file:line: reason"), one per line on stderr."""
    bad = metrics.get("bad_lines") or []
    for b in bad:
        print(f"longalign: {stage}: skipped {b}", file=sys.stderr)
    if bad:
        print(f"longalign: {stage}: {len(bad)} input line(s) skipped, every good line kept (listed in the stage's "
              "JSON output)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.stage:
        ap.print_help()
        return 0
    try:
        cfg = load_config(args.preset, args.overrides)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        run_dir = Path(cfg.run_dir)
        if args.stage == "config":
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if args.stage == "run":
            stages = args.stages.split(",") if args.stages else None
            results = pipeline.run_all(cfg, run_dir, args, stages=stages, force=args.force)
            metrics = {n: r.metrics for n, r in results.items()}
            for name, m in metrics.items():
                _print_skipped_lines(name, m)
        else:
            metrics = pipeline.run_one(args.stage, cfg, run_dir, args).metrics
            _print_skipped_lines(args.stage, metrics)
        print(json.dumps(metrics, indent=2, default=str))
        return 0
    except LongAlignError as e:
        print(f"longalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longalign: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
