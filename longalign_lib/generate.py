"""Long-context generation with the evaluated model's own chat template, middle truncation and batching.

Run as: longalign eval --preset cpu-demo [--bench FILE] [--eval-limit N] [--eval-fresh]   → <run_dir>/predictions.jsonl
Library:
    from longalign_lib.generate import generate_reply, generate_replies, make_generate_fn
    text = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=64)
    outs = generate_replies(model, tok, [msgs1, msgs2], max_new_tokens=128, max_input_tokens=8000)
    gen = make_generate_fn(model, tok, max_new_tokens=32)      # list of message lists -> list of replies
    s = reference_scores(model, tok, records, max_new_tokens=64)  # replies vs the records' answers: exact, F1

Why the model's own template: LongAlign's evaluation code wraps every prompt in `[INST] ... [/INST]`; for a model
trained with another template (ChatML, GLM-4, Llama-3) that is an unseen format and costs it points. Here every
prompt is rendered by `tokenizer.apply_chat_template`. Prompts longer than the window lose their middle (head and
tail kept, as in the paper's evaluation), so the instruction at the start and the question at the end survive.
Prompts are grouped by length into batches (left padding) within a token budget; decoding is greedy and seeded.
Predictions are appended one batch at a time, so an interrupted `longalign eval` resumes where it stopped.
"""
from __future__ import annotations

import inspect
import random
import time

from .io import LongAlignError
from .scoring import exact_and_f1


def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 64, do_sample: bool = False,
                   seed: int = 0, **gen_kwargs) -> str:
    """Render `messages` with the chat template (generation prompt on), generate, return the new text only."""
    import torch

    torch.manual_seed(seed)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def model_window(model, tokenizer=None, override: int | None = None) -> int:
    """The model's context window in tokens (`eval.max_input_tokens` overrides it, but never raises it)."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not window and tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < 10_000_000:
        window = tokenizer.model_max_length
    if not window:
        window = 2048
    return int(min(window, override)) if override else int(window)


def middle_truncate(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last max_len/2 tokens, drop the middle (a no-op when it already fits)."""
    if max_len <= 0:
        raise LongAlignError(f"no room for the prompt: {max_len} tokens left after the answer budget")
    if len(ids) <= max_len:
        return list(ids)
    head = max_len // 2
    return list(ids[:head]) + list(ids[len(ids) - (max_len - head):])


def case_messages(query: str, context: str = "", system: str | None = None) -> list[dict]:
    """The evaluated model's chat: the long context first, then the question, in one user turn."""
    content = f"{context.strip()}\n\n{query.strip()}" if context and context.strip() else query.strip()
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": content}]


def encode_prompt(tokenizer, messages: list[dict], max_input_tokens: int | None = None) -> tuple[list[int], int]:
    """Chat-template token ids (generation prompt on), middle-truncated to `max_input_tokens`; (ids, original length)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LongAlignError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; evaluate "
                             "an instruct/chat model or set tokenizer.chat_template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    ids = list(ids)
    n = len(ids)
    return (middle_truncate(ids, max_input_tokens) if max_input_tokens else ids), n


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int, max_new_tokens: int) -> list[list[int]]:
    """Group prompt indices by length: longest first, each batch ≤ batch_size prompts and ≤ max_batch_tokens
    padded tokens (prompt + answer) in total. Similar lengths share a batch, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        width = (lengths[cur[0]] if cur else lengths[i]) + max_new_tokens
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _eos_ids(model, tok) -> list[int]:
    ids = []
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tok.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(e)
    return ids


def _eos_ids_of(model, tok) -> list[int]:
    """The generation config's eos ids, the tokenizer's, and the chat end-of-turn tokens it knows."""
    ids = _eos_ids(model, tok)
    vocab = tok.get_vocab()
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if t in vocab and vocab[t] not in ids:
            ids.append(vocab[t])
    return ids


