"""Cost model, synchronous data-parallel simulation, calibration, timing, and the `longalign pack` stage."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from longalign_lib.batching import MicroBatch, Plan, Step, plan_epoch
from longalign_lib.config import BatchConfig, load_config
from longalign_lib.io import LongAlignError
from longalign_lib.lengths import synthetic_longalign_sharegpt_mix
from longalign_lib.simulate import (
    CostModel,
    calibrate,
    compare_strategies,
    gantt_figure,
    measure_step_times,
    simulate,
)


def mb(rows, padded):
    return MicroBatch(packs=[list(range(len(r))) for r in rows], lengths=rows, n_target=rows, padded=padded,
                      capacity=100)


def test_cost_model_counts_padding_and_per_sequence_attention():
    cm = CostModel(a=1.0, b=0.01, c=0.5)
    # padded: 2 rows padded to 10 → 20 tokens computed, 2·10² attention
    assert cm.micro_batch(mb([[10], [4]], padded=True)) == pytest.approx(20 + 0.01 * 200 + 0.5)
    # packed: attention per sequence, no padding
    assert cm.micro_batch(mb([[10, 4]], padded=False)) == pytest.approx(14 + 0.01 * (100 + 16) + 0.5)
    assert cm.micro_batch(MicroBatch([], [], [], False, 100)) == 0.0


def test_simulation_idle_time_by_hand():
    cm = CostModel(a=1.0, b=0.0)
    steps = [Step(0, [[mb([[10]], True)], [mb([[4]], True)]]),  # rank 1 waits 6
             Step(1, [[mb([[5]], True)], [mb([[5]], True)]])]  # nobody waits
    plan = Plan("naive", "", 0, 0, 100, 1, 1, 2, steps, np.arange(4), np.zeros(4), np.zeros(4))
    s = simulate(plan, cm)
    assert s.total_time == pytest.approx(15)
    assert s.idle_per_rank.tolist() == pytest.approx([0.0, 6 / 15])
    assert s.idle_fraction == pytest.approx(3 / 15)


def test_calibrate_recovers_constants():
    rng = np.random.default_rng(0)
    true = CostModel(a=2e-4, b=3e-9, c=0.05)
    samples = []
    for _ in range(30):
        x = float(rng.integers(1000, 60000))
        x2 = x * x * rng.uniform(0.2, 1.0)
        samples.append((x, x2, true.a * x + true.b * x2 + true.c))
    fit = calibrate(samples)
    assert fit.a == pytest.approx(true.a, rel=1e-3) and fit.b == pytest.approx(true.b, rel=1e-3)
    assert fit.c == pytest.approx(true.c, rel=1e-2)
    with pytest.raises(LongAlignError, match="at least 6"):
        calibrate(samples[:5])


def test_calibrate_refuses_noise():
    """Notebook 03 once fitted a = b = 0 from 5 micro-batches of one size and told the learner to pass the result to
    `longalign pack`. Fails on the old code (it returned those constants)."""
    same_size = [(64.0, 4096.0, t) for t in (0.30, 0.21, 0.44, 0.25, 0.38, 0.29)]
    with pytest.raises(LongAlignError, match="distinct size"):
        calibrate(same_size)
    shrinking = [(x, x * x, 1.0 / x) for x in (100.0, 200.0, 300.0, 400.0, 500.0, 600.0)]  # slower when smaller
    with pytest.raises(LongAlignError, match="do not grow with the tokens"):
        calibrate(shrinking)


def test_packing_beats_naive_on_the_synthetic_longalign_mix():
    mix = synthetic_longalign_sharegpt_mix(1500, seed=3)
    lens, nt = mix.lengths, mix.n_target
    assert 0.4 < (lens < 4096).mean() < 0.6 and lens.max() <= 65536
    res = compare_strategies(lens, nt, BatchConfig(max_pack_tokens=65536, world_size=8))
    idle = {k: s.idle_fraction for k, (_, s) in res.items()}
    time_ = {k: s.total_time for k, (_, s) in res.items()}
    assert idle["packed-bfd"] < idle["naive"] / 2 and time_["packed-bfd"] < time_["naive"] / 2
    assert idle["packed-bfd+balance"] < idle["packed-bfd"]
    assert res["packed-bfd"][0].counters["fill_rate"] > res["packed-next_fit"][0].counters["fill_rate"]
    fig = gantt_figure([res[k][1] for k in ("naive", "packed-bfd")], max_steps=3)
    assert len(fig.axes) == 2


def test_measure_step_times_on_a_tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    rng = np.random.default_rng(0)
    rows = []
    for L in (12, 30, 7, 20, 9):
        ids = rng.integers(1, 50, L).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    for strategy in ("naive", "packed"):
        plan = plan_epoch([len(r["input_ids"]) for r in rows], None,
                          BatchConfig(strategy=strategy, max_pack_tokens=40, batch_size=2, grad_accum=2))
        t = measure_step_times(model, plan, rows, n_steps=1, warmup=1, repeats=3)
        n_mb = len(list(plan.steps[0].micro_batches()))
        assert len(t["micro"]) == n_mb and len(t["steps"]) == 1 and all(s > 0 for *_, s in t["micro"])
        assert t["tokens"] == plan.steps[0].tokens and t["tokens_per_s"] > 0
    with pytest.raises(LongAlignError, match="median of at least 3"):
        measure_step_times(model, plan, rows, n_steps=1, repeats=1)
    from longalign_lib.simulate import measure_plans

    plans = {s: plan_epoch([len(r["input_ids"]) for r in rows], None,
                           BatchConfig(strategy=s, max_pack_tokens=40, batch_size=2)) for s in ("naive", "packed")}
    both = measure_plans(model, plans, rows, n_steps=None, repeats=3)  # interleaved rounds, every step timed
    assert set(both) == {"naive", "packed"} and all(len(r) == 3 for t in both.values() for r in t["runs"])
    assert both["naive"]["tokens"] == both["packed"]["tokens"] == sum(len(r["input_ids"]) for r in rows)


def test_pack_stage_writes_plans_json_and_figures(tmp_path, smol_tokenizer):
    from longalign_lib.dataset import build_dataset, split_sample
    from longalign_lib.inputs import sample_path
    from longalign_lib.io import read_jsonl
    from longalign_lib.stages.pack import run as run_stage

    cfg = load_config("cpu-demo", ["batching.max_pack_tokens=1024", "batching.sim_world_size=4",
                                   "train.epochs=2"])
    build_dataset(split_sample(read_jsonl(sample_path())), smol_tokenizer, cfg.data, tmp_path / "tokenized")
    res = run_stage(cfg, tmp_path, argparse.Namespace(synthetic_n=300))
    info = json.loads((tmp_path / "batching.json").read_text())
    assert "stage-2 tokenized dataset" in info["data"]
    assert res.metrics["sequences"] == 5 and res.metrics["truncated"] == 3  # 3 long records > 1024 tokens
    for e in (0, 1):
        plan = json.loads((tmp_path / "plans" / f"plan_epoch{e}.json").read_text())
        ids = [i for step in plan["steps"] for rank in step for m in rank for p in m["packs"] for i in p]
        assert sorted(ids) == [0, 1, 2, 3, 4]
        assert all(sum(r) <= 1024 for step in plan["steps"] for rank in step for m in rank for r in m["lengths"])
    assert set(info["strategies_synthetic_64k"]) == {"naive", "sorted", "packed-next_fit", "packed-bfd",
                                                     "packed-bfd+balance"}
    for f in ("gantt", "idle", "pack_fill", "loss_weights"):
        assert (tmp_path / "figures" / f"{f}.png").stat().st_size > 10_000
