"""Training throughput: model FLOPs of a micro-batch and the measured matmul ceiling that MFU is taken against.

Usage:
    from longalign_lib.throughput import flops_counter, matmul_ceiling_tflops
    flops = flops_counter(model, trainable_head=True, full_ft=True)     # flops(doc_lengths, n_target) -> FLOPs
    mfu = flops([512, 300], n_target=700) / step_seconds / 1e12 / matmul_ceiling_tflops("cuda")
train.build_trainer logs tokens/s and MFU with these every step; bench/hf_baseline.py and bench/sp_throughput.py
use them for their baselines. Set `train.matmul_tflops` to skip the ceiling's measurement.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from .io import write_json
from .models import longalign_home


def flops_counter(lm, trainable_head: bool, full_ft: bool):
    """Model FLOPs of one micro-batch (forward + backward, no recomputation), from the model's own shapes.

    linear layers: 6·N·tokens (4·N when the weights are frozen, LoRA); attention: 6·L²·d per document and layer
    (causal half of QKᵀ and PV, backward twice the forward); LM head: 6 (or 4)·V·H per target token only.
    """
    cfg = lm.config
    get_text = getattr(cfg, "get_text_config", None)
    cfg = get_text() if callable(get_text) else cfg
    decoder = lm.get_decoder()
    n_lin = sum(p.numel() for n, p in decoder.named_parameters() if p.dim() == 2 and "embed" not in n and "lora_" not in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    layers = cfg.num_hidden_layers
    w_head = lm.get_output_embeddings().weight
    v_h = w_head.shape[0] * w_head.shape[1]
    lin = 6 if full_ft else 4
    head = 6 if trainable_head else 4

    def flops(docs: list[int], n_target: int) -> float:
        toks = sum(docs)
        return float(lin * n_lin * toks + 6 * layers * d_attn * sum(n * n for n in docs) + head * v_h * n_target)

    return flops


def matmul_ceiling_tflops(device: str, cache_dir: Path | None = None) -> float:
    """Measured dense matmul rate (bf16 8192³ on CUDA, fp32 1024³ on CPU), cached per device name."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.processor() or platform.machine()}-{torch.get_num_threads()}t"
    if cache_dir is None:
        cache_dir = longalign_home()
    cache = Path(cache_dir) / "matmul_ceiling.json"
    table = {}
    if cache.exists():
        try:
            table = json.loads(cache.read_text())
        except json.JSONDecodeError:
            table = {}
    if name in table:
        return float(table[name])
    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1000
        del a, b
    else:
        n, reps = 1024, 5
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        secs = time.perf_counter() - t0
    tflops = 2 * n ** 3 * reps / secs / 1e12
    table[name] = round(tflops, 2)
    try:
        write_json(cache, table)
    except OSError:
        pass
    return tflops
