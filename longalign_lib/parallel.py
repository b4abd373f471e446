"""Several GPUs for stage 4: which engine runs the Trainer (DDP, FSDP2, DeepSpeed ZeRO-3), exact gradient sums
under each, the precision policy under sharding, per-rank idle time, and the export of a sharded model.

Run as: accelerate launch --config_file configs/accelerate/fsdp2.yaml -m longalign_lib.cli train --preset paper
        (torchrun --nproc_per_node N -m longalign_lib.cli train ... keeps working: that is DDP)
Usage:
    from longalign_lib import parallel
    eng = parallel.engine_of(trainer.accelerator)          # "single" | "ddp" | "fsdp2" | "fsdp1" | "deepspeed"
    summed = parallel.sum_gradients(model)                  # FSDP2: reduce-scatter sums instead of averaging
    scale = parallel.loss_scale(eng, world, grad_accum, summed)   # what backward multiplies the step loss by
    parallel.export_model(trainer, run_dir / "model")       # a normal transformers folder, gathered on rank 0

Why a scale at all: the per-token weights of a step (batching.step_token_weights) already make the SUM of the
micro-batch losses of all ranks the step loss. Every engine then averages gradients over ranks (DDP all-reduce,
FSDP reduce-scatter, ZeRO), and DeepSpeed also divides each micro-batch loss by the accumulation steps. The
trainer undoes exactly that: under FSDP2 by asking the reduce-scatter for a plain sum (no division at all, any
world size), otherwise by multiplying the loss by world size (× grad_accum under DeepSpeed); for power-of-two
world sizes a multiplication and the engine's division cancel bit for bit.

Precision under FSDP2 (the engine's MixedPrecisionPolicy, set here instead of accelerate's default): sharded fp32
master weights and Adam states, bf16 all-gather and compute, fp32 gradient reduce-scatter, forward inputs not
cast (the fp32 loss weights keep their exact values), outputs not cast (the fp32 loss stays fp32).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import torch

ENGINES = ("single", "ddp", "fsdp1", "fsdp2", "deepspeed")


def engine_of(accelerator) -> str:
    """The engine accelerate set up for this process (from `accelerate launch` config or torchrun's env)."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is not None:
        return "fsdp2" if int(getattr(plugin, "fsdp_version", 1) or 1) == 2 else "fsdp1"
    return "ddp" if int(getattr(accelerator, "num_processes", 1)) > 1 else "single"


def is_sharded(engine: str) -> bool:
    """True where no rank holds the whole model (checkpoints and the final export go through the engine)."""
    return engine in ("fsdp1", "fsdp2", "deepspeed")


def bind_device() -> None:
    """Under torchrun/accelerate, make "cuda" mean this process's GPU (LOCAL_RANK) before any model is loaded:
    otherwise every rank would first load its copy onto GPU 0."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def set_precision_env(bf16: bool) -> None:
    """The cookbook's train.bf16 decides precision, whatever the accelerate config says (its configs say 'no').

    TrainingArguments reads ACCELERATE_MIXED_PRECISION; on a CPU run a config saying bf16 would otherwise turn
    bf16 autocast on. Call before building TrainingArguments.
    """
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"


def fsdp2_policy(bf16: bool):
    """MixedPrecisionPolicy of the cookbook: fp32 master/reduce, bf16 compute, inputs and outputs left alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=False)


def configure(accelerator, bf16: bool) -> str:
    """Apply the cookbook's policy to the engine before the model is prepared; returns the engine name."""
    eng = engine_of(accelerator)
    if eng == "fsdp2":
        plugin = accelerator.state.fsdp_plugin
        plugin.mixed_precision_policy = fsdp2_policy(bf16)
        from torch.distributed.fsdp import StateDictType

        if plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT:
            # full-state checkpoints gather the whole model on rank 0 every save; resumable shards are the contract
            plugin.set_state_dict_type("SHARDED_STATE_DICT")
    return eng


def fsdp_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model, bf16: bool = False, mesh=None):
    """fully_shard `model` in place the way accelerate's FSDP2 plugin does for ChunkedLossLM: one unit per decoder
    layer (classes named in `model._no_split_modules`), the rest (embeddings, final norm, LM head) in the root unit.

    For runs that accelerate does not shard itself (it enables FSDP on GPUs only; the CPU test uses this).
    """
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError("model has no _no_split_modules: cannot tell its decoder layers apart")
    kw = {"mp_policy": fsdp2_policy(bf16), "mesh": mesh}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for m in layers:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def sum_gradients(model) -> bool:
    """FSDP2: make every unit's gradient reduce-scatter a plain SUM over ranks (no division). True if done."""
    mods = fsdp_modules(model)
    if not mods or not all(hasattr(m, "set_gradient_divide_factor") and
                           hasattr(m, "set_force_sum_reduction_for_comms") for m in mods):
        return False
    for m in mods:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return True


