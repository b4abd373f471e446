"""Batch planners, over-long policy, exact step loss weights and collators (longalign_lib/batching.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longalign_lib.batching import (
    IGNORE,
    best_fit_decreasing,
    collate,
    collate_packed,
    collate_padded,
    effective_sequence_weights,
    keep_ranges,
    loss_weight_figure,
    materialize,
    next_fit,
    plan_epoch,
    step_token_weights,
)
from longalign_lib.config import BatchConfig
from longalign_lib.io import LongAlignError
from longalign_lib.lengths import synthetic_longalign_sharegpt_mix
from longalign_lib.loss import reference_weighted_ce


def cfg_(**kw) -> BatchConfig:
    return dataclasses.replace(BatchConfig(), **kw)


def reference_bfd(lengths, cap):
    """Textbook best-fit-decreasing, O(n · packs)."""
    loads, packs = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        best = None
        for b, load in enumerate(loads):
            if load + lengths[i] <= cap and (best is None or load > loads[best]):
                best = b
        if best is None:
            loads.append(0)
            packs.append([])
            best = len(loads) - 1
        loads[best] += lengths[i]
        packs[best].append(i)
    return packs


def pack_loads(packs, lengths):
    return sorted(sum(lengths[i] for i in p) for p in packs)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=80), st.integers(100, 160))
def test_bfd_matches_textbook_bfd(lengths, cap):
    packs = best_fit_decreasing(np.array(lengths), cap)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= cap for p in packs)
    # packs with equal room are interchangeable, so any tie-break gives the same multiset of pack loads
    assert pack_loads(packs, lengths) == pack_loads(reference_bfd(lengths, cap), lengths)


def test_next_fit_keeps_order_and_capacity():
    packs = next_fit(np.array([5, 4, 3, 8, 1, 1]), 10)
    assert packs == [[0, 1], [2], [3, 4, 5]]


def longalign_mix(n, seed=0, cap=65536):
    """The cookbook's one synthetic LongAlign-10k + ShareGPT length mix, as (lengths, target tokens)."""
    mix = synthetic_longalign_sharegpt_mix(n, seed=seed, max_length=cap)
    return mix.lengths, mix.n_target


def test_bfd_fills_98_percent_at_64k_and_beats_next_fit():
    lens, nt = longalign_mix(5000)
    bfd = plan_epoch(lens, nt, cfg_(strategy="packed", packer="bfd", max_pack_tokens=65536))
    nf = plan_epoch(lens, nt, cfg_(strategy="packed", packer="next_fit", max_pack_tokens=65536))
    assert bfd.counters["fill_rate"] >= 0.98
    assert nf.counters["fill_rate"] < bfd.counters["fill_rate"] - 0.05
    assert bfd.counters["planned_items"] == nf.counters["planned_items"] == 5000


@pytest.mark.parametrize("strategy,packer,mode", [("naive", "bfd", "fixed"), ("sorted", "bfd", "fixed"),
                                                  ("sorted", "bfd", "token_budget"), ("packed", "bfd", "fixed"),
                                                  ("packed", "next_fit", "fixed")])
