"""LongAlignTrainer: exact step losses for any grouping of a step's sequences, bit-exact resume, logs, LoRA, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from longalign_lib import batching, throughput, toy_data, train
from longalign_lib.config import load_config
from longalign_lib.loss import reference_weighted_ce

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny, *sets):
    return load_config("cpu-demo", [f"model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0",
                                    "train.epochs=1", "model.device=cpu", "data.mix_sample=false", *sets])


def _model(tiny):
    from longalign_lib.models import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer(f"random:{tiny}", dtype="fp32", device="cpu")


def _reference_step(model, rows):
    """Mean over sequences of each sequence's mean target-token CE, one sequence at a time (no packing)."""
    total = 0.0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        lab = torch.tensor([r["labels"]])
        lab[0, 0] = -100
        n = int((lab[0, 1:] != -100).sum())
        total = total + reference_weighted_ce(model(ids, use_cache=False).logits, lab) / n
    return total / len(rows)


@pytest.mark.parametrize("sets", [
    ["batching.strategy=packed", "batching.max_pack_tokens=4096", "batching.grad_accum=1"],
    ["batching.strategy=packed", "batching.max_pack_tokens=700", "batching.grad_accum=6"],
    ["batching.strategy=naive", "batching.batch_size=2", "batching.grad_accum=3"],
    ["batching.strategy=sorted", "batching.batch_size=3", "batching.grad_accum=2"],
    ["batching.strategy=packed", "batching.max_pack_tokens=700", "batching.grad_accum=2", "batching.world_size=3"],
], ids=["one-row", "packed-accum", "naive-padded", "sorted", "3-ranks-simulated"])
def test_step_loss_and_grads_do_not_depend_on_grouping(tiny, rows, sets):
    model, tok = _model(tiny)
    cfg = _cfg(tiny, "batching.loss_reduction=sequence", "batching.overlong=truncate", *sets)
    plans = batching.make_plans(rows, cfg.batching, 1.0)
    if cfg.batching.world_size > 1:
        plans = [train._flatten_ranks(p) for p in plans]
    assert len(plans[0].steps) == 1, "all six sequences in one optimizer step"
    pb = train.PlanBatches(plans, rows, 0, "sequence", tok.pad_token_id)
    wrapper = train.ChunkedLossLM(model, chunk_tokens=7)
    params = [p for p in model.parameters()]
    loss = 0.0
    for i in range(len(pb)):
        batch = dict(pb[i])
        batch.pop("meta")
        loss = loss + wrapper(**batch)["loss"]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = _reference_step(model, rows)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    for g, r in zip(grads, ref_grads, strict=False):
        if r is not None:
            assert ((g - r).norm() / r.norm().clamp_min(1e-12)).item() < 1e-4