def loss_scale(engine: str, world: int, grad_accum: int, summed: bool = False) -> float:
    """Factor on the step loss before backward so that the update is the gradient of the exact step loss.

    >>> loss_scale("single", 1, 4), loss_scale("ddp", 8, 4), loss_scale("fsdp2", 8, 4, summed=True)
    (1.0, 8.0, 1.0)
    >>> loss_scale("deepspeed", 8, 4)       # ZeRO averages over ranks and divides by the accumulation steps
    32.0
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    if engine == "single" or world <= 1 and engine != "deepspeed":
        return 1.0
    if summed:
        return 1.0
    if engine == "deepspeed":
        # DeepSpeed 0.19: engine.backward divides the loss by gradient_accumulation_steps(), and ZeRO-3 divides the
        # reduced gradients by the data-parallel world size (runtime/engine.py, runtime/zero/stage3.py)
        return float(world * max(1, grad_accum))
    return float(world)


# ------------------------------------------------------------------------------------------ idle time per rank
class RankTimer:
    """Wall time each rank spends on its own micro-batches in a step (forward + backward, device synchronised).

    At the step's end `gather()` returns every rank's busy seconds; idle_r = max(busy) − busy_r is the time rank r
    waited for the slowest rank. Collectives inside forward/backward (FSDP all-gathers per layer, the DDP
    all-reduce of the last micro-batch) already make a fast rank wait there, so the measured idle is a lower bound
    of the true idle; the cost model's estimate for the same step is logged next to it.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.busy = 0.0
        self._t0 = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.busy += time.perf_counter() - self._t0
        self._t0 = None

    def gather(self, world: int, device) -> list[float]:
        """Every rank's busy seconds this step (a collective when world > 1), then reset."""
        mine = torch.tensor([self.busy], dtype=torch.float64)
        self.busy = 0.0
        if world <= 1 or not torch.distributed.is_initialized():
            return mine.tolist()
        mine = mine.to(device)
        out = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(out, mine)
        return [float(t.item()) for t in out]


def idle_stats(busy: list[float]) -> dict:
    """Per-rank idle seconds and the idle share of the step's GPU time from measured busy seconds.

    >>> idle_stats([2.0, 1.5])
    {'busy_s': [2.0, 1.5], 'idle_s': [0.0, 0.5], 'idle_frac': 0.125}
    """
    top = max(busy) if busy else 0.0
    idle = [round(top - b, 4) for b in busy]
    frac = sum(idle) / (top * len(busy)) if top > 0 else 0.0
    return {"busy_s": [round(b, 4) for b in busy], "idle_s": idle, "idle_frac": round(frac, 4)}


def modelled_idle_frac(step, cost_model) -> float:
    """The cost model's idle share for one step of a plan (what `longalign pack` simulates), for comparison."""
    loads = [sum(cost_model.micro_batch(mb) for mb in rank) for rank in step.ranks]
    top = max(loads) if loads else 0.0
    return sum(top - x for x in loads) / (top * len(loads)) if top > 0 else 0.0


# ------------------------------------------------------------------------------------------------------ export
def full_state_dict(trainer) -> dict:
    """The whole model's state dict on rank 0 (on CPU), an empty dict on the other ranks. A collective."""
    eng = engine_of(trainer.accelerator)
    if eng == "fsdp2" or fsdp_modules(trainer.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if eng in ("fsdp1", "deepspeed"):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped if eng == "deepspeed" else trainer.model)
    return trainer.model.state_dict()


def rebuild_on_cpu(lm, state: dict):
    """A plain (non-sharded) copy of `lm` holding `state`: built on the meta device, tensors assigned; LoRA merged.

    The tensors of `state` become the model's (no copy; a LoRA merge writes into them): pass a gathered copy.
    """
    peft_cfg = None
    base = lm
    if hasattr(lm, "peft_config"):
        peft_cfg = lm.peft_config[getattr(lm, "active_adapter", "default")]
        base = lm.get_base_model()
    cls = type(base)
    try:
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))  # fully_shard's FSDP<Name> subclass
    except ImportError:
        pass
    with torch.device("meta"):
        # the class itself, not AutoModelForCausalLM.from_config: under DeepSpeed ZeRO-3 from_config builds inside
        # deepspeed.zero.Init, a collective, and only rank 0 builds this copy (the other ranks would never join)
        model = cls(copy.deepcopy(base.config))
        if peft_cfg is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(base.config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"gathered state dict does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (rotary inv_freq) are not in the state
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            src = dict(base.named_buffers()).get(name.replace("base_model.model.", "", 1), None)
            mod = model.get_submodule(mod_name) if mod_name else model
            mod.register_buffer(attr, src.detach().cpu() if src is not None and not src.is_meta
                                else torch.empty(buf.shape, dtype=buf.dtype), persistent=False)
    if peft_cfg is not None:
        model = model.merge_and_unload()
    return model


def export_model(trainer, out_dir: str | Path) -> Path | None:
    """Gather a sharded model and write it as a normal transformers folder (LoRA merged) on rank 0, atomically.

    Every rank must call it (the gather is a collective). Returns the folder on rank 0, None on the others.
    """
    out = Path(out_dir)
    state = full_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return None
    prefix = "lm."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    model = rebuild_on_cpu(trainer.model.lm, state)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
