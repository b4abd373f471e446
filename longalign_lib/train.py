"""Stage 4 — long-context SFT: LongAlignTrainer (transformers.Trainer) over stage-3 batch plans.

Run as: longalign train --preset cpu-demo [--set batching.strategy=sorted] [--resume] [--run-dir DIR]
Usage:
    from longalign_lib.train import build_trainer
    trainer, info = build_trainer(cfg, run_dir)          # model, data, plans, Trainer, logging
    trainer.train()

What happens, per optimizer step of a stage-3 plan (batching.plan_epoch):
- each rank runs its `grad_accum` micro-batches in order; packed ones are one row [1, T] whose documents are
  isolated by attention.py (cu_seq_lens); naive/sorted ones are right-padded rows (pads cost compute, never loss);
- every target token carries the weight that batching.step_token_weights gave its sequence, computed over the
  WHOLE step (all micro-batches, all ranks), so the summed loss is exactly the chosen reduction (token / sequence
  mean / pack mean). The trainer therefore sums micro-batch losses (no division by grad_accum) and undoes the
  engine's gradient averaging exactly (parallel.py: ×world under DDP, a summing reduce-scatter under FSDP2);
- several GPUs: torchrun (DDP) or `accelerate launch --config_file configs/accelerate/<engine>.yaml` (DDP, FSDP2,
  DeepSpeed ZeRO-3); sharded engines write sharded checkpoints and export <run_dir>/model gathered on rank 0;
- the loss is loss.model_loss (weighted_chunked_ce on the final hidden states: only target positions reach the LM head);
- `train.sequence_parallel: N` splits each packed row over N GPUs (sequence_parallel.py, Ulysses): the plan is
  made for world/N data-parallel ranks, each GPU of a group trains its T/N-token slice with labels shifted over
  the whole row, and the group's losses and gradients add up to the unsplit row's;
- every step appends to train_log.jsonl (and TensorBoard): loss, lr, tokens/s, MFU, fill, M (sequences),
  K (packed rows), peak memory. Checkpoints resume bit-exactly (`--resume`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import batching, parallel, sequence_parallel
from .inputs import training_set
from .io import LongAlignError, append_jsonl, read_jsonl, write_jsonl
from .kernels import setup_for_training
from .loss import model_loss
from .models import apply_lora, auto_device, load_model_and_tokenizer, longalign_home
from .sequence_parallel import layout, shard_batch
from .throughput import flops_counter, matmul_ceiling_tflops
from .toy_data import tiny_model_dir, verse_lookup_records  # noqa: F401  re-export: notebook 04 calls train.<name>

LOG_NAME = "train_log.jsonl"


@dataclass
class MicroRef:
    plan: int
    step: int
    micro: int  # -1: an empty filler (this rank has fewer micro-batches than grad_accum at this step)


class PlanBatches(torch.utils.data.Dataset):
    """This rank's micro-batches over all plans, grad_accum per optimizer step, collated on access.

    `rank` is the plan rank (the data-parallel group). With sequence parallelism (`sp_size` > 1) every GPU of a
    group collates the same row and keeps its slice `sp_rank` (sequence_parallel.shard_batch); the row's tokens
    and FLOPs are counted once per group (by its first GPU), so step sums over all processes stay exact.
    """

    def __init__(self, plans, dataset, rank: int, reduction: str, pad_id: int, flops_fn=None, sp_rank: int = 0,
                 sp_size: int = 1):
        self.plans, self.dataset, self.rank, self.reduction, self.pad_id = plans, dataset, rank, reduction, pad_id
        self.flops_fn = flops_fn
        self.sp_rank, self.sp_size = int(sp_rank), int(sp_size)
        # every rank runs as many micro-steps as the busiest rank of the busiest step (DDP keeps ranks in lockstep)
        self.grad_accum = max(1, max(len(r) for p in plans for s in p.steps for r in s.ranks))
        self.refs: list[MicroRef] = []
        self.step_refs: list[tuple[int, int]] = []
        for pi, p in enumerate(plans):
            for si, s in enumerate(p.steps):
                self.step_refs.append((pi, si))
                mine = s.ranks[rank]
                for m in range(self.grad_accum):
                    self.refs.append(MicroRef(pi, si, m if m < len(mine) else -1))
        self._weights_cache: dict = {}

    @property
    def n_steps(self) -> int:
        return len(self.step_refs)

    def __len__(self) -> int:
        return len(self.refs)

    def weights(self, pi: int, si: int) -> dict:
        key = (pi, si)
        if key not in self._weights_cache:
            plan = self.plans[pi]
            self._weights_cache = {key: batching.step_token_weights(plan.steps[si], plan.n_target, self.reduction,
                                                                         source=plan.source)}
        return self._weights_cache[key]

    def step_stats(self, pi: int, si: int) -> dict:
        """What the whole step (all ranks) holds: sequences M, packed rows K, tokens, slots (fill)."""
        step = self.plans[pi].steps[si]
        mbs = list(step.micro_batches())
        tokens = sum(mb.tokens for mb in mbs)
        slots = sum(mb.slots for mb in mbs)
        return {"M": self.plans[pi].n_sequences(step), "K": sum(len(mb.packs) for mb in mbs), "step_tokens": tokens,
                "computed_tokens": sum(mb.computed_tokens for mb in mbs), "fill": tokens / slots if slots else 0.0,
                "padded": bool(mbs and mbs[0].padded)}

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        plan = self.plans[ref.plan]
        if ref.micro < 0:
            batch = _empty_batch(self.pad_id)
            docs, n_tgt = [], 0
        else:
            mb = plan.steps[ref.step].ranks[self.rank][ref.micro]
            batch = batching.collate(plan, mb, self.dataset, self.weights(ref.plan, ref.step), self.pad_id)
            docs = [n for row in mb.lengths for n in row]
            n_tgt = int((batch["labels"][:, 1:] != -100).sum())
            if mb.padded:
                _check_right_padded(batch)
                batch.pop("attention_mask")  # right padding + causal attention: real tokens never see pads
                batch.pop("position_ids")  # positions 0..L-1 per row, the model's default
        if self.sp_size > 1:
            batch, docs, n_tgt = self._shard(batch, docs, n_tgt)
        batch["meta"] = {"plan": ref.plan, "step": ref.step, "micro": ref.micro, "docs": docs, "n_target": n_tgt,
                         "computed": int(batch["input_ids"].numel()) if ref.micro >= 0 else 0}
        return batch

    def _shard(self, batch: dict, docs: list, n_tgt: int):
        """This GPU's slice of the row; the row's documents and targets are reported by the group's first GPU."""
        batch = shard_batch(batch, self.sp_rank, self.sp_size, self.pad_id)
        batch.pop("row_tokens")
        return batch, (docs if self.sp_rank == 0 else []), (n_tgt if self.sp_rank == 0 else 0)


