"""The bar to beat, measured in the same harness: plain transformers training on packed rows (no LongAlign code).

Run as: python bench/hf_baseline.py --shape qwen2.5-1.5b --seq 32768 --attn flex_attention sdpa \
            --out bench/results/hf_baseline_qwen2.5-1.5b_32k.json
(bench/train_compare.py runs it, with and without Liger, side by side with the engine.)
Same model shapes, rows, precision policy (fp32 master weights + bf16 autocast), gradient checkpointing and fused
AdamW as bench/train_throughput.py, but the model's own forward and loss: `model(input_ids, labels=...,
position_ids=...)` with one of transformers' attention implementations (it detects the packed documents from
position_ids when use_cache=False) and full-vocabulary logits. Reports tokens/s and peak memory.
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
sys.path.insert(0, str(ROOT / "bench"))


def apply_liger(model) -> list[str]:
    """What a transformers user does to add Liger: its public apply function for the architecture, with its fused
    linear cross-entropy (the model's forward then never builds [T, V] logits)."""
    import inspect

    import liger_kernel.transformers as lt

    fn = getattr(lt, f"apply_liger_kernel_to_{model.config.model_type}")
    want = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": True}
    kw = {k: v for k, v in want.items() if k in inspect.signature(fn).parameters}
    fn(model=model, **kw)
    return [k for k, v in kw.items() if v]


def run(shape: str, seq: int, attn: str, steps: int, warmup: int, mix: str, liger: bool = False,
        extra_steps: int = 0, on_extra_step=None, device: str = "cuda") -> dict:
    """`steps` timed-or-warm-up steps, then `extra_steps` untimed ones wrapped in `on_extra_step()` (a context
    manager factory, e.g. a profiler)."""
    import contextlib

    import torch
    from train_throughput import DOC_MIXES, model_config, packed_rows
    from transformers import AutoModelForCausalLM

    from longalign_lib import throughput

    cfg = model_config(shape, max(seq, 32768))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    ops = apply_liger(model) if liger else []
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    flops_fn = throughput.flops_counter(model, True, True)
    ceiling = throughput.matmul_ceiling_tflops(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=cuda)
    n_docs = len(DOC_MIXES[mix])
    docs = packed_rows(steps + extra_steps, seq, mix, cfg.vocab_size, 0.1)
    times, flops = [], []
    peak_now = (lambda: torch.cuda.max_memory_allocated() / 2 ** 30) if cuda else (lambda: 0.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for s in range(steps + extra_steps):
        if s == steps:
            peak = peak_now()
        ctx = on_extra_step() if s >= steps and on_extra_step else contextlib.nullcontext()
        ctx.__enter__()
        row = docs[s * n_docs:(s + 1) * n_docs]
        ids = torch.tensor([sum((d["input_ids"] for d in row), [])], device=device)
        labels = []
        for d in row:
            labels += [-100] + d["labels"][1:]
        labels = torch.tensor([labels], device=device)
        pos = torch.cat([torch.arange(d["length"]) for d in row])[None].to(device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        ctx.__exit__(None, None, None)
        times.append(time.perf_counter() - t0)
        flops.append(flops_fn([d["length"] for d in row], sum(d["n_target"] for d in row)))
    if steps + extra_steps == steps:
        peak = peak_now()
    step_s = statistics.median(times[warmup:steps] or times[:steps])
    tflops = statistics.median(flops[warmup:steps] or flops[:steps]) / step_s / 1e12
    out = {"shape": shape, "seq": seq, "attn": attn, "mix": mix, "liger": ops, "tokens_per_s": seq / step_s,
           "step_s": step_s, "tflops": tflops, "mfu": tflops / ceiling, "ceiling_tflops": ceiling,
           "first_step_s": times[0], "peak_mem_gib": peak, "loss_last": float(loss),
           "timed_steps": len(times[warmup:steps])}
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--attn", nargs="+", default=["flex_attention", "sdpa"])
    ap.add_argument("--mix", default="8docs")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch
    import transformers

    results = []
    for attn in a.attn:
        try:
            r = run(a.shape, a.seq, attn, a.steps, a.warmup, a.mix)
        except Exception as e:
            r = {"attn": attn, "error": f"{type(e).__name__}: {e}"[:300]}
            gc.collect()
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
    out = Path(a.out or ROOT / "bench" / "results" / f"hf_baseline_{a.shape}_{a.seq // 1024}k.json")
    from longalign_lib.io import write_json

    write_json(out, {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "argv": sys.argv[1:]}, "results": results})
    for r in results:
        print(r.get("attn"), f"{r['tokens_per_s']:.0f} tok/s, {r['peak_mem_gib']:.1f} GiB" if "error" not in r else r["error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
