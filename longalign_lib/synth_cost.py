"""What synthesis will cost before anything is spent: the dry-run plan and the cost levers at scale.

Run as: longalign synth --preset paper --dry-run   (prints the plan and the lever table; needs no API key)
Usage:
    from longalign_lib.synth_cost import dry_run, cost_table, lever_table
    plan = dry_run(None, None, cfg.synth, set(), corpus_cfg=cfg.corpus)   # calls, tokens, cost; plan["scale"]
    rows = cost_table(cfg.synth.prices, 10_000, doc_tokens=16_000)        # per model: interactive/batch x caching
    print(lever_table(rows))

The levers: interactive or Batch API (`synth.mode`, at `synth.batch_discount`) and prompt caching
(`synth.prompt_caching`); `cost_figure` draws the same rows.
"""
from __future__ import annotations

from .corpus import Document
from .io import LongAlignError
from .llm import Price, cost_of, messages_tokens, price_for
from .synth_parts import answer_messages, doc_seed, question_messages, task_for

PLACEHOLDER_QUESTION_TOKENS = 30  # for --dry-run estimates of the answer calls
SCALE_RECORDS = 10_000  # --dry-run also prices a run of this size (the paper's LongAlign-10k)


def mean_target_length(lo: int, hi: int, upsample: float) -> float:
    """Expected document length under corpus.draw_target's density ∝ L^(a−1) on [lo, hi]."""
    a = float(upsample)
    if hi <= lo:
        return float(lo)
    return a / (a + 1) * (hi ** (a + 1) - lo ** (a + 1)) / (hi ** a - lo ** a)


LEVERS = (("interactive", False), ("interactive", True), ("batch", False), ("batch", True))
MIN_CACHE_TOKENS = 1024  # shortest prefix either provider caches (Anthropic's Haiku models need 2,048)


def cost_table(prices: dict, n_docs: int, doc_tokens: float, question_tokens: int = 200, answer_tokens: int = 1024,
               prompt_overhead: int = 120, levers=LEVERS, batch_discount: float = 0.5) -> list[dict]:
    """Cost of Self-Instruct at scale per model and lever (interactive/batch × prompt caching off/on).

    Two calls per document (the question list, then the answer), the document first in both. With caching the
    question call writes the document to the provider's prompt cache and the answer call, sent right after it,
    reads it. In batch mode the two calls sit in two batches hours apart, beyond the cache's lifetime (5 min to
    1 h), so caching saves nothing there and synth does not mark the document (see `use_cache_marker`). Output
    tokens are upper bounds (the max_new_tokens of each call). Each row: model, mode, caching, calls, tokens,
    cost_usd, saving (share saved against interactive without caching).
    """
    q_in = doc_tokens + prompt_overhead
    a_in = doc_tokens + prompt_overhead + PLACEHOLDER_QUESTION_TOKENS
    cacheable = doc_tokens >= MIN_CACHE_TOKENS
    rows = []
    for model, p in prices.items():
        price = Price.parse(p, model)
        base = None
        for mode, caching in levers:
            hit = caching and cacheable and mode == "interactive"
            usage = {"input_tokens": n_docs * (q_in + a_in), "output_tokens": n_docs * (question_tokens + answer_tokens),
                     "cache_write_tokens": n_docs * doc_tokens if hit else 0,
                     "cache_read_tokens": n_docs * doc_tokens if hit else 0}
            usd = cost_of(usage, price, batch=mode == "batch", batch_discount=batch_discount)
            if mode == "interactive" and not caching:
                base = usd
            rows.append({"model": model, "mode": mode, "caching": caching, "calls": 2 * n_docs,
                         **{k: int(v) for k, v in usage.items()},
                         "usd_per_1M": [price.input, price.output, price.cache_read, price.cache_write],
                         "cost_usd": round(usd, 2),
                         "saving": round(1 - usd / base, 3) if base else 0.0})
    return rows