def decode_batch(model, batch_ids: list[list[int]], max_new_tokens, eos_ids: list[int], pad_id: int,
                 repetition_penalty: float = 1.0, temperature=0.0, top_p=1.0, seeds=0) -> list[tuple[list[int], str]]:
    """Decode several prompts at once (left padding); per prompt: its own token cap, temperature, top_p and seed.

    Returns [(new token ids, finish_reason)] in input order; the ids end with the eos token when the prompt
    finished by itself (finish "stop"), else they hit their cap (finish "length"). Greedy rows give the text a
    one-prompt `model.generate` gives (same repetition penalty); sampled rows draw from their own seeded
    generator, so a row's reply does not depend on which other prompts share its batch. Padding never enters
    a row's repetition penalty (transformers' batched `generate` penalises the pad id in padded rows, which
    can change when a padded row stops if pad == eos). Scalars apply to every row.
    """
    import torch
    from transformers import DynamicCache

    n = len(batch_ids)
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    caps = [int(c) for c in as_list(max_new_tokens)]
    temps = [float(t or 0.0) for t in as_list(temperature)]
    tops = [1.0 if p is None else float(p) for p in as_list(top_p)]
    seeds = [int(s or 0) for s in as_list(seeds)]
    dev = model.device
    lens = [len(x) for x in batch_ids]
    width = max(lens)
    ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in batch_ids], device=dev)
    mask = torch.tensor([[0] * (width - k) + [1] * k for k in lens], device=dev)
    # the penalty's view of each row: pads replaced by the row's first real token (already in its set)
    first = torch.tensor([x[0] for x in batch_ids], device=dev).unsqueeze(1)
    seen = torch.where(mask.bool(), ids, first)
    sampled = [t > 0 for t in temps]
    rngs = [random.Random(s) if on else None for s, on in zip(seeds, sampled, strict=True)]
    if any(sampled):
        samp_rows = torch.tensor(sampled, device=dev)
        inv_t = torch.tensor([1.0 / t if t > 0 else 1.0 for t in temps], device=dev).unsqueeze(1)
        keep_p = torch.tensor(tops, device=dev).unsqueeze(1)
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in range(n)]
    done, stopped = [False] * n, [False] * n
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step_ids, step_pos = ids, pos
    # Per-step host work kept off the decode loop: the attention mask and the penalty's token history live in
    # buffers allocated once (each step passes a view one column wider instead of a torch.cat copy), and the
    # next input is built on the device from the argmax (a host→device copy only when a row finishes).
    total = width + max(caps)
    mask_buf = torch.ones(n, total, dtype=mask.dtype, device=dev)
    mask_buf[:, :width] = mask
    seen_buf = first.expand(n, total).contiguous()
    seen_buf[:, :width] = seen
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    pad_t = torch.full((n,), pad_id, dtype=ids.dtype, device=dev)
    first_row = first.squeeze(1)
    cur = width
    with torch.no_grad():
        for _ in range(max(caps)):
            mask, seen = mask_buf[:, :cur], seen_buf[:, :cur]
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits[:, -1, :].float()
            if repetition_penalty != 1.0:
                score = torch.gather(logits, 1, seen)
                score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
                logits = logits.scatter(1, seen, score)
            nxt = logits.argmax(-1)
            if any(sampled):  # temperature, then top-p (transformers' order), then one draw per row from its rng
                z = logits * inv_t
                srt, idx = torch.sort(z, dim=-1, descending=False)
                drop = srt.softmax(-1).cumsum(-1) <= (1 - keep_p)
                drop[:, -1] = False  # keep at least the most likely token
                z = z.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
                cdf = z.softmax(-1).cumsum(-1)
                u = torch.tensor([r.random() if r else 0.0 for r in rngs], device=dev, dtype=cdf.dtype)
                pick = torch.searchsorted(cdf, (u.unsqueeze(1) * cdf[:, -1:]).contiguous()).squeeze(1)
                nxt = torch.where(samp_rows, pick.clamp(max=cdf.shape[1] - 1), nxt)
            toks = nxt.tolist()  # the one device→host copy per step
            newly = False
            for i in range(n):
                if done[i]:
                    continue
                out[i].append(toks[i])
                if toks[i] in eos:
                    done[i] = stopped[i] = newly = True
                elif len(out[i]) >= caps[i]:
                    done[i] = newly = True
            if all(done):
                break
            if newly:
                finished = torch.tensor(done, device=dev)
            feed = torch.where(finished, pad_t, nxt.to(pad_t.dtype))
            seen_buf[:, cur] = torch.where(finished, first_row, feed)
            cur += 1
            step_ids = feed.unsqueeze(1)
            step_pos = step_pos[:, -1:] + 1
    return [(o, "stop" if s else "length") for o, s in zip(out, stopped, strict=True)]


