"""kernels.py: the checkpointing planner and its probe, per-layer checkpointing, the fused-kernel switch and its
plain fallback (CPU); on a GPU: Liger kernels change no result (plain vs Liger, packed vs one-by-one, grouping)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from longalign_lib import attention, batching, kernels, train
from longalign_lib.config import load_config
from longalign_lib.io import LongAlignError
from longalign_lib.loss import reference_weighted_ce

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = {
    "llama": lambda **kw: LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                                                max_position_embeddings=4096), **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                num_key_value_heads=1, intermediate_size=96, vocab_size=128,
                                                max_position_embeddings=4096), **kw}),
}


def _model(arch="qwen2", backend="sdpa", device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(ARCHS[arch](**kw), attn_implementation=attention.PREFIX + backend)
    return m.to(device=device, dtype=dtype)


def _rows(lengths, vocab=128, seed=0):
    """Token rows whose last third is target (what stage 2 writes: input_ids, labels, length, n_target)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        k = max(1, n // 3)
        rows.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k:], "length": n, "n_target": k})
    return rows


# ------------------------------------------------------------------------------------------------- the planner
def test_parse_setting():
    assert kernels.parse_setting("auto", 28) == "auto"
    assert kernels.parse_setting("all", 28) == 28 and kernels.parse_setting("none", 28) == 0
    assert kernels.parse_setting("12", 28) == 12 and kernels.parse_setting(0, 28) == 0
    assert kernels.parse_setting(None, 28) == 0  # `--set train.activation_checkpointing=none` arrives as None
    for bad in ("29", "-1", "half", "1.5"):
        with pytest.raises(LongAlignError, match="activation_checkpointing"):
            kernels.parse_setting(bad, 28)


def test_plan_takes_the_fewest_layers_that_fit():
    gib = kernels.GIB
    # 1.5B-like numbers at 32k: 28 layers of 3 GiB, 0.19 GiB boundary, 17 GiB weights + Adam, 5.7 GiB grads
    mem = kernels.MemoryModel(n_layers=28, layer_bytes=3 * gib, boundary_bytes=0.19 * gib, static_bytes=17 * gib,
                              grad_bytes=5.7 * gib, loss_bytes=5 * gib)
    plan = kernels.plan_checkpointing("auto", mem, 80 * gib)
    k = plan.n_checkpointed
    assert 0 < k < 28 and plan.checkpointed == list(range(k))
    limit = kernels.PLAN_SAFETY * 80 * gib
    assert mem.peak(k) <= limit < mem.peak(k - 1)  # the fewest: one layer less would not fit
    assert plan.predicted_peak_gib == pytest.approx(mem.peak(k) / gib)
    assert kernels.plan_checkpointing("auto", mem, 200 * gib).n_checkpointed == 0  # the whole card: none
    tight = kernels.plan_checkpointing("auto", mem, 20 * gib)
    assert tight.n_checkpointed == 28 and "exceeds" in tight.note
    assert kernels.plan_checkpointing("7", mem, 80 * gib).checkpointed == list(range(7))
    assert kernels.plan_checkpointing("auto", None, None, n_layers=5).n_checkpointed == 5  # no budget: all
    fields = plan.log_fields()
    assert fields["ckpt_layers"] == k and fields["ckpt_of"] == 28 and fields["mem_budget_gib"] == 80.0


def test_probe_extrapolates_saved_bytes_linearly():
    # the probe runs one document per row: plain causal SDPA on CPU, which saves O(T) like the GPU kernels
    m = _model("llama", "sdpa", num_hidden_layers=2)
    predicted, elem = kernels.measure_layer_bytes(m, 384, probe_tokens=96)
    measured, _ = kernels._saved_bytes(m, 384, None)
    assert elem == 4
    assert max(measured) > 0
    assert predicted == pytest.approx(max(measured), rel=0.15)
    small, _ = kernels.measure_layer_bytes(m, 96, probe_tokens=48)
    assert predicted > 2 * small  # grows with the row


def test_partial_checkpointing_gives_the_same_gradients():
    rows = _rows([40, 25, 30])
    grads = {}
    for setting in ("none", "2", "all"):
        m = _model("llama", "sdpa")
        plan = kernels.plan_checkpointing(setting, None, None, n_layers=3)
        kernels.apply_checkpointing(m, plan)
        flags = [layer.gradient_checkpointing for layer in kernels.decoder_layers(m)]
        assert flags == [i < plan.n_checkpointed for i in range(3)]
        m.train()
        loss = 0.0
        for r in rows:
            lab = torch.tensor([r["labels"]])
            loss = loss + reference_weighted_ce(m(torch.tensor([r["input_ids"]]), use_cache=False).logits, lab)
        loss.backward()
        grads[setting] = [p.grad.clone() for p in m.parameters()]
    for setting in ("2", "all"):
        for a, b in zip(grads["none"], grads[setting], strict=False):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_fused_kernels_fall_back_to_plain_on_cpu(capsys):
    m = _model()
    before = type(m.model.layers[0].mlp).forward
    for setting in ("auto", "liger"):
        choice = kernels.apply_fused_kernels(m, setting, device="cpu")
        assert choice.backend == "plain" and "CUDA" in choice.note
    assert "plain PyTorch path" in capsys.readouterr().err
    assert kernels.apply_fused_kernels(m, "none", "cpu").backend == "plain"
    assert kernels.apply_fused_kernels(m, None, "cuda").backend == "plain"  # --set train.fused_kernels=none
    assert m.model.layers[0].mlp.forward.__func__ is before  # nothing was swapped
    with pytest.raises(LongAlignError, match="fused_kernels"):
        kernels.apply_fused_kernels(m, "triton", "cpu")
    ok, why = kernels.liger_status("cuda", "gpt2")
    assert not ok and "gpt2" in why