def test_resume_is_bit_exact(tiny, rows, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    sets = ["train.max_steps=4", "train.save_steps=2", "batching.max_pack_tokens=600", "batching.grad_accum=1",
            "train.lr=1e-3", "train.warmup_ratio=0.25"]
    full = train.train(_cfg(tiny, *sets), tmp_path / "full", save_model=False)
    part = train.train(_cfg(tiny, *sets), tmp_path / "part", save_model=False, callbacks=[StopAt()])
    assert [r["step"] for r in part["log"]] == [1, 2]
    resumed = train.train(_cfg(tiny, *sets), tmp_path / "part", resume=True, save_model=False)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    a = full["trainer"].model.lm.state_dict()
    b = resumed["trainer"].model.lm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    assert [r["loss"] for r in full["log"]] == [r["loss"] for r in resumed["log"]]
    assert [r["lr"] for r in full["log"]] == [r["lr"] for r in resumed["log"]]


def test_cli_stage_logs_and_saves(tiny, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "longalign_lib.cli", "train", "--preset", "cpu-demo", "--run-dir",
                        str(run_dir), "--set", f"model.name=random:{tiny}", "--set", "train.max_steps=2",
                        "--set", "train.save_steps=2", "--set", "model.device=cpu"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "LONGALIGN_HOME": os.environ["LONGALIGN_HOME"]}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "fill", "M", "K", "peak_mem_gib", "tflops"):
        assert key in rows[0] and rows[0][key] == rows[0][key]  # present, not NaN
    assert rows[0]["M"] >= rows[0]["K"] >= 1 and 0 < rows[0]["fill"] <= 1 and rows[0]["mfu"] > 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "figures" / "train_loss.png").exists()
    assert (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert "tokenized it first" in summary["info"]["data"] and summary["plans_from_pack"] is None


def test_trains_from_the_stage2_dataset(tiny, smol_tokenizer, tmp_path):
    from longalign_lib.dataset import build_dataset

    # a dataset built elsewhere is named by data.tokenized_dir and trained as it is
    cfg = _cfg(tiny, "train.max_steps=1", "batching.max_pack_tokens=1024", "data.max_length=1024",
               f"data.tokenized_dir={tmp_path / 'mine'}")
    recs = toy_data.verse_lookup_records(5, min_tokens=60, max_tokens=200, seed=5)
    ds, _ = build_dataset(recs, smol_tokenizer, cfg.data, tmp_path / "mine", num_proc=1)
    res = train.train(cfg, tmp_path / "run", save_model=False)
    assert res["data"].startswith("stage-2 tokenized dataset") and str(tmp_path / "mine") in res["data"]
    assert len(ds) == 5 and sum(p["planned_items"] for p in res["plans"]) == 5
    assert res["log"][0]["M"] >= 1 and res["log"][0]["loss"] > 0


def test_trained_micro_batches_are_the_plans_pack_wrote(tiny, tmp_path):
    """The stage-3/stage-4 seam: `longalign train` runs exactly the micro-batches of the plan files `pack` wrote."""
    from argparse import Namespace

    from longalign_lib.io import read_json, write_jsonl
    from longalign_lib.pipeline import run_one

    run = tmp_path / "run"
    write_jsonl(run / "long.jsonl", toy_data.verse_lookup_records(9, min_tokens=60, max_tokens=250, seed=7))
    cfg = _cfg(tiny, "train.epochs=2", "batching.max_pack_tokens=600", "batching.grad_accum=2", "data.max_length=1024")
    run_one("pack", cfg, run, Namespace(synthetic_n=64))  # tokenizes long.jsonl first (the one stage-2 resolver)
    trainer, info = train.build_trainer(cfg, run, quiet=True)
    assert info["plans_from_pack"] is True
    pb, ds = trainer.plan_batches, trainer.plan_batches.dataset
    files = [read_json(batching.plan_path(run, e)) for e in (0, 1)]
    planned = [mb for f in files for step in f["steps"] for mb in step[0]]
    trained = [i for i, ref in enumerate(pb.refs) if ref.micro >= 0]
    assert len(trained) == len(planned) > 2
    for i, want in zip(trained, planned, strict=True):
        ref = pb.refs[i]
        assert pb.plans[ref.plan].steps[ref.step].ranks[0][ref.micro].to_dict() == want
        (row,) = want["packs"]  # one packed row per micro-batch; every record fits (no truncation, no pieces)
        assert pb[i]["input_ids"][0].tolist() == [t for j in row for t in ds[j]["input_ids"]]
    # a changed setting plans differently: train says the plans on disk are not what it trains
    _, other = train.build_trainer(_cfg(tiny, "train.epochs=2", "batching.max_pack_tokens=600", "batching.grad_accum=2",
                                        "data.max_length=1024", "batching.seed=1"), run, quiet=True)
    assert other["plans_from_pack"] is False


def test_lora_trains_only_adapters_and_saves_merged(tiny, rows, tmp_path):
    cfg = _cfg(tiny, "model.lora=true", "model.lora_r=4", "train.max_steps=2", "batching.max_pack_tokens=600",
               "train.lr=1e-2")
    res = train.train(cfg, tmp_path / "lora", dataset=rows)
    lm = res["trainer"].model.lm
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    saved = json.loads((tmp_path / "lora" / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    assert not list((tmp_path / "lora" / "model").glob("adapter_*"))  # merged, loads like any model


def test_rope_base_scaling_and_positions(tiny):
    cfg = _cfg(tiny, "model.rope_base_factor=200", "model.max_position_embeddings=65536")
    base = json.loads((Path(tiny) / "config.json").read_text())
    theta = base.get("rope_theta") or base.get("rope_parameters", {}).get("rope_theta")
    model, _, _ = train.load_model_for_training(cfg, "cpu")
    c = model.config
    new = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    assert new == pytest.approx(theta * 200) and c.max_position_embeddings == 65536


def test_flops_counter_counts_attention_quadratically(tiny):
    model, _ = _model(tiny)
    f = throughput.flops_counter(model, trainable_head=True, full_ft=True)
    one, two = f([1000], 0), f([500, 500], 0)
    assert one > two  # same tokens, one long document: more attention work
    assert f([1000], 10) > f([1000], 0)


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tiny, rows, tmp_path):
    """2 processes (gloo, CPU) reproduce the single-process run of the same 2-rank plan: loss and gradient norm."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from longalign_lib import batching, throughput, toy_data, train
        from longalign_lib.config import load_config
        cfg = load_config("cpu-demo", ["model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0", "model.device=cpu",
                          "train.epochs=1", "train.max_steps=1", "batching.world_size=2", "batching.grad_accum=1",
                          "batching.max_pack_tokens=700"])
        rows = json.load(open({str(data)!r}))
        res = train.train(cfg, sys.argv[1], dataset=rows, save_model=False)
        hist = [h for h in res["trainer"].state.log_history if "grad_norm" in h]
        if res["trainer"].is_world_process_zero():
            json.dump({{"loss": res["log"][0]["loss"], "grad_norm": hist[0]["grad_norm"]}}, open(sys.argv[1] + "/out.json", "w"))
        train.finish_distributed()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                          str(worker), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "out.json").read_text())
    b = json.loads((tmp_path / "two" / "out.json").read_text())
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["varlen", "flex"])
def test_gpu_bf16_training_loss_falls(tiny, rows, tmp_path, attn):
    cfg = load_config("gpu-small", [f"model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0",
                                    "train.epochs=6", "train.lr=2e-3", "train.warmup_ratio=0", "batching.grad_accum=1",
                                    "batching.max_pack_tokens=1024", f"model.attn_implementation={attn}"])
    res = train.train(cfg, tmp_path / attn, dataset=rows, save_model=False)
    assert res["attn"] == f"longalign_{attn}" and res["bf16"] and res["device"] == "cuda"
    log = res["log"]
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.95 * first  # a 2-layer random model on 6 records: it falls by ~10% in 12 steps
    assert log[-1]["peak_mem_gib"] > 0 and log[-1]["mfu"] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_logged_loss_is_the_step_loss_under_ddp(tiny, rows, tmp_path):
    """2 gloo processes: transformers' own logged `loss` (every logging_steps) and `train_loss` (the run's mean,
    including steps after the last log) are the step loss of train_log.jsonl — on every rank, not divided by W."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from longalign_lib import train
        from longalign_lib.config import load_config
        cfg = load_config("cpu-demo", ["model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0",
                          "model.device=cpu", "train.epochs=3", "train.max_steps=3",
                          "train.logging_steps=2", "batching.world_size=2", "batching.grad_accum=2",
                          "batching.max_pack_tokens=400", "train.lr=1e-3"])
        rows = json.load(open({str(data)!r}))
        res = train.train(cfg, sys.argv[1], dataset=rows, save_model=False)
        t = res["trainer"]
        json.dump({{"history": t.state.log_history, "log": res["log"]}},
                  open(sys.argv[1] + f"/out{{t.args.process_index}}.json", "w"))
        train.finish_distributed()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", str(worker), str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / "two" / f"out{rank}.json").read_text())
        steps = [r["loss"] for r in out["log"]]  # train_log.jsonl: the step loss (all ranks, all micro-batches)
        assert len(steps) == 3 and min(steps) > 1.0
        logged = [h["loss"] for h in out["history"] if "loss" in h]
        (final,) = [h["train_loss"] for h in out["history"] if "train_loss" in h]
        print(f"rank {rank}: step losses {steps}, transformers loss {logged}, train_loss {final}")
        assert logged == [pytest.approx((steps[0] + steps[1]) / 2, rel=1e-6)]
        assert final == pytest.approx(sum(steps) / 3, rel=1e-6)


def test_step_weights_count_targets_as_the_loss_sees_them(tiny, rows):
    """Rows handed to the trainer with a target at position 0 (never trained: nothing precedes it) and an n_target
    that counts it: every sequence still weighs 1/M, and a row whose only target is at position 0 is no sequence."""
    data = []
    for r in rows[:3]:
        labels = [r["input_ids"][0], *r["labels"][1:]]
        data.append({**r, "labels": labels, "n_target": sum(y != -100 for y in labels)})
    r = rows[3]
    data.append({**r, "labels": [r["input_ids"][0]] + [-100] * (r["length"] - 1), "n_target": 1})
    cfg = _cfg(tiny, "batching.loss_reduction=sequence", "batching.max_pack_tokens=4096", "batching.grad_accum=1")
    plans = batching.make_plans(data, cfg.batching, 1.0)
    pb = train.PlanBatches(plans, data, 0, "sequence", 0)
    assert pb.n_steps == 1
    per_seq = []  # each planned sequence's share of the step loss: the sum of its tokens' weights
    for i in range(len(pb)):
        b = pb[i]
        cu = b["cu_seq_lens"].tolist()
        per_seq += [float(b["loss_weights"][0, cu[k]:cu[k + 1]].sum()) for k in range(len(cu) - 1)]
    print(f"M = {pb.step_stats(0, 0)['M']}, weight per sequence {sorted(per_seq)}")
    assert pb.step_stats(0, 0)["M"] == 3
    assert sorted(per_seq) == pytest.approx([1 / 3] * 3, rel=1e-6)


def test_split_rows_share_a_step_and_ranks_stay_in_lockstep(tiny, rows):
    """overlong=split into 40-token rows on a 2-rank plan: a long record's pieces land in one optimizer step (a step
    larger than world × grad_accum when needed), both ranks run the same number of micro-steps per step (DDP
    lockstep), and each step's token weights, over both ranks, sum to 1 (Eq. 2: every record counts once)."""
    cfg = _cfg(tiny, "batching.overlong=split", "batching.max_pack_tokens=40", "batching.world_size=2",
               "batching.grad_accum=1", "batching.split_overlap=8")
    plans = batching.make_plans(rows, cfg.batching, 1.0)
    assert plans[0].counters["split"] == len(rows) and plans[0].counters["oversized_steps"] > 0
    pbs = [train.PlanBatches(plans, rows, r, "sequence", 0) for r in (0, 1)]
    assert pbs[0].grad_accum == pbs[1].grad_accum > 1 and len(pbs[0]) == len(pbs[1])
    for si, step in enumerate(plans[0].steps):
        ids = step.item_ids
        assert len({int(plans[0].source[i]) for i in ids}) == pbs[0].step_stats(0, si)["M"]
        total = sum(float(pb[k]["loss_weights"].sum()) for pb in pbs for k in range(len(pb))
                    if pb.refs[k].step == si)
        assert total == pytest.approx(1.0, rel=1e-5)
    every = sorted(int(plans[0].source[i]) for s in plans[0].steps for i in s.item_ids)
    assert sorted(set(every)) == list(range(len(rows)))
