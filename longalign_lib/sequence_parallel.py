"""Ulysses sequence parallelism for packed, document-isolated rows: one row of T tokens over a group of N GPUs.

Run as: longalign train --set train.sequence_parallel=2 ...   (under torchrun / accelerate launch, N | world size)
Usage:
    from longalign_lib import sequence_parallel as sp
    group = sp.init_groups(2)                               # after torch.distributed.init_process_group
    sp.attach(model)                                        # our isolated backend, wrapped for Ulysses
    local = sp.shard_batch(collate_packed(examples, w), group.rank, group.size)
    hidden = model.get_decoder()(input_ids=local["input_ids"], position_ids=local["position_ids"],
                                 use_cache=False, sp_group=group,
                                 **attention.packed_kwargs(local["cu_seq_lens"], local["max_seqlen"]))
    loss = weighted_chunked_ce(hidden, head, local["shift_labels"], local["shift_weights"], shift=False)
    # Σ of `loss` over the group's ranks = the row's loss on one GPU; gradients add up the same way.

How it works. Every rank of a group holds a contiguous slice of T/N tokens of the same packed row (the row is
padded to a multiple of N with a separate pad "document" that has no loss). Everything outside attention is
per token, so it runs on the slice unchanged: embeddings, RoPE (each rank gets its slice of `position_ids`,
which restart at 0 per document), MLPs, norms, the LM head. Inside each attention layer one all-to-all turns
"T/N tokens × all heads" into "all T tokens × H/N heads"; the rank then runs the SAME varlen kernel as on one
GPU (attention.py's backend, with the row's full `cu_seq_lens`), so every document attends only to itself
exactly as without parallelism; a second all-to-all turns the output back into "T/N tokens × all heads".
The loss shifts labels ONCE over the whole row before splitting (`shift_labels[t] = labels[t+1]`), so a
target whose predicting position sits on the previous rank is not lost, and each rank weights its targets with
the step weights of batching.step_token_weights. The sum of the group's losses is the row's loss; the
all-to-all is its own adjoint, so backward sends gradients home and each rank's parameter gradients add up
(over the group, and over data-parallel groups through DDP/FSDP2) to the one-GPU gradient.

GQA: query heads split evenly (H_q % N == 0 is required). With H_kv % N == 0 each rank gets H_kv/N KV heads;
with fewer KV heads than the group (N % H_kv == 0) each KV head is repeated N/H_kv times before the
exchange, so every rank receives the one KV head its query heads use.

Why our own glue (checked against the maintained implementations, 2026-11):
- accelerate's `ParallelismConfig(sp_size=...)` has one backend, `deepspeed` (DeepSpeed's ALST
  `UlyssesSPAttentionHF`): it needs DeepSpeed as the training engine (ZeRO drives data parallelism, the
  accelerate config must say `distributed_type: DEEPSPEED`), so it does not compose with FSDP2; it wraps only
  transformers' own `sdpa` / `flash_attention_2/3` (sdpa does not isolate packed documents; flash-attn is not on
  our GPU image), not our `varlen` backend, and it all-gathers `position_ids` in every layer to find the
  documents. DeepSpeed is not installed here nor on the device image.
- accelerate's context parallelism (`cp_size`, FSDP2 + `torch.distributed.tensor.experimental.context_parallel`,
  ring attention) supports SDPA with no mask or a causal mask only: no document isolation for packed rows.
So the glue is ours and small: two autograd all-to-alls on `torch.distributed` (any backend with
`all_to_all_single`: NCCL on GPUs, gloo on CPU — gloo implements it in torch 2.13, so the CPU test runs the
real exchange), one wrapper registered through transformers' AttentionInterface around attention.py's
backends (no model file is patched), and the row split. It composes with DDP and FSDP2 because it touches no
parameter: the groups' gradient reduction is whatever the data-parallel wrapper does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import attention
from .attention import _compute_dtype
from .io import LongAlignError

PREFIX = "longalign_sp_"
IGNORE = -100


# ------------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class SPGroup:
    """This rank's sequence-parallel group: `size` ranks share one row; `rank` is the position in the group."""

    group: object  # torch.distributed ProcessGroup (None when size == 1)
    rank: int
    size: int
    dp_rank: int  # which data-parallel group (= which rank of the batch plan) this rank belongs to
    dp_size: int  # data-parallel groups = world size / size (= batching.world_size of the plan)


def layout(world_size: int, size: int, rank: int) -> tuple[int, int, int]:
    """(data-parallel rank, position in the group, data-parallel size) of `rank`: groups are consecutive ranks.

    >>> layout(4, 2, 3)
    (1, 1, 2)
    """
    size = int(size)
    if size < 1 or world_size % size:
        raise LongAlignError(f"train.sequence_parallel={size} must divide the number of processes ({world_size}); "
                             f"launch a multiple of {size} processes or change the setting")
    return rank // size, rank % size, world_size // size