@pytest.mark.skipif(kernels.liger_status("cuda")[0], reason="liger-kernel is installed here")
def test_explicit_liger_without_the_package_is_one_clear_error():
    with pytest.raises(LongAlignError, match="liger-kernel"):
        kernels.apply_fused_kernels(_model(), "liger", device="cuda")


def test_trainer_logs_the_plan(tmp_path):
    m = _model("llama", "sdpa", num_hidden_layers=4)
    rows = _rows([200, 150, 300, 250])
    sets = ["train.tensorboard=false", "train.save_steps=0", "train.epochs=1", "model.device=cpu",
            "train.gradient_checkpointing=true", "train.activation_checkpointing=auto",
            "batching.max_pack_tokens=512", "batching.grad_accum=1"]
    mem = kernels.memory_model(m, 512)
    mid = (mem.peak(0) + mem.peak(4)) / 2 / kernels.GIB  # a budget that fits some kept layers but not all
    cfg = load_config("cpu-demo", sets + [f"train.memory_budget_gib={mid}"])
    res = train.train(cfg, tmp_path / "run", model=m, tok=None, dataset=rows, device="cpu", save_model=False)
    row = res["log"][0]
    assert row["kernels"] == "plain" and row["ckpt_of"] == 4 and 0 < row["ckpt_layers"] < 4
    plan = res["checkpointing"]
    assert plan["budget_gib"] == pytest.approx(mid) and plan["predicted_peak_gib"] <= mid
    assert row["mem_budget_gib"] == pytest.approx(mid, abs=1e-3)
    assert res["checkpointing"]["checkpointed"] == list(range(row["ckpt_layers"]))
    flags = [layer.gradient_checkpointing for layer in kernels.decoder_layers(m)]
    assert sum(flags) == row["ckpt_layers"]
    off = load_config("cpu-demo", sets[:4] + ["train.gradient_checkpointing=false", "batching.max_pack_tokens=512"])
    res = train.train(off, tmp_path / "off", model=m, tok=None, dataset=rows, device="cpu", save_model=False)
    assert res["log"][0]["ckpt_layers"] == 0 and not any(x.gradient_checkpointing for x in kernels.decoder_layers(m))


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def restore_transformers():
    """Liger swaps RoPE (and layer classes) in transformers' modeling modules process-wide: undo after a test."""
    import transformers.models.llama.modeling_llama as ml
    import transformers.models.qwen2.modeling_qwen2 as mq

    saved = {mod: dict(vars(mod)) for mod in (ml, mq)}
    yield
    for mod, d in saved.items():
        for k, v in d.items():
            setattr(mod, k, v)


def _liger(m):
    choice = kernels.apply_fused_kernels(m, "liger", device="cuda")
    assert choice.backend == "liger" and {"rope", "rms_norm", "swiglu"} <= set(choice.ops)
    return m


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
def test_liger_matches_plain_gpu(arch, restore_transformers):
    m = _model(arch, "sdpa", "cuda")
    ids = torch.randint(0, 128, (1, 300), device="cuda")
    outs = []
    for step in ("plain", "liger"):
        if step == "liger":
            _liger(m)
        m.zero_grad()
        logits = m(ids, use_cache=False).logits
        (logits.float() ** 2).mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters()]))
    (a, ga), (b, gb) = outs
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    for x, y in zip(ga, gb, strict=False):
        assert ((x - y).norm() / x.norm().clamp_min(1e-12)).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("backend,dtype,tol", [("varlen", torch.bfloat16, 2e-2), ("sdpa", torch.float32, 1e-5)])