@pytest.mark.parametrize("balance", ["none", "cost"])
def test_plans_cover_every_sequence_once_and_are_deterministic(strategy, packer, mode, balance):
    lens, nt = longalign_mix(300, seed=1, cap=8192)
    c = cfg_(strategy=strategy, packer=packer, sorted_mode=mode, max_pack_tokens=8192, batch_size=3,
             grad_accum=2, world_size=4, balance=balance, seed=7)
    p0, p0b, p1 = plan_epoch(lens, nt, c, 0), plan_epoch(lens, nt, c, 0), plan_epoch(lens, nt, c, 1)
    ids = [i for s in p0.steps for i in s.item_ids]
    assert sorted(ids) == list(range(300))
    assert [s.item_ids for s in p0.steps] == [s.item_ids for s in p0b.steps]
    assert [s.item_ids for s in p0.steps] != [s.item_ids for s in p1.steps]
    for s in p0.steps[:-1]:
        assert len(s.ranks) == 4 and all(len(r) == 2 for r in s.ranks)
    for mb in p0.micro_batches():
        if strategy == "packed":
            assert all(sum(r) <= 8192 for r in mb.lengths) and len(mb.packs) <= 3
        elif mode == "token_budget":
            assert len(mb.packs) * max(mb.row_lengths) <= 3 * 8192
        else:
            assert len(mb.packs) <= 3 and all(len(r) == 1 for r in mb.packs)
    if strategy == "sorted" and mode == "fixed":  # sorted groups are runs of the sorted order: little padding
        naive = plan_epoch(lens, nt, dataclasses.replace(c, strategy="naive"))
        assert p0.counters["padding_fraction"] < naive.counters["padding_fraction"] / 3


def test_cost_balance_reduces_modelled_idle_time():
    from longalign_lib.simulate import CostModel, simulate

    lens, nt = longalign_mix(3000, seed=2)
    c = cfg_(strategy="packed", max_pack_tokens=65536, world_size=8, grad_accum=2, balance="none")
    cm = CostModel.from_config(c)
    plain = simulate(plan_epoch(lens, nt, c), cm)
    bal = simulate(plan_epoch(lens, nt, dataclasses.replace(c, balance="cost")), cm)
    assert bal.idle_fraction < plain.idle_fraction * 0.7
    assert bal.total_time < plain.total_time
    # the default (auto) balances by cost whenever the plan has several ranks, and does nothing on one
    auto = plan_epoch(lens, nt, dataclasses.replace(c, balance=BatchConfig().balance))
    assert simulate(auto, cm).idle_fraction == bal.idle_fraction
    one = dataclasses.replace(c, world_size=1, balance=BatchConfig().balance)
    assert plan_epoch(lens, nt, one).to_dict() == plan_epoch(lens, nt, dataclasses.replace(one, balance="none")).to_dict()


# ------------------------------------------------------------------------------------------------- over-long
def test_keep_ranges():
    assert keep_ranges(10, 20, "middle") == [(0, 10)]
    assert keep_ranges(100, 10, "right") == [(0, 10)]
    assert keep_ranges(100, 10, "middle") == [(0, 5), (95, 100)]


@pytest.mark.parametrize("policy,side", [("truncate", "right"), ("truncate", "middle"), ("skip", "right"),
                                         ("split", "right")])
