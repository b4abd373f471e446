"""Where each stage finds its inputs: one resolver per input, used by every stage driver and notebook.

Usage:
    from longalign_lib import inputs
    inputs.sample_path()                          # data/sample_longalign.jsonl (LongAlign-10k format, bundled)
    inputs.records_file(cfg)                      # `data_file`, else the sample (check, notebooks)
    inputs.stage1_records(cfg, run_dir)           # tokenize: long.jsonl/short.jsonl/data.* files, else the sample
    inputs.tokenized_dir(cfg, run_dir)            # data.tokenized_dir, else <run_dir>/tokenized
    ds, note = inputs.training_set(cfg, run_dir)  # analyze, pack, train: the stage-2 dataset (built if missing)
    docs, note = inputs.corpus_docs(cfg, run_dir) # synth: synth.corpus_file, <run_dir>/corpus.jsonl, else built
    cases, note = inputs.load_or_build_bench(cfg, run_dir)   # eval, judge: eval.bench_file or the offline set
    mc, label = inputs.eval_model_config(cfg, run_dir)       # eval, needle: eval.model, <run_dir>/model, model.name
    model, tok, label = inputs.load_eval_model(cfg, run_dir) # ... loaded for generation
    items, note = inputs.predictions(cfg, run_dir)           # judge: predictions.jsonl, else a meta-evaluation

Stages 3 and 4 read the same dataset through `training_set`, so `pack` plans exactly what `train` trains.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .benchmarks import load_benchmark, make_offline_set, save_benchmark
from .corpus import Document, build_corpus, load_corpus, make_counter
from .dataset import build_dataset, is_tokenized, load_tokenized, split_sample
from .io import LongAlignError, data_dir, read_jsonl, write_jsonl
from .judge import meta_eval_items, read_human_scores
from .models import load_model_and_tokenizer, load_tokenizer
from .provenance import model_fingerprint

SAMPLE_NAME = "sample_longalign.jsonl"


def sample_path() -> Path:
    """The bundled LongAlign-10k-format sample (data/sample_longalign.jsonl): 3 long + 2 short records."""
    return data_dir() / SAMPLE_NAME


def records_file(cfg) -> Path:
    """The records file the setup check formats: `data_file` if set, else the bundled sample."""
    if cfg.data_file:
        path = Path(cfg.data_file)
        if not path.exists():
            raise LongAlignError(f"data_file={cfg.data_file}: file not found")
        return path
    return sample_path()


def stage1_records(cfg, run_dir: Path) -> tuple[list, str]:
    """[(source, path | records)] that `tokenize` mixes, and a sentence saying where they came from:
    data.long_file / data.short_file (default <run_dir>/long.jsonl, short.jsonl) plus data.extra_files, plus the
    bundled sample's records as `sample_long` / `sample_short` when data.mix_sample is on; with none of them, the
    bundled sample split into its long and short records."""
    d = cfg.data
    found: list = []
    for source, given in (("long", d.long_file), ("short", d.short_file)):
        path = Path(given) if given else Path(run_dir) / f"{source}.jsonl"
        if given and not path.exists():
            raise LongAlignError(f"data.{source}_file={given}: file not found")
        if path.exists():
            found.append((source, path))
    for f in d.extra_files:
        if not Path(f).exists():
            raise LongAlignError(f"data.extra_files: {f}: file not found")
        found.append((Path(f).stem, Path(f)))
    if found and d.mix_sample:
        sample = split_sample(read_jsonl(sample_path()))
        found += [(f"sample_{k}", recs) for k, recs in sample.items()]
        return found, ("Inputs: " + ", ".join(f"`{p}` ({s})" for s, p in found if not isinstance(p, list))
                       + f", and the bundled sample `data/{SAMPLE_NAME}` (data.mix_sample: {len(sample['long'])} "
                       f"long + {len(sample['short'])} short records).")
    if found:
        missing = [f"{s}.jsonl" for s in ("long", "short") if s not in dict(found)]
        note = f" (no {' or '.join(missing)} in `{run_dir}`)" if missing else ""
        return found, "Inputs: " + ", ".join(f"`{p}` ({s})" for s, p in found) + note + "."
    sample = split_sample(read_jsonl(sample_path()))
    return list(sample.items()), (
        f"No stage-1 output in `{run_dir}` (long.jsonl / short.jsonl) and no data.extra_files: fell back to the "
        f"bundled sample `data/{SAMPLE_NAME}` ({len(sample['long'])} long + {len(sample['short'])} short records).")


def tokenized_dir(cfg, run_dir: Path) -> Path:
    """Where the stage-2 dataset lives: data.tokenized_dir, else <run_dir>/tokenized."""
    return Path(cfg.data.tokenized_dir) if cfg.data.tokenized_dir else Path(run_dir) / "tokenized"


def training_set(cfg, run_dir: Path, path: str | Path | None = None, tokenizer=None):
    """(dataset, note): the stage-2 tokenized dataset that analyze, pack and train all read.

    A dataset named explicitly (`path`, or data.tokenized_dir when it holds one) is loaded as it is. Otherwise
    the stage-1 records (stage1_records) are tokenized with the current data settings into tokenized_dir,
    exactly as `longalign tokenize` does: a dataset already there from the same inputs, tokenizer and settings
    is reused (dataset.build_dataset's cache), so a changed setting never trains on a stale set.
    """
    for given in (path, cfg.data.tokenized_dir):
        if given and is_tokenized(given):
            ds = load_tokenized(given)
            return ds, f"stage-2 tokenized dataset `{given}` ({len(ds)} sequences)"
    if path:
        raise LongAlignError(f"{path}: no tokenized dataset here; run `longalign tokenize` or fix the path")
    out = tokenized_dir(cfg, run_dir)
    found, where = stage1_records(cfg, run_dir)
    tok = tokenizer or load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    ds, summary = build_dataset(found, tok, cfg.data, out, num_proc=cfg.data.num_proc)
    if summary["cached"]:
        return ds, f"stage-2 tokenized dataset `{out}` ({len(ds)} sequences, up to date with its inputs). {where}"
    return ds, f"no up-to-date tokenized dataset at `{out}`: tokenized it first ({len(ds)} sequences). {where}"


def corpus_docs(cfg, run_dir: Path) -> tuple[list[Document], str]:
    """The documents `synth` writes tasks for: synth.corpus_file, else <run_dir>/corpus.jsonl, else a corpus built
    now from the corpus settings (and saved as <run_dir>/corpus.jsonl)."""
    path = Path(cfg.synth.corpus_file) if cfg.synth.corpus_file else Path(run_dir) / "corpus.jsonl"
    if path.exists():
        return load_corpus(path), str(path)
    if cfg.synth.corpus_file:
        raise LongAlignError(f"synth.corpus_file={path}: file not found")
    docs, _ = build_corpus(cfg.corpus, make_counter(load_tokenizer(cfg.corpus.tokenizer or cfg.model.name)))
    write_jsonl(Path(run_dir) / "corpus.jsonl", [d.to_dict() for d in docs])
    return docs, f"{Path(run_dir) / 'corpus.jsonl'} (built now: no corpus stage output was found)"


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


def predictions(cfg, run_dir: Path, path: str | Path | None = None, human_scores: str | Path | None = None):
    """(items, source): the answers `judge` rates, and a sentence saying where they came from.

    `path` (else <run_dir>/predictions.jsonl, written by `longalign eval`): one item per line with idx, query,
    answer and prediction (a missing field is an error naming file:line; a cut-off last line is skipped). With no
    `path` and no predictions.jsonl, the benchmark's rated example answers (judge.meta_eval_items): a
    meta-evaluation. `human_scores`: a JSONL of {idx, score} whose scores are attached as `human_score`.
    """
    pred_path = Path(path or Path(run_dir) / "predictions.jsonl")
    if pred_path.exists():
        items, source = read_jsonl(pred_path, allow_partial_last_line=True), str(pred_path)
        for k, it in enumerate(items, 1):
            missing = [f for f in ("idx", "query", "answer", "prediction") if f not in it]
            if missing:
                raise LongAlignError(f"{pred_path}:{k}: missing field(s) {missing}; predictions come from `longalign eval`")
            it["idx"] = str(it["idx"])
    elif path:
        raise LongAlignError(f"{pred_path}: file not found")
    else:
        cases, bench = load_or_build_bench(cfg, run_dir)
        items = meta_eval_items(cases)
        source = f"the rated example answers of {bench} (meta-evaluation: no predictions.jsonl in {run_dir})"
    if human_scores:
        human = read_human_scores(human_scores)
        for it in items:
            if it["idx"] in human:
                it["human_score"] = human[it["idx"]]
    return items, source


# ----------------------------------------------------- the model stage 5 evaluates (eval, needle)
def eval_model_config(cfg, run_dir: Path):
    """Which model stage 5 evaluates, as a ModelConfig, and its label.

    eval.model if set, else the model `train` saved in <run_dir>/model, else model.name. A saved model already
    carries its RoPE scaling in its config, so it is not applied twice.
    """
    trained = Path(run_dir) / "model"
    name = cfg.eval.model or (str(trained) if (trained / "config.json").exists() else cfg.model.name)
    if name == cfg.model.name:
        return cfg.model, name
    mc = dataclasses.replace(cfg.model, name=name, lora=False)
    if Path(name).expanduser().is_dir():
        mc = dataclasses.replace(mc, rope_base_factor=1.0, max_position_embeddings=None)
    return mc, name


def eval_model_identity(cfg, run_dir: Path) -> dict:
    """What the evaluated model is, for reuse keys (eval, needle): its weights fingerprint
    (provenance.model_fingerprint: a model retrained into the same folder gets a new one) and how it is loaded."""
    mc, name = eval_model_config(cfg, run_dir)
    return {"weights": model_fingerprint(name), "dtype": mc.dtype, "rope_base_factor": mc.rope_base_factor,
            "max_position_embeddings": mc.max_position_embeddings}


def load_eval_model(cfg, run_dir: Path):
    """(model, tokenizer, label) for generation. The packed-training attention backends of attention.py isolate
    documents inside one row; generation needs left padding and a KV cache instead, so the model is switched to
    transformers' own SDPA (unless model.attn_implementation names eager or flash explicitly)."""
    mc, name = eval_model_config(cfg, run_dir)
    model, tok = load_model_and_tokenizer(cfg=mc)
    if mc.attn_implementation not in ("eager", "flash", "flash_attention_2"):
        model.set_attn_implementation("sdpa")
    return model, tok, name