def test_packed_matches_one_by_one_with_liger_gpu(arch, backend, dtype, tol, restore_transformers):
    from tests.test_attention import _compare, _docs

    m = _liger(_model(arch, backend, "cuda", dtype).eval())
    _compare(m, _docs("cuda"), True, grads=True, tol=tol)
    assert attention.measure_leak(m, [d.tolist() for d in _docs("cuda")]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("sets", [
    ["batching.strategy=packed", "batching.max_pack_tokens=4096", "batching.grad_accum=1"],
    ["batching.strategy=packed", "batching.max_pack_tokens=300", "batching.grad_accum=6"],
    ["batching.strategy=naive", "batching.batch_size=2", "batching.grad_accum=3"],
], ids=["one-row", "packed-accum", "naive-padded"])
def test_step_loss_does_not_depend_on_grouping_with_liger_gpu(sets, restore_transformers):
    m = _liger(_model("qwen2", "sdpa", "cuda"))
    rows = _rows([120, 250, 60, 200, 90, 150])
    cfg = load_config("cpu-demo", ["batching.loss_reduction=sequence", *sets])
    plans = batching.make_plans(rows, cfg.batching, 1.0)
    assert len(plans[0].steps) == 1
    pb = train.PlanBatches(plans, rows, 0, "sequence", 0)
    wrapper = train.ChunkedLossLM(m, chunk_tokens=64)
    loss = 0.0
    for i in range(len(pb)):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pb[i].items() if k != "meta"}
        loss = loss + wrapper(**batch)["loss"]
    params = list(m.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = 0.0
    for r in rows:
        lab = torch.tensor([r["labels"]], device="cuda")
        lab[0, 0] = -100
        n = int((lab[0, 1:] != -100).sum())
        ref = ref + reference_weighted_ce(m(torch.tensor([r["input_ids"]], device="cuda"), use_cache=False).logits,
                                          lab) / n
    ref = ref / len(rows)
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    for g, r in zip(grads, ref_grads, strict=False):
        assert ((g - r).norm() / r.norm().clamp_min(1e-12)).item() < 1e-4


@pytest.mark.gpu
def test_budgeted_checkpointing_fits_its_budget_gpu(tmp_path, restore_transformers):
    m = _model("qwen2", "varlen", "cuda", hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=2, intermediate_size=2816, vocab_size=32000, max_position_embeddings=16384)
    _liger(m)
    tokens = 8192
    mem = kernels.measured_memory(m, tokens, autocast_dtype=torch.bfloat16)
    assert mem.forward_slope > 0 and mem.peak(0) > mem.peak(8)
    budget = (mem.peak(0) + mem.peak(8)) / 2 / kernels.GIB
    rows = _rows([tokens // 4] * 8, vocab=32000)
    cfg = load_config("gpu-small", ["train.tensorboard=false", "train.save_steps=0", "train.epochs=1",
                                    "train.max_steps=3", "train.activation_checkpointing=auto",
                                    f"train.memory_budget_gib={budget}", f"batching.max_pack_tokens={tokens}",
                                    "batching.grad_accum=1"])
    res = train.train(cfg, tmp_path / "run", model=m, tok=None, dataset=rows, device="cuda", save_model=False)
    log = res["log"]
    k = log[0]["ckpt_layers"]
    assert 0 < k < 8 and log[0]["kernels"] == "liger"
    peak = max(r["peak_mem_gib"] for r in log)
    print(f"budget {budget:.2f} GiB, predicted {log[0]['mem_predicted_gib']:.2f}, measured {peak:.2f}, k={k}")
    assert peak <= budget
    assert peak >= 0.8 * log[0]["mem_predicted_gib"]  # nor wildly pessimistic
    assert log[-1]["loss"] == log[-1]["loss"]


def test_docstring_examples():
    import doctest

    assert doctest.testmod(kernels).failed == 0


def test_measured_memory_runs_real_steps_and_restores_the_model(monkeypatch):
    """The CUDA planner's probe, wired on CPU: two real forward + loss + backward steps (all layers checkpointed,
    then the last two kept) with the device's memory counters replaced by a scripted sequence."""
    peaks = iter([100.0, 120.0, 140.0, 130.0])  # forward/backward peaks: all checkpointed, then two layers kept
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)

    def fake_peak(*a, **k):
        seen.append([layer.gradient_checkpointing for layer in kernels.decoder_layers(m)])
        return next(peaks)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake_peak)
    m = _model("llama", "sdpa", num_hidden_layers=4)
    kernels.apply_checkpointing(m, kernels.plan_checkpointing("1", None, None, n_layers=4))
    m.eval()
    mem = kernels.measured_memory(m, 96, chunk_tokens=32)
    assert seen[0] == [True] * 4 and seen[2] == [True, True, False, False]  # what each probe step ran with
    assert mem.forward_slope == 20.0 and mem.backward_slope == 5.0 and mem.forward_all == 100.0
    n_params = sum(p.numel() for p in m.parameters())
    assert mem.optimizer_bytes == 2 * 4 * n_params  # AdamW's two fp32 moments
    assert mem.peak(4) == mem.optimizer_bytes + 120.0 and mem.peak(0) == mem.optimizer_bytes + 180.0
    assert [layer.gradient_checkpointing for layer in kernels.decoder_layers(m)] == [True, False, False, False]
    assert not m.training and all(p.grad is None for p in m.parameters())
    plan = kernels.plan_checkpointing("auto", mem, (mem.optimizer_bytes + 150.0) / kernels.PLAN_SAFETY)
    assert plan.checkpointed == [0, 1]  # two kept layers: 100 + 2·20 ≤ 150; three: 100 + 3·20 > 150