def test_overlong_policies_are_counted_and_exact(policy, side):
    rng = np.random.default_rng(0)
    rows = []
    for L in [30, 5, 12, 25, 8]:
        labels = [IGNORE] * (L // 2) + list(rng.integers(1, 50, L - L // 2))
        rows.append({"input_ids": list(rng.integers(1, 50, L)), "labels": labels})
    lens = [len(r["input_ids"]) for r in rows]
    nt = [sum(x != IGNORE for x in r["labels"]) for r in rows]
    p = plan_epoch(lens, nt, cfg_(strategy="packed", max_pack_tokens=10, overlong=policy, truncate_side=side),
                   labels=[r["labels"] for r in rows])
    c = p.counters
    assert c["overlong"] == 3
    if policy == "skip":
        assert c["skipped_overlong"] == 3 and sorted(i for s in p.steps for i in s.item_ids) == [1, 4]
    elif policy == "truncate":
        assert c["truncated"] == 3 and all(p.lengths[i] in (0, 10) for i in (0, 2, 3))
        # right truncation of row 0 (15 prompt tokens, then the answer) leaves no target: skipped, counted
        dropped = [i for i in (0, 2, 3) if p.lengths[i] == 0]
        assert c["skipped_no_target"] == len(dropped) and (0 in dropped) == (side == "right")
    else:
        # pieces after the first repeat the token before them (split_overlap=1): 30 → 4 pieces, 12 → 2, 25 → 3
        assert c["split"] == 3 and c["pieces"] == 4 + 2 + 3
        assert len(p.lengths) == 5 + 6 and p.lengths.max() <= 10  # ids 5.. are the later pieces of the long rows
        # pieces that hold only prompt tokens have nothing to learn: dropped and counted
        assert c["skipped_no_target"] == int((p.lengths == 0).sum()) >= 2
    # recorded target counts equal what the collator actually weights
    for s in p.steps:
        for mb in s.micro_batches():
            exs = materialize(p, mb, rows)
            assert [len(e["input_ids"]) for e in exs] == [p.lengths[i] for r in mb.packs for i in r]
            b = collate_packed(exs, 1.0)
            assert int((b["loss_weights"] > 0).sum()) == sum(p.n_target[i] for r in mb.packs for i in r)
    if policy == "truncate" and side == "middle":
        ex = materialize(p, next(mb for mb in p.micro_batches() if 0 in mb.packs[0] or any(0 in r for r in mb.packs)),
                         rows)
        ex0 = next(e for e in ex if e["idx"] == 0)
        assert ex0["input_ids"] == rows[0]["input_ids"][:5] + rows[0]["input_ids"][-5:]


def test_bad_settings_raise_clear_errors():
    with pytest.raises(LongAlignError, match="batching.strategy"):
        plan_epoch([10], [5], cfg_(strategy="greedy"))
    with pytest.raises(LongAlignError, match="n_target has 1 entries"):
        plan_epoch([10, 20], [5], cfg_())
    with pytest.raises(LongAlignError, match="loss reduction"):
        step_token_weights(plan_epoch([10], [5], cfg_()).steps[0], None, "mean")


# --------------------------------------------------------------------------------------------- loss weighting
def random_rows(lengths, rng):
    """Dataset rows whose input_ids encode (row, position), labels with random target spans, per-token losses."""
    rows, losses = [], []
    for r, L in enumerate(lengths):
        labels = [int(x) if rng.random() < 0.6 else IGNORE for x in rng.integers(1, 100, L)]
        if all(x == IGNORE for x in labels[1:]):
            labels[-1] = 7
        labels[0] = IGNORE
        rows.append({"input_ids": [r * 10_000 + t for t in range(L)], "labels": labels})
        losses.append(rng.uniform(0, 5, L))
    return rows, losses


def step_loss_through_collators(plan, step, rows, losses, reduction, source=None):
    """Σ over every micro-batch of every rank of Σ_t loss_weights[t] · loss(token t), via the real collators."""
    w = step_token_weights(step, plan.n_target, reduction, source)
    total = 0.0
    for mb in step.micro_batches():
        b = collate(plan, mb, rows, w, pad_id=0)
        ids, lw, att = b["input_ids"], b["loss_weights"].double(), b.get("attention_mask")
        for row in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if lw[row, t] and (att is None or att[row, t]):
                    code = int(ids[row, t])
                    total += float(lw[row, t]) * losses[code // 10_000][code % 10_000]
    return total


def per_sequence_mean(ids, rows, losses):
    means = []
    for i in ids:
        lab = np.array(rows[i]["labels"])
        m = lab[1:] != IGNORE
        means.append(losses[i][1:][m].mean())
    return float(np.mean(means))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(2, 60), min_size=1, max_size=40), st.sampled_from(["naive", "sorted", "nf", "bfd"]),
       st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(60, 150), st.integers(0, 10**6))
