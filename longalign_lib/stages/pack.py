"""`longalign pack`: naive / sorted / packed batch plans and loss weights of the tokenized data → plans/, batching.json.

Run as: longalign pack --preset cpu-demo [--synthetic-n 2000] [--set batching.strategy=sorted] [--run-dir DIR]
Also compares every strategy on a synthetic LongAlign-10k + ShareGPT mix with a cost model of K data-parallel devices.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .. import plots
from ..batching import (
    Plan,
    check_batching_config,
    fill_histogram_figure,
    loss_weight_figure,
    make_plans,
    plan_epoch,
    save_plans,
)
from ..inputs import training_set
from ..io import write_json
from ..lengths import synthetic_longalign_sharegpt_mix
from ..simulate import CostModel, compare_strategies, gantt_figure, idle_bar_figure
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--synthetic-n", type=int, default=2000,
                   help="sequences of the synthetic LongAlign-10k + ShareGPT length mix (64k) used for the idle-time "
                        "comparison")


def run(cfg, run_dir: Path, args) -> StageResult:
    run_dir = Path(run_dir)
    b = cfg.batching
    check_batching_config(b)
    ds, note = training_set(cfg, run_dir)
    lengths, n_target = np.asarray(ds["length"]), np.asarray(ds["n_target"])
    cost = CostModel.from_config(b)
    out: dict[str, Any] = {"data": note, "config": dataclasses.asdict(b), "cost_model": cost.to_dict(), "plans": {}}
    outputs = ["batching.json"]
    # 1. the plans `train` trains: the same function on the same dataset with the same settings
    plans = make_plans(ds, b, cfg.train.epochs, max(1, int(cfg.train.sequence_parallel or 1)))
    for plan, path in zip(plans, save_plans(plans, run_dir), strict=True):
        outputs.append(str(path.relative_to(run_dir)))
        out["plans"][plan.epoch] = plan.counters
    plan0_counters = out["plans"][0]
    # 2. every strategy on this data and on a synthetic LongAlign-10k + ShareGPT mix at 64k, K simulated devices
    K = int(b.sim_world_size)
    ours = compare_strategies(lengths, n_target, b, world_size=K, cost=cost)
    out["strategies_data"] = {k: {**s.summary(), **_eff(p)} for k, (p, s) in ours.items()}
    syn_cfg = dataclasses.replace(b, max_pack_tokens=65536, batch_size=1, grad_accum=1, overlong="truncate")
    mix = synthetic_longalign_sharegpt_mix(int(getattr(args, "synthetic_n", 2000) or 2000), seed=b.seed)
    syn = compare_strategies(mix.lengths, mix.n_target, syn_cfg, world_size=K, cost=cost)
    out["strategies_synthetic_64k"] = {k: {**s.summary(), **_eff(p)} for k, (p, s) in syn.items()}
    # 3. figures (synthetic mix: enough sequences to show the effect; small Gantt so the bars are readable)
    gantt_mix = synthetic_longalign_sharegpt_mix(16 * K, seed=b.seed + 1)
    small = compare_strategies(gantt_mix.lengths, gantt_mix.n_target, syn_cfg, world_size=K, cost=cost)
    figs = {
        "gantt": gantt_figure([small[k][1] for k in ("naive", "sorted", "packed-bfd", "packed-bfd+balance")],
                              title=f"Idle time on {K} devices, synchronous data parallel — synthetic LongAlign-10k + ShareGPT "
                                    f"mix of {len(gantt_mix.lengths)} sequences, 64k rows, cost model a={cost.a:g}, b={cost.b:g}"),
        "idle": idle_bar_figure(out["strategies_synthetic_64k"],
                                title=f"Epoch time on {K} devices — synthetic LongAlign-10k + ShareGPT mix, {len(mix.lengths)} sequences"),
        "pack_fill": fill_histogram_figure({k: syn[k][0] for k in ("packed-next_fit", "packed-bfd")},
                                           title=f"Row fill at 64k — synthetic LongAlign-10k + ShareGPT mix, {len(mix.lengths)} sequences"),
    }
    wstep = max(ours["packed-bfd"][0].steps, key=lambda s: s.n_sequences)
    wnote = "this run's data"
    if wstep.n_sequences < 4:
        wplan = plan_epoch(mix.lengths[:48], mix.n_target[:48], dataclasses.replace(syn_cfg, world_size=2, grad_accum=2))
        wstep, wnote = max(wplan.steps, key=lambda s: s.n_sequences), "synthetic LongAlign-10k + ShareGPT mix"
    figs["loss_weights"] = loss_weight_figure(wstep, title=f"Effective loss weight per sequence, one step of a "
                                                           f"packed plan ({wnote}, M = {wstep.n_sequences})")
    for name, fig in figs.items():
        plots.save(fig, run_dir / "figures" / f"{name}.png", close=True)
        outputs.append(f"figures/{name}.png")
    write_json(run_dir / "batching.json", out)
    on_data, on_mix = out["strategies_data"], out["strategies_synthetic_64k"]
    metrics = {"strategy": b.strategy, "packer": b.packer, "reduction": b.loss_reduction,
               "sequences": int(len(lengths)), "steps": plan0_counters["steps"],
               "fill_rate": round(plan0_counters["fill_rate"], 4),
               "padding_fraction": round(plan0_counters["padding_fraction"], 4),
               "truncated": plan0_counters["truncated"], "skipped_overlong": plan0_counters["skipped_overlong"],
               "skipped_no_target": plan0_counters["skipped_no_target"], "split": plan0_counters["split"],
               "pieces": plan0_counters["pieces"],
               "syn_fill_bfd": round(on_mix["packed-bfd"]["fill_rate"], 4),
               "syn_fill_next_fit": round(on_mix["packed-next_fit"]["fill_rate"], 4),
               **{f"syn_idle_{k}": round(v["idle_fraction"], 4) for k, v in on_mix.items()}}
    rows = ["| strategy | fill | padding | modelled time (s) | idle |", "|---|---|---|---|---|"]
    for k, v in on_mix.items():
        rows.append(f"| {k} | {v['fill_rate']:.1%} | {v['padding_fraction']:.1%} | {v['total_time_s']:,.0f} | "
                    f"{v['idle_fraction']:.1%} |")
    report = (f"Data: {note}. Plan ({b.strategy}{'/' + b.packer if b.strategy == 'packed' else ''}, rows of "
              f"{b.max_pack_tokens} tokens, {b.world_size} rank(s) × {b.grad_accum} micro-step(s), loss "
              f"`{b.loss_reduction}`): {plan0_counters['steps']} steps, fill {plan0_counters['fill_rate']:.1%}, "
              f"padding {plan0_counters['padding_fraction']:.1%}; over-long: {plan0_counters['truncated']} truncated, "
              f"{metrics['skipped_overlong']} skipped, {plan0_counters['split']} split into {metrics['pieces']} "
              f"pieces; {metrics['skipped_no_target']} without target tokens left out. On this data with {K} simulated "
              f"devices: " + ", ".join(f"{k} idle {v['idle_fraction']:.0%}" for k, v in on_data.items()) + ".\n\n"
              f"Synthetic LongAlign-10k + ShareGPT length mix ({len(mix.lengths)} sequences, half long ~16k, half short ~650 "
              f"tokens; `lengths.synthetic_longalign_sharegpt_mix`, not real data), "
              f"{K} devices, cost model t = {cost.a:g}·Σlen + {cost.b:g}·Σlen²:\n\n" + "\n".join(rows) +
              "\n\n![gantt](figures/gantt.png)\n\n![fill](figures/pack_fill.png)\n\n![weights](figures/loss_weights.png)")
    return StageResult(metrics, outputs, report)


def _eff(plan: Plan) -> dict:
    c = plan.counters
    return {"fill_rate": c["fill_rate"], "padding_fraction": c["padding_fraction"], "rows": c["rows"],
            "seqs_per_row": c["seqs_per_row"], "plan_steps": c["steps"]}

