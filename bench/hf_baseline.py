"""The bar to beat, measured in the same harness: plain transformers training on packed rows (no LongAlign code).

Run as: python bench/hf_baseline.py --shape qwen2.5-1.5b --seq 32768 --attn flex_attention sdpa \
            --out bench/results/hf_baseline_qwen2.5-1.5b_32k.json
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


def run(shape: str, seq: int, attn: str, steps: int, warmup: int, mix: str) -> dict:
    import torch
    from train_throughput import DOC_MIXES, model_config, packed_rows
    from transformers import AutoModelForCausalLM

    cfg = model_config(shape, max(seq, 32768))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    n_docs = len(DOC_MIXES[mix])
    docs = packed_rows(steps, seq, mix, cfg.vocab_size, 0.1)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for s in range(steps):
        row = docs[s * n_docs:(s + 1) * n_docs]
        ids = torch.tensor([sum((d["input_ids"] for d in row), [])], device="cuda")
        labels = []
        for d in row:
            labels += [-100] + d["labels"][1:]
        labels = torch.tensor([labels], device="cuda")
        pos = torch.cat([torch.arange(d["length"]) for d in row])[None].cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:] or times)
    out = {"shape": shape, "seq": seq, "attn": attn, "mix": mix, "tokens_per_s": seq / step_s, "step_s": step_s,
           "first_step_s": times[0], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "loss_last": float(loss)}
    del model, opt
    gc.collect()
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