def test_sequence_reduction_is_layout_invariant(lengths, layout, bs, accum, world, cap, seed):
    rng = np.random.default_rng(seed)
    rows, losses = random_rows(lengths, rng)
    strategy = {"nf": "packed", "bfd": "packed"}.get(layout, layout)
    c = cfg_(strategy=strategy, packer="next_fit" if layout == "nf" else "bfd", batch_size=bs, grad_accum=accum,
             world_size=world, max_pack_tokens=cap, seed=seed)
    plan = plan_epoch([len(r["input_ids"]) for r in rows], None if False else
                      [sum(x != IGNORE for x in r["labels"][1:]) for r in rows], c)
    for step in plan.steps:
        ids = step.item_ids
        got = step_loss_through_collators(plan, step, rows, losses, "sequence")
        assert got == pytest.approx(per_sequence_mean(ids, rows, losses), abs=1e-6, rel=1e-6)
        # token: the mean over every target token of the step
        tok = np.concatenate([losses[i][1:][np.array(rows[i]["labels"][1:]) != IGNORE] for i in ids]).mean()
        assert step_loss_through_collators(plan, step, rows, losses, "token") == pytest.approx(tok, abs=1e-6)
        # every reduction gives each sequence's mean a share that sums to one
        for red in ("token", "pack_mean", "sequence"):
            assert sum(effective_sequence_weights(step, red, plan.n_target).values()) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(3, 50), min_size=2, max_size=30), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 10**6))
def test_pack_mean_is_eq3(lengths, accum, world, seed):
    """pack_mean = (1/P) Σ_packs (Σ losses in pack / Σ targets in pack) — the paper's Eq. 3 — not Eq. 2."""
    rng = np.random.default_rng(seed)
    rows, losses = random_rows(lengths, rng)
    c = cfg_(strategy="packed", max_pack_tokens=100, grad_accum=accum, world_size=world, seed=seed)
    plan = plan_epoch([len(r["input_ids"]) for r in rows], [sum(x != IGNORE for x in r["labels"][1:]) for r in rows], c)
    for step in plan.steps:
        packs = [p for mb in step.micro_batches() for p in mb.packs]
        eq3 = np.mean([sum(losses[i][1:][np.array(rows[i]["labels"][1:]) != IGNORE].sum() for i in p)
                       / sum(plan.n_target[i] for i in p) for p in packs])
        assert step_loss_through_collators(plan, step, rows, losses, "pack_mean") == pytest.approx(eq3, abs=1e-6)


def test_pack_mean_bias_is_visible():
    """Two packs: a lone sequence, and three sharing one pack. Eq. 3 gives the lone one half the step;
    Eq. 2 gives every sequence a quarter."""
    [{"input_ids": list(range(8)), "labels": [IGNORE] + [1] * 7} for _ in range(4)]
    c = cfg_(strategy="packed", max_pack_tokens=24, world_size=1, grad_accum=2)
    plan = plan_epoch([8, 8, 8, 8], None, c)
    (step,) = plan.steps
    sizes = sorted(len(p) for mb in step.micro_batches() for p in mb.packs)
    assert sizes == [1, 3]
    lone = next(p[0] for mb in step.micro_batches() for p in mb.packs if len(p) == 1)
    pm = effective_sequence_weights(step, "pack_mean", plan.n_target)
    sq = effective_sequence_weights(step, "sequence", plan.n_target)
    assert pm[lone] == pytest.approx(0.5) and all(v == pytest.approx(1 / 6) for k, v in pm.items() if k != lone)
    assert all(v == pytest.approx(0.25) for v in sq.values())


