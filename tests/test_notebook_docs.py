"""Rendering executed notebooks into docs pages (longalign_lib.notebook_docs, `notebook_runner --render-only`), and the
runner's stamp of how a notebook ran, including a run cut by its time limit and a failing one.
Run as: python -m pytest -q tests/test_notebook_docs.py"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import pytest

from longalign_lib import notebook_docs as docs
from longalign_lib.notebook_runner import execute, main

FULL = {"mode": "full", "device": "NVIDIA H200", "executed": "2026-11-30T14:05:00Z", "seconds": 93.4, "status": "ok"}


def _png() -> str:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _executed(path: Path, stamp: dict | None, papermill: dict | None = None, error: bool = False) -> Path:
    """A small executed notebook as papermill leaves it: injected parameters, stdout, stderr, a figure."""
    v4 = nbformat.v4
    cells = [v4.new_markdown_cell("# Toy chapter"),
             v4.new_code_cell("SMOKE = None", metadata={"tags": ["parameters"]}),
             v4.new_code_cell("SMOKE = False\nOUT_DIR = '/device/path'", metadata={"tags": ["injected-parameters"]}),
             v4.new_code_cell("print('tokens/s 61234')", outputs=[
                 v4.new_output("stream", name="stdout", text="tokens/s 61234\n"),
                 v4.new_output("stream", name="stderr", text="progress bar 3/10 noise\n")]),
             v4.new_code_cell("plots.show(fig)", outputs=[v4.new_output("display_data", data={"image/png": _png()})])]
    if error:
        cells.append(v4.new_code_cell("1/0", outputs=[v4.new_output("error", ename="ZeroDivisionError",
                                                                     evalue="division by zero", traceback=[])]))
    meta = {}
    if stamp is not None:
        meta["longalign"] = stamp
    if papermill is not None:
        meta["papermill"] = papermill
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(v4.new_notebook(cells=cells, metadata=meta), path)
    return path


def test_render_only_renders_what_ran_and_says_how(tmp_path, capsys):
    runs, out = tmp_path / "from_device", tmp_path / "docs"
    _executed(runs / "04_toy.ipynb", FULL)
    _executed(runs / "04_toy.input.ipynb", None)  # the runner's input copy: never rendered
    _executed(runs / "05_cut.ipynb", {**FULL, "status": "stopped at the 120 s time limit"})
    _executed(runs / "06_err.ipynb", {**FULL}, error=True)  # stamped ok, but a cell holds an error
    _executed(runs / "02_old" / "02_old.ipynb", None,  # no stamp: papermill's metadata is read instead
              papermill={"parameters": {"SMOKE": True}, "end_time": "2026-11-29T10:00:00.1", "duration": 41.2})

    assert main(["--render-only", str(runs), "--render", str(out)]) == 1  # two did not run to the end
    err = capsys.readouterr().err
    assert "05_cut: NOT rendered (stopped at the 120 s time limit)" in err and "06_err: NOT rendered" in err
    assert sorted(p.name for p in out.glob("*.md")) == ["02_old.md", "04_toy.md", "index.md"]

    page = (out / "04_toy.md").read_text()
    assert page.splitlines()[2] == ("> Executed in full mode on a GPU (NVIDIA H200) on 2026-11-30 (93 s); the source "
                                    "is [notebooks/04_toy.py](../../notebooks/04_toy.py).")
    assert "tokens/s 61234" in page and "progress bar" not in page and "/device/path" not in page
    figures = list((out / "04_toy_files").glob("*.png"))
    assert len(figures) == 1 and f"](04_toy_files/{figures[0].name})" in page
    assert "> Executed in SMOKE mode on a device it did not record on 2026-11-29 (41 s)" in (out / "02_old.md").read_text()

    index = (out / "index.md").read_text()
    assert "| [04_toy](04_toy.md) | full mode on a GPU (NVIDIA H200) on 2026-11-30 (93 s) | `bash bench/run_device" in index
    assert "| [02_old](02_old.md) | SMOKE mode" in index and "05_cut" not in index
    assert docs.is_full_page(out / "04_toy.md") and not docs.is_full_page(out / "02_old.md")


def test_render_only_names_and_bad_folders(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "docs"
    _executed(runs / "04_toy.ipynb", FULL)
    _executed(runs / "05_other.ipynb", FULL)
    assert main(["--render-only", str(runs), "--render", str(out), "05_other"]) == 0
    assert [p.name for p in out.glob("0*.md")] == ["05_other.md"]
    assert main(["--render-only", str(runs), "--render", str(out), "03_missing"]) == 2
    assert "no executed notebook for 03_missing (found: 04_toy, 05_other)" in capsys.readouterr().err
    assert main(["--render-only", str(tmp_path / "nowhere"), "--render", str(out)]) == 2


@pytest.mark.notebook
def test_execute_stamps_the_run_and_stops_at_the_time_limit(tmp_path):
    """A real kernel: a finished run is stamped ok; a run cut by its time limit keeps its executed cells, is stamped
    with why it stopped, and the renderer refuses it; a failing run is stamped with its error."""
    src = tmp_path / "07_toy.py"
    src.write_text('# %% tags=["parameters"]\nSMOKE = None\nOUT_DIR = "."\nSLEEP = 0\nFAIL = False\n\n'
                   '# %%\nimport json, pathlib, time\nprint("started", SMOKE)\n\n'
                   '# %%\ntime.sleep(SLEEP)\nif FAIL:\n    1 / 0\n\n'
                   '# %%\npathlib.Path(OUT_DIR, "metrics.json").write_text(json.dumps({"smoke": SMOKE}))\n')
    m = execute(src, smoke=False, out_dir=tmp_path / "ok")
    assert m["smoke"] is False
    stamp = nbformat.read(tmp_path / "ok" / "07_toy.ipynb", as_version=4).metadata["longalign"]
    assert stamp["mode"] == "full" and stamp["status"] == "ok" and stamp["device"] and stamp["seconds"] > 0

    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match="KeyboardInterrupt"):
        execute(src, smoke=True, out_dir=tmp_path / "cut", parameters={"SLEEP": 120}, time_limit=15)
    nb = nbformat.read(tmp_path / "cut" / "07_toy.ipynb", as_version=4)
    assert nb.metadata["longalign"]["status"] == "stopped at the 15 s time limit"
    assert nb.metadata["longalign"]["seconds"] < 60
    assert any("started True" in o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert docs.run_status(nb) != "ok"

    with pytest.raises(PapermillExecutionError):  # a failing cell: stamped with the error, the old metrics gone
        execute(src, smoke=False, out_dir=tmp_path / "ok", parameters={"FAIL": True})
    nb = nbformat.read(tmp_path / "ok" / "07_toy.ipynb", as_version=4)
    assert nb.metadata["longalign"]["status"] == "failed: ZeroDivisionError: division by zero"
    assert not (tmp_path / "ok" / "metrics.json").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.py")))
def test_rendered_page_shows_todays_source(name):
    """docs/notebooks/<name>.md shows every code cell of notebooks/<name>.py verbatim: re-render after editing one
    (`bash bench/run_device_notebooks.sh OUT` on a GPU + `make docs-notebooks-render DIR=OUT`, or
    `make docs-notebooks NB=notebooks/<name>.py` for a SMOKE page)."""
    root = Path(__file__).parents[1]
    stale = docs.stale_code_cells(root / "docs" / "notebooks" / f"{name}.md", root / "notebooks" / f"{name}.py")
    assert not stale, f"docs/notebooks/{name}.md is stale: {len(stale)} code cell(s) differ, first:\n{stale[0][:400]}"
