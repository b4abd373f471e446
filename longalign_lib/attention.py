"""Document-isolated attention for packed batches, registered with transformers' attention interfaces.

Usage:
    from longalign_lib import attention
    impl = attention.resolve_implementation("auto", "cuda")     # -> "longalign_varlen" (registered on import)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl)
    out = model(input_ids, position_ids=pos, use_cache=False, **attention.packed_kwargs(cu_seq_lens, max_seqlen))

Packing puts several training sequences in one row `[1, T]`. Plain causal attention would let sequence 2 look at
sequence 1 (a "leak"), which changes what the model learns. Every backend here reads the document boundaries
(`cu_seq_lens_q`, the same kwarg transformers' flash-attention path uses, or else the resets of `position_ids`)
and attends only inside a document:

| name      | kernel                                              | where                      |
|-----------|-----------------------------------------------------|----------------------------|
| `varlen`  | `torch.nn.attention.varlen.varlen_attn` (causal)    | CUDA default, fastest      |
| `flex`    | FlexAttention with a document-causal block mask     | CUDA (compiled); CPU no-grad |
| `flash`   | flash-attn's `flash_attn_varlen_func`               | CUDA, when installed       |
| `sdpa`    | SDPA with a block-diagonal causal boolean mask      | CPU/MPS, short sequences   |
| `eager`   | matmul + softmax with the same mask (reference)     | anywhere, tests            |

Each is registered twice through transformers' extension points (no model file is patched):
`AttentionInterface` gets the attention function, `AttentionMaskInterface` a mask function that returns `None`
(the function isolates documents itself) unless the batch carries padding, in which case transformers' own SDPA
mask is built and the function falls back to transformers' SDPA path (generation with left padding, KV cache).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import weakref

import torch
import torch.nn.functional as F

from .io import LongAlignError

PREFIX = "longalign_"


# --------------------------------------------------------------------------------------------- document boundaries
def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the documents in a packed batch from `position_ids` that restart at 0 for each document.

    `position_ids` [B, T] → (`cu_seq_lens` int32 [n+1] over the flattened B·T tokens, longest document). A row
    start is always a boundary. This syncs with the device once; the trainer passes `cu_seq_lens_q` instead.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)
    b, t = pos.shape
    starts = pos == 0
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([flat, flat.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def doc_ids_from_cu(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of every flattened token: [total] int32 (no host sync)."""
    ar = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, ar, right=True) - 1).to(torch.int32)


def block_causal_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, T]: True where query i may attend key j (same document and j ≤ i)."""
    doc = doc_ids_from_cu(cu_seqlens.to(torch.int64), batch * length).view(batch, length)
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    return (same & causal)[:, None]


def packed_kwargs(cu_seq_lens: torch.Tensor, max_seqlen: int) -> dict:
    """The keyword arguments a model call needs to run a packed row isolated (transformers' flash-attn names)."""
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": int(max_seqlen),
            "max_length_k": int(max_seqlen)}


class _OneEntryCache:
    """Remembers one value per forward pass keyed on the identity of a tensor (all layers share it)."""

    def __init__(self):
        self.ref, self.key, self.value = None, None, None

    def get(self, tensor: torch.Tensor, key):
        if self.ref is not None and self.ref() is tensor and self.key == key:
            return self.value
        return None

    def put(self, tensor: torch.Tensor, key, value):
        self.ref, self.key, self.value = weakref.ref(tensor), key, value
        return value


_POS_CACHE = _OneEntryCache()


def _segments(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int] | None:
    """(cu_seq_lens, max_len) for this call, or None when the row is one plain causal sequence."""
    b, _, tq, _ = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        mx = kwargs.get("max_length_q")
        if isinstance(cu, torch.Tensor) and cu.device.type == "cpu" and int(cu[-1]) != b * tq:
            raise LongAlignError(f"cu_seq_lens_q ends at {int(cu[-1])} but the batch holds {b}x{tq} tokens")
        if mx is None:
            mx = int((cu[1:] - cu[:-1]).max())
        return cu.to(device=query.device, dtype=torch.int32), int(mx)
    pos = kwargs.get("position_ids")
    if pos is not None and pos.shape[-1] == tq:
        hit = _POS_CACHE.get(pos, (b, tq))
        if hit is None:
            hit = _POS_CACHE.put(pos, (b, tq), cu_seqlens_from_position_ids(pos.expand(b, tq)))
        return hit
    return None


def _is_generic(query, key, attention_mask) -> bool:
    """A KV cache (q shorter than k) or a padding mask: use transformers' SDPA path, which handles both."""
    return attention_mask is not None or query.shape[2] != key.shape[2]


