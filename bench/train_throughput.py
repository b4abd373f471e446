"""Training throughput, MFU and peak memory of the stage-4 engine (LongAlignTrainer) on one GPU.

Run as: python bench/train_throughput.py --shape qwen2.5-1.5b --seq 32768 --attn varlen flex sdpa \
            --out bench/results/throughput_qwen2.5-1.5b_32k.json
Random-init models built from a config in code (no download): the speed of a step does not depend on the weights.
Each variant trains `--steps` optimizer steps through the real trainer (plans, packing collator, isolated
attention, chunked weighted loss, fp32 master weights + bf16 autocast, the engine's default fused kernels and
activation checkpointing (kernels.py; `--no-ckpt` turns checkpointing off), fused AdamW) and
reports the median of the steps after `--warmup`: tokens/s, model TFLOP/s, MFU against the measured bf16 matmul
ceiling, peak allocated memory. Writes JSON and a bar chart (PNG) next to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (architecture, hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings)
    "tiny": ("qwen2", 64, 3, 4, 2, 128, 512, True),  # smoke tests of the scripts on CPU
    "smollm2-135m": ("llama", 576, 30, 9, 3, 1536, 49152, True),
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
}
# documents of one packed row, as fractions of the row. Equal sizes: every packer builds the same rows, so the
# attention FLOPs of a step are known exactly (best-fit would regroup unequal documents differently per row).
DOC_MIXES = {"8docs": [1 / 8] * 8, "2docs": [1 / 2] * 2, "single": [1.0]}
BAR = {"transformers + flex (lead's bar, H100)": 20.8e3, "transformers default sdpa (lead's bar, H100)": 8.3e3}


def model_config(shape: str, max_pos: int):
    from transformers import LlamaConfig, Qwen2Config

    arch, h, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    extra = {"rope_theta": 1e6} if arch == "qwen2" else {}
    return cls(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=max_pos,
               use_cache=False, **extra)


def packed_rows(n_rows: int, seq: int, mix: str, vocab: int, target_frac: float, seed: int = 0):
    """Token rows whose documents fill `seq` exactly; the last `target_frac` of each document is target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        sizes = [int(seq * f) for f in DOC_MIXES[mix]]
        sizes[-1] += seq - sum(sizes)
        for n in sizes:
            ids = rng.integers(0, vocab, n).tolist()
            k = max(1, int(n * target_frac))
            rows.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k:], "length": n, "n_target": k})
    return rows


def run_variant(shape, seq, attn, steps, warmup, mix, ckpt, target_frac, work: Path, sets=(), extra_steps=0,
                callbacks=(), device: str = "cuda") -> dict:
    """Train `steps` (+ `extra_steps` untimed, e.g. a profiled one) steps of the engine; `sets`: --set overrides
    (fused kernels, checkpointing); `ckpt` False forces train.gradient_checkpointing=false."""
    import torch
    from transformers import AutoModelForCausalLM

    from longalign_lib import attention, train
    from longalign_lib.config import load_config

    impl = attention.resolve_implementation(attn, device)
    mcfg = model_config(shape, max(seq, 32768))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mcfg, attn_implementation=impl, dtype=torch.float32)
    rows = packed_rows(steps + extra_steps, seq, mix, mcfg.vocab_size, target_frac)
    cfg = load_config("gpu-small", [
        f"batching.max_pack_tokens={seq}", "batching.grad_accum=1", "batching.world_size=1",
        "batching.strategy=packed", "batching.packer=bfd", "train.save_steps=0", "train.epochs=1",
        f"train.max_steps={steps + extra_steps}", "train.tensorboard=false", "train.lr=1e-5", "train.bf16=true",
        f"train.gradient_checkpointing={'true' if ckpt else 'false'}", *sets])
    run_dir = work / f"{shape}_{seq}_{attn}_{mix}"
    t0 = time.time()
    res = train.train(cfg, run_dir, model=model, tok=None, dataset=rows, device=device, quiet=True, save_model=False,
                      callbacks=callbacks)
    log = res["log"][:steps]
    steady = log[warmup:] or log
    out = {"shape": shape, "seq": seq, "attn": attn, "impl": impl, "mix": mix, "docs_per_row": len(DOC_MIXES[mix]),
           "grad_ckpt": ckpt, "steps": len(log), "timed_steps": len(steady),
           "kernels": res["kernels"], "checkpointing": res["checkpointing"], "compile": res["compile"],
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
           "step_s": statistics.median(r["step_s"] for r in steady),
           "tflops": statistics.median(r["tflops"] for r in steady),
           "mfu": statistics.median(r["mfu"] for r in steady), "ceiling_tflops": res["ceiling_tflops"],
           "peak_mem_gib": max(r["peak_mem_gib"] for r in log), "first_step_s": log[0]["step_s"],
           "wall_s": round(time.time() - t0, 1), "n_params": sum(p.numel() for p in model.parameters())}
    del model, res
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def plot(results: list[dict], path: Path, title: str):
    from longalign_lib import plots

    fig, ax = plots.figure(figsize=(8, 4))
    names = [f"{r['attn']}\n{r['mix']}" for r in results]
    vals = [r["tokens_per_s"] / 1e3 for r in results]
    bars = ax.bar(names, vals, color=plots.PALETTE["packed"])
    for b, r in zip(bars, results, strict=False):
        ax.annotate(f"{r['tokens_per_s'] / 1e3:.1f}k\nMFU {100 * r['mfu']:.0f}%\n{r['peak_mem_gib']:.0f} GiB",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    if results and results[0]["shape"] == "qwen2.5-1.5b" and results[0]["seq"] == 32768:
        for (label, v), style in zip(BAR.items(), ("--", ":"), strict=False):
            ax.axhline(v / 1e3, color="#c44e52", ls=style, lw=1, label=label)
        ax.legend(loc="upper right", fontsize=7)
    ax.set_ylabel("training tokens / s (thousands)")
    ax.set_title(title)
    ax.set_ylim(0, max(vals + [22]) * 1.3)
    plots.save(fig, path, close=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--attn", nargs="+", default=["varlen", "flex", "sdpa"])
    ap.add_argument("--mix", nargs="+", default=["8docs"], choices=list(DOC_MIXES))
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--target-frac", type=float, default=0.1)
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default="/tmp/longalign_bench")
    a = ap.parse_args(argv)
    import torch

    out = Path(a.out or ROOT / "bench" / "results" / f"throughput_{a.shape}_{a.seq // 1024}k.json")
    results = []
    for mix in a.mix:
        for attn in a.attn:
            try:
                r = run_variant(a.shape, a.seq, attn, a.steps, a.warmup, mix, not a.no_ckpt, a.target_frac,
                                Path(a.work))
            except Exception as e:  # keep the other variants (an OOM in one should not lose the table)
                r = {"shape": a.shape, "seq": a.seq, "attn": attn, "mix": mix, "error": f"{type(e).__name__}: {e}"[:300]}
                gc.collect()
                torch.cuda.empty_cache()
            results.append(r)
            print(json.dumps(r), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "argv": sys.argv[1:]}
    from longalign_lib.io import write_json

    write_json(out, {"meta": meta, "results": results})
    ok = [r for r in results if "error" not in r]
    if ok:
        plot(ok, out.with_suffix(".png"), f"{a.shape} shape, packed {a.seq // 1024}k rows, {meta['device']}")
    print(f"{'attn':8} {'mix':7} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['attn']:8} {r['mix']:7} ERROR {r['error'][:80]}")
        else:
            print(f"{r['attn']:8} {r['mix']:7} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% "
                  f"{r['peak_mem_gib']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
