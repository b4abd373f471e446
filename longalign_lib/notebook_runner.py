"""Pair jupytext py:percent notebooks to .ipynb and execute them headless with papermill; render executed ones.

Run as: python -m longalign_lib.notebook_runner [--mode smoke|full] [--out-dir runs/notebooks] [--render docs/notebooks]
        [--time-limit S] notebooks/*.py
        python -m longalign_lib.notebook_runner --render-only DIR [--render docs/notebooks] [NAME ...]
(`make notebooks MODE=full` does the first; `make docs-notebooks` renders into docs/notebooks/.) Each notebook's first
code cell is tagged `parameters`; the runner injects SMOKE and OUT_DIR, the executed notebook is written to
OUT_DIR/<name>.ipynb, and the notebook's last cell writes OUT_DIR/metrics.json (tests read it). The runner stamps the
executed notebook's metadata with how it ran (`longalign`: mode, device, date, seconds, status). With --render DIR,
each executed notebook is also turned into DIR/<name>.md with its figures in DIR/<name>_files/ (readable on
GitHub or any Markdown viewer without running anything), headed by a line saying how it was executed
(longalign_lib.notebook_docs). --render-only renders notebooks executed elsewhere (e.g. in full mode on a GPU by
bench/run_device_notebooks.sh): every DIR/<name>.ipynb or DIR/<name>/<name>.ipynb that ran to the end. A SMOKE
run does not replace a page rendered from a full-mode run unless --replace-full is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .io import LongAlignError, read_json, write_text
from .notebook_docs import is_full_page, render_markdown, render_only, write_index


def to_ipynb(py_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Convert a py:percent notebook to .ipynb in `out_dir` (default: beside it); the .py stays the source of truth.

    The runner writes it into the run's output folder, never next to the source: a generated .ipynb beside a .py
    that JupyterLab opens is a second copy that can go stale."""
    import jupytext

    py_path = Path(py_path)
    nb = jupytext.read(py_path, fmt="py:percent")
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"):
        raise LongAlignError(f"{py_path}: no code cell is tagged 'parameters' (add `# %% tags=[\"parameters\"]`)")
    out = (Path(out_dir) / f"{py_path.stem}.input.ipynb") if out_dir else py_path.with_suffix(".ipynb")
    jupytext.write(nb, out, fmt="ipynb")
    return out


def _kernel_for_this_python() -> str:
    """Register (in a private folder on JUPYTER_PATH) a kernel that runs *this* interpreter, so notebooks import
    the same longalign_lib whatever kernels the machine has; returns its name."""
    name = "longalign-runner"
    root = Path(tempfile.gettempdir()) / f"longalign-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "LongAlign (runner)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(root) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *([paths] if paths else [])])
    return name


def machine_device() -> str:
    """What the notebooks of this process run on, in words: the GPU's model (read from the NVIDIA driver's /proc
    files, so this process never opens a CUDA context beside the kernel's), else torch's name for it, else the CPU."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            names += [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("Model:")]
        except OSError:
            pass
    if not names:
        try:
            import torch

            if torch.cuda.is_available():
                names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            pass
    if names:
        return f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]
    return f"CPU ({os.cpu_count()} cores)"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def stamp(ipynb: str | Path, info: dict) -> None:
    """Record how a notebook was executed in its metadata (`longalign` key); written atomically."""
    import nbformat


    nb = nbformat.read(ipynb, as_version=4)
    nb.metadata["longalign"] = info
    write_text(ipynb, nbformat.writes(nb))


def execute(py_path: str | Path, smoke: bool = True, out_dir: str | Path | None = None,
            parameters: dict | None = None, timeout: int = 1800, time_limit: float | None = None) -> dict:
    """Execute one notebook headless; returns its metrics.json (plus `seconds`).

    `timeout` bounds each cell; `time_limit` (seconds) the whole notebook: the cell running when it is spent is
    interrupted and the notebook fails. Either way the executed notebook is saved with what ran and stamped
    (`stamp`: mode, device, date, seconds, status) before any error is raised."""
    import papermill as pm

    py_path = Path(py_path)
    out_dir = Path(out_dir or Path("runs") / "notebooks" / py_path.stem).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ipynb = to_ipynb(py_path, out_dir)
    executed = out_dir / f"{py_path.stem}.ipynb"
    for stale in (executed, out_dir / "metrics.json"):  # an earlier run's outputs must not pass for this one's
        stale.unlink(missing_ok=True)
    params = {"SMOKE": smoke, "OUT_DIR": str(out_dir), **(parameters or {})}
    t0 = time.time()
    extra = {}
    if time_limit:
        deadline = t0 + time_limit
        extra = {"timeout_func": lambda cell: max(1, min(timeout, int(deadline - time.time()))),
                 "interrupt_on_timeout": True}
    info = {"mode": "smoke" if smoke else "full", "device": machine_device(),
            "executed": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **_versions()}
    status = "ok"
    try:
        pm.execute_notebook(str(ipynb), str(executed), parameters=params, kernel_name=_kernel_for_this_python(),
                            cwd=str(py_path.parent.resolve()), progress_bar=False, execution_timeout=timeout, **extra)
    except BaseException as e:
        over = time_limit and time.time() - t0 >= time_limit - 1
        last = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[-1:] or [type(e).__name__]
        status = f"stopped at the {time_limit:.0f} s time limit" if over else f"failed: {last[0][:300]}"
        raise
    finally:
        if executed.exists():
            stamp(executed, {**info, "seconds": round(time.time() - t0, 1), "status": status})
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.exists():
        raise LongAlignError(f"{py_path}: ran, but its last cell wrote no {metrics_path}")
    metrics = read_json(metrics_path)
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks/*.py to execute (or, after `notebook_runner --render-only DIR`, the names to render)")
    ap.add_argument("--mode", choices=["smoke", "full"], default="smoke")
    ap.add_argument("--out-dir", default="runs/notebooks")
    ap.add_argument("--render", default=None, help="also render each executed notebook to Markdown in this folder")
    ap.add_argument("--render-only", metavar="DIR", default=None,
                    help="execute nothing: render the executed notebooks in DIR into the `notebook_runner --render` folder "
                         "(default docs/notebooks)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds each notebook may run in all")
    ap.add_argument("--replace-full", action="store_true",
                    help="let a SMOKE run replace a rendered page that came from a full-mode run")
    a = ap.parse_args(argv)
    if a.render_only:
        try:
            return render_only(a.render_only, a.render or "docs/notebooks", a.notebooks)
        except LongAlignError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not a.notebooks:
        ap.error("give the notebooks to execute (notebooks/*.py), or `notebook_runner --render-only DIR`")
    failed = 0
    for nb in a.notebooks:
        name = Path(nb).stem
        try:
            m = execute(nb, smoke=a.mode == "smoke", out_dir=Path(a.out_dir) / name, time_limit=a.time_limit)
            print(f"{name}: ok in {m['seconds']}s -> {Path(a.out_dir) / name}")
            if a.render:
                page = Path(a.render) / f"{name}.md"
                if a.mode == "smoke" and is_full_page(page) and not a.replace_full:
                    print(f"{name}: kept {page} (a full-mode run; `notebook_runner --replace-full` replaces it with this SMOKE run)")
                    continue
                md = render_markdown(Path(a.out_dir) / name / f"{name}.ipynb", a.render)
                print(f"{name}: rendered -> {md}")
        except Exception as e:  # report every notebook, then fail
            failed += 1
            print(f"{name}: FAILED: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}", file=sys.stderr)
    if a.render:
        print(f"index -> {write_index(a.render)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