def test_collators_shapes_and_boundaries():
    exs = [{"input_ids": [1, 2, 3], "labels": [5, 2, 3], "idx": 4}, {"input_ids": [7, 8], "labels": [IGNORE, 8], "idx": 9}]
    b = collate_packed(exs, {4: 0.5, 9: 2.0})
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5] and b["cu_seq_lens"].dtype == torch.int32
    assert b["max_seqlen"] == 3
    assert b["loss_weights"].tolist() == [[0.0, 0.5, 0.5, 0.0, 2.0]]
    p = collate_padded(exs, [0.5, 2.0], pad_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3], [7, 8, 0]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert p["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, 8, IGNORE]]
    assert p["loss_weights"].tolist() == [[0.0, 0.5, 0.5], [0.0, 2.0, 0.0]]
    with pytest.raises(LongAlignError, match="no loss weight for item 9"):
        collate_packed(exs, {4: 1.0})


# --------------------------------------------------------------------------------------------------- gradients
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    conf._attn_implementation = "sdpa"
    return LlamaForCausalLM(conf).float()


def test_packed_sequence_gradients_equal_unpacked_per_sequence_mean():
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(5, 40, 11)]
    rows = []
    for L in lengths:
        ids = [int(x) for x in rng.integers(1, 97, L)]
        start = int(rng.integers(1, L - 1))
        rows.append({"input_ids": ids, "labels": [IGNORE] * start + ids[start:]})
    nt = [sum(x != IGNORE for x in r["labels"][1:]) for r in rows]
    c = cfg_(strategy="packed", packer="bfd", max_pack_tokens=64, grad_accum=2, world_size=3, seed=1)
    plan = plan_epoch(lengths, nt, c)
    step = plan.steps[0]
    assert step.n_sequences >= 4 and max(len(p) for mb in step.micro_batches() for p in mb.packs) > 1

    model = tiny_llama()
    w = step_token_weights(step, plan.n_target, "sequence")
    for mb in step.micro_batches():  # all ranks' micro-batches: the trainer's step loss is their SUM
        b = collate(plan, mb, rows, w)
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        reference_weighted_ce(out.logits, b["labels"], b["loss_weights"]).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ids = step.item_ids
    ref = 0.0
    for i in ids:  # unpacked: each sequence alone, its mean target loss, averaged over the step's M sequences
        x = torch.tensor([rows[i]["input_ids"]])
        y = torch.tensor([rows[i]["labels"]])
        logits = model(input_ids=x, use_cache=False).logits
        ref = ref + torch.nn.functional.cross_entropy(logits[0, :-1], y[0, 1:], ignore_index=IGNORE) / len(ids)
    ref.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-5, rtol=0), (n, (packed[n] - p.grad).abs().max())


def test_token_balance_and_drop_last():
    lens, nt = longalign_mix(203, seed=5, cap=16384)
    c = cfg_(strategy="naive", max_pack_tokens=16384, world_size=4, grad_accum=2, balance="tokens")
    p = plan_epoch(lens, nt, c)
    assert sorted(i for s in p.steps for i in s.item_ids) == list(range(203))
    # within a step, the heaviest rank carries at most the heaviest micro-batch more than the lightest one
    for s in p.steps[:-1]:
        loads = [sum(mb.computed_tokens for mb in r) for r in s.ranks]
        assert max(loads) - min(loads) <= max(mb.computed_tokens for mb in s.micro_batches())
        assert all(len(r) == 2 for r in s.ranks)
    d = plan_epoch(lens, nt, dataclasses.replace(c, drop_last=True, balance="none"))
    assert d.counters["dropped_micro_batches"] == 203 % 8 and len(d.steps) == 203 // 8
    assert all(len(r) == 2 for s in d.steps for r in s.ranks)


# ------------------------------------------------------------------------------------- cuts and split sequences
def test_middle_truncation_never_trains_across_the_cut():
    """A 30-token answer cut to 10 in the middle: head [0, 5) and tail [25, 30) sit side by side with consecutive
    positions, but token 25 never followed token 4, so it is no target; the plan's count is what the loss sees."""
    row = {"input_ids": list(range(100, 130)), "labels": [IGNORE, *range(101, 130)]}
    p = plan_epoch([30], [29], cfg_(strategy="packed", max_pack_tokens=10, overlong="truncate",
                                    truncate_side="middle"), labels=[row["labels"]])
    (mb,) = list(p.micro_batches())
    b = collate_packed(materialize(p, mb, [row]), 1.0)
    assert b["input_ids"][0].tolist() == [*range(100, 105), *range(125, 130)]
    trained = [int(t) for t, w in zip(b["input_ids"][0], b["loss_weights"][0], strict=True) if w > 0]
    print(f"trained after the cut: {[t for t in trained if t >= 125]}; plan n_target {int(p.n_target[0])}")
    assert trained == [*range(101, 105), *range(126, 130)] and int(p.n_target[0]) == len(trained) == 8


