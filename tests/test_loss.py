"""Weighted chunked cross-entropy: exact (fp32, 1e-6) vs full-logit reference in value and gradient."""
from __future__ import annotations

import pytest
import torch

from longalign_lib.loss import reference_weighted_ce, select_targets, weighted_chunked_ce

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(seed=0, B=2, T=48, H=32, V=300, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).requires_grad_()
    W = (0.2 * torch.randn(V, H, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :6] = -100  # a prompt
    y[0, 20:30] = -100
    w = torch.rand(B, T, generator=g)
    return h, W, b, y, w


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_matches_reference_fp32(chunk, bias, softcap):
    h, W, b, y, w = _case(bias=bias)
    loss = weighted_chunked_ce(h, W, y, w, chunk_tokens=chunk, bias=b, softcap=softcap)
    params = [h, W] + ([b] if bias else [])
    grads = torch.autograd.grad(loss * 0.37, params)
    logits = h @ W.t() + (b if bias else 0)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = reference_weighted_ce(logits, y, w)
    ref_grads = torch.autograd.grad(ref * 0.37, params)
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-6
    for g, r in zip(grads, ref_grads, strict=False):
        assert _rel(g, r) < 1e-6


def test_shift_convention_by_hand():
    # labels[t] is predicted from position t-1
    torch.manual_seed(0)
    h, W = torch.randn(1, 4, 8), torch.randn(10, 8)
    y = torch.tensor([[-100, 3, -100, 7]])
    w = torch.tensor([[0.0, 0.5, 0.0, 2.0]])
    logits = h[0] @ W.t()
    expect = 0.5 * (torch.logsumexp(logits[0], 0) - logits[0, 3]) + 2.0 * (torch.logsumexp(logits[2], 0) - logits[2, 7])
    assert torch.allclose(weighted_chunked_ce(h, W, y, w), expect, rtol=1e-6)


def test_only_target_positions_reach_the_head():
    h, W, _, y, w = _case()
    sel_h, sel_y, sel_w = select_targets(h, y, w)
    assert sel_h.shape[0] == int(((y[:, 1:] != -100) & (w[:, 1:] != 0)).sum())
    # poison every non-target position: a head that saw them would return NaN
    poisoned = h.detach().clone()
    src_is_target = torch.zeros_like(y, dtype=torch.bool)
    src_is_target[:, :-1] = y[:, 1:] != -100
    poisoned[~src_is_target] = float("nan")
    poisoned.requires_grad_()
    loss = weighted_chunked_ce(poisoned, W, y, w, chunk_tokens=5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(poisoned.grad[~src_is_target] == 0) and torch.isfinite(poisoned.grad[src_is_target]).all()


def test_zero_weights_and_no_targets():
    h, W, _, y, w = _case()
    w0 = w.clone()
    w0[1] = 0  # row 1 has no weight: same as dropping it
    a = weighted_chunked_ce(h, W, y, w0)
    b = weighted_chunked_ce(h[:1], W, y[:1], w[:1])
    assert torch.allclose(a, b, rtol=1e-6)
    empty = weighted_chunked_ce(h, W, torch.full_like(y, -100), w)
    empty.backward()
    assert empty.item() == 0 and torch.all(h.grad == 0)


def test_frozen_head_gets_no_gradient_buffer():
    h, W, _, y, w = _case()
    W = W.detach()
    loss = weighted_chunked_ce(h, W, y, w, chunk_tokens=9)
    (g,) = torch.autograd.grad(loss, [h])
    ref = torch.autograd.grad(reference_weighted_ce(h @ W.t(), y, w), [h])[0]
    assert _rel(g, ref) < 1e-6


def test_bf16_autocast_close_to_fp32():
    h, W, _, y, w = _case(T=64, H=64, V=500)
    ref = weighted_chunked_ce(h, W, y, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = weighted_chunked_ce(h, W, y, w, chunk_tokens=16)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2


def test_model_loss_matches_hf_logits(smol_model_and_tokenizer):
    from longalign_lib.batching import collate_packed
    from longalign_lib.loss import model_loss

    model, tok = smol_model_and_tokenizer
    exs = []
    for i, (q, a) in enumerate([("Who was Ruth?", "A Moabite woman."), ("Name a river.", "The Jordan.")]):
        ids = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        exs.append({"input_ids": ids, "labels": [-100] * (len(ids) - 5) + ids[-5:], "idx": i})
    batch = collate_packed(exs, {0: 0.25, 1: 0.5})
    with torch.no_grad():
        loss, _ = model_loss(model, batch, chunk_tokens=3)
        ref = sum(reference_weighted_ce(model(torch.tensor([e["input_ids"]])).logits,
                                        torch.tensor([[-100] + e["labels"][1:]]),
                                        torch.full((1, len(e["labels"])), w)) for e, w in zip(exs, (0.25, 0.5), strict=False))
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    # the trainer's loss is this function, not a second implementation: same batch, bit-identical value and grads
    from longalign_lib.train import ChunkedLossLM

    head = model.get_output_embeddings().weight
    trained = ChunkedLossLM(model, chunk_tokens=3)(**batch)["loss"]
    (g_trained,) = torch.autograd.grad(trained, head)
    direct, _ = model_loss(model, batch, chunk_tokens=3)
    (g_direct,) = torch.autograd.grad(direct, head)
    assert torch.equal(trained, direct) and torch.equal(g_trained, g_direct)
    assert torch.equal(trained.detach(), loss)
