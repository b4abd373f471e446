"""Packed rows attend only inside their documents, on every backend: logits and gradients match one-by-one runs."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from longalign_lib import attention
from longalign_lib.io import LongAlignError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENS = [5, 11, 3, 8]
ARCHS = {
    "llama": lambda: LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, vocab_size=128, max_position_embeddings=256),
    "qwen2": lambda: Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 intermediate_size=96, vocab_size=128, max_position_embeddings=256),
}


def _model(arch: str, backend: str, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attention.PREFIX + backend)
    return m.to(device=device, dtype=dtype).eval()


def _docs(device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).to(device) for n in LENS]


def _packed_inputs(docs, explicit: bool):
    dev = docs[0].device
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d), device=dev) for d in docs])[None]
    kw = {"position_ids": pos, "use_cache": False}
    if explicit:
        cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        kw.update(attention.packed_kwargs(cu, max(len(d) for d in docs)))
    return ids, kw


def _compare(model, docs, explicit, grads: bool, tol: float):
    """Packed logits (and parameter gradients of a random projection of them) vs each document alone."""
    ids, kw = _packed_inputs(docs, explicit)
    vocab = model.config.vocab_size
    proj = torch.randn(ids.shape[1], vocab, generator=torch.Generator().manual_seed(3)).to(ids.device)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.set_grad_enabled(grads):
        packed = model(ids, **kw).logits[0]
        if grads:
            g_packed = torch.autograd.grad((packed.float() * proj).sum(), params)
        singles, start = [], 0
        g_single = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for d in docs:
            out = model(d[None], use_cache=False).logits[0]
            singles.append(out)
            if grads:
                gs = torch.autograd.grad((out.float() * proj[start:start + len(d)]).sum(), params)
                g_single = [a + b.float() for a, b in zip(g_single, gs, strict=False)]
            start += len(d)
    ref = torch.cat(singles).float()
    rel = ((packed.float() - ref).norm() / ref.norm()).item()
    assert rel <= tol, f"logits differ: rel {rel:.2e}"
    if grads:
        for p_name, a, b in zip([n for n, p in model.named_parameters() if p.requires_grad], g_packed, g_single, strict=False):
            r = ((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert r <= tol * 10, f"grad of {p_name} differs: rel {r:.2e}"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("explicit", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_packed_matches_one_by_one_cpu(arch, backend, explicit):
    _compare(_model(arch, backend), _docs(), explicit, grads=True, tol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_flex_forward_cpu(arch):
    # FlexAttention has no CPU backward; its forward (eager) must still isolate documents.
    _compare(_model(arch, "flex"), _docs(), True, grads=False, tol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_no_leak_and_the_detector_sees_one(backend):
    m = _model("llama", backend)
    docs = [d.tolist() for d in _docs()]
    assert attention.measure_leak(m, docs) < 1e-6
    # the detector is not blind: transformers' own SDPA path with the KV cache on mixes documents
    plain = AutoModelForCausalLM.from_config(ARCHS["llama"](), attn_implementation="sdpa").eval()
    plain.load_state_dict(m.state_dict())
    assert attention.measure_leak(plain, docs, use_cache=True) > 1e-3


def test_real_smollm2_packed(smol_model_and_tokenizer):
    model, tok = smol_model_and_tokenizer
    assert model.config._attn_implementation == "longalign_sdpa"
    texts = ["The LORD is my shepherd; I shall not want.", "Ruth said, Intreat me not to leave thee.",
             "In the beginning God created the heaven and the earth."]
    docs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    _compare(model, docs, True, grads=False, tol=1e-5)
    assert attention.measure_leak(model, [d.tolist() for d in docs]) < 1e-6


def test_padding_and_cache_fall_back_to_transformers_sdpa():
    m = _model("llama", "sdpa")
    ref = AutoModelForCausalLM.from_config(ARCHS["llama"](), attn_implementation="sdpa").eval()
    ref.load_state_dict(m.state_dict())
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as in batched generation
    with torch.no_grad():
        a = m(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)
        ga = m.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        gb = ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(ga, gb)


def test_resolve_implementation():
    assert attention.resolve_implementation("auto", "cpu") == "longalign_sdpa"
    assert attention.resolve_implementation("eager", "cpu") == "longalign_eager"
    with pytest.raises(LongAlignError, match="not available"):
        attention.resolve_implementation("varlen", "cpu")
    with pytest.raises(LongAlignError, match="choose"):
        attention.resolve_implementation("ring", "cpu")


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, mx = attention.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9] and mx == 4
    mask = attention.block_causal_mask(cu, 1, 9)[0, 0]
    assert mask[4, 3] and not mask[3, 2] and not mask[5, 4] and not mask[1, 2]


# ------------------------------------------------------------------------------------------------ GPU backends
GPU_BACKENDS = ["varlen", "flex", "sdpa", "eager"] + (["flash"] if "flash" in attention.available("cuda") else [])


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_packed_matches_one_by_one_gpu_bf16(arch, backend):
    m = _model(arch, backend, torch.bfloat16, "cuda")
    _compare(m, _docs("cuda"), True, grads=True, tol=2e-2)
    assert attention.measure_leak(m, [d.tolist() for d in _docs("cuda")]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "sdpa", "eager"])
def test_packed_matches_one_by_one_gpu_fp32(backend):
    m = _model("llama", backend, torch.float32, "cuda")
    _compare(m, _docs("cuda"), True, grads=True, tol=1e-5)


@pytest.mark.gpu
def test_varlen_long_rows_match_sdpa_gpu():
    # a realistic packed row: 3 documents, 4k tokens, bf16 — varlen vs our sdpa mask path
    torch.manual_seed(0)
    cfg = ARCHS["qwen2"]()
    cfg.max_position_embeddings = 8192
    lens = [1500, 2000, 596]
    docs = [torch.randint(0, 128, (n,), device="cuda") for n in lens]
    outs = []
    for backend in ("varlen", "sdpa"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention.PREFIX + backend)
        m = m.to("cuda", torch.bfloat16).eval()
        ids, kw = _packed_inputs(docs, True)
        with torch.no_grad():
            outs.append(m(ids, **kw).logits.float())
    rel = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert rel < 2e-2


def test_decode_step_mask_reads_the_padding_mask_once():
    """A decode step (q shorter than kv) leaves the skip decision to transformers' sdpa_mask: one host read of the
    mask per step, not two (the old isolating_mask read bool(mask.all()) first: 2 syncs per step on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    from longalign_lib.attention import isolating_mask

    ones = torch.ones(2, 6, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        out = isolating_mask(2, 1, 6, q_offset=5, attention_mask=ones)
    reads = sum(e.name == "aten::_local_scalar_dense" for e in p.events())
    assert out is None and reads == 1  # unpadded decode step: no mask, SDPA without one
    padded = ones.clone()
    padded[0, 0] = 0
    m = isolating_mask(2, 1, 6, q_offset=5, attention_mask=padded)
    assert m.shape[-1] == 6 and not bool(m[0, ..., 0].any()) and bool(m[1].all())
    assert isolating_mask(2, 6, 6, attention_mask=ones) is None  # full-length call, no padding: the backend's own path


def test_one_registration_loop_serves_both_prefixes():
    """BACKENDS are FUNCTIONS' keys; attention and sequence_parallel register through the same helper."""
    import doctest

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as MASKS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as FORWARDS

    from longalign_lib import sequence_parallel as sp

    assert attention.BACKENDS == tuple(attention.FUNCTIONS)
    wrapped = attention.register_backends("test_wrapped_", wrap=lambda fn: (lambda *a, **k: fn(*a, **k)))
    assert wrapped == [f"test_wrapped_{b}" for b in attention.BACKENDS]
    assert FORWARDS["test_wrapped_sdpa"] is not attention.sdpa_attention_forward
    assert MASKS["test_wrapped_sdpa"] is attention.isolating_mask
    assert attention.register() == [attention.PREFIX + b for b in attention.BACKENDS]
    assert FORWARDS["longalign_sdpa"] is attention.sdpa_attention_forward
    assert sp.register() == [sp.PREFIX + b for b in attention.BACKENDS]
    assert MASKS["longalign_sp_eager"] is attention.isolating_mask
    assert FORWARDS["longalign_sp_eager"].__name__ == "ulysses_eager_attention_forward"
    assert doctest.testmod(attention).failed == 0
