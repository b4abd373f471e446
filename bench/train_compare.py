"""The engine against what users would pick instead, side by side: one process per variant, identical rows.

Run as: python bench/train_compare.py --out-dir bench/results/compare_h200 [--only 1.5b-32k-8docs] [--budget-s 600]
Variants (each a fresh Python process, so peak memory and compile caches do not leak between them):
  engine-liger-auto80   the engine with Liger kernels and `auto` checkpointing under an 80 GiB budget (fits an H100)
  engine-liger-auto     the same, budget = the whole GPU (default `train.memory_budget_gib`)
  engine-liger-auto80-flex / -compile   the same with flex attention / torch.compile of the decoder layers
  engine-liger-all      Liger kernels, every layer checkpointed
  engine-plain-all      the engine before kernels.py: plain PyTorch, every layer checkpointed
  hf                    plain transformers: flex_attention, its own loss, gradient checkpointing
  hf-liger              transformers + Liger (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), flex_attention
Cases: <shape>-<row>-<documents per row>, e.g. 1.5b-32k-8docs (rows from bench/train_throughput.py's `packed_rows`).
Every variant: random-init model of the shape, fp32 master weights + bf16 autocast, fused AdamW, 10 % target
tokens, median over the timed steps after warm-up; MFU = model FLOPs (throughput.flops_counter) / measured matmul
ceiling, the same definition for all. Writes compare.json (rewritten after every variant), compare.log,
profile.txt (torch.profiler top kernels of the variants run with profiling) and compare.png into --out-dir.
`--budget-s`: stop starting variants when the next one would not finish in time (the list is in priority order).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CASES = {
    "1.5b-32k-8docs": ("qwen2.5-1.5b", 32768, "8docs"),
    "1.5b-32k-single": ("qwen2.5-1.5b", 32768, "single"),
    "1.5b-64k-8docs": ("qwen2.5-1.5b", 65536, "8docs"),
    "0.5b-64k-8docs": ("qwen2.5-0.5b", 65536, "8docs"),
    "7b-32k-8docs": ("qwen2.5-7b", 32768, "8docs"),
    "tiny-1k-8docs": ("tiny", 1024, "8docs"),  # smoke test of this script on CPU: --device cpu --only tiny-1k-8docs
}
ENGINE = {  # variant → (attention, --set overrides)
    "engine-liger-auto80": ("varlen", ["train.fused_kernels=liger", "train.activation_checkpointing=auto",
                                       "train.memory_budget_gib=80"]),
    "engine-liger-auto": ("varlen", ["train.fused_kernels=liger", "train.activation_checkpointing=auto"]),
    "engine-liger-auto80-flex": ("flex", ["train.fused_kernels=liger", "train.activation_checkpointing=auto",
                                          "train.memory_budget_gib=80"]),
    "engine-liger-auto80-compile": ("varlen", ["train.fused_kernels=liger", "train.activation_checkpointing=auto",
                                               "train.memory_budget_gib=80", "train.compile_layers=true"]),
    "engine-liger-all": ("varlen", ["train.fused_kernels=liger", "train.activation_checkpointing=all"]),
    "engine-plain-all": ("varlen", ["train.fused_kernels=none", "train.activation_checkpointing=all"]),
}
HF = {"hf": False, "hf-liger": True}
REFERENCE = "hf-liger"
# (case, variant, profile) in priority order; seconds each is expected to take (to respect --budget-s)
DEFAULT_PLAN = [
    ("1.5b-32k-8docs", "engine-liger-auto80", True), ("1.5b-32k-8docs", "hf-liger", True),
    ("1.5b-32k-8docs", "engine-plain-all", False), ("1.5b-32k-8docs", "hf", False),
    ("1.5b-64k-8docs", "engine-liger-auto80", False), ("1.5b-64k-8docs", "hf-liger", False),
    ("1.5b-32k-single", "engine-liger-auto80", False), ("1.5b-32k-single", "hf-liger", False),
    ("1.5b-32k-8docs", "engine-liger-auto", False), ("1.5b-32k-8docs", "engine-liger-auto80-flex", False),
    ("1.5b-32k-8docs", "engine-liger-auto80-compile", False), ("1.5b-64k-8docs", "engine-plain-all", False),
    ("0.5b-64k-8docs", "engine-liger-auto80", False), ("0.5b-64k-8docs", "hf-liger", False),
    ("7b-32k-8docs", "engine-liger-auto80", False), ("7b-32k-8docs", "hf-liger", False),
]


def expected_s(case: str, variant: str) -> float:
    """A rough guess of one variant's wall time on an H200 (process start, model build, steps, compiles)."""
    shape, seq, _ = CASES[case]
    base = {"qwen2.5-7b": 60, "qwen2.5-1.5b": 20, "qwen2.5-0.5b": 15}.get(shape, 10) * (seq / 32768) ** 0.5
    return base + (30 if variant.startswith("hf") or "flex" in variant or "compile" in variant else 0)


