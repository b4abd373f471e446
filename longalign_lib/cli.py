"""`longalign <stage>`: one subcommand per recipe stage, thin wrappers over the library modules.

Run as: longalign --help | longalign <stage> --preset cpu-demo [--set section.key=value ...] [--run-dir DIR]

A stage is a function of a longalign_lib module: `run_<stage>(cfg, run_dir, args) -> dict` (or `run_stage` when the
module holds one stage) returning keys `metrics`, `outputs`, `report` (markdown); optionally
`add_<stage>_arguments(parser)` (or `add_arguments`) for its own flags. STAGES lists them in recipe order;
`longalign run` chains every stage that is built (pipeline.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .config import list_presets, load_config
from .io import LongAlignError

# name: (module, one-line help) — in the order `longalign run` chains them.
STAGES: dict[str, tuple[str, str]] = {
    "check": ("check", "setup check: load the model, format a record, generate a reply"),
    "corpus": ("corpus", "stage 1a: collect long documents into corpus.jsonl"),
    "synth": ("synth", "stage 1b: Self-Instruct long tasks + short chat data → long.jsonl, short.jsonl"),
    "tokenize": ("dataset", "stage 2: mix and tokenize records into a datasets Dataset"),
    "analyze": ("lengths", "stage 2: length-distribution statistics and figures → lengths.json"),
    "pack": ("batching", "stage 3: naive / sorted / packed batch plans and loss weights → batching.json"),
    "train": ("train", "stage 4: long-context SFT with packing and loss weighting"),
    "eval": ("generate", "stage 5: generate answers on a long-context benchmark → predictions.jsonl"),
    "judge": ("judge", "stage 5: LongBench-Chat-style LLM judge → judgments.jsonl"),
    "needle": ("needle", "stage 5: needle-in-a-haystack grid → needle.json + heatmap"),
}


def _module(name: str):
    mod_name = STAGES[name][0]
    try:
        return importlib.import_module(f"longalign_lib.{mod_name}")
    except ModuleNotFoundError as e:
        if e.name == f"longalign_lib.{mod_name}":
            return None
        raise


def stage_runner(name: str):
    """The function that runs stage `name` (`run_<name>` or `run_stage`); None if it is not built yet."""
    mod = _module(name)
    if mod is None:
        return None
    return getattr(mod, f"run_{name}", None) or getattr(mod, "run_stage", None)


def stage_arguments(name: str):
    """The function that adds stage `name`'s own flags to a parser, or None."""
    mod = _module(name)
    if mod is None:
        return None
    return getattr(mod, f"add_{name}_arguments", None) or getattr(mod, "add_arguments", None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-demo", help=f"preset name ({', '.join(list_presets())}) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--run-dir", default=None, help="folder for every artifact of this run (default: preset's run_dir)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longalign", description="LongAlign cookbook: long-context alignment, stage by stage.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", metavar="<stage>")
    for name, (_, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        if stage_arguments(name):
            stage_arguments(name)(p)
    p = sub.add_parser("run", help="chain every built stage over one run directory (resumable) and write report.md")
    _common(p)
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. check,corpus")
    for name in STAGES:  # `run` accepts every stage's own flags too
        if stage_arguments(name):
            try:
                stage_arguments(name)(p)
            except argparse.ArgumentError:
                pass
    p = sub.add_parser("config", help="print the resolved configuration as YAML")
    _common(p)
    return ap


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
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from . import pipeline

        if args.stage == "run":
            stages = args.stages.split(",") if args.stages else None
            result = pipeline.run_all(cfg, run_dir, args, stages=stages, force=args.force)
        else:
            if stage_runner(args.stage) is None:
                raise LongAlignError(f"stage '{args.stage}' is not built yet in this version of the cookbook")
            result = pipeline.run_one(args.stage, cfg, run_dir, args)
        print(json.dumps(result.get("metrics", {}), indent=2, default=str))
        return 0
    except LongAlignError as e:
        print(f"longalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longalign: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
