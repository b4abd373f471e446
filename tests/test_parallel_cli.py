"""The sharded paths through the product's own CLI on 2 CPU processes (gloo): what a user types, checked against
one process.

Each combination of issue 27 runs as
    accelerate launch --config_file configs/accelerate/<x>.yaml --num_processes 2 tests/cli_cpu.py train ...
(tests/cli_cpu.py is `longalign_lib.cli` plus, under an FSDP config, the FSDP plugin built from that config's
settings: accelerate enables FSDP on GPUs only). For each one:
- the logged step losses and the gradient norms (before clipping) equal the single-process reference, the same
  config trained in this process with the 2-rank plan flattened (fp32: rel 1e-5 on losses, 1e-4 on the first
  step's norm, which checks the loss scale, 1e-3 on later norms; the GPU runs, bf16, are held to
  bench/run_device_parallel_cli.sh's tolerance);
- resume: the run's state is cut back to what a kill -9 during the save of checkpoint-3 leaves (checkpoint-2
  complete, checkpoint-3 without its trainer_state.json, log rows 1-2 and half of row 3, no exported model), then
  `train --resume` continues from checkpoint-2 and reproduces the uninterrupted run: the same log rows and the same
  exported weights, bit for bit (weights, optimizer, scheduler and RNG state were all restored).

Combinations: FSDP2 with `auto` activation checkpointing planned to 1 of 2 layers (the Liger kernels are CUDA-only:
on CPU the plain path runs, the GPU script covers them); LoRA under FSDP2; `train.sequence_parallel=2` with
configs/accelerate/sequence_parallel.yaml; DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml; runs when deepspeed is
installed: `pip install -e .[deepspeed]`, see bench/README.md), plus the ZeRO-3 configs' precision and loss-scale
settings as the Trainer completes them.

Run as: python -m pytest -q tests/test_parallel_cli.py      (about 6 two-process launches; ~10 s each when idle)
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from longalign_lib import toy_data, train
from longalign_lib.config import load_config
from longalign_lib.io import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MAX_STEPS = 3  # checkpoints at 2 and 3: the resume starts at 2 and must redo step 3 exactly
LAUNCH_TIMEOUT_S = 600  # generous: CI runs two pytest workers on 2 cores, and each launch starts 3 Python processes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random SmolLM2-shaped model and 40 verse-lookup records (a few thousand tokens), on disk as a user has them."""
    root = tmp_path_factory.mktemp("cli")
    tiny = toy_data.tiny_model_dir(root / "tiny")
    write_jsonl(root / "verse.jsonl", toy_data.verse_lookup_records(40, min_tokens=60, max_tokens=300, seed=1))
    return root, tiny


def _sets(setup, *more) -> list[str]:
    root, tiny = setup
    return [f"model.name=random:{tiny}", f"data.long_file={root / 'verse.jsonl'}", "model.device=cpu",
            "train.tensorboard=false", "train.warmup_ratio=0", "train.lr=1e-3", f"train.max_steps={MAX_STEPS}",
            "train.save_steps=2", "train.save_total_limit=3", "train.matmul_tflops=1", "batching.max_pack_tokens=600",
            "batching.world_size=2", "batching.grad_accum=2", *more]


def _reference(run_dir: Path, sets: list[str]) -> dict:
    """The same config on one process (the plan's ranks run one after another): losses and gradient norms."""
    res = train.train(load_config("cpu-demo", sets), run_dir, save_model=False, quiet=True)
    norms = [h["grad_norm"] for h in res["trainer"].state.log_history if "grad_norm" in h]
    return {"loss": [r["loss"] for r in res["log"]], "grad_norm": norms, "engine": res["engine"]}


def _launch(config: str, run_dir: Path, sets: list[str], *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(ROOT / "tests" / "cli_cpu.py"),
           "train", "--preset", "cpu-demo", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    r = subprocess.run(cmd + list(flags), env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd[-8:])}\n{r.stderr[-4000:]}"
    return r