# ------------------------------------------------------------------------------------------------------ worker
class _Profile:
    """torch.profiler around one step; appends the top kernels (self GPU time) to a text file, returns a summary."""

    def __init__(self, path: Path, title: str):
        self.path, self.title, self.summary = Path(path), title, {}

    def __call__(self):
        import torch

        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                       torch.profiler.ProfilerActivity.CUDA])
        return self

    def __enter__(self):
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.summary = kernel_summary(self.prof)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n==== {self.title}: one step, kernels by self GPU time ====\n")
            f.write(self.summary.pop("_table"))
            f.write("\n" + json.dumps({k: v for k, v in self.summary.items()}, indent=1) + "\n")
        return False


CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "varlen", "flex", "attention")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90")),
    ("liger/triton", ("liger", "_rms_norm", "rms_norm", "swiglu", "silu_mul", "_rope", "triton_", "cross_entropy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "to_copy", "convert")),
    ("elementwise/reduce", ("elementwise", "reduce", "vectorized", "unrolled", "index", "scatter", "gather")),
]


def kernel_summary(prof, top: int = 25) -> dict:
    """Self GPU time per kernel (top `top` as a table) and per category, in ms and share of the step."""
    import torch

    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, float(us), int(e.count)))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    cats: dict[str, float] = {}
    for name, us, _ in rows:
        low = name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + us
    lines = [f"{'kernel':90} {'ms':>9} {'share':>6} {'calls':>6}"]
    for name, us, n in rows[:top]:
        lines.append(f"{name[:90]:90} {us / 1e3:9.2f} {100 * us / total:5.1f}% {n:6d}")
    lines.append(f"{'total GPU kernel time':90} {total / 1e3:9.2f}")
    return {"_table": "\n".join(lines), "gpu_ms": round(total / 1e3, 2),
            "categories_ms": {k: round(v / 1e3, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:120], "ms": round(us / 1e3, 3), "calls": c} for n, us, c in rows[:top]]}


def worker(case: str, variant: str, steps: int, warmup: int, profile: Path | None, result: Path,
           device: str = "cuda") -> int:
    shape, seq, mix = CASES[case]
    prof = _Profile(profile, f"{case} {variant}") if profile else None
    t0 = time.time()
    if variant in ENGINE:
        from train_throughput import run_variant
        from transformers import TrainerCallback

        attn, sets = ENGINE[variant]
        callbacks = []
        if prof is not None:
            class ProfileLast(TrainerCallback):
                def on_step_begin(self, args, state, control, **kw):
                    if state.global_step == steps:  # the extra step after the timed ones
                        self.ctx = prof().__enter__()

                def on_step_end(self, args, state, control, **kw):
                    if getattr(self, "ctx", None) is not None and state.global_step == steps + 1:
                        import torch

                        if device == "cuda":
                            torch.cuda.synchronize()
                        self.ctx.__exit__(None, None, None)
                        self.ctx = None

            callbacks.append(ProfileLast())
        if device != "cuda":
            attn = "sdpa"
        out = run_variant(shape, seq, attn, steps, warmup, mix, True, 0.1, Path("/tmp/longalign_compare"), sets=sets,
                          extra_steps=1 if prof else 0, callbacks=callbacks, device=device)
    else:
        from hf_baseline import run

        out = run(shape, seq, "flex_attention" if device == "cuda" else "sdpa", steps, warmup, mix, liger=HF[variant],
                  extra_steps=1 if prof else 0, on_extra_step=prof, device=device)
    out.update({"case": case, "variant": variant, "process_s": round(time.time() - t0, 1)})
    if prof is not None:
        out["profile"] = prof.summary
    from longalign_lib.io import write_json

    write_json(result, out)
    return 0