def test_stage2_middle_truncation_cuts_inside_a_prompt(smol_tokenizer):
    """formatting's middle truncation cuts inside the longest prompt run: the token after its cut is a prompt token."""
    from longalign_lib.formatting import format_record

    rec = {"messages": [{"role": "user", "content": "word " * 600 + "Now answer."},
                        {"role": "assistant", "content": "A short answer."}]}
    full = format_record(rec, smol_tokenizer)
    ex = format_record(rec, smol_tokenizer, max_length=200, truncation="middle")
    k = next(j for j in range(len(ex.input_ids)) if ex.input_ids[j] != full.input_ids[j])  # first token after the cut
    assert ex.labels[k] == IGNORE and ex.labels[k - 1] == IGNORE and ex.n_target == full.n_target


def test_split_sequence_counts_once_in_one_step():
    """Eq. 2 counts a sequence once: a 25-token row (24 targets) split into pieces of at most 10 tokens next to an
    8-token row takes half of the step loss (not 3/4, as three sequences of its own would); each of its 24 targets
    is trained exactly once: every piece after the first repeats the token before it as context, never as target."""
    rows = [{"input_ids": list(range(1000, 1025)), "labels": [IGNORE, *range(1001, 1025)]},
            {"input_ids": list(range(2000, 2008)), "labels": [IGNORE, *range(2001, 2008)]}]
    p = plan_epoch([25, 8], [24, 7], cfg_(strategy="packed", max_pack_tokens=10, overlong="split", grad_accum=4),
                   labels=[r["labels"] for r in rows])
    (step,) = p.steps
    assert p.counters["pieces"] == 3 and p.n_sequences(step) == 2
    assert step.n_sequences == 2 and step.n_items == 4  # a7eda25: Step.n_sequences said 4
    w = step_token_weights(step, p.n_target, "sequence", source=p.source)
    trained, share, firsts = {}, {1: 0.0, 2: 0.0}, []
    for mb in step.micro_batches():
        b = collate_packed(materialize(p, mb, rows), w)
        cu = b["cu_seq_lens"].tolist()
        firsts += [int(b["input_ids"][0, a]) for a in cu[:-1]]
        for t, x in zip(b["input_ids"][0].tolist(), b["loss_weights"][0].tolist(), strict=True):
            if x > 0:
                trained[t] = trained.get(t, 0) + 1
                share[t // 1000] += x
    print(f"share of the step loss: split row {share[1]:.4f}, other row {share[2]:.4f}")
    assert share[1] == pytest.approx(0.5) and share[2] == pytest.approx(0.5)
    assert sorted(trained) == [*range(1001, 1025), *range(2001, 2008)] and set(trained.values()) == {1}
    assert sorted(firsts) == [1000, 1009, 1018, 2000]  # pieces 2 and 3 start with the token before their targets


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(2, 120), min_size=1, max_size=25), st.sampled_from(["naive", "sorted", "nf", "bfd"]),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(12, 40), st.integers(1, 6),
       st.booleans(), st.integers(0, 10**6))