def _empty_batch(pad_id: int) -> dict:
    """A filler micro-batch with no target: keeps every rank in step (DDP) and adds exactly zero to the loss."""
    return {"input_ids": torch.full((1, 2), int(pad_id), dtype=torch.long),
            "labels": torch.full((1, 2), -100, dtype=torch.long),
            "loss_weights": torch.zeros((1, 2), dtype=torch.float32)}


def _check_right_padded(batch: dict) -> None:
    att = batch["attention_mask"]
    n = att.sum(-1, keepdim=True)
    expect = torch.arange(att.shape[1])[None] < n
    if not torch.equal(att.bool(), expect):
        raise LongAlignError("collate_padded returned left padding; the trainer needs right-padded rows")


# ------------------------------------------------------------------------------------------------ model + loss
class ChunkedLossLM(nn.Module):
    """A causal LM whose forward returns the weighted chunked loss (no [T, V] logits): what the Trainer trains.

    Wrapping (instead of calling the decoder from the trainer) keeps DDP's and accelerate's forward hooks
    (gradient sync, autocast) on the path. `self.lm` is the transformers (or peft) model.
    """

    def __init__(self, lm, chunk_tokens: int = 4096, sp_group=None):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = int(chunk_tokens)
        self.config = lm.config
        self.sp_group = sp_group  # sequence_parallel.SPGroup: rows arrive split over the group (shift_labels)
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        # FSDP2 (accelerate's TRANSFORMER_BASED_WRAP) shards one unit per decoder layer, named by the model
        self._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])

    def forward(self, input_ids, labels=None, loss_weights=None, position_ids=None, cu_seq_lens=None,
                max_seqlen=None, attention_mask=None, shift_labels=None, shift_weights=None, row_tokens=None):
        """`labels`/`loss_weights` as collated, or `shift_labels`/`shift_weights` (already shifted over the whole
        row: this rank's slice under sequence parallelism, see sequence_parallel.shard_batch)."""
        batch = {"input_ids": input_ids, "labels": labels, "loss_weights": loss_weights, "position_ids": position_ids,
                 "cu_seq_lens": cu_seq_lens, "max_seqlen": max_seqlen, "attention_mask": attention_mask,
                 "shift_labels": shift_labels, "shift_weights": shift_weights}
        extra = {"sp_group": self.sp_group} if self.sp_group is not None and self.sp_group.size > 1 else {}
        loss, _ = model_loss(self.lm, batch, self.chunk_tokens, **extra)
        return {"loss": loss}


