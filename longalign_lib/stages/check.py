"""`longalign check`: the model loads, a record is formatted with its chat template, and the model replies.

Run as: longalign check --preset cpu-demo [--prompt "..."]
Notebook 00 walks through the same steps.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import plots
from ..formatting import format_file, label_segments
from ..generate import generate_reply
from ..inputs import records_file
from ..io import LongAlignError, bad_lines_note, load_jsonl, write_json
from ..models import BUNDLED, convert_bundled, load_model_and_tokenizer, longalign_home, model_info
from .base import StageResult


def add_arguments(p) -> None:
    p.add_argument("--prompt", default="In one sentence, what is long-context alignment of a language model?",
                   help="the question the check asks the model")


def run(cfg, run_dir: Path, args) -> StageResult:
    import torch

    convert_s = None
    if cfg.model.name in BUNDLED and not (longalign_home() / "models" / cfg.model.name / "config.json").exists():
        t0 = time.time()  # a clean $LONGALIGN_HOME: the bundled GGUF is converted once, timed on its own
        convert_bundled(cfg.model.name)
        convert_s = round(time.time() - t0, 2)
    data = records_file(cfg)
    load_jsonl(data)  # a missing file, or one with no readable line, stops here: before the model loads
    t0 = time.time()
    model, tok = load_model_and_tokenizer(cfg=cfg.model)
    load_s = time.time() - t0
    examples, stats = format_file(data, tok, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    if not examples:
        raise LongAlignError(f"{data}: no record could be formatted ({dict(stats.rejected)}); first: "
                             f"{(stats.errors or stats.bad_lines or ['the file is empty'])[0]}")
    ex = min(examples, key=lambda e: e.length)
    fig = plots.label_mask_figure(label_segments(tok, ex))
    fig_path = plots.save(fig, run_dir / "figures" / "label_mask.png", close=True)
    t1 = time.time()
    before = torch.get_num_threads()
    if cfg.eval.local_threads and model.device.type == "cpu":  # the threads generation uses in eval (1 on cpu-demo)
        torch.set_num_threads(cfg.eval.local_threads)
    try:
        reply = generate_reply(model, tok, [{"role": "user", "content": args.prompt}], max_new_tokens=48)
    finally:
        torch.set_num_threads(before)
    info = model_info(model, cfg.model.name)
    metrics = {"model": cfg.model.name, "device": info.device, "dtype": info.dtype, "n_params": info.n_params,
               "load_s": round(load_s, 2), "generate_s": round(time.time() - t1, 2),
               **({"convert_s": convert_s} if convert_s is not None else {}), "records": stats.kept,
               "rejected": sum(stats.rejected.values()), "reply_chars": len(reply), "bad_lines": list(stats.bad_lines)}
    write_json(run_dir / "check.json", {**metrics, "prompt": args.prompt, "reply": reply, "format": stats.to_dict()})
    converted = f"converted once from the bundled GGUF in {convert_s:.1f}s, then " if convert_s is not None else ""
    report = (f"Model `{cfg.model.name}` ({info.n_params/1e6:.0f}M parameters, {info.dtype} on {info.device}) "
              f"{converted}loaded in {load_s:.1f}s. {stats.kept}/{stats.total} records of `{data}` formatted."
              f"{bad_lines_note(stats.bad_lines)}\n\n"
              f"> **Q:** {args.prompt}\n>\n> **A:** {reply}\n\n![label mask]({fig_path.relative_to(run_dir)})")
    return StageResult(metrics, ["check.json", str(fig_path.relative_to(run_dir))], report)
