"""Ulysses sequence parallelism: a packed row split over 2 ranks (gloo, CPU) = the same row on one rank.

Two spawned processes (one spawn for the module: imports dominate the time) build the same tiny random models
(SmolLM2 architecture from toy_data.tiny_model_dir: 4 query heads with 2 KV heads, split; and with 1 KV head,
replicated) and compare, on every rank, the sequence-parallel run against the one-rank run of the same row:
logits, the weighted loss (summed over the group), every parameter gradient (summed over the group), document
isolation across the split, and the trainer's loss module. Failures are recorded, not raised, inside the workers
so that both ranks always run the same collectives; the tests below assert on the records.
"""
from __future__ import annotations

import json
import socket

import pytest
import torch

from longalign_lib import sequence_parallel as sp
from longalign_lib.io import LongAlignError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = [7, 12, 5, 9]  # 33 tokens: padded to 34, split 17 | 17; document 1 (tokens 7..18) straddles the split
CHECKS = [("exact", 2, "sdpa"), ("exact", 1, "sdpa"), ("isolation", 2, "eager"), ("trainer-module", 2, "sdpa")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(vocab: int, seed: int = 0):
    """One packed row of DOCS with prompts (no loss) and answers weighted 1/(M·N_i), as batching would."""
    from longalign_lib.batching import collate_packed

    g = torch.Generator().manual_seed(seed)
    exs, w = [], []
    for i, n in enumerate(DOCS):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        k = n // 2  # second half is the answer
        exs.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k:], "idx": i})
        w.append(1.0 / (len(DOCS) * k))
    return collate_packed(exs, w)


