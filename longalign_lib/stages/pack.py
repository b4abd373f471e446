"""`longalign pack`: naive / sorted / packed batch plans and loss weights of the tokenized data → plans/, batching.json.

Run as: longalign pack --preset cpu-demo [--synthetic-n 2000] [--set batching.strategy=sorted] [--run-dir DIR]
Also compares every strategy on a synthetic LongAlign-like mix with a cost model of K data-parallel devices.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .. import plots
from ..batching import Plan, _check_cfg, fill_histogram_figure, loss_weight_figure, plan_epoch
from ..dataset import load_tokenized
from ..formatting import format_file
from ..inputs import sample_path
from ..io import LongAlignError, write_json
from ..models import load_tokenizer
from ..simulate import CostModel, compare_strategies, gantt_figure, idle_bar_figure, longalign_like_mix
from .base import StageResult


class _LazyLabels:
    """labels[i] read on demand from a dataset (only over-long rows are looked at)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        return self.ds[int(i)]["labels"]


def load_lengths(cfg, run_dir: Path):
    """(lengths, n_target, labels, dataset, note): the stage-2 tokenized dataset, or the bundled sample tokenized
    on the fly when there is none (said in `note`)."""
    if cfg.batching.dataset_dir and not (Path(cfg.batching.dataset_dir) / "state.json").exists():
        raise LongAlignError(f"batching.dataset_dir={cfg.batching.dataset_dir}: no tokenized dataset there; run "
                             "`longalign tokenize` or fix the path")
    cand = [cfg.batching.dataset_dir, cfg.data.tokenized_dir, Path(run_dir) / "tokenized"]
    for c in cand:
        if c and (Path(c) / "state.json").exists():
            ds = load_tokenized(c)
            return (np.asarray(ds["length"]), np.asarray(ds["n_target"]), _LazyLabels(ds), ds,
                    f"stage-2 tokenized dataset `{c}` ({len(ds)} sequences)")
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    data = Path(cfg.data_file) if cfg.data_file else sample_path()
    exs, _ = format_file(data, tok, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in exs]
    return (np.array([e.length for e in exs]), np.array([e.n_target for e in exs]), [r["labels"] for r in rows],
            rows, f"no tokenized dataset in the run directory: the bundled sample `{data.name}` "
                  f"({len(exs)} sequences), tokenized on the fly")


def add_arguments(p) -> None:
    p.add_argument("--synthetic-n", type=int, default=2000,
                   help="sequences of the synthetic LongAlign-like mix (64k) used for the idle-time comparison")


