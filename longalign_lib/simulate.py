"""Cost model and synchronous data-parallel simulation of batch plans: step time, idle time per device.

Usage:
    from longalign_lib.simulate import CostModel, simulate, calibrate
    cm = CostModel.from_config(cfg.batching)            # t(micro-batch) = a·Σlen + b·Σlen² + c
    sim = simulate(plan, cm)                             # total time, idle fraction per rank, per-step timeline
    cm = calibrate(measured)                             # fit a, b (, c) from measured micro-batch times
Run as: python -m longalign_lib.simulate  (prints the default-constant simulation of a LongAlign-like mix)

The model: a micro-batch's time is linear in the tokens the model runs over (MLPs, projections: a per token)
plus quadratic in each attention span (b per token², summed over the sequences of a packed row; over the padded
row length for padded rows), plus a fixed overhead c. Synchronous data parallel: at every optimizer step all K
ranks wait for the slowest one (the gradient all-reduce), so a rank's idle time is (slowest rank − its own time).
The default constants describe a 7B-class Llama on one H100 in bf16 at ~40 % MFU (6·N·tokens FLOPs for the linear
part, ~6·layers·d·len² for causal attention); calibrate them from real step times with `calibrate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import LongAlignError


@dataclass
class CostModel:
    a: float = 1.0e-4  # seconds per token
    b: float = 2.0e-9  # seconds per token² of attention span
    c: float = 0.0  # seconds per micro-batch

    @classmethod
    def from_config(cls, cfg) -> CostModel:
        return cls(float(cfg.cost_a), float(cfg.cost_b), float(getattr(cfg, "cost_c", 0.0)))

    def features(self, mb) -> tuple[float, float]:
        """(linear tokens, quadratic term) the micro-batch runs: padded rows count their padding."""
        if not mb.packs:
            return 0.0, 0.0
        if mb.padded:
            L = max(mb.row_lengths)
            return float(len(mb.packs) * L), float(len(mb.packs) * L * L)
        return float(mb.tokens), float(sum(l * l for row in mb.lengths for l in row))

    def micro_batch(self, mb) -> float:
        if not mb.packs:
            return 0.0
        x, x2 = self.features(mb)
        return self.a * x + self.b * x2 + self.c

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c}


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
    e.g. from CostModel().features(mb) and measured micro-batch times."""
    from scipy.optimize import nnls

    if len(samples) < (3 if fit_overhead else 2):
        raise LongAlignError(f"calibrate: need at least {3 if fit_overhead else 2} timed micro-batches, got {len(samples)}")
    X = np.array([[x, x2, 1.0] if fit_overhead else [x, x2] for x, x2, _ in samples], dtype=float)
    y = np.array([t for *_, t in samples], dtype=float)
    scale = X.max(0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(X / scale, y)
    coef = coef / scale
    return CostModel(float(coef[0]), float(coef[1]), float(coef[2]) if fit_overhead else 0.0)


def longalign_like_mix(n: int, seed: int = 0, max_len: int = 65536, short_share: float = 0.7,
                       short_max: int = 8192, min_len: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC lengths shaped like LongAlign's training mix (for benchmarks and figures, not real data):
    `short_share` of sequences uniform in [min_len, short_max), the rest uniform in [short_max, max_len];
    target tokens 2–30 % of each sequence (answers are short next to long documents)."""
    rng = np.random.default_rng(seed)
    short = rng.random(n) < short_share
    lens = np.where(short, rng.integers(min_len, short_max, n), rng.integers(short_max, max_len + 1, n))
    nt = np.maximum(1, (lens * rng.uniform(0.02, 0.3, n)).astype(np.int64))
    return lens.astype(np.int64), nt