# ------------------------------------------------------------------------------------------------------ driver
def _ratios(results: list[dict]) -> None:
    ref = {r["case"]: r for r in results if r.get("variant") == REFERENCE and "error" not in r}
    for r in results:
        base = ref.get(r.get("case"))
        if base and "error" not in r:
            r["speed_vs_hf_liger"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["memory_vs_hf_liger"] = round(r["peak_mem_gib"] / base["peak_mem_gib"], 3)


def plot(results: list[dict], path: Path, title: str) -> None:
    from longalign_lib import plots

    ok = [r for r in results if "error" not in r]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    if not ok:
        return
    fig, ax = plots.figure(figsize=(max(8, 1.6 * len(cases) * max(1, len(variants)) / 2), 4.5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys, labels = [], [], []
        for i, c in enumerate(cases):
            r = next((x for x in ok if x["case"] == c and x["variant"] == v), None)
            if r is None:
                continue
            xs.append(i + (j - (len(variants) - 1) / 2) * width)
            ys.append(r["tokens_per_s"] / 1e3)
            ratio = f"\n{r['speed_vs_hf_liger']:.2f}×" if "speed_vs_hf_liger" in r else ""
            labels.append(f"{r['peak_mem_gib']:.0f}G{ratio}")
        bars = ax.bar(xs, ys, width=width, label=v, color=plots.CYCLE[j % len(plots.CYCLE)])
        for b, t in zip(bars, labels, strict=False):
            ax.annotate(t, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases)
    ax.set_ylabel("training tokens / s (thousands)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.set_ylim(0, max(r["tokens_per_s"] for r in ok) / 1e3 * 1.35)
    plots.save(fig, path, close=True)


def driver(a) -> int:
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [p for p in DEFAULT_PLAN if (not a.only or p[0] in a.only) and (not a.variants or p[1] in a.variants)]
    if a.plan:
        plan = [(x.split(":")[0], x.split(":")[1], x.endswith(":profile")) for x in a.plan]
    log = out_dir / "compare.log"
    results, t_start = [], time.time()
    meta = {"argv": sys.argv[1:], "steps": a.steps, "warmup": a.warmup, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch
        import transformers

        meta.update({"torch": torch.__version__, "transformers": transformers.__version__,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        meta["liger_kernel"] = version("liger-kernel")
    except Exception as e:  # record, do not stop: the engine's plain variants still run
        meta["import_note"] = f"{type(e).__name__}: {e}"
    from longalign_lib.io import write_json

    for case, variant, profile in plan:
        left = a.budget_s - (time.time() - t_start)
        guess = expected_s(case, variant)
        if guess > left:
            results.append({"case": case, "variant": variant, "error": f"skipped: {left:.0f} s left, ~{guess:.0f} s needed"})
            continue
        res_file = Path(f"/tmp/longalign_compare_{case}_{variant}.json")
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", "--case", case, "--variant", variant, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--result", str(res_file), "--device", a.device]
        if profile and a.profile:
            cmd += ["--profile", str(out_dir / "profile.txt")]
        t0 = time.time()
        cap = max(30.0, min(a.cap_s, left))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", f"{e.stdout or ''}{e.stderr or ''}" if isinstance(e.stdout, str) else "timeout"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n==== {case} {variant} rc={rc} {time.time() - t0:.1f} s ====\n{text[-4000:]}\n")
        if rc == 0 and res_file.exists():
            r = json.loads(res_file.read_text())
        else:
            tail = [x for x in text.strip().splitlines() if x.strip()][-3:]
            r = {"case": case, "variant": variant, "error": f"rc={rc}: " + " | ".join(tail)[-400:]}
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        _ratios(results)
        write_json(out_dir / "compare.json", {"meta": meta, "results": results})
        print(summary_line(r), flush=True)
    _ratios(results)
    meta["total_s"] = round(time.time() - t_start, 1)
    write_json(out_dir / "compare.json", {"meta": meta, "results": results})
    plot(results, out_dir / "compare.png", f"Engine vs transformers (+ Liger), {meta.get('device', '?')}")
    print(table(results))
    return 0


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:16} {r['variant']:28} ERROR {r['error'][:160]}"
    ck = r.get("checkpointing") or {}
    ck_s = f"ckpt {ck.get('n_checkpointed')}/{ck.get('n_layers')}" if ck else "ckpt all (HF)"
    return (f"{r['case']:16} {r['variant']:28} {r['tokens_per_s']:9.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
            f"{r['peak_mem_gib']:6.1f} GiB  {ck_s}  x{r.get('speed_vs_hf_liger', float('nan')):.2f} vs hf-liger")


def table(results: list[dict]) -> str:
    """A markdown table of the results (what docs/performance.md shows)."""
    lines = ["| case | variant | tokens/s | MFU | peak GiB | checkpointed layers | vs transformers + Liger (speed, memory) |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | — | — | — | — | {r['error'][:80]} |")
            continue
        ck = r.get("checkpointing") or {}
        ck_s = f"{ck['n_checkpointed']} of {ck['n_layers']}" if ck else "all"
        if ck.get("predicted_peak_gib"):
            ck_s += f" (predicted {ck['predicted_peak_gib']:.1f} GiB)"
        ratio = (f"{r['speed_vs_hf_liger']:.2f}×, {r['memory_vs_hf_liger']:.2f}×" if "speed_vs_hf_liger" in r else "")
        lines.append(f"| {r['case']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f} % | "
                     f"{r['peak_mem_gib']:.1f} | {ck_s} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / "compare"))
    ap.add_argument("--only", nargs="*", default=None, help="cases to run (default: all of the plan)")
    ap.add_argument("--variants", nargs="*", default=None, help="variants to run (default: all of the plan)")
    ap.add_argument("--plan", nargs="*", default=None,
                    help="explicit case:variant[:profile] list instead of the default plan")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=1800.0)
    ap.add_argument("--cap-s", type=float, default=150.0, help="time limit of one variant's process")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script (tiny case, no Liger)")
    ap.add_argument("--table", default=None, help="print the markdown table of an existing compare.json and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--profile", dest="profile_path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.table).read_text())["results"]))
        return 0
    if a.worker:
        return worker(a.case, a.variant, a.steps, a.warmup, Path(a.profile_path) if a.profile_path else None,
                      Path(a.result), a.device)
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
