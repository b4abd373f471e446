"""`longalign corpus`: collect long documents (local texts, optional HF datasets) into corpus.jsonl + a genre figure.

Run as: longalign corpus --preset cpu-demo [--set corpus.n_docs=20] [--run-dir DIR]
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .. import plots
from ..corpus import build_corpus, corpus_figure, make_counter
from ..io import LongAlignError, write_jsonl
from ..models import load_tokenizer
from .base import StageResult


def run(cfg, run_dir: Path, args) -> StageResult:
    tok_name = cfg.corpus.tokenizer or cfg.model.name
    try:
        tok = load_tokenizer(tok_name)
    except LongAlignError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LongAlignError(f"corpus.tokenizer={tok_name!r}: could not load ({e}); set corpus.tokenizer") from None
    docs, notes = build_corpus(cfg.corpus, make_counter(tok))
    out = write_jsonl(run_dir / "corpus.jsonl", [d.to_dict() for d in docs])
    fig = plots.save(corpus_figure(docs), run_dir / "figures" / "corpus_genres.png", close=True)
    lengths = sorted(d.n_tokens for d in docs)
    genres = Counter(d.genre for d in docs)
    metrics = {"n_docs": len(docs), "n_genres": len(genres), "tokens_min": lengths[0], "tokens_max": lengths[-1],
               "tokens_mean": round(sum(lengths) / len(lengths), 1), "tokens_total": sum(lengths),
               "sources_skipped": sum(1 for v in notes.values() if v.startswith("skipped")),
               **{f"genre_{g}": c for g, c in sorted(genres.items())}}
    rows = "\n".join(f"| {n} | {v} |" for n, v in notes.items())
    report = (f"{len(docs)} documents, {sum(lengths):,} tokens ({tok_name} tokenizer), "
              f"{lengths[0]}–{lengths[-1]} tokens each, genres: "
              + ", ".join(f"{g} {c}" for g, c in sorted(genres.items()))
              + f".\n\n| source | status |\n|---|---|\n{rows}\n\n![genres]({fig.relative_to(run_dir)})")
    return StageResult(metrics, [out.name, str(fig.relative_to(run_dir))], report)