def _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _check_module(module) -> None:
    if getattr(module, "sliding_window", None):
        raise LongAlignError(
            f"{type(module).__name__} uses sliding-window attention, which the isolated backends do not implement; "
            "set model.attn_implementation=sdpa (transformers isolates packed rows there with use_cache=False)"
        )


def _compute_dtype(query, key, value):
    """Under autocast, RoPE's fp32 cos/sin upcast q and k: bring q, k, v back to the autocast dtype."""
    dev = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return query.to(dt), key.to(dt), value.to(dt)
    return query, key, value


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# ------------------------------------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=1)
def _varlen_fn():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "enable_gqa" in params, "window_size" in params, "is_causal" in params


def _varlen_layout(query, key, value, kwargs):
    """[b, h, t, d] q/k/v in the compute dtype → token-major [b·t, h, d] tensors plus (cu_seqlens, max_seqlen) of
    the documents (each row is one document when no boundaries were passed): the varlen kernels' input."""
    query, key, value = _compute_dtype(query, key, value)
    b, hq, t, d = query.shape
    hk = key.shape[1]
    seg = _segments(query, key, kwargs)
    if seg is None:
        seg = (torch.arange(0, (b + 1) * t, t, device=query.device, dtype=torch.int32), t)
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, hk, d)
    v = value.transpose(1, 2).reshape(b * t, hk, d)
    return q, k, v, *seg


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """PyTorch's variable-length flash kernel: each document is its own causal sequence."""
    if _is_generic(query, key, attention_mask):
        return _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_module(module)
    b, hq, t, d = query.shape
    hk = key.shape[1]
    q, k, v, cu, mx = _varlen_layout(query, key, value, kwargs)
    varlen_attn, has_gqa, has_window, has_causal = _varlen_fn()
    extra = {}
    if hq != hk:
        if has_gqa:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
    if has_window:
        extra["window_size"] = (-1, 0)
    elif has_causal:
        extra["is_causal"] = True
    out = varlen_attn(q, k, v, cu, cu, mx, mx, scale=scaling, **extra)
    return out.view(b, t, hq, d), None


_FLEX = {}
_BLOCK_CACHE = _OneEntryCache()


def _flex_fn(device_type: str):
    """flex_attention, compiled on CUDA (the eager version materialises scores and is for tests only)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device_type] = torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention
    return _FLEX[device_type]


def document_block_mask(cu_seqlens: torch.Tensor, batch: int, length: int):
    """FlexAttention BlockMask for document-causal attention over a packed batch [B, T]."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = doc_ids_from_cu(cu_seqlens, batch * length).view(batch, length)

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(doc_causal, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=cu_seqlens.device,
                             _compile=cu_seqlens.device.type == "cuda")


def flex_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """FlexAttention with a block mask that only keeps (same document, causal) tiles."""
    if _is_generic(query, key, attention_mask):
        return _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_module(module)
    query, key, value = _compute_dtype(query, key, value)
    b, hq, t, d = query.shape
    seg = _segments(query, key, kwargs)
    if seg is None:
        cu = torch.arange(0, (b + 1) * t, t, device=query.device, dtype=torch.int32)
    else:
        cu = seg[0]
    mask = _BLOCK_CACHE.get(cu, (b, t))
    if mask is None:
        mask = _BLOCK_CACHE.put(cu, (b, t), document_block_mask(cu, b, t))
    flex = _flex_fn(query.device.type)
    out = flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=key.shape[1] != hq)
    return out.transpose(1, 2).contiguous(), None


def flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """flash-attn's varlen kernel (needs `pip install flash-attn`)."""
    if _is_generic(query, key, attention_mask):
        return _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_module(module)
    from flash_attn import flash_attn_varlen_func

    b, hq, t, d = query.shape
    q, k, v, cu, mx = _varlen_layout(query, key, value, kwargs)
    out = flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, dropout_p=dropout if module.training else 0.0,
                                 softmax_scale=scaling, causal=True)
    return out.view(b, t, hq, d), None


def _masked(query, key, kwargs):
    b, _, t, _ = query.shape
    seg = _segments(query, key, kwargs)
    if seg is None or seg[0].numel() == b + 1:  # one document per row: plain causal
        return None
    return block_causal_mask(seg[0], b, t)


def sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """SDPA with an explicit block-diagonal causal mask (O(T²) memory: CPU and short sequences)."""
    if _is_generic(query, key, attention_mask):
        return _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_module(module)
    groups = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    mask = _masked(query, key, kwargs)
    drop = dropout if module.training else 0.0
    if mask is None:
        out = F.scaled_dot_product_attention(query, k, v, dropout_p=drop, scale=scaling, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=drop, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def eager_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """The textbook computation (scores, mask, softmax in fp32, weights @ values): the tests' reference."""
    if _is_generic(query, key, attention_mask):
        return _generic(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_module(module)
    b, hq, t, d = query.shape
    groups = hq // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    scores = torch.matmul(query, k.transpose(-1, -2)).float() * scale
    mask = _masked(query, key, kwargs)
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()[None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    if dropout and module.training:
        weights = F.dropout(weights, p=dropout)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


FUNCTIONS = {"varlen": varlen_attention_forward, "flex": flex_attention_forward, "flash": flash_attention_forward,
             "sdpa": sdpa_attention_forward, "eager": eager_attention_forward}
BACKENDS = tuple(FUNCTIONS)  # the config names: varlen, flex, flash, sdpa, eager


def isolating_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function for our backends: nothing to build unless there is padding (then transformers' SDPA mask)."""
    # Only a full-length call (no KV cache) can skip the mask, so only that one reads the mask on the host; a
    # decode step goes straight to transformers' mask, which makes its own skip decision (no extra device sync).
    if q_length == kv_length and (attention_mask is None or (attention_mask.ndim == 2
                                                             and bool(attention_mask.all()))):
        return None
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    return mask


def register_backends(prefix: str, wrap=None) -> list[str]:
    """Register `<prefix><backend>` for every backend in FUNCTIONS with transformers (idempotent), each with
    `isolating_mask` as its mask function; `wrap(fn)` (optional) wraps each forward first. Returns the names.

    >>> register_backends(PREFIX)[:2]
    ['longalign_varlen', 'longalign_flex']
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = []
    for short, fn in FUNCTIONS.items():
        name = prefix + short
        AttentionInterface.register(name, wrap(fn) if wrap else fn)
        AttentionMaskInterface.register(name, isolating_mask)
        names.append(name)
    return names


def register() -> list[str]:
    """Register every backend with transformers as `longalign_<backend>` (idempotent); returns the names."""
    return register_backends(PREFIX)


def available(device: str) -> list[str]:
    """Backends that can run on `device` ('cuda' or 'cpu'/'mps') with what is installed."""
    out = []
    if device == "cuda" and torch.cuda.is_available():
        try:
            _varlen_fn()
            out.append("varlen")
        except ImportError:
            pass
        out.append("flex")
        if importlib.util.find_spec("flash_attn") is not None:
            out.append("flash")
    # FlexAttention runs on CPU only without gradients (torch raises on backward), so it is not offered there.
    return out + ["sdpa", "eager"]


def resolve_implementation(name: str, device: str) -> str:
    """Config name (auto | varlen | flex | flash | sdpa | eager) → registered transformers implementation name.

    `auto`: varlen on CUDA (flash-attn when varlen is missing, else flex), sdpa elsewhere.
    """
    register()
    name = (name or "auto").lower()
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    dev = "cuda" if str(device).startswith("cuda") else str(device)
    avail = available(dev)
    if name == "auto":
        if dev == "cuda":
            name = next(n for n in ("varlen", "flash", "flex") if n in avail)
        else:
            name = "sdpa"
    if name not in BACKENDS:
        raise LongAlignError(f"model.attn_implementation={name!r}: choose auto, {', '.join(BACKENDS)}")
    if name not in avail:
        why = "pip install flash-attn" if name == "flash" else "it needs a CUDA device"
        raise LongAlignError(f"attention backend '{name}' is not available on {dev} ({why}); "
                             f"available here: {', '.join(avail)}")
    return PREFIX + name


register()


def measure_leak(model, docs: list[list[int]], vocab: int | None = None, **call_kwargs) -> float:
    """How much the logits of documents 2..n move when document 1's tokens change, in one packed row.

    0 means isolated. `call_kwargs` go to the model call (e.g. use_cache=True to reproduce transformers' cache
    path, which does not isolate packed rows). Packing kwargs (position_ids, cu_seq_lens) are added here.
    """
    vocab = vocab or model.config.vocab_size
    dev = next(model.parameters()).device
    lens = [len(d) for d in docs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    kw = {"position_ids": pos, **call_kwargs}
    if not call_kwargs.get("use_cache"):
        kw.update(packed_kwargs(cu, max(lens)))
    kw.setdefault("use_cache", False)
    a = torch.tensor([sum(docs, [])], device=dev)
    b = a.clone()
    b[0, :lens[0]] = (b[0, :lens[0]] + 1 + torch.arange(lens[0], device=dev)) % vocab
    with torch.no_grad():
        la = model(a, **kw).logits[0, lens[0]:].float()
        lb = model(b, **kw).logits[0, lens[0]:].float()
    return float((la - lb).abs().max())
