"""Stage-4 throughput on several GPUs: one worker per GPU under `accelerate launch` (DDP or FSDP2) or alone (1 GPU).

Run as: python bench/train_parallel.py --shape qwen2.5-1.5b --seq 32768 --out single.json            # 1 GPU
        accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
            bench/train_parallel.py --shape qwen2.5-1.5b --seq 32768 --out ddp.json                     # 2 GPUs
        accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
            bench/train_parallel.py --shape qwen2.5-7b --seq 65536 --steps 4 --out fsdp2_7b.json
Random-init model of the shape (bench/train_throughput.py SHAPES), built on each GPU with the same seed, trained
through the real trainer (plans with world_size = the number of processes, one packed row per GPU per step,
fp32 master weights + bf16 compute, gradient checkpointing, chunked loss). Writes, on rank 0, the median over the
steps after --warmup: tokens/s (all GPUs and per GPU), MFU, the peak memory of the fullest GPU, idle per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--mix", default="8docs")
    ap.add_argument("--attn", default="varlen")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--target-frac", type=float, default=0.1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/longalign_parallel")
    a = ap.parse_args(argv)
    import torch
    from train_throughput import model_config, packed_rows
    from transformers import AutoModelForCausalLM

    from longalign_lib import attention, train
    from longalign_lib.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    impl = attention.resolve_implementation(a.attn, "cuda")
    mcfg = model_config(a.shape, max(a.seq, 32768))
    torch.manual_seed(0)  # the same weights on every GPU
    t0 = time.time()
    with torch.device(f"cuda:{local}"):
        model = AutoModelForCausalLM.from_config(mcfg, attn_implementation=impl, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = packed_rows(a.steps * world, a.seq, a.mix, mcfg.vocab_size, a.target_frac)
    cfg = load_config("gpu-small", [
        f"batching.max_pack_tokens={a.seq}", "batching.grad_accum=1", f"batching.world_size={world}",
        "batching.strategy=packed", "batching.packer=bfd", "train.save_steps=0", "train.epochs=1",
        f"train.max_steps={a.steps}", "train.tensorboard=false", "train.lr=1e-5", "train.bf16=true"])
    run_dir = Path(a.work) / f"{a.shape}_{a.seq}_{world}_{os.environ.get('ACCELERATE_USE_FSDP', 'x')}"
    n_params = sum(p.numel() for p in model.parameters())
    res = train.train(cfg, run_dir, model=model, tok=None, dataset=rows, device="cuda", quiet=True, save_model=False)
    log = res["log"]
    if res["trainer"].is_world_process_zero():
        steady = log[a.warmup:] or log
        tps = statistics.median(r["tokens_per_s"] for r in steady)
        out = {"shape": a.shape, "seq": a.seq, "mix": a.mix, "attn": impl, "engine": res["engine"], "world": world,
               "steps": len(log), "timed_steps": len(steady), "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
               "step_s": statistics.median(r["step_s"] for r in steady),
               "mfu": statistics.median(r["mfu"] for r in steady),
               "tflops_per_gpu": statistics.median(r["tflops"] for r in steady) / world,
               "peak_mem_gib_per_gpu": max(r["peak_mem_gib"] for r in log),
               "idle_frac": statistics.median(r.get("idle_frac", 0.0) for r in steady),
               "ceiling_tflops": res["ceiling_tflops"], "n_params": n_params, "wall_s": round(time.time() - t0, 1),
               "loss": [round(r["loss"], 5) for r in log], "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "transformers": __import__("transformers").__version__}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(json.dumps(out), flush=True)
    train.finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