def dry_run(client, docs: list[Document] | None, scfg, done: set[str], corpus_cfg=None) -> dict:
    """Calls, tokens and cost of the long-data synthesis before spending anything; needs no API key.

    docs: the corpus synth would read (its texts are counted), or None when no corpus was built yet: the plan is
    then made for the size the settings ask for — min(corpus.n_docs, synth.max_docs) documents of the mean length
    corpus.draw_target gives for corpus.min_tokens/max_tokens/upsample_long — without building anything.
    client: an LLMClient to count tokens with and to tell which question calls are already cached, or None:
    tokens are then approximated (~4 characters per token, what API backends use anyway) and price comes from
    synth.prices; `questions.cached` is None (not checked).
    """
    qp = {"max_new_tokens": scfg.question_max_new_tokens or scfg.max_new_tokens, "temperature": scfg.temperature}
    backend = client.backend_name if client is not None else scfg.backend
    model = client.model if client is not None else scfg.model
    price = client.price if client is not None else (price_for(model, scfg.prices) if backend != "local" else None)
    count = client.count_tokens if client is not None else messages_tokens
    placeholder = "?" * (PLACEHOLDER_QUESTION_TOKENS * 4)

    def priced(calls: int, cached, tin: int, tout: int) -> dict:
        usage = {"input_tokens": int(tin), "output_tokens": int(tout)}
        return {"calls": calls, "cached": cached, **usage, "cost_usd": round(cost_of(usage, price), 6)}

    if docs is None:  # estimate from the requested size: no corpus, no client
        if corpus_cfg is None:
            raise LongAlignError("dry_run: give the corpus documents or the corpus settings (corpus_cfg)")
        n_req = min(corpus_cfg.n_docs, scfg.max_docs) if scfg.max_docs else corpus_cfg.n_docs
        mean_doc = mean_target_length(corpus_cfg.min_tokens, corpus_cfg.max_tokens, corpus_cfg.upsample_long)
        types = [task_for(i, scfg) for i in range(max(1, len(scfg.task_types)))]
        q_over = sum(messages_tokens(question_messages("", t, "en", scfg.n_questions)) for t in types) / len(types)
        a_over = messages_tokens(answer_messages("", placeholder, "en"))
        n = n_req
        q_est = priced(n, None, n * (mean_doc + q_over), n * qp["max_new_tokens"])
        a_est = priced(n, None, n * (mean_doc + a_over), n * scfg.max_new_tokens)
        source = (f"requested size, no corpus built: {n} documents (corpus.n_docs={corpus_cfg.n_docs}"
                  f"{f', synth.max_docs={scfg.max_docs}' if scfg.max_docs else ''}) of ~{mean_doc:,.0f} tokens "
                  f"(the mean for corpus.min_tokens={corpus_cfg.min_tokens}, max_tokens={corpus_cfg.max_tokens}, "
                  f"upsample_long={corpus_cfg.upsample_long})")
        skipped = 0
    else:
        todo = [(i, d) for i, d in enumerate(docs) if d.id not in done]
        n, skipped = len(todo), len(docs) - len(todo)
        q_batch = [question_messages(d.text, task_for(i, scfg), d.lang, scfg.n_questions) for i, d in todo]
        if client is not None:  # the seed is part of each request's cache key
            q_est = {"calls": 0, "cached": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
            for (_, d), msgs in zip(todo, q_batch, strict=True):
                e = client.estimate([msgs], seed=doc_seed(d.id, scfg.seed), **qp)
                for k in q_est:
                    q_est[k] += e[k]
        else:
            q_est = priced(n, None, sum(count(m) for m in q_batch), n * qp["max_new_tokens"])
        a_msgs = [answer_messages(d.text, placeholder, d.lang) for _, d in todo]
        a_est = priced(n, None if client is None else 0, sum(count(m) for m in a_msgs), n * scfg.max_new_tokens)
        mean_doc = sum(count([{"role": "user", "content": d.text}]) for d in docs) / max(1, len(docs))
        source = f"the corpus: {len(docs)} documents"
    total = {k: q_est[k] + a_est[k] for k in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    total["cost_usd"] = round(total["cost_usd"], 6)
    # the same run at the paper's scale, under each lever, at this model's price (or every listed price)
    key = _price_key(model, scfg.prices)
    prices = {model: scfg.prices[key]} if key else dict(scfg.prices)
    scale = cost_table(prices, SCALE_RECORDS, mean_doc, question_tokens=qp["max_new_tokens"],
                       answer_tokens=scfg.max_new_tokens, batch_discount=scfg.batch_discount)
    return {"documents": n, "skipped_done": skipped, "estimated_from": source, "backend": backend,
            "extra_question_calls_at_most": n * (max(1, scfg.question_attempts) - 1),
            "model": model, "price_per_1M": [price.input, price.output] if price else None, "questions": q_est,
            "answers": a_est, **total, "mode": scfg.mode, "prompt_caching": scfg.prompt_caching,
            "scale": {"records": SCALE_RECORDS, "mean_doc_tokens": round(mean_doc), "rows": scale}}


def _price_key(model: str, prices: dict) -> str | None:
    keys = [k for k in prices if model == k or model.startswith(k) or model.split("/")[-1].startswith(k)]
    return max(keys, key=len) if keys else None


def lever_table(rows: list[dict]) -> str:
    """Markdown table of `cost_table` rows: model, lever, cost, saving."""
    lines = ["| model | mode | prompt caching | cost (USD) | saving |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {'on' if r['caching'] else 'off'} | {r['cost_usd']:,.2f} | "
                     f"{r['saving']:.0%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------------------------------
def lever_label(mode: str, caching: bool) -> str:
    return f"{mode}{' + prompt caching' if caching else ''}"


def cost_figure(rows: list[dict], n_docs: int):
    """Grouped bars of `cost_table` rows: per model, the cost under each lever (interactive/batch × caching)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    models = list(dict.fromkeys(r["model"] for r in rows))
    levers = list(dict.fromkeys((r["mode"], r["caching"]) for r in rows))
    cost = {(r["model"], r["mode"], r["caching"]): r["cost_usd"] for r in rows}
    fig, ax = plots.figure(figsize=(8.5, 3.8))
    width = 0.8 / max(1, len(levers))
    for k, (mode, caching) in enumerate(levers):
        xs = [i + (k - (len(levers) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [cost[(m, mode, caching)] for m in models], width, label=lever_label(mode, caching),
               hatch="//" if caching else None, edgecolor="white")
    ax.set_xticks(range(len(models)), models, rotation=15)
    ax.set_ylabel("USD (output at its max_new_tokens cap)")
    ax.set_title(f"Self-Instruct cost for {n_docs:,} long documents (2 calls each), list prices")
    ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    return fig