# ------------------------------------------------------------------------------------------------------ trainer
def _hf_trainer():
    from transformers import Trainer, TrainerCallback

    return Trainer, TrainerCallback


Trainer, TrainerCallback = _hf_trainer()


class LongAlignTrainer(Trainer):
    """transformers.Trainer driven by stage-3 plans, summing exactly-weighted micro-batch losses.

    Extra arguments: `plan_batches` (PlanBatches for this rank), `log_dir` (train_log.jsonl, TensorBoard),
    `flops_fn`, `ceiling_tflops`, `tensorboard`, `log_fields` (constant fields written into every log row, e.g.
    the kernels and checkpointing plan in use).
    """

    def __init__(self, *args, plan_batches: PlanBatches, log_dir: Path, flops_fn=None, ceiling_tflops: float = 0.0,
                 tensorboard: bool = True, log_fields: dict | None = None, cost_model=None, **kwargs):
        targs = kwargs.get("args") or (args[1] if len(args) > 1 else None)
        if targs is not None and targs.n_gpu > 1:
            # One process sees several GPUs (no torchrun): the plan already says what each device trains, so never
            # let Trainer fall back to nn.DataParallel, whose replica threads would also run without autocast.
            # (transformers pins n_gpu to 1 the same way for model parallelism.) Use torchrun for several GPUs.
            targs._n_gpu = 1
        super().__init__(*args, **kwargs)
        self.engine = parallel.configure(self.accelerator, bool(self.args.bf16))
        self._summed = None  # FSDP2: reduce-scatter set to sum (decided at the first step, once the model is sharded)
        self._timer = parallel.RankTimer("cuda" if torch.cuda.is_available() and not self.args.use_cpu else "cpu")
        self.cost_model = cost_model
        self.plan_batches = plan_batches
        self.log_dir = Path(log_dir)
        self.flops_fn = flops_fn
        self.ceiling_tflops = float(ceiling_tflops or 0.0)
        self.use_tensorboard = tensorboard
        self.log_fields = dict(log_fields or {})
        self._tb = None
        self._reset_step()
        self._t_last = None
        self.add_callback(_StepLogger(self))

    # --- data: the plan is the sampler, batching.collate the collator
    def get_train_dataloader(self):
        pb = self.plan_batches
        return torch.utils.data.DataLoader(pb, batch_sampler=[[i] for i in range(len(pb))],
                                           collate_fn=_first, num_workers=0)

    # --- loss: exact sums across accumulation and ranks
    def _reset_step(self):
        self._acc = {"loss": 0.0, "tokens": 0, "computed": 0, "flops": 0.0, "n_target": 0, "ref": None}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("meta", None)
        out = model(**inputs)
        return (out["loss"], out) if return_outputs else out["loss"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        meta = inputs.get("meta", {})
        inputs = self._prepare_inputs(inputs)
        world = self.args.world_size
        if self._summed is None:
            self._summed = parallel.sum_gradients(model)
        if world > 1:
            self._timer.start()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        # the step loss is a SUM over micro-batches and ranks: no /grad_accum, and the engine's averaging undone
        scale = parallel.loss_scale(self.engine, world, self.args.gradient_accumulation_steps, self._summed)
        self.accelerator.backward(loss * scale if scale != 1.0 else loss)
        if world > 1:
            self._timer.stop()
        a = self._acc
        a["loss"] += float(loss.detach())
        docs = meta.get("docs", [])
        a["tokens"] += sum(docs)
        a["computed"] += meta.get("computed", 0)
        a["n_target"] += meta.get("n_target", 0)
        if self.flops_fn is not None and docs:
            a["flops"] += self.flops_fn(docs, meta.get("n_target", 0))
        if meta.get("micro", -1) >= 0 or a["ref"] is None:
            a["ref"] = (meta.get("plan", 0), meta.get("step", 0))
        return self._loss_to_report(loss.detach(), world)

    def _loss_to_report(self, loss, world: int):
        """What transformers adds to its running loss for this micro-batch. It sums these over the step and, when
        it logs, averages the sums over ranks (`loss`; `train_loss` also adds this rank's unlogged rest). One rank
        alone: this micro-batch's share of the step loss. Several ranks: 0, then the whole step loss (summed over
        ranks) at the step's last micro-batch — so every rank holds the step loss and every logged loss is it."""
        if world <= 1:
            return loss
        self._acc["rank_loss"] = self._acc.get("rank_loss", 0.0) + loss.double()
        if not self.accelerator.sync_gradients:
            return torch.zeros_like(loss)
        step = self._acc.pop("rank_loss").clone()
        torch.distributed.all_reduce(step)
        return step.to(loss.dtype)

    # --- checkpoints: the inner transformers/peft model in its own format (loadable by stage 5)
    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if parallel.is_sharded(self.engine):
            # the weights are written by the engine itself, sharded (FSDP: torch.distributed.checkpoint, DeepSpeed:
            # its own files), next to the sharded optimizer state; export_model writes the loadable folder
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, output_dir / "training_args.bin")
            return
        lm = self.model.lm
        lm.save_pretrained(output_dir, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if parallel.is_sharded(self.engine):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(self.model.lm, Path(resume_from_checkpoint))

    def _write_log(self, row: dict):
        append_jsonl(self.log_dir / LOG_NAME, row)
        if self.use_tensorboard and self.is_world_process_zero():
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
                except ImportError:
                    self.use_tensorboard = False
                    return
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, row["step"])
            self._tb.flush()


