"""Executed notebooks → Markdown pages with their figures (docs/notebooks/), each headed by how it was executed.

Run as: python -m longalign_lib.notebook_runner --render-only DIR [--render docs/notebooks] [NAME ...]
(renders notebooks executed elsewhere, e.g. in full mode on a GPU by `bash bench/run_device_notebooks.sh DIR`;
`make docs-notebooks` executes in SMOKE mode and renders in one go). The heading line is read off the notebook
itself: the runner's `longalign` metadata stamp (mode, device, date, seconds, status), else papermill's metadata.
`write_index` lists every rendered page with that line in docs/notebooks/index.md, so the docs always say which
pages are full-mode GPU runs and which SMOKE CPU runs.

    >>> import nbformat
    >>> nb = nbformat.v4.new_notebook(metadata={"longalign": {"mode": "full", "device": "NVIDIA H200",
    ...                                          "executed": "2026-11-30T14:00:00Z", "seconds": 93.4}})
    >>> execution_note(nb, "04_long_context_sft").split(";")[0]
    'Executed in full mode on a GPU (NVIDIA H200) on 2026-11-30 (93 s)'
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from .io import LongAlignError, write_text

NOTE_PREFIX = "> Executed in "
REPRODUCE = {  # how to make a page again, by the mode it was executed in
    "full": "`bash bench/run_device_notebooks.sh OUT` on a GPU, then `make docs-notebooks-render DIR=OUT`",
    "SMOKE": "`make docs-notebooks NB=notebooks/<name>.py` (any CPU)",
}


def execution_note(nb, name: str) -> str:
    """The line heading a rendered page: mode, device, date and duration of the run, read from the notebook
    (the runner's `longalign` stamp, else papermill's metadata and its injected SMOKE parameter)."""
    info = dict(nb.metadata.get("longalign", {}))
    pm_meta = nb.metadata.get("papermill", {})
    if "mode" not in info and "SMOKE" in pm_meta.get("parameters", {}):
        info["mode"] = "smoke" if pm_meta["parameters"]["SMOKE"] else "full"
    date = (info.get("executed") or pm_meta.get("end_time") or "")[:10]
    seconds = info.get("seconds", pm_meta.get("duration"))
    device = info.get("device")
    if not device:
        where = "on a device it did not record"
    elif device.startswith("CPU"):
        where = "on a CPU" + device[3:]  # "on a CPU (2 cores)"
    else:
        where = f"on a GPU ({device})"
    mode = {"smoke": "SMOKE mode", "full": "full mode"}.get(info.get("mode"), "an unrecorded mode")
    parts = [f"Executed in {mode} {where}"]
    if date:
        parts.append(f"on {date}")
    if seconds is not None:
        parts.append(f"({float(seconds):.0f} s)")
    return " ".join(parts) + f"; the source is [notebooks/{name}.py](../../notebooks/{name}.py)."


def run_status(nb) -> str:
    """'ok' when the notebook ran to the end; else why not (the runner's stamp, papermill's flag, error outputs)."""
    status = nb.metadata.get("longalign", {}).get("status", "ok")
    if status != "ok":
        return status
    if nb.metadata.get("papermill", {}).get("exception"):
        return "failed (papermill recorded an exception)"
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            return f"failed: cell {i} holds an error output"
    return "ok"


def executed_notebooks(folder: str | Path, names=()) -> list[Path]:
    """Executed notebooks in `folder`, flat (<name>.ipynb) or per run (<name>/<name>.ipynb); `names` picks stems.

    The runner's inputs (<name>.input.ipynb) are never taken; a name asked for but not found is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LongAlignError(f"{folder}: not a folder (give the folder holding the executed <name>.ipynb files)")
    found: dict[str, Path] = {}
    for p in sorted([*folder.glob("*.ipynb"), *folder.glob("*/*.ipynb")]):
        if p.name.endswith(".input.ipynb") or (p.parent != folder and p.parent.name != p.stem):
            continue
        found.setdefault(p.stem, p)
    wanted = [Path(n).stem for n in names] or sorted(found)
    if not wanted:
        raise LongAlignError(f"{folder}: holds no executed notebook (<name>.ipynb or <name>/<name>.ipynb)")
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LongAlignError(f"{folder}: no executed notebook for {', '.join(missing)} "
                             f"(found: {', '.join(sorted(found)) or 'none'})")
    return [found[n] for n in wanted]


def page_note(md_path: str | Path) -> str | None:
    """The 'Executed in …' line of a rendered page (without the source link), or None."""
    md_path = Path(md_path)
    if not md_path.exists():
        return None
    for line in md_path.read_text(encoding="utf-8").splitlines()[:6]:
        if line.startswith(NOTE_PREFIX):
            return line[2:].split("; the source is")[0]
    return None