def test_split_sequences_are_eq2_sequences(lengths, layout, bs, accum, world, cap, overlap, balance, seed):
    """With overlong=split, every step's `sequence` loss through the real collators is Eq. 2 over the ORIGINAL rows:
    all pieces of a row share its step, each original target is trained once, every row counts once in M."""
    rng = np.random.default_rng(seed)
    rows, losses = random_rows(lengths, rng)
    strategy = {"nf": "packed", "bfd": "packed"}.get(layout, layout)
    c = cfg_(strategy=strategy, packer="next_fit" if layout == "nf" else "bfd", batch_size=bs, grad_accum=accum,
             world_size=world, max_pack_tokens=cap, overlong="split", split_overlap=min(overlap, cap - 1), seed=seed,
             balance="cost" if balance else "none")
    plan = plan_epoch([len(r["input_ids"]) for r in rows], [sum(x != IGNORE for x in r["labels"][1:]) for r in rows],
                      c, labels=[r["labels"] for r in rows])
    step_of = {}
    for k, step in enumerate(plan.steps):
        for i in step.item_ids:
            assert step_of.setdefault(int(plan.source[i]), k) == k, "a split row's pieces landed in two steps"
        sources = sorted({int(plan.source[i]) for i in step.item_ids})
        got = step_loss_through_collators(plan, step, rows, losses, "sequence", source=plan.source)
        assert got == pytest.approx(per_sequence_mean(sources, rows, losses), abs=1e-6, rel=1e-6)
    assert sorted(step_of) == list(range(len(rows)))


def test_loss_weight_figure_counts_a_split_sequence_once():
    """Fails on a7eda25: the figure titled the step "M = 4 sequences" and gave the three pieces of the long
    sequence 1/4 each under `sequence` (3/4 together), where Eq. 2 gives that sequence 1/2."""
    p = plan_epoch([25, 8], [24, 7], cfg_(strategy="packed", max_pack_tokens=10, overlong="split", grad_accum=4))
    (step,) = p.steps
    fig = loss_weight_figure(step, p.n_target)
    ax = fig.axes[0]
    assert "M = 2 sequences" in ax.get_title()
    seq_bars = ax.containers[2]  # token, pack_mean, sequence
    long_pieces = [i for i in step.item_ids if int(p.source[i]) == 0]
    heights = dict(zip(step.item_ids, [b.get_height() for b in seq_bars], strict=True))
    assert len(long_pieces) == 3 and sum(heights[i] for i in long_pieces) == pytest.approx(0.5)
    import matplotlib.pyplot as plt

    plt.close(fig)

def test_pack_mix_window_brings_back_mixed_steps_at_a_small_fill_cost():
    """Global BFD sorts by length: its rows are long-only or short-only, so its steps are as biased as sorted
    batching (notebook 03). pack_mix=window (BFD inside shuffled windows of one step's tokens) gives steps as mixed
    as next-fit's for a few points of fill. Fails before pack_mix existed (BatchConfig has no such field)."""
    from longalign_lib.batching import step_shares

    mix = synthetic_longalign_sharegpt_mix(800, seed=3)
    long_ = mix.source == "long"
    c = BatchConfig(strategy="packed", packer="bfd", max_pack_tokens=65536, world_size=8, balance="none", seed=1)
    plans = {k: plan_epoch(mix.lengths, mix.n_target, dataclasses.replace(c, **kw)) for k, kw in {
        "bfd": {}, "window": {"pack_mix": "window"}, "next_fit": {"packer": "next_fit"}}.items()}
    std = {k: float(np.std(step_shares(p, long_))) for k, p in plans.items()}
    fill = {k: p.counters["fill_rate"] for k, p in plans.items()}
    assert std["bfd"] > 3 * std["window"] and std["window"] < 1.5 * std["next_fit"], std
    assert fill["bfd"] > fill["window"] > 0.93 > fill["next_fit"], fill
    assert sorted(plans["window"].steps[0].item_ids + [i for s in plans["window"].steps[1:] for i in s.item_ids]) \
        == list(range(800))
    with pytest.raises(LongAlignError, match="pack_mix"):
        plan_epoch(mix.lengths, mix.n_target, dataclasses.replace(c, pack_mix="stratified"))


def test_collate_packed_doctest_shows_one_packed_row():
    """The token-layout picture in collate_packed's docstring is checked by its doctest (and the module's others)."""
    import doctest

    from longalign_lib import batching

    examples = doctest.DocTestFinder().find(batching.collate_packed)[0].examples
    assert any("position_ids" in e.source for e in examples)
    assert doctest.testmod(batching).failed == 0