def _load(model_dir: str, attn: str):
    """The tiny model with random weights (seed 0: identical on every rank), wrapped for Ulysses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longalign_lib.attention import resolve_implementation

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32,
                                             attn_implementation=resolve_implementation(attn, "cpu"))
    assert sp.attach(model) == f"longalign_sp_{attn}"
    return model


def _decoder_kwargs(batch, group=None):
    from longalign_lib.attention import packed_kwargs

    kw = {"position_ids": batch["position_ids"], "use_cache": False,
          **packed_kwargs(batch["cu_seq_lens"], batch["max_seqlen"])}
    if group is not None:
        kw["sp_group"] = group
    return kw


class _Record:
    """Collects failed comparisons instead of raising (a rank that stopped early would hang the other one)."""

    def __init__(self):
        self.failures: list[str] = []

    def close(self, what, a, b, rtol, atol):
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        except AssertionError as e:
            self.failures.append(f"{what}: {str(e).splitlines()[0:3]}")

    def true(self, what, cond):
        if not cond:
            self.failures.append(what)


def _run_check(check, model, group, rec: _Record):
    import torch.distributed as dist

    from longalign_lib.loss import weighted_chunked_ce

    head = model.get_output_embeddings().weight
    row = _row(model.config.vocab_size)
    local = sp.shard_batch(row, group.rank, group.size)
    rec.true("slice shape", local["input_ids"].shape == (1, 17) and local["cu_seq_lens"].tolist()[-1] == 34)
    dec = model.get_decoder()
    if check == "exact":
        # one rank, the whole row (reference)
        h_ref = dec(input_ids=row["input_ids"], **_decoder_kwargs(row)).last_hidden_state
        logits_ref = model.lm_head(h_ref).detach()
        loss_ref = weighted_chunked_ce(h_ref, head, row["labels"], row["loss_weights"], chunk_tokens=5)
        loss_ref.backward()
        g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        # this rank's half of the row, attention exchanged over the group
        h = dec(input_ids=local["input_ids"], **_decoder_kwargs(local, group)).last_hidden_state
        logits = sp.gather_sequence(model.lm_head(h).detach(), group)[:, :sum(DOCS)]
        rec.close("logits", logits, logits_ref, 1e-5, 1e-5)
        loss = weighted_chunked_ce(h, head, local["shift_labels"], local["shift_weights"], chunk_tokens=5,
                                   shift=False)
        rec.true("this rank holds targets", float(loss) != 0.0)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        rec.close("loss", total, loss_ref.detach(), 1e-5, 1e-7)
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            rec.close(f"grad {n}", g, g_ref[n], 1e-4, 1e-6)
    elif check == "isolation":
        # change every token of document 0 (all on rank 0): nothing after it may move, on either rank
        other = dict(local)
        if group.rank == 0:
            ids = local["input_ids"].clone()
            ids[0, :DOCS[0]] = (ids[0, :DOCS[0]] + 1) % model.config.vocab_size
            other["input_ids"] = ids
        start = DOCS[0] if group.rank == 0 else 0
        with torch.no_grad():
            a = dec(input_ids=local["input_ids"], **_decoder_kwargs(local, group)).last_hidden_state
            b = dec(input_ids=other["input_ids"], **_decoder_kwargs(other, group)).last_hidden_state
            leak = float((a[0, start:] - b[0, start:]).abs().max())
            rec.true(f"documents after the changed one moved by {leak}", leak == 0.0)
            # control: the same exchange with the row taken as ONE document does leak (the check can fail)
            one = dict(local, cu_seq_lens=torch.tensor([0, 34], dtype=torch.int32), max_seqlen=34,
                       position_ids=torch.arange(17 * group.rank, 17 * group.rank + 17)[None])
            a = dec(input_ids=one["input_ids"], **_decoder_kwargs(one, group)).last_hidden_state
            b = dec(input_ids=other["input_ids"], **_decoder_kwargs(one, group)).last_hidden_state
            rec.true("control leaks", float((a[0, start:] - b[0, start:]).abs().max()) > 1e-4)
    elif check == "trainer-module":
        from longalign_lib.train import ChunkedLossLM

        ref = ChunkedLossLM(model, chunk_tokens=7)
        loss_ref = ref(**{k: row[k] for k in ("input_ids", "labels", "loss_weights", "position_ids", "cu_seq_lens",
                                              "max_seqlen")})["loss"]
        mod = ChunkedLossLM(model, chunk_tokens=7, sp_group=group)
        loss = mod(input_ids=local["input_ids"], position_ids=local["position_ids"],
                   shift_labels=local["shift_labels"], shift_weights=local["shift_weights"],
                   cu_seq_lens=local["cu_seq_lens"], max_seqlen=local["max_seqlen"])["loss"]
        total = loss.detach().clone()
        dist.all_reduce(total)
        rec.close("trainer loss", total, loss_ref.detach(), 1e-5, 1e-7)


def _worker(rank: int, world: int, port: int, dirs: dict, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        group = sp.init_groups(2)
        results["group"] = [] if (group.rank, group.size, group.dp_rank, group.dp_size) == (rank, 2, 0, 1) else \
            [f"group {group}"]
        for check, kv, attn in CHECKS:
            rec = _Record()
            _run_check(check, _load(dirs[kv], attn), group, rec)
            results[f"{check}-kv{kv}"] = rec.failures
    finally:
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    from longalign_lib import toy_data

    root = tmp_path_factory.mktemp("sp")
    dirs = {kv: str(toy_data.tiny_model_dir(root / f"kv{kv}", heads=4, kv_heads=kv)) for kv in (2, 1)}
    mp.spawn(_worker, args=(2, _free_port(), dirs, str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_ok(results, key):
    for r, res in enumerate(results):
        assert key in res, f"rank {r} did not run {key}"
        assert res[key] == [], f"rank {r}: {res[key]}"


@pytest.mark.parametrize("kv", [2, 1], ids=["gqa-kv-split", "kv-replicated"])
def test_split_row_matches_one_rank(sp_results, kv):
    """Logits, summed loss and summed gradients of the split row equal the one-rank run (fp32, 1e-5)."""
    _assert_ok(sp_results, "group")
    _assert_ok(sp_results, f"exact-kv{kv}")


def test_split_row_keeps_documents_isolated(sp_results):
    _assert_ok(sp_results, "isolation-kv2")


def test_trainer_loss_module_on_a_split_row(sp_results):
    _assert_ok(sp_results, "trainer-module-kv2")


def test_shard_batch_shifts_over_the_whole_row_and_pads():
    row = _row(50)
    t = sum(DOCS)
    parts = [sp.shard_batch(row, r, 3, pad_id=0) for r in range(3)]
    assert all(p["input_ids"].shape == (1, 11) for p in parts)  # 33 tokens = 3 × 11: no pad
    lab = torch.cat([p["shift_labels"] for p in parts], 1)
    w = torch.cat([p["shift_weights"] for p in parts], 1)
    assert torch.equal(lab[0, :t - 1], row["labels"][0, 1:]) and lab[0, -1] == -100
    assert torch.equal(w[0, :t - 1], row["loss_weights"][0, 1:])
    assert torch.equal(torch.cat([p["position_ids"] for p in parts], 1), row["position_ids"])
    four = [sp.shard_batch(row, r, 4, pad_id=7) for r in range(4)]  # 33 → 36: a pad document of 3 tokens
    assert four[3]["input_ids"][0, -3:].tolist() == [7, 7, 7] and four[3]["position_ids"][0, -3:].tolist() == [0, 1, 2]
    assert four[0]["cu_seq_lens"].tolist() == row["cu_seq_lens"].tolist() + [36]
    assert float(four[3]["shift_weights"][0, -4:].sum()) == 0.0


def test_clear_errors():
    with pytest.raises(LongAlignError, match="must divide"):
        sp.layout(3, 2, 0)
    with pytest.raises(LongAlignError, match="packed"):
        sp.shard_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, 0, 2)
    with pytest.raises(LongAlignError, match="KV heads"):
        sp.expand_kv(torch.zeros(1, 3, 4, 8), 2)
    with pytest.raises(LongAlignError, match="isolated backends"):
        sp.implementation_for("sdpa")
    assert sp.expand_kv(torch.zeros(1, 1, 4, 8), 4).shape[1] == 4
    with pytest.raises(LongAlignError, match="torchrun"):
        sp.init_groups(2)


FSDP2_ON_CPU = """
from tests.fsdp2_cpu import CpuFsdp2Trainer  # the Trainer's FSDP2 path on CPU, as in tests/test_parallel.py
if len(sys.argv) > 3 and sys.argv[3] == "fsdp2":
    train.LongAlignTrainer = CpuFsdp2Trainer
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_trainer_with_sequence_parallel_matches_one_process(smol_tokenizer, tmp_path, engine):
    """`train.sequence_parallel=2` on 2 processes (gloo, CPU; one data-parallel group), under DDP or the Trainer's
    FSDP2 path, reproduces the one-process run of the same plan: the logged step losses (step 2 after an optimizer
    step), the gradient norms and the tokens counted once per row."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from longalign_lib import toy_data
    from longalign_lib.formatting import format_records

    root = Path(__file__).resolve().parent.parent
    tiny = toy_data.tiny_model_dir(tmp_path / "tiny")
    recs = toy_data.verse_lookup_records(6, min_tokens=60, max_tokens=300, long_fraction=0.5, seed=3)
    exs, _ = format_records(recs, smol_tokenizer, max_length=4096)
    rows = [e.row() for e in exs]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(root)!r})
        from longalign_lib import train
        from longalign_lib.config import load_config
    """) + FSDP2_ON_CPU + textwrap.dedent(f"""
        cfg = load_config("cpu-demo", ["model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0",
                          "model.device=cpu", "train.epochs=1", "train.max_steps=2",
                          "batching.world_size=1", "batching.grad_accum=2", "batching.max_pack_tokens=700",
                          "train.sequence_parallel=" + sys.argv[2]])
        rows = json.load(open({str(tmp_path / "rows.json")!r}))
        res = train.train(cfg, sys.argv[1], dataset=rows, save_model=False)
        hist = [h for h in res["trainer"].state.log_history if "grad_norm" in h]
        if res["trainer"].is_world_process_zero():
            json.dump({{"loss": [r["loss"] for r in res["log"]], "tokens": [r["tokens"] for r in res["log"]],
                        "grad_norm": [h["grad_norm"] for h in hist], "attn": res["attn"], "engine": res["engine"]}},
                      open(sys.argv[1] + "/out.json", "w"))
        train.finish_distributed()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "1"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", str(worker), str(tmp_path / "two"), "2", engine], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "out.json").read_text())
    b = json.loads((tmp_path / "two" / "out.json").read_text())
    assert b["attn"] == "longalign_sp_sdpa" and a["attn"] == "longalign_sdpa" and b["engine"] == engine
    assert len(a["loss"]) == len(b["loss"]) == 2
    assert b["tokens"] == a["tokens"]  # counted once per group, not once per GPU
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # step 2 also checks the optimizer step matched
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_plan_knows_a_row_costs_T_over_N_per_gpu():
    from longalign_lib.batching import CostModel, plan_epoch
    from longalign_lib.config import BatchConfig

    lengths = [300, 900, 250, 700, 120, 640, 480, 999]
    cfg = BatchConfig(strategy="packed", max_pack_tokens=1000, world_size=1, grad_accum=2, balance="cost", cost_c=0.5)
    one = plan_epoch(lengths, None, cfg)
    two = plan_epoch(lengths, None, cfg, sequence_parallel=2)
    assert [s.ranks for s in two.steps] == [s.ranks for s in one.steps]  # same rows: only the cost per GPU halves
    longest = max(mb.tokens for mb in two.micro_batches())
    assert two.counters["max_tokens_per_gpu"] == sp.tokens_per_gpu(longest, 2) and "sequence_parallel" not in one.counters
    mb = next(iter(two.micro_batches()))
    c1, c2 = CostModel.from_config(cfg), CostModel.from_config(cfg, sequence_parallel=2)
    assert c2.micro_batch(mb) - cfg.cost_c == pytest.approx((c1.micro_batch(mb) - cfg.cost_c) / 2)
