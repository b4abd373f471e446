"""Sequence parallelism (Ulysses) on N GPUs composed with FSDP2: longest rows, tokens/s, MFU, peak memory.

Run as (one process per GPU):
    torchrun --nproc_per_node=2 bench/sp_throughput.py --shape qwen2.5-7b --seq 262144 --sp 2 --out R.jsonl
    torchrun --nproc_per_node=2 bench/sp_throughput.py --check --out R.jsonl     # bf16 correctness, 2 GPUs
    python bench/sp_throughput.py --shape qwen2.5-1.5b --seq 65536 --sp 1 --out R.jsonl   # one-GPU baseline
    torchrun --nproc_per_node=2 bench/sp_throughput.py --device cpu --shape tiny --seq 512 --sp 2  # CPU dry run
The script drives the library's pieces directly (no Trainer): a random-init model of the shape (bench/
train_throughput.py's SHAPES), `sequence_parallel.attach` + `shard_batch` + `train.ChunkedLossLM`, FSDP2
(`torch.distributed.fsdp.fully_shard` on every decoder layer and the root; bf16 compute, fp32 master weights,
gradients reduced in fp32), non-reentrant gradient checkpointing, AdamW, clipping at 1.0. Each packed row holds
documents of `--doc-tokens` (the last one shorter), 10 % of each is target. One short warm-up step (kernels,
communicators), then `--steps` timed steps of the full row; rank 0 appends one JSON line to --out: tokens/s,
model TFLOP/s (throughput.flops_counter: 6·N·T + causal attention per document + LM head on targets), MFU against the
bf16 matmul rate measured on this GPU × GPUs, and the peak allocated / reserved memory of every GPU.
`--check`: a 2-layer model of the 1.5B shape in bf16 autocast, one 8k row of 4 documents (one straddles the
split): SP=2 vs the same row on one GPU — logits, loss and gradient relative errors, and document leakage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput  # noqa: E402
from train_throughput import SHAPES, model_config  # noqa: E402

SHAPES.setdefault("tiny", ("qwen2", 64, 2, 4, 2, 128, 1000, True))  # CPU dry runs (train_throughput.SHAPES)
assert train_throughput.SHAPES is SHAPES


def _dist(device: str):
    import torch
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def packed_row(seq: int, doc_tokens: int, vocab: int, target_frac: float = 0.1, seed: int = 0):
    """One collated packed row of `seq` tokens: documents of `doc_tokens` (the last one shorter)."""
    import numpy as np

    from longalign_lib.batching import collate_packed

    rng = np.random.default_rng(seed)
    sizes = [doc_tokens] * (seq // doc_tokens) + ([seq % doc_tokens] if seq % doc_tokens else [])
    exs, w = [], []
    for i, n in enumerate(sizes):
        ids = rng.integers(0, vocab, n).tolist()
        k = max(1, int(n * target_frac))
        exs.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k:], "idx": i})
        w.append(1.0 / (len(sizes) * k))
    return collate_packed(exs, w), sizes


def build(shape: str, seq: int, device: str, attn: str, layers: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from longalign_lib import attention

    cfg = model_config(shape, max(seq, 32768))
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention.resolve_implementation(attn, device),
                                                 dtype=torch.float32)
    return model


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run_throughput(a, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from longalign_lib import sequence_parallel as sp
    from longalign_lib.throughput import flops_counter, matmul_ceiling_tflops
    from longalign_lib.train import ChunkedLossLM

    dev = a.device
    if world % a.sp:
        raise SystemExit(f"--sp {a.sp} must divide the {world} processes")
    model = build(a.shape, a.seq, dev, a.attn)
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_counter(model, trainable_head=True, full_ft=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    group = sp.init_groups(a.sp) if world > 1 else sp.SPGroup(None, 0, 1, 0, 1)
    if a.sp > 1:
        sp.attach(model)
    wrapper = ChunkedLossLM(model, chunk_tokens=4096, sp_group=group if a.sp > 1 else None)
    use_fsdp = world > 1 and not a.no_fsdp
    autocast = dev == "cuda"
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = dev == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)  # keep the fp32 loss weights fp32
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(wrapper, mp_policy=root_mp)
        autocast = False  # FSDP2 computes in bf16 itself
    wrapper.train()  # gradient checkpointing applies in training mode only
    opt = torch.optim.AdamW(wrapper.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    ceiling = matmul_ceiling_tflops("cuda" if dev == "cuda" else "cpu", cache_dir=Path(a.work))

    def step(batch: dict) -> float:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = wrapper(**batch)["loss"]
        (loss * world if world > 1 else loss).backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().float()
        if world > 1:  # the row's loss = the sum of its group's slices (averaged over data-parallel groups)
            dist.all_reduce(total)
            total /= world // a.sp
        return float(total)

    def local(row):
        if a.sp > 1:
            b = sp.shard_batch(row, group.rank, group.size)
            b.pop("row_tokens")
        else:
            b = dict(row)
        return _to(b, dev)

    vocab = model.config.vocab_size
    warm, _ = packed_row(min(a.seq, 8192), min(a.doc_tokens, 4096), vocab, seed=1)
    step(local(warm))
    row, sizes = packed_row(a.seq, a.doc_tokens, vocab, seed=2)
    n_target = int((row["labels"][:, 1:] != -100).sum())
    batch = local(row)
    del row
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        losses.append(step(batch))
        if dev == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    mem = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30, torch.cuda.max_memory_reserved() / 2 ** 30]
                       if dev == "cuda" else [0.0, 0.0], dtype=torch.float64, device=dev)
    mems = [torch.zeros_like(mem) for _ in range(world)]
    if world > 1:
        dist.all_gather(mems, mem)
    else:
        mems = [mem]
    dt = min(times)
    row_flops = flops(sizes, n_target)
    groups = world // a.sp
    return {"shape": a.shape, "n_params": n_params, "seq": a.seq, "doc_tokens": a.doc_tokens, "docs": len(sizes),
            "gpus": world, "sp": a.sp, "fsdp2": use_fsdp, "attn": model.config._attn_implementation,
            "tokens_per_gpu": sp.tokens_per_gpu(a.seq, a.sp), "step_s": round(dt, 3),
            "step_s_all": [round(t, 3) for t in times], "loss": losses,
            "tokens_per_s": round(groups * a.seq / dt, 1),
            "tflops_per_gpu": round(groups * row_flops / dt / 1e12 / world, 1),
            "mfu": round(groups * row_flops / dt / 1e12 / (ceiling * world), 4), "ceiling_tflops": round(ceiling, 1),
            "peak_alloc_gib": [round(float(m[0]), 2) for m in mems],
            "peak_reserved_gib": [round(float(m[1]), 2) for m in mems]}


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_check(a, rank: int, world: int) -> dict:
    """SP=2 vs one GPU on the same bf16 row: relative errors of logits, loss, gradients; leakage across the split."""
    import torch
    import torch.distributed as dist

    from longalign_lib import sequence_parallel as sp
    from longalign_lib.batching import collate_packed
    from longalign_lib.train import ChunkedLossLM

    dev = a.device
    group = sp.init_groups(world)
    model = build("qwen2.5-1.5b" if dev == "cuda" else "tiny", 8192, dev, a.attn, layers=2)
    sp.attach(model)
    docs = [2500, 3000, 1700, 992]  # 8192 tokens; the second document straddles the middle
    g = torch.Generator().manual_seed(0)
    exs = [{"input_ids": torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist(), "idx": i}
           for i, n in enumerate(docs)]
    for e in exs:
        n = len(e["input_ids"])
        e["labels"] = [-100] * (n - n // 4) + e["input_ids"][n - n // 4:]
    row = collate_packed(exs, [1.0 / (len(docs) * (n // 4)) for n in docs])
    loc = sp.shard_batch(row, group.rank, group.size)
    loc.pop("row_tokens")
    auto = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    dec = model.get_decoder()

    def hidden(b, grp):
        from longalign_lib.attention import packed_kwargs

        kw = {"position_ids": b["position_ids"].to(dev), "use_cache": False,
              **packed_kwargs(b["cu_seq_lens"].to(dev), b["max_seqlen"])}
        if grp is not None:
            kw["sp_group"] = grp
        with auto:
            return dec(input_ids=b["input_ids"].to(dev), **kw).last_hidden_state

    one = ChunkedLossLM(model, 4096)
    with auto:
        loss_ref = one(**_to({k: row[k] for k in ("input_ids", "labels", "loss_weights", "position_ids",
                                                   "cu_seq_lens", "max_seqlen")}, dev))["loss"]
    loss_ref.backward()
    g_ref = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    split = ChunkedLossLM(model, 4096, sp_group=group)
    with auto:
        loss = split(**_to(loc, dev))["loss"]
    loss.backward()
    tot = loss.detach().clone()
    dist.all_reduce(tot)
    grad_err = 0.0
    for n, p in model.named_parameters():
        gg = p.grad.detach().clone()
        dist.all_reduce(gg)
        grad_err = max(grad_err, rel(gg, g_ref[n]))
    with torch.no_grad():
        h_ref = hidden(row, None)
        h = sp.gather_sequence(hidden(loc, group), group)[:, :sum(docs)]
        head = model.get_output_embeddings().weight
        logit_err = max(rel(h[:, s:s + 2048] @ head.T.to(h.dtype), h_ref[:, s:s + 2048] @ head.T.to(h.dtype))
                        for s in range(0, sum(docs), 2048))
        other = dict(loc)
        if group.rank == 0:
            ids = loc["input_ids"].clone()
            ids[0, :docs[0]] = (ids[0, :docs[0]] + 1) % model.config.vocab_size
            other["input_ids"] = ids
        start = docs[0] if group.rank == 0 else 0
        leak = torch.tensor(float((hidden(loc, group)[0, start:] - hidden(other, group)[0, start:]).abs().max()),
                            device=dev)
        dist.all_reduce(leak, op=dist.ReduceOp.MAX)
    return {"check": "sp2_vs_one_gpu_bf16" if dev == "cuda" else "sp2_vs_one_process_fp32_cpu",
            "shape": ("qwen2.5-1.5b" if dev == "cuda" else "tiny") + " x 2 layers", "row": sum(docs), "docs": docs,
            "attn": model.config._attn_implementation, "loss_one_gpu": float(loss_ref), "loss_sp": float(tot),
            "loss_rel_err": abs(float(tot) - float(loss_ref)) / abs(float(loss_ref)),
            "hidden_rel_err": rel(h, h_ref), "logits_rel_err": logit_err, "grad_max_rel_err": grad_err,
            "leak_max_abs": float(leak)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    ap.add_argument("--seq", type=int, default=262144)
    ap.add_argument("--sp", type=int, default=2, help="GPUs sharing one row (train.sequence_parallel)")
    ap.add_argument("--doc-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-fsdp", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default="/tmp/longalign_sp_bench")
    a = ap.parse_args(argv)
    import torch

    Path(a.work).mkdir(parents=True, exist_ok=True)
    rank, world = _dist(a.device)
    t0 = time.time()
    try:
        res = run_check(a, rank, world) if a.check else run_throughput(a, rank, world)
        res["ok"] = True
    except torch.OutOfMemoryError as e:
        res = {"shape": a.shape, "seq": a.seq, "sp": a.sp, "gpus": world, "ok": False,
               "error": f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"}
    res["wall_s"] = round(time.time() - t0, 1)
    if a.device == "cuda":
        res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    if rank == 0:
        line = json.dumps(res)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0 if res.get("ok") else 1


def longest_row(points: list[tuple[int, float]], sp: int, budget_gib: float) -> tuple[float, float, int]:
    """Memory model from measured (row tokens, peak GiB per GPU) pairs of one shape and GPU count:
    peak = fixed + per_token · T/sp (least squares) → (fixed GiB, GiB per 1k tokens per GPU, longest row T).

    >>> f, k, t = longest_row([(131072, 60.0), (262144, 100.0)], 2, 140.0)
    >>> round(f, 1), round(k, 4), t
    (20.0, 0.625, 393216)
    """
    xs = [t / sp / 1024 for t, _ in points]
    ys = [m for _, m in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else my / mx
    fixed = my - slope * mx
    t = int(math.floor((budget_gib - fixed) / slope)) * 1024 * sp if slope > 0 else 0
    return fixed, slope, t


if __name__ == "__main__":
    sys.exit(main())
