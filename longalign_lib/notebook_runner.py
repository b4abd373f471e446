"""Pair jupytext py:percent notebooks to .ipynb and execute them headless with papermill.

Run as: python -m longalign_lib.notebook_runner [--mode smoke|full] [--out-dir runs/notebooks] [--render docs/notebooks]
        notebooks/*.py
(`make notebooks MODE=full` does this; `make docs-notebooks` renders into docs/notebooks/.) Each notebook's first
code cell is tagged `parameters`; the runner injects SMOKE and OUT_DIR, the executed notebook is written to
OUT_DIR/<name>.ipynb, and the notebook's last cell writes OUT_DIR/metrics.json (tests read it). With --render DIR,
each executed notebook is also turned into DIR/<name>.md with its figures in DIR/<name>_files/ (readable on
GitHub or any Markdown viewer without running anything).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .io import LongAlignError, read_json


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
    import json
    import os
    import tempfile

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


def execute(py_path: str | Path, smoke: bool = True, out_dir: str | Path | None = None,
            parameters: dict | None = None, timeout: int = 1800) -> dict:
    """Execute one notebook headless; returns its metrics.json (plus `seconds`)."""
    import papermill as pm

    py_path = Path(py_path)
    out_dir = Path(out_dir or Path("runs") / "notebooks" / py_path.stem).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ipynb = to_ipynb(py_path, out_dir)
    params = {"SMOKE": smoke, "OUT_DIR": str(out_dir), **(parameters or {})}
    t0 = time.time()
    pm.execute_notebook(str(ipynb), str(out_dir / f"{py_path.stem}.ipynb"), parameters=params, kernel_name=_kernel_for_this_python(),
                        cwd=str(py_path.parent.resolve()), progress_bar=False, execution_timeout=timeout)
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.exists():
        raise LongAlignError(f"{py_path}: ran, but its last cell wrote no {metrics_path}")
    metrics = read_json(metrics_path)
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics


def render_markdown(ipynb: str | Path, out_dir: str | Path, note: str = "") -> Path:
    """An executed notebook → `out_dir/<name>.md` plus its figures in `out_dir/<name>_files/` (nbconvert).

    Progress bars and warnings (stderr) and papermill's injected-parameters cell are left out; everything else —
    prose, code, printed results, figures — is kept in order. Written atomically; returns the Markdown path.
    """
    import nbformat
    from nbconvert import MarkdownExporter

    from .io import write_text

    ipynb, out_dir = Path(ipynb), Path(out_dir)
    nb = nbformat.read(ipynb, as_version=4)
    cells = []
    for c in nb.cells:
        if "injected-parameters" in c.metadata.get("tags", []):
            continue
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
            c.metadata.pop("jupyter", None)  # solutions shown (collapsed only in JupyterLab)
        cells.append(c)
    nb.cells = cells
    name = ipynb.stem
    body, resources = MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{name}_files", "unique_key": name})
    files_dir = out_dir / f"{name}_files"
    if files_dir.exists():
        import shutil

        shutil.rmtree(files_dir)
    files_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in resources.get("outputs", {}).items():
        (out_dir / rel).write_bytes(data)
    header = f"<!-- generated by `make docs-notebooks` from notebooks/{name}.py; do not edit -->\n"
    return write_text(out_dir / f"{name}.md", header + (f"\n> {note}\n\n" if note else "") + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--mode", choices=["smoke", "full"], default="smoke")
    ap.add_argument("--out-dir", default="runs/notebooks")
    ap.add_argument("--render", default=None, help="also render each executed notebook to Markdown in this folder")
    a = ap.parse_args(argv)
    failed = 0
    for nb in a.notebooks:
        name = Path(nb).stem
        try:
            m = execute(nb, smoke=a.mode == "smoke", out_dir=Path(a.out_dir) / name)
            print(f"{name}: ok in {m['seconds']}s -> {Path(a.out_dir) / name}")
            if a.render:
                note = (f"Executed in {'SMOKE' if a.mode == 'smoke' else 'full'} mode on "
                        f"{'a CUDA GPU' if m.get('device') == 'cuda' else 'a CPU'} ({m['seconds']:.0f} s) "
                        f"by `make docs-notebooks`; the source is [notebooks/{name}.py](../../notebooks/{name}.py).")
                md = render_markdown(Path(a.out_dir) / name / f"{name}.ipynb", a.render, note)
                print(f"{name}: rendered -> {md}")
        except Exception as e:  # report every notebook, then fail
            failed += 1
            print(f"{name}: FAILED: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