def run(cfg, run_dir: Path, args) -> StageResult:
    run_dir = Path(run_dir)
    b = cfg.batching
    _check_cfg(b)
    lengths, n_target, labels, _, note = load_lengths(cfg, run_dir)
    cost = CostModel.from_config(b)
    out: dict[str, Any] = {"data": note, "config": dataclasses.asdict(b), "cost_model": cost.to_dict(), "plans": {}}
    outputs = ["batching.json"]
    # 1. the plans the trainer will run (same function, same seed: train.py re-plans identically)
    for e in range(max(1, int(b.plan_epochs))):
        plan = plan_epoch(lengths, n_target, b, epoch=e, labels=labels)
        write_json(run_dir / "plans" / f"plan_epoch{e}.json", plan.to_dict(), indent=None)
        outputs.append(f"plans/plan_epoch{e}.json")
        out["plans"][e] = plan.counters
    plan0_counters = out["plans"][0]
    # 2. every strategy on this data and on a synthetic LongAlign-like 64k mix, K simulated devices
    K = int(b.sim_world_size)
    ours = compare_strategies(lengths, n_target, b, world_size=K, cost=cost)
    out["strategies_data"] = {k: {**s.summary(), **_eff(p)} for k, (p, s) in ours.items()}
    syn_cfg = dataclasses.replace(b, max_pack_tokens=65536, batch_size=1, grad_accum=1, overlong="truncate")
    sl, sn = longalign_like_mix(int(getattr(args, "synthetic_n", 2000) or 2000), seed=b.seed)
    syn = compare_strategies(sl, sn, syn_cfg, world_size=K, cost=cost)
    out["strategies_synthetic_64k"] = {k: {**s.summary(), **_eff(p)} for k, (p, s) in syn.items()}
    # 3. figures (synthetic mix: enough sequences to show the effect; small Gantt so the bars are readable)
    gl, gn = longalign_like_mix(16 * K, seed=b.seed + 1)
    small = compare_strategies(gl, gn, syn_cfg, world_size=K, cost=cost)
    figs = {
        "gantt": gantt_figure([small[k][1] for k in ("naive", "sorted", "packed-bfd", "packed-bfd+balance")],
                              title=f"Idle time on {K} devices, synchronous data parallel — synthetic LongAlign-like "
                                    f"mix of {len(gl)} sequences, 64k rows, cost model a={cost.a:g}, b={cost.b:g}"),
        "idle": idle_bar_figure(out["strategies_synthetic_64k"],
                                title=f"Epoch time on {K} devices — synthetic LongAlign-like mix, {len(sl)} sequences"),
        "pack_fill": fill_histogram_figure({k: syn[k][0] for k in ("packed-next_fit", "packed-bfd")},
                                           title=f"Row fill at 64k — synthetic LongAlign-like mix, {len(sl)} sequences"),
    }
    wstep = max(ours["packed-bfd"][0].steps, key=lambda s: s.n_sequences)
    wnote = "this run's data"
    if wstep.n_sequences < 4:
        wplan = plan_epoch(sl[:48], sn[:48], dataclasses.replace(syn_cfg, world_size=2, grad_accum=2))
        wstep, wnote = max(wplan.steps, key=lambda s: s.n_sequences), "synthetic LongAlign-like mix"
    figs["loss_weights"] = loss_weight_figure(wstep, title=f"Effective loss weight per sequence, one step of a "
                                                           f"packed plan ({wnote}, M = {wstep.n_sequences})")
    for name, fig in figs.items():
        plots.save(fig, run_dir / "figures" / f"{name}.png", close=True)
        outputs.append(f"figures/{name}.png")
    write_json(run_dir / "batching.json", out)
    sd, sy = out["strategies_data"], out["strategies_synthetic_64k"]
    metrics = {"strategy": b.strategy, "packer": b.packer, "reduction": b.loss_reduction,
               "sequences": int(len(lengths)), "steps": plan0_counters["steps"],
               "fill_rate": round(plan0_counters["fill_rate"], 4),
               "padding_fraction": round(plan0_counters["padding_fraction"], 4),
               "truncated": plan0_counters["truncated"], "skipped_overlong": plan0_counters["skipped_overlong"],
               "skipped_no_target": plan0_counters["skipped_no_target"], "split": plan0_counters["split"],
               "pieces": plan0_counters["pieces"],
               "syn_fill_bfd": round(sy["packed-bfd"]["fill_rate"], 4),
               "syn_fill_next_fit": round(sy["packed-next_fit"]["fill_rate"], 4),
               **{f"syn_idle_{k}": round(v["idle_fraction"], 4) for k, v in sy.items()}}
    rows = ["| strategy | fill | padding | modelled time (s) | idle |", "|---|---|---|---|---|"]
    for k, v in sy.items():
        rows.append(f"| {k} | {v['fill_rate']:.1%} | {v['padding_fraction']:.1%} | {v['total_time_s']:,.0f} | "
                    f"{v['idle_fraction']:.1%} |")
    report = (f"Data: {note}. Plan ({b.strategy}{'/' + b.packer if b.strategy == 'packed' else ''}, rows of "
              f"{b.max_pack_tokens} tokens, {b.world_size} rank(s) × {b.grad_accum} micro-step(s), loss "
              f"`{b.loss_reduction}`): {plan0_counters['steps']} steps, fill {plan0_counters['fill_rate']:.1%}, "
              f"padding {plan0_counters['padding_fraction']:.1%}; over-long: {plan0_counters['truncated']} truncated, "
              f"{metrics['skipped_overlong']} skipped, {plan0_counters['split']} split into {metrics['pieces']} "
              f"pieces; {metrics['skipped_no_target']} without target tokens left out. On this data with {K} simulated "
              f"devices: " + ", ".join(f"{k} idle {v['idle_fraction']:.0%}" for k, v in sd.items()) + ".\n\n"
              f"Synthetic LongAlign-like mix ({len(sl)} sequences: 70 % 0.2k–8k, 30 % 8k–64k; not real data), "
              f"{K} devices, cost model t = {cost.a:g}·Σlen + {cost.b:g}·Σlen²:\n\n" + "\n".join(rows) +
              "\n\n![gantt](figures/gantt.png)\n\n![fill](figures/pack_fill.png)\n\n![weights](figures/loss_weights.png)")
    return StageResult(metrics, outputs, report)


def _eff(plan: Plan) -> dict:
    c = plan.counters
    return {"fill_rate": c["fill_rate"], "padding_fraction": c["padding_fraction"], "rows": c["rows"],
            "seqs_per_row": c["seqs_per_row"], "plan_steps": c["steps"]}

