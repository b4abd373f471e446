"""Weighted, chunked cross-entropy from final hidden states: the loss of long packed batches without [T, V] logits.

Usage:
    from longalign_lib.loss import weighted_chunked_ce, reference_weighted_ce
    h = model.get_decoder()(input_ids, position_ids=pos, use_cache=False, **kw).last_hidden_state
    loss = weighted_chunked_ce(h, model.get_output_embeddings().weight, labels, loss_weights, chunk_tokens=4096)

Convention (shared with batching.py): `labels[t]` is the token the model should predict *at* position t, so the
logits come from position t-1 (this module does the shift); `loss_weights[t]` is that target's weight, and

    loss = Σ_t loss_weights[t] · CE(logits[t-1], labels[t])      over t ≥ 1 with labels[t] != -100.

Batching.py chooses the weights (token-mean, per-sequence mean, pack mean, ...) so that summing micro-batch
losses over a whole optimizer step gives exactly the loss the recipe asks for.

Why chunked: a 64k packed row of a 150k-vocabulary model has 64k × 150k fp32 logits = 39 GB. Only target
positions go through the LM head (prompt tokens have no loss), and they go through it `chunk_tokens` at a time
inside one autograd Function that computes the loss *and* its gradients chunk by chunk (the logits of a chunk are
freed before the next one), then scales the stored gradients in backward. Memory: one chunk of fp32 logits, plus
the gradient of the selected hidden states and (if it trains) of the LM-head weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import packed_kwargs

IGNORE = -100


def select_targets(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                   ignore_index: int = IGNORE, shift: bool = True):
    """Shift and keep only target positions: (hidden rows [N, H], targets [N], weights [N] fp32).

    `shift=False`: labels/weights are already shifted (`labels[t]` is predicted AT t, as sequence_parallel.py
    builds them for a slice of a row), so hidden[t] pairs with labels[t].
    """
    if hidden.dim() == 2:
        hidden, labels = hidden[None], labels.reshape(1, -1)
        weights = weights.reshape(1, -1) if weights is not None else None
    k = 1 if shift else 0
    h = hidden[:, :hidden.shape[1] - k].reshape(-1, hidden.shape[-1])
    y = labels[:, k:].reshape(-1)
    if weights is None:
        w = torch.ones(y.shape, dtype=torch.float32, device=y.device)
    else:
        w = weights[:, k:].reshape(-1).to(torch.float32)
    keep = (y != ignore_index) & (w != 0)
    idx = keep.nonzero(as_tuple=True)[0]
    return h.index_select(0, idx), y.index_select(0, idx), w.index_select(0, idx)


class _ChunkedLinearCE(torch.autograd.Function):
    """Σ w · CE(h @ Wᵀ + b, y), with gradients computed during the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, w, chunk, compute_dtype, softcap):
        n = h.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        wc = weight.to(compute_dtype)
        bc = bias.to(torch.float32) if bias is not None else None
        for s in range(0, n, chunk):
            hc = h[s:s + chunk].to(compute_dtype)
            logits = (hc @ wc.t()).float()
            if bc is not None:
                logits = logits + bc
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            yc, wt = targets[s:s + chunk], w[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, yc[:, None]).squeeze(1)
            total += ((lse - picked) * wt).sum()
            if need_h or need_w or need_b:
                # d/dlogits of w·CE = w · (softmax − onehot)
                g = torch.exp(logits - lse[:, None])
                g.scatter_add_(1, yc[:, None], -torch.ones_like(picked)[:, None])
                g *= wt[:, None]
                if softcap:
                    g *= 1 - (logits / softcap) ** 2
                if need_b:
                    grad_b += g.sum(0)
                gc = g.to(compute_dtype)
                del logits, g
                if need_h:
                    grad_h[s:s + chunk] = (gc @ wc).to(h.dtype)
                if need_w:
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(gc.t(), hc)
                    else:
                        grad_w.add_((gc.t() @ hc).float())
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """bf16/fp16 under autocast (as the model's own matmuls would be), else the hidden states' dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def weighted_chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_weights: torch.Tensor | None = None, chunk_tokens: int = 4096,
                        bias: torch.Tensor | None = None, softcap: float | None = None,
                        ignore_index: int = IGNORE, shift: bool = True) -> torch.Tensor:
    """Σ_t w[t]·CE(hidden[t-1] @ weightᵀ, labels[t]) computed `chunk_tokens` target positions at a time.

    hidden [B, T, H] (or [T, H]); weight [V, H] (the LM head); labels, loss_weights [B, T]. `loss_weights=None`
    means weight 1 (a summed loss). Returns a 0-dim fp32 tensor; differentiable w.r.t. hidden, weight and bias.
    `shift=False`: labels and weights are already shifted (Σ_t w[t]·CE(hidden[t], labels[t])).
    """
    h, y, w = select_targets(hidden, labels, loss_weights, ignore_index, shift)
    if h.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()  # keeps the graph connected
    return _ChunkedLinearCE.apply(h, weight, bias, y, w, max(1, int(chunk_tokens)), _compute_dtype(h), softcap)


def reference_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor | None = None,
                          ignore_index: int = IGNORE) -> torch.Tensor:
    """The same loss, written the obvious way from full logits [B, T, V] (tests and notebook 04 compare)."""
    if logits.dim() == 2:
        logits, labels = logits[None], labels.reshape(1, -1)
        loss_weights = loss_weights.reshape(1, -1) if loss_weights is not None else None
    lg = logits[:, :-1].float()
    y = labels[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="none")
    w = torch.ones_like(ce) if loss_weights is None else loss_weights[:, 1:].reshape(-1).float()
    w = torch.where(y.reshape(-1) == ignore_index, torch.zeros_like(w), w)
    return (ce * w).sum()


def lm_head_of(model):
    """(weight, bias, softcap) of a causal LM's output layer (works through peft wrappers)."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    return head.weight, getattr(head, "bias", None), softcap


def model_loss(model, batch: dict, chunk_tokens: int = 4096, **decoder_kwargs) -> tuple[torch.Tensor, dict]:
    """Forward the decoder on a collated batch and return (weighted loss, stats) without full logits: the one loss
    of the cookbook (the trainer's ChunkedLossLM calls it).

    `batch`: input_ids, labels, loss_weights, and position_ids / cu_seq_lens / max_seqlen for packed rows; or
    shift_labels / shift_weights, already shifted over the whole row (a sequence-parallel slice). `decoder_kwargs`
    go to the decoder (e.g. sp_group).
    """
    kwargs = {"use_cache": False, **decoder_kwargs}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if batch.get("cu_seq_lens") is not None:
        kwargs.update(packed_kwargs(batch["cu_seq_lens"], int(batch["max_seqlen"])))
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], **kwargs).last_hidden_state
    weight, bias, softcap = lm_head_of(model)
    scale = getattr(model.config, "logit_scale", None)
    if scale:  # Cohere-style scaled logits: fold the scale into the hidden states
        hidden = hidden * scale
    shifted = batch.get("shift_labels") is not None
    loss = weighted_chunked_ce(hidden, weight, batch["shift_labels"] if shifted else batch["labels"],
                               batch.get("shift_weights") if shifted else batch.get("loss_weights"), chunk_tokens,
                               bias=bias, softcap=softcap, shift=not shifted)
    return loss, {"tokens": int(batch["input_ids"].numel())}
