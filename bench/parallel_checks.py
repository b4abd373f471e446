"""Compare stage-4 run directories written on several GPUs: one step equal across engines; resume after a kill.

Run as: python bench/parallel_checks.py equality --lr 1e-4 RUN_SINGLE RUN_FSDP2 [RUN_DDP ...] --out equality.json
        python bench/parallel_checks.py resume RUN_UNINTERRUPTED RUN_KILLED_AND_RESUMED --out resume.json
Reads each run's train_log.jsonl and exported model/ (safetensors). `equality` reports, per run against the first:
relative loss difference, and the parameter difference in units of the learning rate (the first AdamW step
moves every weight by about lr, so |Δ| / lr is the share of an update two runs disagree on).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(run: Path):
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted((run / "model").glob("model*.safetensors")):
        state.update(load_file(str(f)))
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {k: v.float() for k, v in state.items() if torch.is_floating_point(v)}, log


def param_diff(a: dict, b: dict, lr: float) -> dict:
    import torch

    keys = sorted(set(a) & set(b))
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in keys])
    return {"tensors": len(keys), "only_in_one": sorted(set(a) ^ set(b))[:5], "max_abs": float(diffs.max()),
            "mean_abs": float(diffs.mean()), "max_over_lr": float(diffs.max()) / lr,
            "mean_over_lr": float(diffs.mean()) / lr, "share_over_half_lr": float((diffs > 0.5 * lr).float().mean()),
            "bit_equal": bool(all(torch.equal(a[k], b[k]) for k in keys))}


def within_bf16_tolerance(r: dict) -> bool:
    """docs/performance.md's tolerance for one bf16 optimizer step against the single-process step: loss within
    1e-3 relative; < 1 % of the weights moved differently by more than lr/2; none by more than 2·lr (a sign flip of
    a gradient within rounding of zero under Adam's first step), with 0.5 % slack for fp32 rounding of the weight."""
    return r["loss_rel_diff"] <= 1e-3 and r["share_over_half_lr"] < 0.01 and r["max_over_lr"] <= 2.01


def equality(runs: list[Path], lr: float) -> dict:
    ref_state, ref_log = _load(runs[0])
    out = {"reference": str(runs[0]), "lr": lr, "ref_loss": ref_log[0]["loss"], "runs": {}}
    for r in runs[1:]:
        state, log = _load(r)
        out["runs"][r.name] = {"loss": log[0]["loss"],
                               "loss_rel_diff": abs(log[0]["loss"] - ref_log[0]["loss"]) / abs(ref_log[0]["loss"]),
                               **param_diff(state, ref_state, lr)}
        out["runs"][r.name]["within_bf16_tolerance"] = within_bf16_tolerance(out["runs"][r.name])
    return out


def resume(full: Path, resumed: Path) -> dict:
    a_state, a_log = _load(full)
    b_state, b_log = _load(resumed)
    la, lb = [r["loss"] for r in a_log], [r["loss"] for r in b_log]
    n = min(len(la), len(lb))
    rel = [abs(x - y) / abs(x) for x, y in zip(la[:n], lb[:n], strict=True)]
    return {"steps": [len(la), len(lb)], "loss_full": la, "loss_resumed": lb, "loss_max_rel_diff": max(rel or [0.0]),
            "loss_bit_equal": la == lb, **param_diff(b_state, a_state, 1.0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["equality", "resume"])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = equality(a.runs, a.lr) if a.what == "equality" else resume(*a.runs[:2])
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
