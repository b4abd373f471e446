"""Host-side overhead of one decode step: `generate.decode_batch` vs transformers' `model.generate`, on CPU.

Run as: OMP_NUM_THREADS=1 python bench/decode_overhead.py [--batch 8] [--prompt 512] [--new 32] [--profile]

A tiny random model (toy_data.tiny_model_dir: 2 layers, hidden 64, SmolLM2's 49k vocabulary) makes the compute
negligible, so the milliseconds per new token are what Python, transformers' mask building and tensor copies
cost per step — the part a small model on a GPU pays too (where it shows up as launch-bound decode steps).
Prints ms per decode step for: decode_batch on `batch` rows; model.generate on the same left-padded batch;
model.generate on one prompt (what the one-at-a-time local backend runs). `--profile` adds a cProfile of
decode_batch's steps (top functions by cumulative time).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time


def ops_per_step(fn, short: int = 2, long: int = 12) -> dict:
    """Torch ops one decode step adds (a long run minus a short one): all aten ops, and the host syncs among them
    (`aten::_local_scalar_dense`: .item(), bool(tensor), .tolist() read a value back from the device)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    def count(n):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fn(n)
        return collections.Counter(e.name for e in p.events())

    a, b = count(short), count(long)
    d = {k: (b[k] - a[k]) / (long - short) for k in b}
    return {"aten": round(sum(v for k, v in d.items() if k.startswith("aten::")), 1),
            "syncs": round(d.get("aten::_local_scalar_dense", 0.0), 1), "cat": round(d.get("aten::cat", 0.0), 1),
            "host_to_device": round(d.get("aten::lift_fresh", 0.0), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rep", type=float, default=1.1)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also count torch ops per step (≈ kernel launches on a GPU)")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longalign_lib import toy_data
    from longalign_lib.generate import decode_batch

    torch.manual_seed(0)
    d = toy_data.tiny_model_dir(tempfile.mkdtemp())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), attn_implementation=a.attn).eval()
    model.generation_config.eos_token_id = None  # never stop early: every row decodes `new` tokens
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (a.prompt - 8 * k,), generator=g).tolist() for k in range(a.batch)]

    def per_step(fn):
        fn(1)  # warm-up
        t0 = time.perf_counter()
        fn(1)
        t1 = time.perf_counter()
        fn(a.new)
        t2 = time.perf_counter()
        return 1000 * ((t2 - t1) - (t1 - t0)) / (a.new - 1)  # prefill cancels out

    def ours(n):
        decode_batch(model, prompts, n, [], 0, repetition_penalty=a.rep)

    w = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (w - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])

    def hf_batch(n):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           repetition_penalty=a.rep, pad_token_id=0)

    one = torch.tensor([prompts[0]])

    def hf_one(n):
        with torch.no_grad():
            model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, repetition_penalty=a.rep, pad_token_id=0,
                           return_dict_in_generate=True)

    res = {"batch": a.batch, "prompt": a.prompt, "new": a.new, "attn": a.attn,
           "decode_batch_ms_per_step": round(per_step(ours), 2),
           "hf_generate_batch_ms_per_step": round(per_step(hf_batch), 2),
           "hf_generate_one_ms_per_step": round(per_step(hf_one), 2)}
    if a.ops:
        res.update({f"{k}_ops_per_step": v for k, v in
                    (("decode_batch", ops_per_step(ours)), ("hf_generate_batch", ops_per_step(hf_batch)),
                     ("hf_generate_one", ops_per_step(hf_one)))})
    print(json.dumps(res))
    if a.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        ours(a.new)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