def init_groups(size: int) -> SPGroup:
    """Create the sequence-parallel process groups (every rank must call this, in the same order).

    Ranks [0..N-1] form group 0, [N..2N-1] group 1, ... (consecutive ranks: on one host they share NVLink).
    Without torch.distributed, or with size 1, returns a trivial group.
    """
    import torch.distributed as dist

    size = int(size)
    if not (dist.is_available() and dist.is_initialized()):
        if size > 1:
            raise LongAlignError(f"train.sequence_parallel={size} needs {size} processes: launch with torchrun or "
                                 "accelerate launch (see configs/accelerate/)")
        return SPGroup(None, 0, 1, 0, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_rank, sp_rank, dp_size = layout(world, size, rank)
    mine = None
    if size > 1:
        for g in range(dp_size):
            pg = dist.new_group(list(range(g * size, (g + 1) * size)))
            if g == dp_rank:
                mine = pg
    return SPGroup(mine, sp_rank, size, dp_rank, dp_size)


def tokens_per_gpu(row_tokens: int, size: int) -> int:
    """Tokens each GPU of a group runs for a row of `row_tokens` (the row is padded to a multiple of `size`).

    >>> tokens_per_gpu(524288, 2), tokens_per_gpu(10, 4)
    (262144, 3)
    """
    return math.ceil(int(row_tokens) / max(1, int(size)))


# ------------------------------------------------------------------------------------------------- the exchange
class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (N equal chunks); the same exchange is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def heads_to_sequence(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """[b, h, T/N, d] (this rank's tokens, all heads) → [b, h/N, T, d] (all tokens, this rank's heads)."""
    b, h, t, d = x.shape
    n = group.size
    chunks = x.reshape(b, n, h // n, t, d).transpose(0, 1)  # [n (destination), b, h/n, t, d]
    got = _AllToAll.apply(chunks, group.group)  # [n (source = sequence chunk), b, h/n, t, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)


def sequence_to_heads(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """[b, T, h/N, d] (attention output: all tokens, this rank's heads) → [b, T/N, h, d]."""
    b, t, h, d = x.shape
    n = group.size
    chunks = x.reshape(b, n, t // n, h, d).transpose(0, 1)  # [n (destination = sequence chunk), b, t/n, h, d]
    got = _AllToAll.apply(chunks, group.group)  # [n (source = head group), b, t/n, h, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, t // n, n * h, d)


def expand_kv(x: torch.Tensor, size: int) -> torch.Tensor:
    """KV heads [b, h_kv, t, d] made divisible over `size` ranks: unchanged, or each head repeated size/h_kv times."""
    hk = x.shape[1]
    if hk % size == 0:
        return x
    if size % hk == 0:
        return x.repeat_interleave(size // hk, dim=1)
    raise LongAlignError(f"{hk} KV heads cannot be shared by a sequence-parallel group of {size}: use a group size "
                         f"that divides the KV heads or is a multiple of them")


# ------------------------------------------------------------------------------------------------ the attention
def _ulysses(inner):
    """Wrap one of attention.py's backends: exchange heads for tokens around the unchanged kernel call."""
    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
        group = kwargs.pop("sp_group", None)
        if group is None or group.size == 1:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if attention_mask is not None or query.shape[2] != key.shape[2]:
            raise LongAlignError("sequence parallelism trains packed rows only (no padding mask, no KV cache): "
                                 "set batching.strategy=packed")
        if kwargs.get("cu_seq_lens_q") is None:
            raise LongAlignError("sequence-parallel attention needs the row's cu_seq_lens_q (the document "
                                 "boundaries of the WHOLE row): build the batch with sequence_parallel.shard_batch")
        n = group.size
        hq = query.shape[1]
        if hq % n:
            raise LongAlignError(f"{hq} attention heads cannot be split over a sequence-parallel group of {n}: "
                                 f"choose train.sequence_parallel among the divisors of {hq}")
        query, key, value = _compute_dtype(query, key, value)  # exchange bf16 under autocast, not RoPE's fp32
        q = heads_to_sequence(query, group)
        k = heads_to_sequence(expand_kv(key, n), group)
        v = heads_to_sequence(expand_kv(value, n), group)
        kwargs.pop("position_ids", None)  # this rank's slice only; the kernel reads cu_seq_lens of the whole row
        out, _ = inner(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)
        return sequence_to_heads(out, group), None

    forward.__name__ = f"ulysses_{getattr(inner, '__name__', 'attention')}"
    forward.__doc__ = f"Ulysses all-to-all around {getattr(inner, '__name__', 'the backend')} (sp_group kwarg)."
    return forward


def register() -> list[str]:
    """Register `longalign_sp_<backend>` for every attention.py backend (idempotent); returns the names.

    Without an `sp_group` kwarg (or with a group of one) each behaves exactly like its backend.
    """
    return attention.register_backends(PREFIX, wrap=_ulysses)


def implementation_for(name: str) -> str:
    """Registered attention name (e.g. `longalign_varlen`) → its sequence-parallel wrapper (`longalign_sp_varlen`)."""
    if name.startswith(PREFIX):
        return name
    if not name.startswith(attention.PREFIX):
        raise LongAlignError(f"sequence parallelism runs on the isolated backends of attention.py (varlen, flex, "
                             f"flash, sdpa, eager), not on '{name}': set model.attn_implementation to one of them")
    register()
    return PREFIX + name[len(attention.PREFIX):]


def attach(model) -> str:
    """Switch a loaded model's attention to the Ulysses wrapper of its current backend; returns the new name."""
    cfg = model.config
    name = implementation_for(cfg._attn_implementation)
    cfg._attn_implementation = name
    for sub in model.modules():  # sub-configs (peft wrappers keep the same config object; VLMs have text configs)
        c = getattr(sub, "config", None)
        if c is not None and c is not cfg and getattr(c, "_attn_implementation", None):
            try:
                c._attn_implementation = implementation_for(c._attn_implementation)
            except LongAlignError:
                pass
    return name


# ------------------------------------------------------------------------------------------------- the row split
def shard_batch(batch: dict, rank: int, size: int, pad_id: int = 0) -> dict:
    """This rank's slice of a packed row `[1, T]` (batching.collate_packed's output) for a group of `size`.

    Returns input_ids, position_ids [1, T'/N] (T' = T padded to a multiple of N), shift_labels and shift_weights
    [1, T'/N] (labels and loss weights shifted over the WHOLE row: the target predicted AT each position),
    cu_seq_lens of the whole padded row (the pad is its own document), max_seqlen, and row_tokens = T.

    >>> import torch
    >>> b = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, 6, 7, -100, 9]]),
    ...      "loss_weights": torch.tensor([[0., .5, .5, 0., 1.]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
    ...      "cu_seq_lens": torch.tensor([0, 3, 5], dtype=torch.int32), "max_seqlen": 3}
    >>> s = shard_batch(b, 1, 2)
    >>> s["input_ids"].tolist(), s["shift_labels"].tolist(), s["cu_seq_lens"].tolist()
    ([[8, 9, 0]], [[9, -100, -100]], [0, 3, 5, 6])
    """
    if batch.get("attention_mask") is not None or batch["input_ids"].shape[0] != 1:
        raise LongAlignError("sequence parallelism splits packed rows [1, T]: set batching.strategy=packed "
                             "(padded naive/sorted micro-batches are not split)")
    if not 0 <= rank < size:
        raise LongAlignError(f"shard_batch: rank {rank} outside a group of {size}")
    ids = batch["input_ids"]
    t = ids.shape[1]
    labels = batch.get("labels")
    labels = torch.full_like(ids, IGNORE) if labels is None else labels
    weights = batch.get("loss_weights")
    weights = (labels != IGNORE).float() if weights is None else weights.float()
    pos = batch.get("position_ids")
    pos = torch.arange(t, dtype=torch.long)[None] if pos is None else pos
    cu = batch.get("cu_seq_lens")
    cu = torch.tensor([0, t], dtype=torch.int32) if cu is None else cu.to(torch.int32)
    mx = int(batch["max_seqlen"]) if batch.get("max_seqlen") is not None else int((cu[1:] - cu[:-1]).max())
    # the target predicted AT position t is labels[t+1]; the row's last position predicts nothing
    shift_labels = torch.cat([labels[:, 1:], labels.new_full((1, 1), IGNORE)], dim=1)
    shift_weights = torch.cat([weights[:, 1:], weights.new_zeros((1, 1))], dim=1)
    pad = (-t) % size
    if pad:
        ids = torch.cat([ids, ids.new_full((1, pad), int(pad_id))], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        shift_labels = torch.cat([shift_labels, shift_labels.new_full((1, pad), IGNORE)], dim=1)
        shift_weights = torch.cat([shift_weights, shift_weights.new_zeros((1, pad))], dim=1)
        cu = torch.cat([cu, cu.new_tensor([t + pad])])
        mx = max(mx, pad)
    n = (t + pad) // size
    sl = slice(rank * n, (rank + 1) * n)
    return {"input_ids": ids[:, sl].contiguous(), "position_ids": pos[:, sl].contiguous(),
            "shift_labels": shift_labels[:, sl].contiguous(), "shift_weights": shift_weights[:, sl].contiguous(),
            "cu_seq_lens": cu, "max_seqlen": mx, "row_tokens": t}


def gather_sequence(x: torch.Tensor, group: SPGroup, dim: int = 1) -> torch.Tensor:
    """Concatenate the group's slices of a tensor along `dim` (no gradient): tests and inspection."""
    import torch.distributed as dist

    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, dim=dim)
