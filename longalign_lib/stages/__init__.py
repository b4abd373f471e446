"""The recipe stages, in the order `longalign run` chains them: one module per stage, one typed registry.

Usage:
    from longalign_lib.stages import STAGES, get
    for stage in STAGES: print(stage.name, stage.help)
    result = get("check").run(cfg, run_dir, args)          # a StageResult
Each stage module holds its driver (`run`), its flags (`add_arguments`), its report section and figure saving;
the library modules it calls never import a stage.
"""
from __future__ import annotations

from ..io import LongAlignError
from . import analyze, check, corpus, eval, judge, needle, pack, synth, tokenize, train
from .base import Stage, StageResult

MODEL_DATA = ("model.name", "model.trust_remote_code")  # what tokenizing depends on besides `data`

STAGES: tuple[Stage, ...] = (
    Stage("check", "setup check: load the model, format a record, generate a reply", check.run, check.add_arguments,
          settings=("model", "data.max_length", "data.truncation", "data_file")),
    Stage("corpus", "stage 1a: collect long documents into corpus.jsonl", corpus.run,
          settings=("corpus", "model.name")),
    Stage("synth", "stage 1b: Self-Instruct long tasks + short chat data → long.jsonl, short.jsonl", synth.run,
          synth.add_arguments, settings=("synth", "corpus", "model"), reads=("corpus",)),
    Stage("tokenize", "stage 2: mix and tokenize records into a datasets Dataset", tokenize.run,
          tokenize.add_arguments, settings=("data", *MODEL_DATA), reads=("synth",)),
    Stage("analyze", "stage 2: length-distribution statistics and figures → lengths.json", analyze.run,
          analyze.add_arguments, settings=("data", *MODEL_DATA), reads=("tokenize",)),
    Stage("pack", "stage 3: naive / sorted / packed batch plans and loss weights → batching.json", pack.run,
          pack.add_arguments, settings=("batching", "data", *MODEL_DATA, "train.epochs", "train.sequence_parallel"), reads=("tokenize",)),
    Stage("train", "stage 4: long-context SFT with packing and loss weighting", train.run, train.add_arguments,
          settings=("model", "data", "batching", "train"), reads=("tokenize", "pack")),
    Stage("eval", "stage 5: generate answers on a long-context benchmark → predictions.jsonl", eval.run,
          eval.add_arguments, settings=("model", "eval"), reads=("train",)),
    Stage("judge", "stage 5: LongBench-Chat-style LLM judge → judgments.jsonl", judge.run, judge.add_arguments,
          settings=("model", "eval"), reads=("eval",)),
    Stage("needle", "stage 5: needle-in-a-haystack grid → needle.json + heatmap", needle.run, needle.add_arguments,
          settings=("model", "eval"), reads=("train",)),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get(name: str, among: tuple[Stage, ...] | None = None) -> Stage:
    """The stage called `name` in `among` (default: STAGES); a clear error naming the known stages otherwise."""
    stages = STAGES if among is None else among
    for stage in stages:
        if stage.name == name:
            return stage
    raise LongAlignError(f"unknown stage {name!r}; known: {', '.join(s.name for s in stages)}")


__all__ = ["STAGES", "NAMES", "Stage", "StageResult", "get"]
