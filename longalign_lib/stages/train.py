"""`longalign train`: long-context SFT over the stage-3 batch plans (LongAlignTrainer), loss curve, exported model.

Run as: longalign train --preset cpu-demo [--resume] [--set batching.strategy=sorted] [--run-dir DIR]
Under torchrun every rank runs this; rank 0 alone writes the summary, figure and report.
"""
from __future__ import annotations

from pathlib import Path

from .. import plots
from ..io import write_json
from .base import StageResult, add_resume_flag

PLAN_NOTE = {True: "The micro-batches trained are those of the plans `pack` wrote (plans/).",
             False: "The plans in plans/ differ from the ones trained (settings or data changed since `pack` ran): "
                    "rerun `longalign pack` to see what was trained.",
             None: "No plans/ from `pack` in the run directory; the plans were built here with the same function."}


def add_arguments(p) -> None:
    add_resume_flag(p)


def run(cfg, run_dir: Path, args) -> StageResult:
    # transformers + torch: imported when the stage runs, so `longalign --help` stays quick
    from ..train import LOG_NAME, finish_distributed, loss_figure, summarize_log, train

    res = train(cfg, run_dir, resume=bool(getattr(args, "resume", False)))
    if not res["trainer"].is_world_process_zero():  # under torchrun, rank 0 alone writes the stage's files
        finish_distributed()
        return StageResult({"rank": res["trainer"].args.process_index}, rank_only=True)
    rows = res["log"]
    summ = summarize_log(rows)
    fig = loss_figure({f"{res['strategy']} ({res['reduction']})": rows})
    fig_path = plots.save(fig, Path(run_dir) / "figures" / "train_loss.png", close=True)
    metrics = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summ.items()},
               "strategy": res["strategy"], "reduction": res["reduction"], "device": res["device"],
               "attn": res["attn"], "train_s": res["train_s"], "kernels": res["kernels"],
               "ckpt_layers": res["checkpointing"]["n_checkpointed"], "engine": res["engine"],
               "world_size": res["world_size"],
               "plans_from_pack": res["plans_from_pack"]}
    ck = res["checkpointing"]
    write_json(Path(run_dir) / "train_summary.json", {**metrics, "info": {k: v for k, v in res.items()
                                                                           if k not in ("trainer", "log")}})
    report = (f"Trained `{cfg.model.name}` for {summ.get('steps')} steps ({res['strategy']} batches, "
              f"{res['reduction']} loss weighting, attention `{res['attn']}`, {res['device']}, engine {res['engine']} on "
              f"{res['world_size']} process(es)). Data: {res['data']}.\n\n"
              f"Loss {summ.get('loss_first', float('nan')):.3f} → {summ.get('loss_last', float('nan')):.3f}; "
              f"{summ.get('tokens_per_s', 0):,.0f} tokens/s, "
              + (f"MFU {100 * summ.get('mfu', 0):.1f}% of a measured {res['ceiling_tflops']:.0f} TFLOP/s matmul ceiling, "
                 if res["device"] == "cuda" else "(MFU is reported on GPUs only), ")
              + f"peak memory {summ.get('peak_mem_gib', 0):.1f} GiB. Kernels: {res['kernels']} "
              f"(`train.fused_kernels`); activation checkpointing ({ck['setting']}): {ck['n_checkpointed']} of "
              f"{ck['n_layers']} decoder layers — {ck['note']}.\n\n"
              f"![training loss]({fig_path.relative_to(run_dir)})")
    finish_distributed()
    return StageResult(metrics, [LOG_NAME, "model", "train_summary.json", str(fig_path.relative_to(run_dir))],
                       report)