def _first(items):
    return items[0]


def load_weights(lm, ckpt: Path) -> None:
    """Load a checkpoint written by LongAlignTrainer._save into `lm` (full model or peft adapter)."""
    from safetensors.torch import load_file

    adapter = ckpt / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lm, load_file(str(adapter)))
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise LongAlignError(f"{ckpt}: no model*.safetensors to resume from")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LongAlignError(f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")


class _StepLogger(TrainerCallback):
    """After each optimizer step: reduce the step's numbers over ranks and write one log row."""

    def __init__(self, trainer: LongAlignTrainer):
        self.t = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.t._t_last = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kw):
        t = self.t
        a = t._acc
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt = now - (t._t_last or now)
        t._t_last = now
        vals = torch.tensor([a["loss"], a["tokens"], a["computed"], a["flops"], a["n_target"]], dtype=torch.float64)
        idle = {}
        if args.world_size > 1 and torch.distributed.is_initialized():
            dev = args.device if torch.cuda.is_available() and not args.use_cpu else "cpu"
            vals = vals.to(dev)
            torch.distributed.all_reduce(vals)
            vals = vals.cpu()
            idle = parallel.idle_stats(t._timer.gather(args.world_size, dev))
            if t.cost_model is not None and a["ref"] is not None:
                pi, si = a["ref"]
                idle["idle_model_frac"] = round(parallel.modelled_idle_frac(t.plan_batches.plans[pi].steps[si],
                                                                            t.cost_model), 4)
        loss, tokens, computed, flops, n_target = vals.tolist()
        stats = t.plan_batches.step_stats(*(a["ref"] or (0, 0)))
        lr = t.lr_scheduler.get_last_lr()[0] if t.lr_scheduler is not None else args.learning_rate
        world = max(1, args.world_size)
        row = {"step": state.global_step, "epoch": (a["ref"] or (0, 0))[0], "loss": loss, "lr": lr,
               "tokens": int(tokens), "computed_tokens": int(computed), "target_tokens": int(n_target),
               "step_s": round(dt, 4), "tokens_per_s": tokens / dt if dt > 0 else 0.0,
               "tflops": flops / dt / 1e12 if dt > 0 else 0.0,
               "mfu": (flops / dt / 1e12) / (t.ceiling_tflops * world) if dt > 0 and t.ceiling_tflops else 0.0,
               "fill": stats["fill"], "M": stats["M"], "K": stats["K"], **t.log_fields, **idle}
        if torch.cuda.is_available():
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device=args.device)
            if args.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)  # the fullest GPU
            row["peak_mem_gib"] = float(peak.item())
            torch.cuda.reset_peak_memory_stats()
        else:
            import resource  # Unix-only module

            row["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        if t.is_world_process_zero():
            t._write_log(row)
        t._reset_step()


# ----------------------------------------------------------------------------------------------------- building
def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def load_model_for_training(cfg, device: str | None = None):
    """(model, tokenizer, full_ft) with RoPE scaling, LoRA and the precision policy of the config applied."""
    parallel.bind_device()  # several processes: each loads onto its own GPU
    mcfg = dataclasses.replace(cfg.model)
    dev = device or auto_device(mcfg.device)
    mcfg.device = dev
    use_bf16 = cfg.train.bf16 and dev == "cuda"
    full_ft = not mcfg.lora
    if full_ft and use_bf16 and cfg.train.master_fp32:
        mcfg.dtype = "fp32"  # fp32 master weights, bf16 compute through autocast
    from transformers import set_seed

    set_seed(cfg.train.seed)  # random-init models (random:<config>) and LoRA adapters start the same every run
    model, tok = load_model_and_tokenizer(cfg=mcfg)
    model.config.use_cache = False
    if mcfg.lora:
        model = apply_lora(model, mcfg)
    return model, tok, full_ft


def build_trainer(cfg, run_dir: str | Path, model=None, tok=None, dataset=None, device: str | None = None,
                  quiet: bool = False):
    """Everything `longalign train` needs: (LongAlignTrainer, info dict). Pass model/tok/dataset to reuse them."""
    from transformers import TrainingArguments

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    dev = device or auto_device(cfg.model.device)
    full_ft = not cfg.model.lora
    if model is None:
        model, tok, full_ft = load_model_for_training(cfg, dev)
    data_note = "dataset given by the caller"
    if dataset is None:
        dataset, data_note = training_set(cfg, run_dir, tokenizer=tok)
    bcfg = cfg.batching
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp_size, rank, sp_rank, dp_world = _parallel_layout(cfg, bcfg, world, int(os.environ.get("RANK", "0")))
    plans = batching.make_plans(dataset, bcfg, cfg.train.epochs, sp_size)
    same = batching.saved_plans_match(plans, run_dir)
    if dp_world != bcfg.world_size:
        if world > 1:
            need = f"{dp_world} (= {world} processes / train.sequence_parallel {sp_size})" if sp_size > 1 else world
            raise LongAlignError(f"running on {world} processes but batching.world_size={bcfg.world_size}: "
                                 f"set --set batching.world_size={need}")
        # one process simulating a W-rank plan: run every rank's micro-batches here, in rank order
        plans = [_flatten_ranks(p) for p in plans]
        rank = 0
    trainable_head = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    flops_fn = flops_counter(model, trainable_head, full_ft)
    pad_id = (tok.pad_token_id or 0) if tok is not None else 0
    pb = PlanBatches(plans, dataset, rank, bcfg.loss_reduction, pad_id, flops_fn, sp_rank=sp_rank, sp_size=sp_size)
    n_steps = pb.n_steps
    if cfg.train.max_steps and cfg.train.max_steps > 0:
        n_steps = min(n_steps, cfg.train.max_steps)
    use_bf16 = cfg.train.bf16 and dev == "cuda"
    # fused kernels, memory-budgeted activation checkpointing (planned for the longest micro-batch this GPU holds:
    # 1/N of a row under sequence parallelism), compile
    tokens = max(1, bcfg.batch_size) * bcfg.max_pack_tokens // sp_size
    speed = setup_for_training(model, cfg.train, tokens, dev, use_bf16)
    ceiling = cfg.train.matmul_tflops or matmul_ceiling_tflops("cuda" if dev == "cuda" else "cpu")
    parallel.set_precision_env(use_bf16)  # the cookbook's precision, whatever an accelerate config says

    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=1,
        gradient_accumulation_steps=pb.grad_accum, max_steps=n_steps, learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler, warmup_steps=int(math.ceil(cfg.train.warmup_ratio * n_steps)),
        adam_beta1=cfg.train.adam_beta1, adam_beta2=cfg.train.adam_beta2, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, bf16=use_bf16,
        save_strategy="steps" if cfg.train.save_steps > 0 else "no",
        save_steps=max(1, min(cfg.train.save_steps, n_steps)), save_total_limit=cfg.train.save_total_limit,
        logging_steps=cfg.train.logging_steps, report_to="none", seed=cfg.train.seed, data_seed=cfg.train.seed,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=dev != "cuda",
        disable_tqdm=quiet,
    )
    sp_group = None
    if sp_size > 1:
        _ = args.device  # initialises torch.distributed under torchrun / accelerate launch
        sequence_parallel.attach(model)
        sp_group = sequence_parallel.init_groups(sp_size)
    wrapper = ChunkedLossLM(model, cfg.train.loss_chunk_tokens, sp_group=sp_group)
    trainer = LongAlignTrainer(model=wrapper, args=args, processing_class=tok, plan_batches=pb, log_dir=run_dir,
                               flops_fn=flops_fn, ceiling_tflops=ceiling, tensorboard=cfg.train.tensorboard,
                               log_fields=speed["log_fields"],
                               cost_model=batching.CostModel.from_config(bcfg, sp_size))
    if quiet:  # without tqdm, transformers prints every log dict instead; train_log.jsonl already has them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    info = {"data": data_note, "engine": trainer.engine, "world_size": world,
            "balance": batching.resolved_balance(bcfg), "plans": [p.counters for p in plans], "plans_from_pack": same,
            "steps": n_steps,
            "grad_accum": pb.grad_accum,
            "strategy": bcfg.strategy, "reduction": bcfg.loss_reduction, "max_pack_tokens": bcfg.max_pack_tokens,
            "ceiling_tflops": ceiling, "device": dev, "full_ft": full_ft, "bf16": use_bf16,
            "attn": model.config._attn_implementation, "home": str(longalign_home()), "sequence_parallel": sp_size,
            "kernels": speed["kernels"].backend, "kernel_note": speed["kernels"].note,
            "checkpointing": speed["checkpointing"].to_dict(), "compile": speed["compile"]}
    return trainer, info