def generate_batch(model, tok, batch_ids: list[list[int]], max_new_tokens: int, seed: int = 0,
                   do_sample: bool = False, temperature: float = 1.0) -> list[tuple[str, int]]:
    """Generate for prompts of token ids at once (left padding); returns [(text, n_new_tokens)] in input order."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = _eos_ids(model, tok)
    outs = decode_batch(model, batch_ids, max_new_tokens, eos, pad, temperature=temperature if do_sample else 0.0,
                        seeds=[seed + k for k in range(len(batch_ids))])
    results = []
    for row, finish in outs:
        row = row[:-1] if finish == "stop" else row  # the eos token is not part of the reply
        results.append((tok.decode(row, skip_special_tokens=True).strip(), len(row)))
    return results


def generate_replies(model, tok, messages_list: list[list[dict]], max_new_tokens: int = 128,
                     max_input_tokens: int | None = None, batch_size: int = 4, max_batch_tokens: int = 16384,
                     seed: int = 0, progress: bool = True, on_batch=None, desc: str = "generate",
                     threads: int = 0) -> list[dict]:
    """Generate a reply for each chat; returns [{prediction, n_input_tokens, n_prompt_tokens, truncated,
    n_new_tokens, seconds}] in input order. `on_batch(indices, results)` is called after each batch (streaming).
    `threads`: torch CPU threads meanwhile (1 is several times faster on a machine shared with other jobs, where
    OpenMP threads wait on each other; 0 leaves torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads and model.device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _generate_replies(model, tok, messages_list, max_new_tokens, max_input_tokens, batch_size,
                                 max_batch_tokens, seed, progress, on_batch, desc)
    finally:
        torch.set_num_threads(before)


def _generate_replies(model, tok, messages_list, max_new_tokens, max_input_tokens, batch_size, max_batch_tokens,
                      seed, progress, on_batch, desc) -> list[dict]:
    from tqdm.auto import tqdm

    window = model_window(model, tok)
    budget = min(max_input_tokens or window, window) - max_new_tokens
    encoded = [encode_prompt(tok, m, budget) for m in messages_list]
    lengths = [len(ids) for ids, _ in encoded]
    out: list[dict | None] = [None] * len(messages_list)
    bar = tqdm(total=len(messages_list), desc=desc, disable=not progress)
    for b in plan_batches(lengths, batch_size, max_batch_tokens, max_new_tokens):
        t0 = time.time()
        gens = generate_batch(model, tok, [encoded[i][0] for i in b], max_new_tokens, seed=seed)
        dt = (time.time() - t0) / len(b)
        res = []
        for i, (text, n_new) in zip(b, gens, strict=False):
            out[i] = {"prediction": text, "n_input_tokens": lengths[i], "n_prompt_tokens": encoded[i][1],
                      "truncated": encoded[i][1] > lengths[i], "n_new_tokens": n_new, "seconds": round(dt, 3)}
            res.append(out[i])
        if on_batch:
            on_batch(b, res)
        bar.update(len(b))
    bar.close()
    return out


def reference_scores(model, tok, records: list[dict], max_new_tokens: int = 64, **kw) -> dict:
    """Greedy replies to each LongAlign record's first user turn, scored against the record's assistant reply.

    Returns {"predictions": [str], "exact": [bool], "f1": [float]} (scoring.exact_and_f1). `kw` goes to
    generate_replies (batch_size, threads, ...). Notebook 04 uses it before and after training.
    """
    outs = generate_replies(model, tok, [r["messages"][:1] for r in records], max_new_tokens=max_new_tokens,
                            progress=False, **kw)
    preds = [o["prediction"].strip() for o in outs]
    exact, f1 = exact_and_f1(preds, [r["messages"][1]["content"] for r in records])
    return {"predictions": preds, "exact": exact, "f1": f1}


def make_generate_fn(model, tok, max_new_tokens: int = 64, seed: int = 0, max_input_tokens: int | None = None,
                     batch_size: int = 4, max_batch_tokens: int = 16384, progress: bool = False, threads: int = 0):
    """A `generate_fn(list of message lists) -> list of replies` over a transformers model (for needle.run_grid)."""
    def fn(messages_list):
        outs = generate_replies(model, tok, messages_list, max_new_tokens=max_new_tokens,
                                max_input_tokens=max_input_tokens, batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens, seed=seed, progress=progress, threads=threads)
        return [o["prediction"] for o in outs]
    return fn


def client_generate_fn(client, max_new_tokens: int = 64, **params):
    """The same `generate_fn` over an llm.py client (API model, vLLM server, local backend)."""
    def fn(messages_list):
        return [r.text for r in client.chat_many(messages_list, max_new_tokens=max_new_tokens, progress=False,
                                                 **params)]
    return fn
