"""Local generation, one request at a time vs batched: tokens/s side by side and whether the texts are identical.

One process, one model, the same synth-like prompts (Self-Instruct question requests over documents cut from the
offline texts in data/, `--doc-tokens` tokens each), greedy decoding with the local backend's repetition penalty:
  - one at a time: the local backend as it ran before batching (`model.generate`, one prompt per call);
  - batched: the local backend's batched path (`generate.decode_batch` over `generate.plan_batches`).
The one-at-a-time pass runs on the first `--single-n` prompts (it is the slow one); the batched pass on all `--n`;
texts are compared on the prompts both ran.

Run as (on the GPU, repo root, offline SmolLM2 converted under $LONGALIGN_HOME):
    python3 bench/generation_speed.py --out OUT_DIR                       # 64 prompts of ~3k tokens, bf16
    python3 bench/generation_speed.py --device cpu --n 4 --out /tmp/gs    # smoke mode (a CPU, seconds)
Writes OUT_DIR/generation_speed.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synth_prompts(tok, n: int, doc_tokens: int) -> list[list[dict]]:
    """`n` question requests (synth.question_messages) over consecutive `doc_tokens`-token pieces of data/*.txt."""
    from longalign_lib.synth_parts import TASK_TYPES, question_messages

    ids = []
    for p in sorted((ROOT / "data").glob("*.txt")):
        ids += tok(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if not ids:
        raise SystemExit(f"no text under {ROOT / 'data'}: the offline texts (kjv_*.txt) are missing")
    types = sorted(TASK_TYPES)
    out = []
    for i in range(n):
        # vary the length a little (as a corpus does), wrap around the texts when n * doc_tokens exceeds them
        size = max(16, int(doc_tokens * (0.75 + 0.5 * ((i * 37) % 11) / 10)))
        start = (i * doc_tokens) % max(1, len(ids) - size)
        out.append(question_messages(tok.decode(ids[start:start + size]), types[i % len(types)], "en", 3))
    return out


def _sync(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def compare(model, tok, prompts: list[list[dict]], max_new_tokens: int, single_n: int, batch_size: int,
            max_batch_tokens: int, repetition_penalty: float = 1.1) -> dict:
    """Time both paths on the same prompts; returns the numbers generation_speed.json holds."""
    from longalign_lib.providers import LocalBackend

    one = LocalBackend("bench", model_obj=model, tokenizer=tok, repetition_penalty=repetition_penalty, batch_size=1)
    many = LocalBackend("bench", model_obj=model, tokenizer=tok, repetition_penalty=repetition_penalty,
                         batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    ids = [one._encode("chat", m) for m in prompts]
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    one._generate(ids[0][:32], {"max_new_tokens": 2})  # warm-up (CUDA context, kernels) outside the timings
    many.generate_many([ids[0][:32]] * 2, [{"max_new_tokens": 2}] * 2)

    k = max(1, min(single_n, len(ids)))
    _sync(model)
    t0 = time.perf_counter()
    singles = [one._generate(x, dict(params)) for x in ids[:k]]
    _sync(model)
    t_one = time.perf_counter() - t0

    many.stats.update(batches=0, batched_requests=0)
    t0 = time.perf_counter()
    batched = many.generate_many(ids, [dict(params) for _ in ids])
    _sync(model)
    t_many = time.perf_counter() - t0
    bad = [r for r in batched if isinstance(r, Exception)]
    if bad:
        raise SystemExit(f"batched generation failed: {bad[0]}")

    new_one = sum(u["output_tokens"] for _, u, _ in singles)
    new_many = sum(u["output_tokens"] for _, u, _ in batched)
    same = [singles[i][0] == batched[i][0] for i in range(k)]
    diffs = [{"index": i, "one_at_a_time": singles[i][0][:300], "batched": batched[i][0][:300]}
             for i in range(k) if not same[i]][:3]
    tps_one, tps_many = new_one / t_one, new_many / t_many
    return {
        "prompts": len(ids), "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
        "prompt_tokens_max": max(map(len, ids)), "max_new_tokens": max_new_tokens,
        "repetition_penalty": repetition_penalty, "batch_size": many.max_in_flight,
        "max_batch_tokens": many.batch_token_budget(), "batches": many.stats["batches"],
        "one_at_a_time": {"prompts": k, "seconds": round(t_one, 3), "new_tokens": new_one,
                          "tokens_per_s": round(tps_one, 1), "seconds_per_prompt": round(t_one / k, 3)},
        "batched": {"prompts": len(ids), "seconds": round(t_many, 3), "new_tokens": new_many,
                    "tokens_per_s": round(tps_many, 1), "seconds_per_prompt": round(t_many / len(ids), 4)},
        "speedup_tokens_per_s": round(tps_many / tps_one, 2),
        "identical_texts": sum(same), "compared": k, "finish_reasons_equal": sum(
            singles[i][2]["finish_reason"] == batched[i][2]["finish_reason"] for i in range(k)),
        "differences": diffs,
    }


def main(argv=None) -> int:
    import torch

    from longalign_lib.io import write_json
    from longalign_lib.models import load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for generation_speed.json")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--n", type=int, default=64, help="prompts (the batched pass runs all)")
    ap.add_argument("--single-n", type=int, default=16, help="prompts the one-at-a-time pass runs (the slow one)")
    ap.add_argument("--doc-tokens", type=int, default=3000, help="document tokens per prompt (±25%%)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=131072)
    a = ap.parse_args(argv)
    smoke = a.device == "cpu"
    if smoke:  # a CPU: seconds, not minutes
        torch.set_num_threads(1)
        a.doc_tokens, a.max_new_tokens = min(a.doc_tokens, 200), min(a.max_new_tokens, 8)
    dtype = a.dtype or ("fp32" if smoke else "bf16")
    model, tok = load_model_and_tokenizer(a.model, dtype=dtype, device=a.device)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # generation: transformers' SDPA with left padding
    res = compare(model, tok, synth_prompts(tok, a.n, a.doc_tokens), a.max_new_tokens, a.single_n, a.batch_size,
                  a.max_batch_tokens)
    res.update(model=a.model, device=str(model.device), dtype=dtype, smoke=smoke,
               gpu=torch.cuda.get_device_name(0) if model.device.type == "cuda" else None,
               peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if model.device.type == "cuda"
               else None, command=" ".join(["python3", "bench/generation_speed.py", *(argv or sys.argv[1:])]))
    out = Path(a.out)
    write_json(out / "generation_speed.json", res)
    print(f"[generation_speed] one at a time {res['one_at_a_time']['tokens_per_s']} tok/s, batched "
          f"{res['batched']['tokens_per_s']} tok/s (x{res['speedup_tokens_per_s']}); identical texts "
          f"{res['identical_texts']}/{res['compared']}; -> {out / 'generation_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