def _parallel_layout(cfg, bcfg, world: int, rank: int) -> tuple[int, int, int, int]:
    """(sequence-parallel size N, plan rank, position in the group, data-parallel groups) of this process."""
    sp_size = max(1, int(getattr(cfg.train, "sequence_parallel", 1) or 1))
    if sp_size == 1:
        return 1, rank, 0, world
    if world < sp_size:
        raise LongAlignError(f"train.sequence_parallel={sp_size} splits each row over {sp_size} processes but "
                             f"{world} run: launch with torchrun --nproc_per_node={sp_size} (or accelerate launch "
                             f"--config_file configs/accelerate/sequence_parallel.yaml)")
    if bcfg.strategy != "packed":
        raise LongAlignError(f"train.sequence_parallel={sp_size} splits packed rows: set batching.strategy=packed "
                             f"(now {bcfg.strategy!r})")
    dp_rank, sp_rank, dp_world = layout(world, sp_size, rank)
    return sp_size, dp_rank, sp_rank, dp_world


def _flatten_ranks(plan):
    """A W-rank plan run by one process: rank r's micro-batches for a step run one after another."""
    p = copy.copy(plan)
    p.steps = [batching.Step(index=s.index, ranks=[[mb for r in s.ranks for mb in r]]) for s in plan.steps]
    return p