def _run_state(run_dir: Path) -> dict:
    final = run_dir / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json"
    hist = json.loads(final.read_text())["log_history"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"log": read_jsonl(run_dir / "train_log.jsonl"), "grad_norm": [h["grad_norm"] for h in hist if "grad_norm" in h],
            "engine": summary["engine"], "world_size": summary["world_size"], "summary": summary,
            "weights": _weights(run_dir / "model")}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cut_back_as_after_kill(run_dir: Path) -> None:
    """What kill -9 while checkpoint-3 was being written leaves: checkpoint-3 without trainer_state.json (the
    Trainer writes it last), log rows 1-2 plus half a row, no exported model."""
    (run_dir / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").unlink()
    log = (run_dir / "train_log.jsonl").read_text().splitlines()
    (run_dir / "train_log.jsonl").write_text("\n".join(log[:2]) + "\n" + log[2][: len(log[2]) // 2])
    import shutil

    shutil.rmtree(run_dir / "model")
    (run_dir / "train_summary.json").unlink()


def _check_combination(tmp_path, config: str, sets: list[str], ref_sets: list[str], engine: str):
    """Run through the CLI on 2 processes, compare with one process, kill-and-resume, compare with itself."""
    import torch

    ref = _reference(tmp_path / "ref", ref_sets)
    run = tmp_path / "run"
    _launch(config, run, sets)
    got = _run_state(run)
    assert got["engine"] == engine and got["world_size"] == 2
    assert len(got["log"]) == len(ref["loss"]) == MAX_STEPS
    assert [r["loss"] for r in got["log"]] == pytest.approx(ref["loss"], rel=1e-5)
    # the gradient norm before any update checks the loss scale (a wrong one is off by a factor >= 2, which Adam's
    # update would hide; seen here: up to 3e-5, from the order of fp32 sums over 3M embedding gradients); after
    # updates, Adam's first steps amplify such differences in near-zero gradients, so later norms get 1e-3
    assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], rel=1e-4)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
    assert got["log"][0]["loss"] != got["log"][-1]["loss"]  # the steps trained

    _cut_back_as_after_kill(run)
    _launch(config, run, sets, "--resume")
    again = _run_state(run)
    assert again["summary"]["loss_last"] == got["summary"]["loss_last"]
    keep = ("step", "loss", "lr", "tokens", "computed_tokens", "target_tokens")
    assert [{k: r[k] for k in keep} for r in again["log"]] == [{k: r[k] for k in keep} for r in got["log"]]
    assert again["grad_norm"] == got["grad_norm"]
    assert got["weights"].keys() == again["weights"].keys() and got["weights"]
    assert all(torch.equal(got["weights"][k], again["weights"][k]) for k in got["weights"])
    return got


@pytest.mark.slow
def test_fsdp2_with_auto_checkpointing_through_the_cli(setup, tmp_path):
    """fsdp2.yaml, full fine-tuning, `auto` checkpointing given a budget that fits 1 of the 2 layers kept."""
    from longalign_lib import kernels
    from longalign_lib.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(f"random:{setup[1]}", dtype="fp32", device="cpu")
    mem = kernels.memory_model(model, 600)  # the CPU memory model `auto` plans with, for 600-token rows
    budget = (mem.peak(0) + mem.peak(1)) / 2 / kernels.PLAN_SAFETY / kernels.GIB  # 1 layer kept fits, 2 do not
    ck = ["train.gradient_checkpointing=true", "train.activation_checkpointing=auto", f"train.memory_budget_gib={budget}"]
    got = _check_combination(tmp_path, "fsdp2.yaml", _sets(setup, *ck), _sets(setup), "fsdp2")
    assert (got["log"][0]["ckpt_setting"], got["log"][0]["ckpt_layers"], got["log"][0]["ckpt_of"]) == ("auto", 1, 2)
    assert got["log"][0]["kernels"] == "plain"  # Liger is CUDA-only; the GPU script runs it


@pytest.mark.slow
def test_lora_under_fsdp2_through_the_cli(setup, tmp_path):
    # no LoRA dropout: its masks would be drawn in a different order on 1 and 2 processes
    lora = ["model.lora=true", "model.lora_r=4", "model.lora_dropout=0", "train.lr=1e-2"]
    got = _check_combination(tmp_path, "fsdp2.yaml", _sets(setup, *lora), _sets(setup, *lora), "fsdp2")
    assert not any("lora" in k for k in got["weights"])  # exported merged
    base = train.load_model_for_training(load_config("cpu-demo", _sets(setup)), "cpu")[0]  # the same seeded init
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (got["weights"][q] == base.state_dict()[q]).all()  # the merged adapter moved the weight


@pytest.mark.slow
def test_sequence_parallel_2_through_the_cli(setup, tmp_path):
    """sequence_parallel.yaml (FSDP2) with train.sequence_parallel=2: one data-parallel rank, each row split over 2."""
    sp = ["batching.world_size=1", "train.sequence_parallel=2"]
    got = _check_combination(tmp_path, "sequence_parallel.yaml", _sets(setup, *sp), _sets(setup, "batching.world_size=1"),
                             "fsdp2")
    assert got["summary"]["attn"] == "longalign_sp_sdpa"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e .[deepspeed])")
