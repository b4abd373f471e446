"""Cost model and synchronous data-parallel simulation of batch plans: step time, idle time per device.

Usage:
    from longalign_lib.simulate import CostModel, simulate, calibrate
    cm = CostModel.from_config(cfg.batching)            # t(micro-batch) = a·Σlen + b·Σlen² + c
    sim = simulate(plan, cm)                             # total time, idle fraction per rank, per-step timeline
    cm = calibrate(measured)                             # fit a, b (, c) from measured micro-batch times
Run as: python -m longalign_lib.simulate  (prints the default-constant simulation of the synthetic
        LongAlign-10k + ShareGPT mix, lengths.synthetic_longalign_sharegpt_mix)

The model: a micro-batch's time is linear in the tokens the model runs over (MLPs, projections: a per token)
plus quadratic in each attention span (b per token², summed over the sequences of a packed row; over the padded
row length for padded rows), plus a fixed overhead c. Synchronous data parallel: at every optimizer step all K
ranks wait for the slowest one (the gradient all-reduce), so a rank's idle time is (slowest rank − its own time).
The default constants describe a 7B-class Llama on one H100 in bf16 at ~40 % MFU (6·N·tokens FLOPs for the linear
part, ~6·layers·d·len² for causal attention); calibrate them from real step times with `calibrate`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from .batching import CostModel, collate, plan_epoch, step_token_weights
from .io import LongAlignError
from .lengths import synthetic_longalign_sharegpt_mix


@dataclass
class Simulation:
    name: str
    world_size: int
    busy: np.ndarray  # [steps, ranks] seconds of work
    step_time: np.ndarray  # [steps] slowest rank
    timeline: list  # per step, per rank: list of micro-batch durations

    @property
    def total_time(self) -> float:
        return float(self.step_time.sum())

    @property
    def idle_per_rank(self) -> np.ndarray:
        """Idle fraction of each rank: Σ_steps (slowest − own) / total time."""
        tot = self.total_time
        return (self.step_time[:, None] - self.busy).sum(0) / tot if tot else np.zeros(self.world_size)

    @property
    def idle_fraction(self) -> float:
        return float(self.idle_per_rank.mean())

    def summary(self) -> dict:
        return {"total_time_s": self.total_time, "idle_fraction": self.idle_fraction,
                "idle_per_rank": [round(float(x), 4) for x in self.idle_per_rank], "steps": int(len(self.step_time))}


def simulate(plan, cost: CostModel, name: str | None = None) -> Simulation:
    """Run `plan` on its world_size ranks under the cost model, step by step (synchronous data parallel)."""
    W = plan.world_size
    busy = np.zeros((len(plan.steps), W))
    timeline = []
    for s, step in enumerate(plan.steps):
        row = []
        for r, mbs in enumerate(step.ranks):
            d = [cost.micro_batch(mb) for mb in mbs]
            busy[s, r] = sum(d)
            row.append(d)
        timeline.append(row)
    step_time = busy.max(1) if len(busy) else np.zeros(0)
    return Simulation(name or plan.name, W, busy, step_time, timeline)


def calibrate(samples: list[tuple[float, float, float]], fit_overhead: bool = True) -> CostModel:
    """Fit a, b (and c) ≥ 0 by non-negative least squares on (linear tokens, quadratic term, seconds) samples,
    e.g. from CostModel().features(mb) and measured micro-batch times.

    Refuses (LongAlignError, one message saying why) a fit that would only describe noise: fewer than two samples
    per constant, fewer than three distinct micro-batch sizes, or times that do not grow with tokens (a = b = 0).

    >>> cm = calibrate([(100, 1e4, 0.2), (200, 4e4, 0.4), (400, 1.6e5, 0.8), (800, 6.4e5, 1.6)], fit_overhead=False)
    >>> round(cm.a, 6), round(cm.b, 12)
    (0.002, 0.0)
    >>> calibrate([(64, 4096, 0.3)] * 6)
    Traceback (most recent call last):
    ...
    longalign_lib.io.LongAlignError: calibrate: the 6 timed micro-batches have only 1 distinct size(s); a cost model needs at least 3 different sizes to separate a, b and c: time more steps or longer rows (TIMED_STEPS, TIMING_MAX_TOKENS)
    """
    from scipy.optimize import nnls

    k = 3 if fit_overhead else 2
    what = "time more steps or longer rows (TIMED_STEPS, TIMING_MAX_TOKENS)"
    if len(samples) < 2 * k:
        raise LongAlignError(f"calibrate: need at least {2 * k} timed micro-batches to fit {k} constants (two per "
                             f"constant), got {len(samples)}: {what}")
    sizes = len({round(float(x)) for x, *_ in samples})
    if sizes < 3:
        raise LongAlignError(f"calibrate: the {len(samples)} timed micro-batches have only {sizes} distinct size(s); a "
                             f"cost model needs at least 3 different sizes to separate a, b and c: {what}")
    X = np.array([[x, x2, 1.0] if fit_overhead else [x, x2] for x, x2, _ in samples], dtype=float)
    y = np.array([t for *_, t in samples], dtype=float)
    scale = X.max(0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(X / scale, y)
    coef = coef / scale
    if coef[0] <= 0 and coef[1] <= 0:
        raise LongAlignError(f"calibrate: the {len(samples)} measured times do not grow with the tokens of a "
                             f"micro-batch (fit a = b = 0): fixed overheads and noise dominate, so the constants "
                             f"would mean nothing: {what}")
    return CostModel(float(coef[0]), float(coef[1]), float(coef[2]) if fit_overhead else 0.0)


# ----------------------------------------------------------------------------------------------------- figures
def gantt_figure(sims: list[Simulation], title: str | None = None, max_steps: int | None = None):
    """The paper's Figure 3 as data: per device, each micro-batch as a bar and the wait for the slowest device at
    each step (synchronous all-reduce) as a red 'idle' bar; one panel per strategy, shared time axis."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    K = max(s.world_size for s in sims)
    fig, axes = plots.figure(len(sims), 1, figsize=(9, 1.0 + 0.32 * K * len(sims)), sharex=True, squeeze=False)
    for ax, sim in zip(axes[:, 0], sims, strict=False):
        color = plots.PALETTE.get(sim.name.split("-")[0].split("+")[0], plots.CYCLE[0])
        t0 = 0.0
        steps = sim.timeline if max_steps is None else sim.timeline[:max_steps]
        for s, row in enumerate(steps):
            st = sim.step_time[s]
            for r, durs in enumerate(row):
                x = t0
                for d in durs:
                    ax.broken_barh([(x, d)], (r - 0.4, 0.8), facecolors=color, edgecolors="white", linewidth=0.3)
                    x += d
                if st - (x - t0) > 0:
                    ax.broken_barh([(x, st - (x - t0))], (r - 0.4, 0.8), facecolors=plots.PALETTE["idle"],
                                   edgecolors="none")
            t0 += st
        ax.set_yticks(range(sim.world_size))
        ax.set_yticklabels([f"dev {r}" for r in range(sim.world_size)], fontsize=7)
        ax.invert_yaxis()
        ax.grid(False)
        ax.set_title(f"{sim.name}: {t0:,.0f} s, idle {sim.idle_fraction:.0%} of device time", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("modelled time (s)  —  coloured: computing a micro-batch · red: waiting for the slowest device")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def idle_bar_figure(summary: dict[str, dict], title: str | None = None):
    """Total modelled time and idle share per strategy (bars)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    names = list(summary)
    fig, ax = plots.figure(figsize=(7, 3.2))
    tot = [summary[n]["total_time_s"] for n in names]
    idle = [summary[n]["total_time_s"] * summary[n]["idle_fraction"] for n in names]
    colors = [plots.PALETTE.get(n.split("-")[0].split("+")[0], plots.CYCLE[0]) for n in names]
    ax.barh(names, tot, color=colors, label="busy")
    ax.barh(names, idle, left=[t - i for t, i in zip(tot, idle, strict=True)], color=plots.PALETTE["idle"],
            label="idle (waiting for the slowest device)")
    for y, (t, n) in enumerate(zip(tot, names, strict=True)):
        ax.text(t, y, f"  {t:,.0f} s, idle {summary[n]['idle_fraction']:.0%}", va="center", fontsize=8)
    ax.set_xlabel("modelled epoch time (s, summed over steps)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title(title or "Synchronous data parallel: epoch time and idle share")
    return fig


# ---------------------------------------------------------------------------------------------- measurements
def measure_step_times(model, plan, dataset, n_steps: int = 2, pad_id: int = 0, reduction: str = "sequence",
                       warmup: int = 1, desc: str | None = None, repeats: int = 3) -> dict:
    """Run the first `n_steps` optimizer steps of `plan` for real on this device (forward + backward of every
    micro-batch of every rank, one after the other, through the trainer's loss `loss.model_loss`; no optimizer
    update) and time each micro-batch: `warmup` untimed micro-batches first (allocation, kernel choice), then the
    MEDIAN of `repeats` (≥ 3) runs of each.

    Returns {"micro": [(linear tokens, quadratic term, seconds), ...], "steps": [seconds per step, ...],
    "tokens": real tokens, "computed_tokens": ...}. Packed rows go in with position_ids (documents isolated by
    transformers' packed-sequence masking, use_cache=False); padded rows with an attention mask.
    """
    return measure_plans(model, {plan.name: plan}, dataset, n_steps, pad_id, reduction, warmup, repeats)[plan.name]


def measure_plans(model, plans: dict, dataset, n_steps: int | None = 2, pad_id: int = 0, reduction: str = "sequence",
                  warmup: int = 1, repeats: int = 3) -> dict:
    """`measure_step_times` for several plans, with the repeats INTERLEAVED: round r times every micro-batch of
    every plan once, then round r+1 begins. On a shared machine whose load drifts, the drift then hits every plan
    alike instead of whichever plan ran during a busy minute. Returns {name: measure_step_times' dict}."""
    import torch

    from .loss import model_loss  # torch: only when timing for real

    if int(repeats) < 3:
        raise LongAlignError(f"measure_step_times: repeats={repeats}: a timing needs the median of at least 3 runs")
    device = next(model.parameters()).device
    cm = CostModel()
    model.train()
    work = {}
    for name, plan in plans.items():
        steps_ = plan.steps if n_steps is None else plan.steps[:n_steps]
        items = []
        for si, step in enumerate(steps_):
            w = step_token_weights(step, plan.n_target, reduction, source=plan.source)
            items.extend((si, mb, collate(plan, mb, dataset, w, pad_id)) for mb in step.micro_batches())
        work[name] = (len(steps_), items)
        for _, _, b in items[:warmup]:  # first calls allocate and pick kernels: not timed
            _forward_backward(model, b, device, model_loss)
        model.zero_grad(set_to_none=True)
    runs = {name: [[] for _ in items] for name, (_, items) in work.items()}
    for _ in range(int(repeats)):
        for name, (_, items) in work.items():
            for k, (_, _, b) in enumerate(items):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _forward_backward(model, b, device, model_loss)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs[name][k].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
    out = {}
    for name, (n, items) in work.items():
        micro, steps, tokens, computed = [], [0.0] * n, 0, 0
        for (si, mb, _), r in zip(items, runs[name], strict=True):
            dt = float(np.median(r))
            x, x2 = cm.features(mb)
            micro.append((x, x2, dt))
            steps[si] += dt
            tokens += mb.tokens
            computed += mb.computed_tokens
        out[name] = {"micro": micro, "steps": steps, "tokens": tokens, "computed_tokens": computed,
                     "tokens_per_s": tokens / sum(steps) if sum(steps) else 0.0, "runs": runs[name]}
    return out


def _forward_backward(model, batch, device, loss_fn) -> float:
    """The trainer's forward + backward (loss.model_loss: chunked weighted CE, only targets reach the LM head)."""
    import torch

    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    loss, _ = loss_fn(model, b)
    loss.backward()
    return float(loss.detach())


def strategy_variants(cfg) -> dict:
    """The plans compared in notebook 03 and `longalign pack`, as BatchConfig copies of `cfg`: naive (batch_size
    sequences per micro-batch), sorted (LongAlign's sort-group-shuffle, groups filling max_pack_tokens padded
    tokens), packed next-fit, packed BFD, and packed BFD with cost-balanced steps."""
    r = dataclasses.replace
    return {"naive": r(cfg, strategy="naive", balance="none"),
            "sorted": r(cfg, strategy="sorted", sorted_mode="token_budget", sort_token_budget=cfg.max_pack_tokens,
                        balance="none"),
            "packed-next_fit": r(cfg, strategy="packed", packer="next_fit", balance="none"),
            "packed-bfd": r(cfg, strategy="packed", packer="bfd", balance="none"),
            "packed-bfd+balance": r(cfg, strategy="packed", packer="bfd", balance="cost")}


def compare_strategies(lengths, n_target, cfg, world_size: int | None = None, epoch: int = 0,
                       cost: CostModel | None = None) -> dict:
    """Plan and simulate every strategy variant on the same sequences: {name: (plan, Simulation)}."""
    cost = cost or CostModel.from_config(cfg)
    out = {}
    for name, c in strategy_variants(cfg).items():
        if world_size:
            c = dataclasses.replace(c, world_size=int(world_size))
        plan = plan_epoch(lengths, n_target, c, epoch)
        out[name] = (plan, simulate(plan, cost, name))
    return out


if __name__ == "__main__":
    import json

    from .config import BatchConfig

    mix = synthetic_longalign_sharegpt_mix(2000)
    res = compare_strategies(mix.lengths, mix.n_target, BatchConfig(max_pack_tokens=65536, world_size=8, grad_accum=1))
    print(json.dumps({k: {**s.summary(), "fill_rate": p.counters["fill_rate"],
                          "padding_fraction": p.counters["padding_fraction"]} for k, (p, s) in res.items()}, indent=1))
