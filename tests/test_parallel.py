"""parallel.py: FSDP2 (fully_shard, gloo on CPU) reproduces the single-process step exactly; loss scales; export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from longalign_lib import parallel, train
from longalign_lib.config import load_config

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    """A port no other job holds now: CI runs two pytest workers, and fixed ports let two torchrun jobs meet."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(tiny):
    # one optimizer step whose plan gives each of 2 ranks one packed micro-batch; lr large enough to move weights
    return [f"model.name=random:{tiny}", "train.tensorboard=false", "train.save_steps=0", "model.device=cpu",
            "train.epochs=1", "train.max_steps=1", "batching.world_size=2",
            "batching.grad_accum=1", "batching.max_pack_tokens=700", "train.lr=1e-3", "train.warmup_ratio=0",
            "train.matmul_tflops=1", "train.max_grad_norm=1.0"]


WORKER = """
import json, sys, torch
from transformers import Trainer
from longalign_lib import parallel, train
from longalign_lib.config import load_config
out, sets = sys.argv[1], json.loads(sys.argv[2])
rows = json.load(open(out + "/rows.json"))
cfg = load_config("cpu-demo", sets)
# the real engine's pieces: model (same seed), this rank's plan micro-batches, the Trainer's optimizer settings
trainer, info = train.build_trainer(cfg, out, dataset=rows, device="cpu", quiet=True)
model, pb, args = trainer.model, trainer.plan_batches, trainer.args
parallel.shard_model(model)                      # one FSDP2 unit per decoder layer + the root, as accelerate does
summed = parallel.sum_gradients(model)
scale = parallel.loss_scale("fsdp2", args.world_size, pb.grad_accum, summed)
opt_cls, opt_kw = Trainer.get_optimizer_cls_and_kwargs(args, model)
opt = opt_cls(model.parameters(), **opt_kw)
loss = 0.0
for i in range(pb.grad_accum):
    batch = dict(pb[i]); batch.pop("meta")
    l = model(**batch)["loss"]
    (l * scale).backward()
    loss += float(l.detach())
torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
opt.step()
tot = torch.tensor([loss], dtype=torch.float64)
torch.distributed.all_reduce(tot)
state = parallel.full_state_dict(trainer)
if torch.distributed.get_rank() == 0:
    torch.save(state, out + "/params.pt")
    json.dump({"loss": tot.item(), "summed": summed, "scale": scale, "micro": pb.grad_accum,
               "sharded": [type(m).__name__ for m in parallel.fsdp_modules(model)]}, open(out + "/out.json", "w"))
train.finish_distributed()
"""


def test_fsdp2_step_equals_single_process_accumulation(tiny, rows, tmp_path):
    """2 gloo processes, fully_shard per layer, summing reduce-scatter == 1 process, grad_accum 2, same plan."""
    sets = _sets(tiny)
    ref = train.train(load_config("cpu-demo", sets), tmp_path / "one", dataset=rows, save_model=False, quiet=True)
    assert ref["grad_accum"] == 2 and len(ref["log"]) == 1  # the 2-rank plan flattened: 2 micro-batches here
    ref_loss = ref["log"][0]["loss"]
    ref_params = {f"lm.{k}": v.detach() for k, v in ref["trainer"].model.lm.state_dict().items()}

    two = tmp_path / "two"
    two.mkdir()
    (two / "rows.json").write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                        str(worker), str(two), json.dumps(sets)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((two / "out.json").read_text())
    assert got["summed"] and got["scale"] == 1.0 and got["micro"] == 1  # one micro-batch per rank, sums reduced
    assert len(got["sharded"]) == 3  # 2 decoder layers + the root
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
    params = torch.load(two / "params.pt")
    moved = 0
    for k, v in ref_params.items():
        assert k in params, k
        torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(v, params[k]))
    init = train.load_model_for_training(load_config("cpu-demo", sets), "cpu")[0].state_dict()
    changed = sum(not torch.equal(init[k[3:]], v) for k, v in ref_params.items())
    assert changed >= len(ref_params) // 2  # the step moved the weights, so equal weights mean equal updates


def test_loss_scale_undoes_each_engines_averaging():
    assert parallel.loss_scale("single", 1, 4) == 1.0
    assert parallel.loss_scale("ddp", 2, 4) == 2.0  # all-reduce mean over ranks; accumulation is summed locally
    assert parallel.loss_scale("fsdp2", 8, 2) == 8.0  # reduce-scatter mean, when it could not be set to sum
    assert parallel.loss_scale("fsdp2", 8, 2, summed=True) == 1.0
    assert parallel.loss_scale("deepspeed", 4, 3) == 12.0  # ZeRO mean over ranks and 1/grad_accum per micro-batch
    with pytest.raises(ValueError):
        parallel.loss_scale("horovod", 2, 1)


