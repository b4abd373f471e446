"""Where a stage finds its inputs: the bundled sample, the benchmark cases of stage 5 (one resolver per input).

Usage:
    from longalign_lib.inputs import sample_path, load_or_build_bench
    path = sample_path()                                   # data/sample_longalign.jsonl (LongAlign-10k format)
    cases, where = load_or_build_bench(cfg, run_dir)       # eval.bench_file, <run_dir>/bench.jsonl, or built offline
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from .benchmarks import load_benchmark, make_offline_set, save_benchmark
from .models import load_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample_longalign.jsonl"


def sample_path() -> Path:
    """The bundled LongAlign-10k-format sample (data/sample_longalign.jsonl)."""
    if SAMPLE.exists():
        return SAMPLE
    return Path(str(importlib.resources.files("longalign_lib"))) / "data" / "sample_longalign.jsonl"


def load_or_build_bench(cfg, run_dir: Path, bench: str | None = None, tokenizer=None):
    """The benchmark cases and where they came from: a file, or the offline set (saved as <run_dir>/bench.jsonl)."""
    ec = cfg.eval
    path = bench or ec.bench_file
    if path:
        return load_benchmark(path, ec.bench_limit), str(path)
    saved = Path(run_dir) / "bench.jsonl"
    if saved.exists():
        return load_benchmark(saved, ec.bench_limit), f"{saved} (offline set, built earlier)"
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.name)
    cases = make_offline_set(tokenizer, ec.bench_context_tokens, ec.bench_n_per_task, ec.seed, ec.needle_haystack_dir)
    save_benchmark(saved, cases)
    cases = cases[: ec.bench_limit] if ec.bench_limit else cases
    return cases, f"{saved} (offline set built from local text: no eval.bench_file given)"