def render_markdown(ipynb: str | Path, out_dir: str | Path, note: str | None = None) -> Path:
    """An executed notebook → `out_dir/<name>.md` plus its figures in `out_dir/<name>_files/` (nbconvert).

    Progress bars and warnings (stderr) and papermill's injected-parameters cell are left out; everything else —
    prose, code, printed results, figures — is kept in order. The page opens with `note`, by default the line
    `execution_note` reads off the notebook (mode, device, date, seconds). Written atomically; returns the path.
    """
    import nbformat
    from nbconvert import MarkdownExporter

    ipynb, out_dir = Path(ipynb), Path(out_dir)
    nb = nbformat.read(ipynb, as_version=4)
    name = ipynb.stem
    note = note if note is not None else execution_note(nb, name)
    cells = []
    for c in nb.cells:
        if "injected-parameters" in c.metadata.get("tags", []):
            continue
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
            c.metadata.pop("jupyter", None)  # solutions shown (collapsed only in JupyterLab)
        cells.append(c)
    nb.cells = cells
    body, resources = MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{name}_files", "unique_key": name})
    files_dir = out_dir / f"{name}_files"
    if files_dir.exists():
        shutil.rmtree(files_dir)
    files_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in resources.get("outputs", {}).items():
        (out_dir / rel).write_bytes(data)
    header = f"<!-- generated by longalign_lib.notebook_runner from notebooks/{name}.py; do not edit -->\n"
    return write_text(out_dir / f"{name}.md", header + (f"\n> {note}\n\n" if note else "") + body)


def write_index(out_dir: str | Path) -> Path:
    """docs/notebooks/index.md: every rendered page with how it was executed and how to make it again."""
    out_dir = Path(out_dir)
    rows = []
    for md in sorted(out_dir.glob("[0-9][0-9]_*.md")):
        note = page_note(md) or "Executed in an unrecorded way"
        mode = "full" if "full mode" in note else "SMOKE" if "SMOKE mode" in note else None
        how = REPRODUCE.get(mode, "see the page").replace("<name>", md.stem)
        rows.append(f"| [{md.stem}]({md.name}) | {note.removeprefix('Executed in ')} | {how} |")
    text = ("<!-- generated by longalign_lib.notebook_runner (write_index); do not edit -->\n"
            "# Executed notebooks\n\n"
            "Each notebook of `notebooks/`, executed and rendered with its figures. Full-mode pages ran on a GPU with\n"
            "the notebook's full settings (real step times, SmolLM2-135M trained at 16k, the judge and the needle\n"
            "grid); SMOKE pages ran with the small CPU settings CI uses. Each page's first line says the same.\n\n"
            "| notebook | executed in | made again by |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return write_text(out_dir / "index.md", text)


def render_only(folder: str | Path, out_dir: str | Path, names=()) -> int:
    """Render notebooks executed elsewhere into `out_dir` and refresh its index; a notebook that did not run to
    the end is reported on stderr and not rendered (its page, if any, stays). Returns a shell exit code."""
    import nbformat

    failed = 0
    for ipynb in executed_notebooks(folder, names):
        status = run_status(nbformat.read(ipynb, as_version=4))
        if status != "ok":
            failed += 1
            print(f"{ipynb.stem}: NOT rendered ({status}): {ipynb}", file=sys.stderr)
            continue
        md = render_markdown(ipynb, out_dir)
        print(f"{ipynb.stem}: rendered -> {md} ({page_note(md)})")
    print(f"index -> {write_index(out_dir)}")
    return 1 if failed else 0


def source_code_cells(py_path: str | Path) -> list[str]:
    """The code cells of a py:percent notebook, as jupytext reads them (the sources a rendered page must show)."""
    import jupytext

    nb = jupytext.read(Path(py_path), fmt="py:percent")
    return [c.source.strip() for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def stale_code_cells(md_path: str | Path, py_path: str | Path) -> list[str]:
    r"""Code cells of the source that the rendered page does not show verbatim, in order ([] = the page is current).

    A page is current when every code cell of `py_path` appears as a fenced ```python block of `md_path`, in the
    source's order (nbconvert writes each code cell's source unchanged; outputs and prose sit between them).

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "n.py").write_text("# %%\nx = 1\n\n# %%\nprint(x)\n")
        >>> _ = (d / "n.md").write_text("```python\nx = 1\n```\n\n    1\n\n```python\nprint(x)\n```\n")
        >>> stale_code_cells(d / "n.md", d / "n.py")
        []
        >>> _ = (d / "n.py").write_text("# %%\nx = 2\n\n# %%\nprint(x)\n")
        >>> stale_code_cells(d / "n.md", d / "n.py")
        ['x = 2']
    """
    page = Path(md_path).read_text(encoding="utf-8")
    stale, pos = [], 0
    for src in source_code_cells(py_path):
        block = "```python\n" + src + "\n```"
        at = page.find(block, pos)
        if at < 0:
            stale.append(src)
        else:
            pos = at + len(block)
    return stale


def is_full_page(md_path: str | Path) -> bool:
    """True when a rendered page came from a full-mode run (a SMOKE re-render must not silently replace it)."""
    note = page_note(md_path)
    return bool(note and re.search(r"\bfull mode\b", note))