def test_idle_stats_from_busy_times():
    s = parallel.idle_stats([3.0, 1.0, 2.0, 3.0])
    assert s["idle_s"] == [0.0, 2.0, 1.0, 0.0] and s["idle_frac"] == pytest.approx(3 / 12)


def test_export_rebuilds_a_loadable_model_and_merges_lora(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from longalign_lib.models import load_model_and_tokenizer

    torch.manual_seed(0)
    lm, _ = load_model_and_tokenizer(f"random:{tiny}", dtype="fp32", device="cpu")
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained adapter (B starts at zero)
    rebuilt = parallel.rebuild_on_cpu(peft_lm, {k: v.clone() for k, v in peft_lm.state_dict().items()})
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        want = peft_lm(ids).logits
        got = rebuilt(ids).logits
    assert not hasattr(rebuilt, "peft_config")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


TRAINER_WORKER = """
import json, os, sys, torch
from transformers import TrainerCallback
from longalign_lib import parallel, train
from longalign_lib.config import load_config
from tests.fsdp2_cpu import CpuFsdp2Trainer


class StopAt2(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            control.should_training_stop = True


train.LongAlignTrainer = CpuFsdp2Trainer
out, sets = sys.argv[1], json.loads(sys.argv[2])
rows = json.load(open(out + "/rows.json"))
cfg = lambda *more: load_config("cpu-demo", sets + list(more))
full = train.train(cfg(), out + "/full", dataset=rows, quiet=True)
part = train.train(cfg(), out + "/part", dataset=rows, quiet=True, save_model=False, callbacks=[StopAt2()])
resumed = train.train(cfg(), out + "/part", dataset=rows, quiet=True, resume=True)
lora = train.train(cfg("model.lora=true", "model.lora_r=4", "train.lr=1e-2"), out + "/lora", dataset=rows, quiet=True)
if torch.distributed.get_rank() == 0:
    json.dump({"engine": full["engine"], "units": len(parallel.fsdp_modules(full["trainer"].model)),
               "full": [r["loss"] for r in full["log"]], "part": [r["loss"] for r in part["log"]],
               "resumed": [r["loss"] for r in resumed["log"]], "resumed_from": resumed.get("resumed_from"),
               "idle": [r.get("idle_s") for r in full["log"]],
               "ckpt": sorted(os.listdir(out + "/part/checkpoints/checkpoint-2"))}, open(out + "/out.json", "w"))
train.finish_distributed()
"""


@pytest.mark.slow
def test_trainer_fsdp2_sharded_checkpoints_resume_and_export(tiny, rows, tmp_path):
    """The Trainer's FSDP2 path on 2 CPU processes: DCP-sharded checkpoints resume bit-exactly (a run stopped at step 2
    and resumed == an uninterrupted run), the final model is gathered into a loadable folder, LoRA exports merged."""
    from safetensors.torch import load_file

    from longalign_lib.models import load_model_and_tokenizer

    sets = [s for s in _sets(tiny) if not s.startswith(("train.max_steps", "train.save_steps",
                                                           "batching.max_pack_tokens"))]
    sets += ["train.max_steps=4", "train.save_steps=2", "batching.max_pack_tokens=300"]
    (tmp_path / "rows.json").write_text(json.dumps(rows * 2))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(TRAINER_WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                        str(worker), str(tmp_path), json.dumps(sets)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["engine"] == "fsdp2" and got["units"] == 3
    assert "pytorch_model_fsdp_0" in got["ckpt"] and "optimizer_0" in got["ckpt"]  # sharded model + optimizer
    assert len(got["full"]) == 4 and got["part"] == got["full"][:2] and got["resumed_from"].endswith("checkpoint-2")
    assert got["resumed"] == got["full"]  # the log rows after the resume are those of the uninterrupted run
    assert all(len(i) == 2 for i in got["idle"])  # idle seconds logged per rank
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _ = load_model_and_tokenizer(str(tmp_path / "lora" / "model"), dtype="fp32", device="cpu")
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = train.load_model_for_training(load_config("cpu-demo", sets), "cpu")[0]  # the same seeded init
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
