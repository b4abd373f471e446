"""CPU benchmark: tokenize N short chat records (default 100k) into the stage-2 dataset and print JSON timings.

Run as: .venv/bin/python bench/bench_tokenize.py [--n 100000] [--num-proc 2] [--out bench/results/tokenize.json]

The records are generated (seeded) from the bundled KJV Genesis text: 1-3 user/assistant turns with
log-normal word counts, a stand-in for ShareGPT-style short chats. What is timed is `dataset.build_dataset` from
the JSONL file to the saved Arrow dataset (reading, JSON parsing, chat template, tokenizing, labels, saving), with
the cache bypassed; then a second call that hits the cache; then, for reference, the CPU time of the bare Rust
tokenizer on the same kind of text (what no pipeline can go below). The machine load (1-minute load average) is printed
too, since other processes on the same cores slow the figure down, and so is the CPU time used (this process and
its workers): on a busy machine, cpu_s / 2 estimates the wall time the same work takes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LONGALIGN_HOME", str(ROOT / ".longalign_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def short_records(n: int, seed: int = 0, user_words: float = 40.0, answer_words: float = 160.0):
    """n synthetic short chats from Genesis text: (1-3 turns, log-normal lengths around the given medians)."""
    words = (ROOT / "data" / "kjv_genesis.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def span(median):
        k = max(3, min(2000, int(rng.lognormvariate(0.0, 0.6) * median)))
        i = rng.randrange(0, len(words) - k)
        return " ".join(words[i:i + k])

    for j in range(n):
        msgs = [{"role": "system", "content": "You are a careful assistant."}] if j % 5 == 0 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            msgs.append({"role": "user", "content": "Explain this passage: " + span(user_words)})
            msgs.append({"role": "assistant", "content": span(answer_words)})
        yield {"messages": msgs, "meta": {"task_type": "short", "id": j, "synthetic": True}}


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children = the tokenizer workers): user + system CPU seconds."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--user-words", type=float, default=40.0, help="median words per user turn")
    ap.add_argument("--answer-words", type=float, default=160.0, help="median words per assistant turn")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    a = ap.parse_args()

    from longalign_lib.config import DataConfig
    from longalign_lib.dataset import build_dataset
    from longalign_lib.io import write_json, write_jsonl
    from longalign_lib.models import load_tokenizer

    tok = load_tokenizer(a.model)
    cfg = DataConfig(max_length=a.max_length, num_proc=a.num_proc)
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        path = Path(tmp) / "short.jsonl"
        t0 = time.time()
        write_jsonl(path, short_records(a.n, user_words=a.user_words, answer_words=a.answer_words))
        gen_s = time.time() - t0
        load_before = os.getloadavg()[0]
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        ds, summary = build_dataset({"short": path}, tok, cfg, Path(tmp) / "tokenized", num_proc=a.num_proc,
                                    rebuild=True)
        build_s = time.perf_counter() - t0
        cpu1 = _cpu_seconds()
        main_cpu_s, workers_cpu_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        cpu_s = main_cpu_s + workers_cpu_s
        load_after = os.getloadavg()[0]
        t0 = time.perf_counter()
        _, again = build_dataset({"short": path}, tok, cfg, Path(tmp) / "tokenized", num_proc=a.num_proc)
        cached_s = time.perf_counter() - t0
        # Reference: the tokenizer alone (chat-templated texts of 5,000 records, one process, no offsets/labels).
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in short_records(min(a.n, 5000))]
        c0 = time.process_time()
        tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        raw_cpu_per_record = (time.process_time() - c0) / len(texts)
        result = {
            "bench": "tokenize", "records": a.n, "user_words": a.user_words, "answer_words": a.answer_words, "kept": summary["kept"], "num_proc": summary["num_proc"],
            "cpu_count": os.cpu_count(), "model": a.model, "file_mb": round(path.stat().st_size / 2**20, 1),
            "tokens": summary["tokens"], "mean_len": round(summary["tokens"] / max(1, summary["kept"]), 1),
            "target_share": round(summary["target_tokens"] / max(1, summary["tokens"]), 3),
            "seconds": round(build_s, 2), "records_per_s": round(a.n / build_s), "tokens_per_s": round(summary["tokens"] / build_s),
            "under_a_minute": build_s < 60.0, "cpu_s": round(cpu_s, 2),
            "main_cpu_s": round(main_cpu_s, 2), "workers_cpu_s": round(workers_cpu_s, 2),
            "idle_2core_estimate_s": round(cpu_s / 2, 2), "cached_reload_s": round(cached_s, 2), "cache_hit": again["cached"],
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(load_after, 2),
            "generate_records_s": round(gen_s, 2),
            "raw_tokenizer_cpu_ms_per_record": round(1000 * raw_cpu_per_record, 3),
            "pipeline_cpu_ms_per_record": round(1000 * cpu_s / a.n, 3),
        }
    print(json.dumps(result, indent=2))
    if a.out:
        write_json(a.out, result)


if __name__ == "__main__":
    main()
