"""One matplotlib style for every figure in the cookbook, and the helpers that save figures as PNG.

Usage:
    from longalign_lib import plots
    fig, ax = plots.figure()            # styled figure
    plots.save(fig, "runs/demo/figures/lengths.png")
    plots.show(fig, "runs/notebooks/00/label_mask.png")   # in a notebook: save, close, display once
Each stage module builds its figures with these helpers; notebooks show them with `show`.
"""
from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in os.environ.get("JPY_PARENT_PID", "") and \
        matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
    try:
        import IPython

        if IPython.get_ipython() is None:
            matplotlib.use("Agg")
    except ImportError:
        matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

PALETTE = {
    "naive": "#9e9e9e", "sorted": "#4c72b0", "packed": "#dd8452", "packed+weighting": "#55a868",
    "target": "#55a868", "prompt": "#e0e0e0", "long": "#4c72b0", "short": "#dd8452", "idle": "#f2c6c6",
}
CYCLE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]

STYLE = {
    "figure.figsize": (7.0, 4.0), "figure.dpi": 110, "savefig.dpi": 130, "savefig.bbox": "tight",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "axes.titlesize": 11, "axes.labelsize": 10, "legend.frameon": False, "font.size": 9,
    "axes.prop_cycle": matplotlib.cycler(color=CYCLE),
}


def use_style() -> None:
    plt.rcParams.update(STYLE)


def figure(nrows: int = 1, ncols: int = 1, **kw):
    use_style()
    return plt.subplots(nrows, ncols, **kw)


def save(fig, path: str | os.PathLike, close: bool = False) -> Path:
    """Save `fig` as PNG atomically (temp file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if close:
        plt.close(fig)
    return path


def show(fig, path: str | os.PathLike) -> None:
    """Save `fig` as PNG (atomically), close it, and display that PNG once in a notebook; returns None, so a
    cell ending with it prints nothing else.

    Closing the figure keeps matplotlib's inline backend from drawing it a second time at the end of the cell,
    and displaying the saved PNG puts the same picture into the notebook whatever the kernel's backend (Agg under
    papermill, inline in JupyterLab), so executed and rendered notebooks carry it. Outside IPython it only saves.
    """
    save(fig, path, close=True)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))


def label_mask_figure(segments: list[tuple[str, bool]], max_chars: int = 1400, title: str | None = None):
    """Draw chat-templated text with target (trained-on) tokens highlighted in green, prompt tokens in grey.

    `segments` comes from formatting.label_segments(tokenizer, example). Long prompt runs are elided.
    """
    fig, ax = figure(figsize=(9, 5))
    ax.axis("off")
    ax.grid(False)
    shown, used = [], 0
    for text, tgt in segments:
        if not tgt and len(text) > 300:
            text = text[:140] + f" … [{len(text) - 280:,} characters of this prompt not shown] … " + text[-140:]
        if used + len(text) > max_chars:
            text = text[: max(0, max_chars - used)] + " …"
        shown.append((text, tgt))
        used += len(text)
        if used >= max_chars:
            break
    y, width = 0.98, 110
    for text, tgt in shown:
        for para in text.split("\n"):
            for line in textwrap.wrap(para, width) or [""]:
                ax.text(0.0, y, line, family="monospace", fontsize=7.5, va="top", transform=ax.transAxes,
                        bbox=dict(facecolor=PALETTE["target" if tgt else "prompt"], edgecolor="none", pad=1.0))
                y -= 0.034
                if y < 0.02:
                    break
    ax.set_title(title or "Label mask: green = trained on (assistant + end-of-turn), grey = ignored (-100)")
    return fig
