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
from ..synth_parts import repetition
from .base import StageResult

LOOP_REPETITION = 0.3  # share of repeated word 3-grams above which a reply counts as looping


def reply_verdict(reply: str, rope_base_factor: float = 1.0) -> tuple[bool, str]:
    """(loops, one plain sentence on what the setup check's reply shows).

    A RoPE base scaled for a longer window moves every position's rotation, so the model, untrained at that
    base, often repeats itself until `train` adapts it: a looping reply then is expected, not a pass of the
    model's quality (and not a broken setup).

    >>> reply_verdict("language model's " * 12, 8.0)[0]
    True
    >>> reply_verdict("Paris is the capital of France.", 1.0)
    (False, 'The model loads, formats a record and replies without looping at its native RoPE.')
    """
    loops = repetition(reply) > LOOP_REPETITION
    f = float(rope_base_factor or 1.0)
    if f != 1.0:
        scaled = (f"RoPE base ×{f:g} is untrained until `train` adapts the model: an untrained RoPE-scaled model "
                  "loops or drifts, so this reply says nothing about quality yet")
        if loops:
            return True, (f"The reply loops. That is expected here: {scaled}. The check passes on what it tests "
                          "(the model loads, a record is formatted, generation runs).")
        return False, f"The reply does not loop, but {scaled}."
    if loops:
        return True, ("The reply loops at the model's native RoPE: generation runs, but the model's output is "
                      "degenerate; check model.name and model.dtype before training on it.")
    return False, "The model loads, formats a record and replies without looping at its native RoPE."


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
    loops, verdict = reply_verdict(reply, cfg.model.rope_base_factor)
    metrics = {"model": cfg.model.name, "device": info.device, "dtype": info.dtype, "n_params": info.n_params,
               "load_s": round(load_s, 2), "generate_s": round(time.time() - t1, 2),
               **({"convert_s": convert_s} if convert_s is not None else {}), "records": stats.kept,
               "rejected": sum(stats.rejected.values()), "reply_chars": len(reply), "bad_lines": list(stats.bad_lines),
               "reply_loops": loops, "rope_base_factor": cfg.model.rope_base_factor}
    write_json(run_dir / "check.json", {**metrics, "prompt": args.prompt, "reply": reply, "reply_verdict": verdict,
                                        "format": stats.to_dict()})
    converted = f"converted once from the bundled GGUF in {convert_s:.1f}s, then " if convert_s is not None else ""
    report = (f"Model `{cfg.model.name}` ({info.n_params/1e6:.0f}M parameters, {info.dtype} on {info.device}) "
              f"{converted}loaded in {load_s:.1f}s. {stats.kept}/{stats.total} records of `{data}` formatted."
              f"{bad_lines_note(stats.bad_lines)}\n\n"
              f"> **Q:** {args.prompt}\n>\n> **A:** {reply}\n\n{verdict}\n\n![label mask]({fig_path.relative_to(run_dir)})")
    return StageResult(metrics, ["check.json", str(fig_path.relative_to(run_dir))], report)