def _prune_log(path: Path, upto_step: int) -> None:
    """On resume, drop log rows past the checkpoint (they will be written again)."""
    if path.exists():
        rows = [r for r in read_jsonl(path, allow_partial_last_line=True) if r.get("step", 0) <= upto_step]
        write_jsonl(path, rows)


def train(cfg, run_dir: str | Path, resume: bool = False, save_model: bool = True, callbacks=(), **kw) -> dict:
    """Build, (resume and) train, save the final model in <run_dir>/model; returns a summary."""
    run_dir = Path(run_dir)
    trainer, info = build_trainer(cfg, run_dir, **kw)
    for cb in callbacks:
        trainer.add_callback(cb)
    log = run_dir / LOG_NAME
    ckpt = _latest_checkpoint(run_dir / "checkpoints") if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        _prune_log(log, int(state.get("global_step", 0)))
        info["resumed_from"] = str(ckpt)
    elif log.exists():
        log.unlink()
    t0 = time.time()
    threads = torch.get_num_threads()
    if info["device"] == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(int(cfg.train.cpu_threads))
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    finally:
        torch.set_num_threads(threads)
    info["train_s"] = round(time.time() - t0, 2)
    info["log"] = read_jsonl(log) if log.exists() else []
    if not save_model:
        return {"trainer": trainer, **info}
    if parallel.is_sharded(trainer.engine):  # gather the shards (every rank takes part), rank 0 writes the folder
        parallel.export_model(trainer, run_dir / "model")
        _barrier()
        info["model_dir"] = str(run_dir / "model")
        info["log"] = read_jsonl(log) if log.exists() else []
        return {"trainer": trainer, **info}
    if not trainer.is_world_process_zero():  # one writer for the final model; the others wait for it
        _barrier()
        info["model_dir"] = str(run_dir / "model")
        return {"trainer": trainer, **info}
    final = run_dir / "model"
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lm = trainer.model.lm
    if hasattr(lm, "merge_and_unload"):  # LoRA: save the merged model (stage 5 loads it like any model)
        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(tmp, safe_serialization=True)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _barrier()
    info["model_dir"] = str(final)
    info["log"] = read_jsonl(log) if log.exists() else []
    return {"trainer": trainer, **info}


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish_distributed() -> None:
    """Tear the process group down before exit (torchrun): gloo/NCCL threads left running abort the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def summarize_log(rows: list[dict]) -> dict:
    """Headline numbers of a train_log: first/last loss, median tokens/s and MFU (first step excluded: warm-up)."""
    if not rows:
        return {}
    steady = rows[1:] or rows
    return {"steps": rows[-1]["step"], "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "tokens": sum(r["tokens"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady),
            "tflops": statistics.median(r["tflops"] for r in steady),
            "fill": statistics.mean(r["fill"] for r in rows), "peak_mem_gib": max(r["peak_mem_gib"] for r in rows),
            "wall_s": sum(r["step_s"] for r in rows),
            **({"idle_frac": statistics.median(r["idle_frac"] for r in steady)} if "idle_frac" in rows[0] else {})}


def loss_figure(curves: dict[str, list[dict]], title: str = "Training loss", x: str = "step"):
    """Loss curves of one or more train logs (name → rows); colours from plots.PALETTE where the name has one.

    x="step" or "tokens" (cumulative training tokens: compares strategies whose steps hold different amounts)."""
    import numpy as np

    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, ax = plots.figure()
    for name, rows in curves.items():
        xs = np.cumsum([r["tokens"] for r in rows]) if x == "tokens" else [r[x] for r in rows]
        ax.plot(xs, [r["loss"] for r in rows], marker="o", ms=3, label=name, color=plots.PALETTE.get(name))
    ax.set_xlabel({"step": "optimizer step", "tokens": "training tokens seen"}.get(x, x))
    ax.set_ylabel("step loss (weighted CE)")
    ax.set_title(title)
    ax.legend()
    return fig


def packed_batch_figure(batch: dict, title: str = "One packed row: documents, positions, loss weights"):
    """Three aligned panels of a collated packed batch: which document each token belongs to, position_ids
    (restarting per document), and the per-token loss weight (0 on prompts; 1/(M·N_i) on answers)."""
    import numpy as np

    from . import plots  # matplotlib: imported only when a figure is drawn

    cu = batch["cu_seq_lens"].tolist()
    pos = batch["position_ids"][0].numpy()
    w = batch["loss_weights"][0].numpy()
    T = len(pos)
    fig, axes = plots.figure(3, 1, figsize=(9, 5), sharex=True)
    for d in range(len(cu) - 1):
        axes[0].axvspan(cu[d], cu[d + 1], color=plots.CYCLE[d % len(plots.CYCLE)], alpha=0.8)
        if cu[d + 1] - cu[d] >= 0.06 * T:  # label the documents wide enough to hold one
            axes[0].text((cu[d] + cu[d + 1]) / 2, 0.5, f"doc {d}\n{cu[d + 1] - cu[d]} tok", ha="center",
                         va="center", fontsize=7, color="white")
    axes[0].set_yticks([])
    axes[0].set_ylabel(f"{len(cu) - 1} docs")
    axes[0].grid(False)
    axes[1].plot(np.arange(T), pos, lw=1, color=plots.CYCLE[0])
    axes[1].set_ylabel("position_ids")
    axes[2].fill_between(np.arange(T), w, step="mid", color=plots.PALETTE["target"])
    axes[2].set_ylabel("loss weight")
    axes[2].set_xlabel("token index in the packed row")
    axes[0].set_title(title)
    axes[0].set_xlim(0, T)
    return fig