def test_deepspeed_zero3_through_the_cli(setup, tmp_path):
    """zero3.yaml: DeepSpeed runs on CPU with gloo; its loss scale (× world × grad_accum) gives the exact step."""
    got = _check_combination(tmp_path, "zero3.yaml", _sets(setup), _sets(setup), "deepspeed")
    assert got["weights"]  # exported through the 16-bit gather on rank 0 (hung before parallel.rebuild_on_cpu's fix)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e .[deepspeed])")
@pytest.mark.parametrize("config", ["zero3.yaml", "zero3_offload.yaml"])
def test_zero3_configs_give_a_coherent_deepspeed_config(config, monkeypatch, tmp_path):
    """The DeepSpeed config the Trainer builds from each ZeRO-3 file with bf16 on: stage 3, bf16 without fp16 (so
    no dynamic loss scaling: DeepSpeed scales fp16 losses only), its accumulation steps = the plan's (what
    parallel.loss_scale multiplies back), clipping = train.max_grad_norm, and the file's offload devices."""
    import yaml
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from longalign_lib import parallel

    spec = yaml.safe_load((ROOT / "configs/accelerate" / config).read_text())
    ds = spec["deepspeed_config"]
    assert spec["distributed_type"] == "DEEPSPEED" and spec["mixed_precision"] == "no"  # precision: the cookbook's
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
           "ACCELERATE_GRADIENT_CLIPPING": str(ds["gradient_clipping"]),
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds["offload_optimizer_device"],
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds["offload_param_device"],
           "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(ds["zero3_init_flag"]).lower(),
           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(ds["zero3_save_16bit_model"]).lower()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # what `accelerate launch --config_file <config>` exports to each process
    parallel.set_precision_env(True)  # train.bf16 on a GPU, as build_trainer does before TrainingArguments
    cfg = load_config("paper")
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, per_device_train_batch_size=1,
                             gradient_accumulation_steps=3, max_grad_norm=cfg.train.max_grad_norm, report_to="none")
    hf = HfTrainerDeepSpeedConfig(args.deepspeed_plugin.deepspeed_config)
    hf.trainer_config_process(args)
    c = hf.config
    assert c["zero_optimization"]["stage"] == 3
    assert c["bf16"]["enabled"] is True and not c.get("fp16", {}).get("enabled", False)
    assert c["gradient_accumulation_steps"] == 3 and c["train_micro_batch_size_per_gpu"] == 1
    assert c["gradient_clipping"] == cfg.train.max_grad_norm and not hf.mismatches
    assert c["zero_optimization"]["offload_optimizer"]["device"] == ds["offload_optimizer_device"]
    assert c["zero_optimization"]["offload_param"]["device"] == ds["offload_param_device"]
    assert c["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert parallel.loss_scale("deepspeed", 2, c["gradient_accumulation_steps"]) == 6.0
