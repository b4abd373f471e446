"""Memory plan on paper: GPU memory per rank for full fine-tuning under DDP, FSDP2, ZeRO-3 and ZeRO-3 + offload.

Run as: python bench/memory_plan.py --shape qwen2.5-7b --gpus 8 --seq 65536 131072 [--out plan.json]
The terms (GiB per GPU), for P parameters, N GPUs, T tokens per row, the cookbook's policy (fp32 master weights and
Adam states, bf16 compute, gradient checkpointing on every decoder layer, chunked loss):
  states      16·P bytes (fp32 weights 4 + fp32 grads 4 + Adam m, v 8), divided by N when sharded (FSDP2, ZeRO-3);
              0 on the GPU with ZeRO-3 + CPU offload (host RAM holds them)
  layers      bf16 copies of the decoder layers being computed: 2 gathered (current + prefetched) + 1 bf16 gradient
              + its fp32 reduce-scatter buffer (2 bf16 units); a full replica's layers are in `states` under DDP
  root        FSDP2 root unit (embeddings, final norm, LM head), gathered from forward until the end of backward:
              bf16 params + bf16 grads + fp32 reduce buffer (8 bytes per parameter); ZeRO-3 gathers per module: 4
  checkpoints the input of every decoder layer kept for the backward: layers · T · H · b; b = 2 (bf16) where the
              engine computes with bf16 parameters (FSDP2, ZeRO-3), 4 under DDP (fp32 weights + autocast: the
              residual stream stays fp32)
  recompute   one layer's activations rebuilt in backward and their gradients: ≈ T · (4·I + 6·H) · 2 bytes
  loss        one chunk of fp32 logits and their gradient: 2 · chunk · V · 4 bytes
  buckets     DDP on several GPUs: the fp32 gradient buckets of the all-reduce, 4·P bytes
Fragmentation and the CUDA context are not counted (leave ≈ 5 GiB). Compare with `peak_mem_gib` measured by
bench/train_parallel.py (torch.cuda.max_memory_allocated of the fullest GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
GIB = 2 ** 30


def shape_numbers(shape: str) -> dict:
    from train_throughput import SHAPES

    _, h, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    hd = h // heads
    per_layer = h * (heads * hd) + 2 * h * (kv * hd) + (heads * hd) * h + 3 * h * inter + 2 * h
    embed = vocab * h
    root = embed * (1 if tied else 2) + h
    return {"H": h, "layers": layers, "I": inter, "V": vocab, "per_layer": per_layer, "root": root,
            "P": per_layer * layers + root}


def plan(shape: str, gpus: int, seq: int, engine: str, loss_chunk: int = 4096) -> dict:
    s = shape_numbers(shape)
    P, n = s["P"], gpus
    states = {"ddp": 16 * P, "fsdp2": 16 * P / n, "zero3": 16 * P / n, "zero3_offload": 0.0}[engine]
    layers = 0.0 if engine == "ddp" else s["per_layer"] * (2 * 2 + 2 + 4)
    root = {"ddp": 0.0, "fsdp2": 8 * s["root"], "zero3": 4 * s["root"], "zero3_offload": 4 * s["root"]}[engine]
    ckpt = s["layers"] * seq * s["H"] * (4 if engine == "ddp" else 2)
    recompute = seq * (4 * s["I"] + 6 * s["H"]) * 2
    loss = 2 * min(loss_chunk, seq) * s["V"] * 4
    buckets = 4 * P if engine == "ddp" and gpus > 1 else 0.0
    parts = {"states": states, "layers": layers, "root": root, "checkpoints": ckpt, "recompute": recompute,
             "loss": loss, "buckets": buckets}
    out = {k: round(v / GIB, 1) for k, v in parts.items()}
    out.update({"shape": shape, "params_b": round(P / 1e9, 2), "gpus": gpus, "seq": seq, "engine": engine,
                "total_gib": round(sum(parts.values()) / GIB, 1),
                "host_ram_gib": round(16 * P / GIB, 1) if engine == "zero3_offload" else 0.0})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8])
    ap.add_argument("--seq", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero3", "zero3_offload"])
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = [plan(a.shape, g, t, e, a.loss_chunk) for g in a.gpus for t in a.seq for e in a.engines]
    cols = ["engine", "gpus", "seq", "states", "layers", "root", "checkpoints", "recompute", "loss", "buckets",
            "total_gib"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
