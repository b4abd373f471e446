"""Profile `make demo` stage by stage: wall seconds and CPU seconds of each stage, on a clean or a given home.

On a machine shared with other jobs, wall time says little; the demo runs one torch thread, so a stage's CPU
seconds (process time, all threads) are what it would take on an idle core. The model conversion a clean
$LONGALIGN_HOME starts with is timed first, as its own row. Each row also records the 1-minute load average when
the stage ended (`load_1m`): wall time means something only next to it.

Run as: python bench/profile_demo.py [--preset cpu-demo] [--home /tmp/clean_home] [--out bench/results/demo_profile.json]
        [--stages check,corpus,synth] [--set section.key=value ...]
(`--home` defaults to a fresh temporary folder: model conversion and an empty LLM cache, as a newcomer has it.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--home", default=None, help="LONGALIGN_HOME to use (default: a fresh temporary folder)")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--stages", default=None, help="comma-separated subset (default: every stage)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default="bench/results/demo_profile.json")
    a = ap.parse_args(argv)
    load_start = os.getloadavg()
    home = Path(a.home or tempfile.mkdtemp(prefix="longalign_home_"))
    os.environ["LONGALIGN_HOME"] = str(home)
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="longalign_demo_"))

    from longalign_lib import pipeline
    from longalign_lib.config import load_config
    from longalign_lib.models import convert_bundled

    rows = [{"stage": "imports", "wall_s": None, "cpu_s": round(time.process_time(), 1)}]  # python + torch import

    def timed(name, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        rows.append({"stage": name, "wall_s": round(time.perf_counter() - w0, 1),
                     "cpu_s": round(time.process_time() - c0, 1), "load_1m": round(os.getloadavg()[0], 2)})
        print(f"[profile] {name:10s} wall {rows[-1]['wall_s']:7.1f} s   cpu {rows[-1]['cpu_s']:7.1f} s   "
              f"(load {rows[-1]['load_1m']:.1f})", flush=True)
        return out

    cfg = load_config(a.preset, a.overrides)
    if cfg.model.name == "smollm2-135m-instruct":
        timed("convert", lambda: convert_bundled(quiet=True))
    from longalign_lib.stages import NAMES

    names = a.stages.split(",") if a.stages else list(NAMES)
    results = {n: timed(n, lambda n=n: pipeline.run_one(n, cfg, run_dir)) for n in names}
    pipeline.write_report(cfg, run_dir, results)
    total = {"wall_s": round(sum(r["wall_s"] or 0 for r in rows), 1), "cpu_s": round(sum(r["cpu_s"] for r in rows), 1)}
    report = {"preset": a.preset, "overrides": a.overrides, "home": str(home), "run_dir": str(run_dir),
              "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "stages": rows, "total": total,
              "metrics": {n: r.metrics for n, r in results.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"[profile] total wall {total['wall_s']} s, cpu {total['cpu_s']} s (load {os.getloadavg()[0]:.1f}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
