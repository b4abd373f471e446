"""The two types of the stage layer: a Stage (name, help, run, flags) and the StageResult a run returns.

Usage:
    from longalign_lib.stages.base import Stage, StageResult
    def run(cfg, run_dir, args) -> StageResult: ...
    STAGE = Stage("check", "setup check: ...", run, add_arguments)
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """What a stage run hands back: headline metrics, the files it wrote (relative to the run directory), its
    markdown section of report.md. dry_run / rank_only: nothing was finished (a dry run, or a torchrun rank other
    than 0), so `longalign run` does not mark the stage done. stage, seconds, fingerprint, reused: filled in by
    pipeline.py."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    report: str = ""
    dry_run: bool = False
    rank_only: bool = False
    stage: str = ""
    seconds: float = 0.0
    fingerprint: str = ""
    reused: bool = False

    @property
    def finished(self) -> bool:
        """True when the stage's outputs are complete (not a dry run, not a non-zero rank)."""
        return not (self.dry_run or self.rank_only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StageResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RunFn = Callable[[Any, Path, argparse.Namespace], StageResult]
FlagFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Stage:
    """One recipe stage: `longalign <name>` runs `run(cfg, run_dir, args)`; `add_arguments(parser)` adds its flags.

    `settings`: the config sections (or `section.key`s) the stage's result depends on; `reads`: the earlier stages
    whose output files it reads. Together they make the stage's fingerprint (pipeline.fingerprint): `longalign run`
    reruns a stage when its settings, the files those settings name, or an upstream stage changed.
    """

    name: str
    help: str
    run: RunFn
    add_arguments: FlagFn | None = None
    settings: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()


def add_resume_flag(p: argparse.ArgumentParser) -> None:
    """`--resume`, shared by synth and train (one definition, so `longalign run` accepts it once for both)."""
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted stage (synth: keep the records already written; train: from the "
                        "last checkpoint in <run_dir>/checkpoints)")
