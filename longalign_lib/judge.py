"""LLM-as-judge after LongBench-Chat: rate each answer 1-10 against the reference, calibrated by rated examples.

Run as: longalign judge --preset cpu-demo [--predictions FILE] [--human-scores FILE] [--judge-proxy-only]
        longalign judge --compare RUN_A RUN_B      (is A's score really higher than B's? paired bootstrap + permutation)
Library:
    from longalign_lib.judge import load_template, build_judge_prompt, parse_rating, judge_items
    client = make_client("openai", "gpt-4o")                  # any llm.py backend; or a vLLM base_url
    rows = judge_items(client, [{"idx": "1", "query": q, "answer": ref, "prediction": p, "few_shots": shots}])
    items, source = inputs.predictions(cfg, run_dir)           # a run's predictions.jsonl (what `longalign judge` reads)
    judged = judge_predictions(cfg.eval, cfg.model, items, run_dir / "judgments.jsonl")   # keyed reuse, resumable

The protocol (Bai et al., 2024, LongBench-Chat): the judge sees the question, the reference answer and several
answers with human ratings — never the long document, so a judge with a short window can grade long-context
answers. The rated examples are shuffled for every run, each case is judged `runs` times (2, as in the paper) and
the ratings are averaged. The judge must give the rating as [[n]], and only a [[n]] the judge wrote itself is read
(parse_rating skips any it copied from its prompt: rated examples, the template, the graded answer); a reply with no
rating is retried with a reminder, up to `max_attempts` tries; runs that never yield a rating are recorded as
failures, and the parse rate (parse_stats) goes into the summary and the report. All requests of a try go out
together; the client keeps `eval.judge_concurrency` of them in flight. Alongside, every answer gets the
reference-overlap proxy scores of scoring.py (offline, labelled as a proxy).

Scoring (`eval.judge_scoring`): a local judge is read through its rating probabilities (rating_probs.py: the
expectation over 1..10 at the rating position, so every item gets a score without generating); an API judge's
[[n]] is parsed, or, with `probs` on an OpenAI-compatible server, its reply is prefilled with "[[" (eval.judge_prefill)
and the top_logprobs of the rating token are read. Each score records its
method. `reliability` adds judge reliability (agreement.py) whenever reference scores exist: against human / rubric
ratings (Spearman, Kendall, weighted κ, Krippendorff's α, Scott's π, leniency, with CIs), against exact
correctness on verifiable tasks (AUC, point-biserial), scores per input-length bucket, truncation and the
no-document control (`eval.no_document_pass`); `compare_runs` tests whether two judged runs really differ.

Pointing the judge elsewhere takes two settings: `--set eval.judge_backend=openai --set eval.judge_model=gpt-4o`
(key in $OPENAI_API_KEY), or `--set eval.judge_base_url=http://localhost:8000/v1 --set eval.judge_model=<served
name>` for a vLLM / llama.cpp server (a base_url switches the local backend to the OpenAI wire format).
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import time
from pathlib import Path

from .agreement import binary_report, by_bucket, markdown_table, paired_compare, reliability_report
from .io import LongAlignError, append_jsonl, iter_jsonl, read_jsonl, write_jsonl
from .llm import Deferred, client_from_config, run_sync
from .llm_batch import run_batched
from .models import load_model_and_tokenizer, load_tokenizer
from .provenance import ReuseLog, changed_parts, judge_identity, reuse_key
from .rating_probs import (  # noqa: F401
    PATTERNS,
    LocalRatingScorer,
    OpenAIRatingScorer,
    parse_rating,
    prompt_text,
    rating_matches,
)
from .scoring import agreement, bootstrap_ci, proxy_scores

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
FIELDS = ("question", "reference", "answer", "examples")
REQUIRED = ("question", "reference", "answer")
REMINDER = ("Your reply did not contain a rating in the required form. Reply with the rating only, as a whole "
            "number from 1 to 10 in double square brackets, for example [[6]].")
NO_EXAMPLES = "(no rated examples for this question)"


# ---------------------------------------------------------------- prompt assembly
def load_template(spec: str | None = None) -> str:
    """A judge prompt template: a bundled name (default, rating_first) or a path to a text file.

    Placeholders: {question}, {reference}, {answer} (required) and {examples} (the rated answers).
    """
    spec = spec or "default"
    path = Path(spec)
    if not path.exists():
        bundled = PROMPT_DIR / f"judge_{spec}.txt"
        if not bundled.exists():
            names = sorted(p.stem.removeprefix("judge_") for p in PROMPT_DIR.glob("judge_*.txt"))
            raise LongAlignError(f"eval.judge_prompt_file={spec!r}: no such file, and not a bundled template "
                                 f"({', '.join(names)})")
        path = bundled
    text = path.read_text(encoding="utf-8")
    missing = [f for f in REQUIRED if "{" + f + "}" not in text]
    if missing:
        raise LongAlignError(f"{path}: the judge template lacks the placeholder(s) "
                             f"{', '.join('{' + m + '}' for m in missing)}; it needs {{question}}, {{reference}}, "
                             "{answer} and usually {examples}")
    return text


def fill(template: str, **values: str) -> str:
    """Substitute {question} {reference} {answer} {examples} in one pass (text inside the values is left alone)."""
    return re.sub(r"\{(" + "|".join(FIELDS) + r")\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _fmt_score(s) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def format_examples(few_shots: list[dict], order: list[int]) -> str:
    """The rated example answers, in the given order, each headed by its rating."""
    if not few_shots:
        return NO_EXAMPLES
    blocks = [f"[Example answer {k + 1}, rated {_fmt_score(few_shots[i]['score'])}/10]\n{few_shots[i]['answer'].strip()}"
              for k, i in enumerate(order)]
    return "\n\n".join(blocks)


def build_judge_prompt(template: str, question: str, reference: str, answer: str, few_shots: list[dict],
                       rng: random.Random | None = None) -> tuple[str, list[int]]:
    """The judge's prompt with the rated examples shuffled by `rng`; returns (prompt, order of the examples)."""
    order = list(range(len(few_shots)))
    (rng or random.Random(0)).shuffle(order)
    text = fill(template, question=question.strip(), reference=reference.strip(),
                answer=answer.strip() or "(empty answer)", examples=format_examples(few_shots, order))
    return text, order


# ---------------------------------------------------------------- parsing
# parse_rating and PATTERNS live in rating_probs.py (how a rating is read off a reply); re-exported here.


# ---------------------------------------------------------------- judging
def judge_items(client, items: list[dict], template: str | None = None, runs: int = 2, max_attempts: int = 3,
                seed: int = 0, temperature: float = 0.0, max_new_tokens: int = 256, progress: bool = True,
                scorer=None, first_run: int = 0) -> list[dict]:
    """Judge each item ({idx, query, answer (reference), prediction, few_shots}) `runs` times; returns one row each.

    A row: idx, score (mean of the runs that gave a rating, or None), score_method (how the runs' ratings were
    obtained: parsed | prob_weighted | mixed), runs (per run: example order, rating, method, attempts with raw
    reply, parse pattern, usage, cost, cached), n_failed_runs, failed, usage, cost_usd.
    The runs of a case show the rated examples in different orders and use seeds seed, seed+1, ...; all requests
    of a try (every run of every item) go out together, at most `client.concurrency` (eval.judge_concurrency) in
    flight; a reply is read for the judge's own [[n]] only (parse_rating with the prompt: copied ones are listed in
    the attempt's `echoed_ratings`), and unparseable replies are retried with the reply and a reminder appended.
    `scorer` (rating_probs.LocalRatingScorer / OpenAIRatingScorer): each run's rating is then the expectation of
    the judge's probability distribution over 1..10 at the rating position (method `prob_weighted`, with the
    distribution and its mass recorded); a reply without a readable rating position falls back to parsing.
    `first_run`: judge only runs first_run..runs-1 (the earlier ones exist: the judge stage extends a row judged
    with fewer runs); each run's example order and seed are the same as in a call that judges all of them.
    """
    template = template or load_template()
    if runs < 1 or max_attempts < 1:
        raise LongAlignError("eval.judge_runs and eval.judge_max_attempts must be at least 1")
    jobs = []
    for i, it in enumerate(items):
        shots = it.get("few_shots") or []
        n_orders = math.factorial(len(shots))
        seen = []
        for r in range(runs):
            rng = random.Random(f"{seed}|{it['idx']}|{r}")
            for _ in range(50):  # runs see different orders of the examples while there are orders left
                prompt, order = build_judge_prompt(template, it["query"], it["answer"], it.get("prediction") or "",
                                                   shots, rng)
                if order not in seen or len(seen) >= n_orders:
                    break
            seen.append(order)
            if r < first_run:
                continue
            jobs.append({"item": i, "run": r, "order": order, "rating": None, "parsed_by": None, "method": None,
                         "messages": [{"role": "user", "content": prompt}], "attempts": []})
    pending = jobs
    if scorer is not None:
        _score_by_probs(scorer, jobs, progress)
        pending = [j for j in jobs if j["rating"] is None and j["attempts"] and j["attempts"][-1]["raw"]] \
            if client is not None else []
        max_attempts = max(0, max_attempts - 1)  # the scorer's call was the first try
    for attempt in range(max_attempts):
        if not pending:
            break
        # every run's request at once (each run its own seed: identical prompts still count as separate samples);
        # the client keeps at most `concurrency` of them in flight
        texts = _gather(client, [(lambda j=j: client.achat(j["messages"], temperature=temperature,
                                                             max_new_tokens=max_new_tokens, seed=seed + j["run"]))
                                 for j in pending], f"judge try {attempt + 1}", progress)
        retry = []
        for j, rep in zip(pending, texts, strict=True):
            rating, how, echoed = _read(rep.text, j["messages"])
            j["attempts"].append({"raw": rep.text, "rating": rating, "parsed_by": how, "usage": dict(rep.usage),
                                  "cost_usd": rep.cost_usd, "cached": rep.cached, "echoed_ratings": echoed})
            if rating is None:
                j["messages"] = j["messages"] + [{"role": "assistant", "content": rep.text.strip() or "(no reply)"},
                                                 {"role": "user", "content": REMINDER}]
                retry.append(j)
            else:
                j["rating"], j["parsed_by"], j["method"] = rating, how, "parsed"
        pending = retry
    rows = []
    for i, it in enumerate(items):
        mine = [j for j in jobs if j["item"] == i]
        ratings = [j["rating"] for j in mine if j["rating"] is not None]
        usage = {"input_tokens": 0, "output_tokens": 0}
        for j in mine:
            for a in j["attempts"]:
                for k in usage:
                    usage[k] += int(a["usage"].get(k, 0) or 0)
        methods = sorted({j["method"] for j in mine if j["rating"] is not None})
        rows.append({"idx": it["idx"], "score": sum(ratings) / len(ratings) if ratings else None,
                     "score_method": (methods[0] if len(methods) == 1 else "mixed") if methods else None,
                     "runs": [{"run": j["run"], "order": j["order"], "rating": j["rating"], "parsed_by": j["parsed_by"],
                               "method": j["method"], "attempts": j["attempts"]} for j in mine],
                     "n_failed_runs": len(mine) - len(ratings), "failed": not ratings, "usage": usage,
                     "cost_usd": sum(a["cost_usd"] or 0.0 for j in mine for a in j["attempts"]),
                     "judge": {"backend": client.backend_name, "model": client.model} if client is not None else
                     {"backend": getattr(scorer, "backend_name", "local"), "model": getattr(scorer, "name", None)}})
    return rows


def _read(text: str, messages: list[dict]) -> tuple[float | None, str | None, list[float]]:
    """(rating, how, ratings the judge copied from its prompt and that were therefore not read) of one reply."""
    sent = prompt_text(messages)
    echoed = [m["value"] for m in rating_matches(text, sent) if m["echoed"]]
    return (*parse_rating(text, sent), echoed)


def _gather(client, calls: list, desc: str, progress: bool) -> list:
    """Run the coroutine factories `calls` together on one client session (its semaphore bounds how many are in
    flight: eval.judge_concurrency); results in order. Inside `client.deferring()` every miss is recorded before
    one Deferred is raised (judge_mode=batch)."""
    from tqdm.auto import tqdm

    async def go():
        async with client.session():
            bar = tqdm(total=len(calls), desc=desc, disable=not progress, leave=False)

            async def one(call):
                r = await call()
                bar.update(1)
                return r
            try:
                return await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)
            finally:
                bar.close()

    out = list(run_sync(go())) if calls else []
    for r in out:
        if isinstance(r, BaseException) and not isinstance(r, Deferred):
            raise r
    n_deferred = sum(isinstance(r, Deferred) for r in out)
    if n_deferred:
        raise Deferred(n_deferred)
    return out


def _score_by_probs(scorer, jobs: list[dict], progress: bool) -> None:
    """Each job's rating from the scorer's distribution (expectation over 1..10); the attempt records it all.

    A scorer with a client (an OpenAI-compatible server) is asked for every job at once, at most
    `client.concurrency` in flight; a local scorer runs the jobs one after another."""
    from tqdm.auto import tqdm

    client = getattr(scorer, "client", None)
    if client is not None and hasattr(scorer, "adistribution"):
        dists = _gather(client, [(lambda j=j: scorer.adistribution(j["messages"])) for j in jobs],
                        "judge (rating probabilities)", progress)
    else:
        dists = [scorer.distribution(j["messages"]) for j in tqdm(jobs, desc="judge (rating probabilities)",
                                                                   disable=not progress, leave=False)]
    for j, d in zip(jobs, dists, strict=True):
        d = d or {}
        text = d.get("text", "")
        parsed, how, echoed = _read(text, j["messages"]) if text else (None, None, [])
        att = {"raw": text, "rating": None, "parsed_by": None, "usage": dict(d.get("usage") or {}),
               "cost_usd": d.get("cost_usd", 0.0), "cached": d.get("cached", False), "parsed_rating": parsed,
               "echoed_ratings": echoed}
        if d.get("prefill"):
            att["prefill"] = d["prefill"]
        if d.get("expected") is not None:
            att.update(rating=d["expected"], parsed_by="prob_weighted", probs=d["probs"], mass=d["mass"],
                       mode=d["mode"], approximate=bool(d.get("approximate")))
            j.update(rating=d["expected"], parsed_by="prob_weighted", method="prob_weighted")
        elif parsed is not None:
            att.update(rating=parsed, parsed_by=how)
            j.update(rating=parsed, parsed_by=how, method="parsed")
        if text and j["rating"] is None:
            j["messages"] = j["messages"] + [{"role": "assistant", "content": text.strip()},
                                             {"role": "user", "content": REMINDER}]
        j["attempts"].append(att)


def parse_stats(rows: list[dict]) -> dict:
    """How the judge's replies were read: `attempted` replies read for a [[n]] (every try not scored by rating
    probabilities), `parsed`, `unparseable`, `rate` (parsed / attempted), `echoed_ignored` ([[n]] the judge copied
    from its prompt, not read), `prob_weighted` (tries scored from the rating distribution)."""
    atts = [a for r in rows for run in r.get("runs") or [] for a in run.get("attempts") or []]
    probs = sum(a.get("parsed_by") == "prob_weighted" for a in atts)
    read = [a for a in atts if a.get("parsed_by") != "prob_weighted"]
    parsed = sum(a.get("rating") is not None for a in read)
    return {"attempted": len(read), "parsed": parsed, "unparseable": len(read) - parsed,
            "rate": parsed / len(read) if read else None,
            "echoed_ignored": sum(len(a.get("echoed_ratings") or []) for a in atts), "prob_weighted": probs}


def parse_text(p: dict) -> str:
    """One sentence for the report on parse_stats' numbers."""
    if not p["attempted"]:
        return ""
    return (f"Judge replies read for a [[n]] rating: {p['parsed']} of {p['attempted']} parsed "
            f"({100 * p['rate']:.0f} %), {p['unparseable']} unparseable; {p['echoed_ignored']} [[n]] copied from the "
            "judge's own prompt (rated examples, the template, the graded answer) were not read as ratings.")


def judge_config(ec):
    """EvalConfig with a judge_base_url but the `local` backend → the OpenAI wire format (vLLM, llama.cpp...)."""
    if ec.judge_base_url and ec.judge_backend == "local":
        return dataclasses.replace(ec, judge_backend="openai")
    return ec


def make_judge_client(ec, model_cfg=None, **overrides):
    return client_from_config(judge_config(ec), prefix="judge_", model_cfg=model_cfg, **overrides)


def needle_judge_scorer(ec, needle: str, question: str, client=None):
    """A needle.run_grid scorer that asks the judge (reference = the needle sentence); rating/10, 0 on failure."""
    client = client or make_judge_client(ec)
    template = load_template(ec.judge_prompt_file)

    def score(prediction: str, cell: dict) -> float:
        row = judge_items(client, [{"idx": f"needle-{cell['length']}-{cell['depth']}", "query": question,
                                    "answer": needle, "prediction": prediction, "few_shots": []}], template,
                          runs=1, max_attempts=ec.judge_max_attempts, seed=ec.seed,
                          temperature=ec.judge_temperature, max_new_tokens=ec.judge_max_new_tokens, progress=False)[0]
        return 0.0 if row["score"] is None else row["score"] / 10.0
    return score


# ---------------------------------------------------------------- scoring method, reliability, comparison
GPT4_HUMAN = {"spearman": 0.844, "kendall": 0.716}  # LongAlign paper, Table 1: GPT-4 few-shot judge vs humans
HUMAN_HUMAN_SPEARMAN = 0.817  # the paper: agreement between two human raters


def resolve_scoring(ec) -> str:
    """eval.judge_scoring → "probs" or "parse" (auto: probabilities for a local judge, parsing otherwise)."""
    mode = ec.judge_scoring
    if mode not in ("auto", "probs", "parse"):
        raise LongAlignError(f"eval.judge_scoring={mode!r}: choose auto, probs or parse")
    if mode == "auto":
        return "probs" if judge_config(ec).judge_backend == "local" else "parse"
    return mode


def make_rating_scorer(ec, model_cfg=None, client=None):
    """The probability-weighted scorer for the configured judge: a local transformers model, or `client`'s
    OpenAI-compatible server (which must return logprobs)."""
    if judge_config(ec).judge_backend == "local":
        kw = {"dtype": model_cfg.dtype, "device": model_cfg.device} if model_cfg is not None else {}
        model, tok = load_model_and_tokenizer(ec.judge_model, **kw)
        return LocalRatingScorer(model, tok, threads=ec.local_threads, name=ec.judge_model)
    prefill = resolve_prefill(ec)
    tok = None
    if prefill == "completions":
        tok = load_tokenizer(ec.judge_tokenizer)
    return OpenAIRatingScorer(client or make_judge_client(ec, model_cfg), top_logprobs=ec.judge_top_logprobs,
                              max_new_tokens=min(ec.judge_max_new_tokens, 16), seed=ec.seed, prefill=prefill,
                              tokenizer=tok)


def resolve_prefill(ec) -> str:
    """eval.judge_prefill → how an OpenAI-compatible judge's reply is begun with "[[" (rating_probs.PREFILL_MODES).

    auto: `completions` when eval.judge_tokenizer names the served model's chat template; `chat` (a continued final
    assistant message) when eval.judge_base_url points at your own server (vLLM, llama.cpp, SGLang continue one);
    `none` for the provider's own endpoint, which takes no prefilled assistant turn.
    """
    mode = getattr(ec, "judge_prefill", "auto") or "auto"
    if mode not in ("auto", "chat", "completions", "none"):
        raise LongAlignError(f"eval.judge_prefill={mode!r}: choose auto, chat, completions or none")
    if mode == "auto":
        return "completions" if getattr(ec, "judge_tokenizer", None) else "chat" if ec.judge_base_url else "none"
    return mode


def reliability(rows: list[dict], n_boot: int = 1000, seed: int = 0, length_edges=None) -> dict:
    """The judge reliability section: agreement with human ratings (and the proxy's, as a baseline), separation
    of right from wrong answers on verifiable tasks, scores by input-length bucket, truncation and no-document
    controls. Keys are present only when their inputs are."""
    judge = [r.get("score") for r in rows]
    proxy = [r["proxy"]["proxy_10"] for r in rows]
    out = {"score_methods": {}}
    for r in rows:
        m = r.get("score_method") or "none"
        out["score_methods"][m] = out["score_methods"].get(m, 0) + 1
    if any(r.get("runs") for r in rows):
        out["parsing"] = parse_stats(rows)
    human = [r.get("human_score") for r in rows]
    if any(h is not None for h in human):
        out["judge_vs_human"] = reliability_report(judge, human, n_boot=n_boot, seed=seed)
        out["proxy_vs_human"] = reliability_report(proxy, human, n_boot=n_boot, seed=seed)
    exact = [r.get("exact") for r in rows]
    if any(e is not None for e in exact):
        out["judge_vs_exact"] = binary_report(judge, exact, n_boot=n_boot, seed=seed)
        out["proxy_vs_exact"] = binary_report(proxy, exact, n_boot=n_boot, seed=seed)
    lengths = [r.get("n_prompt_tokens") for r in rows]
    if length_edges and any(n is not None for n in lengths):
        out["by_length"] = {"edges": list(length_edges), "judge": by_bucket(judge, lengths, length_edges, seed),
                            "exact": by_bucket(exact, lengths, length_edges, seed)}
        out["truncated"] = [{"idx": r["idx"], "tokens_cut": r.get("truncated_tokens")} for r in rows if r.get("truncated")]
    nodoc = [r for r in rows if r.get("no_doc_exact") is not None]
    if nodoc:
        out["answered_without_document"] = [r["idx"] for r in nodoc if r["no_doc_exact"] == 1]
        out["no_document_checked"] = len(nodoc)
    return out


def reliability_text(rel: dict, judge_name: str, reference: str = "human ratings") -> str:
    """Markdown for the report: tables with CIs and a plain comparison with the paper's GPT-4 judge."""
    parts = []
    if rel.get("parsing") and parse_text(rel["parsing"]):
        parts.append(parse_text(rel["parsing"]))
    if "judge_vs_human" in rel:
        a, p = rel["judge_vs_human"], rel["proxy_vs_human"]
        rho = a["spearman"]["value"]
        parts.append(f"**Judge reliability against the {reference}** ({a['n']} rated answers, each judged "
                     "leave-one-out; 95% bootstrap CIs):\n\n" + markdown_table(a, "judge vs reference"))
        if rho is not None:
            gap = GPT4_HUMAN["spearman"] - rho
            parts.append(f"How far this is from a judge you can trust: `{judge_name}` reaches Spearman {rho:.3f} "
                         f"(CI {a['spearman']['lo']:.2f}–{a['spearman']['hi']:.2f}); the paper's GPT-4 judge reaches "
                         f"{GPT4_HUMAN['spearman']} (Kendall {GPT4_HUMAN['kendall']}) and two humans "
                         f"{HUMAN_HUMAN_SPEARMAN}. The gap is {gap:.2f} in Spearman"
                         + (" — do not use this judge's numbers as a measurement." if gap > 0.3 else ".")
                         + (f" The overlap proxy, for comparison: Spearman {p['spearman']['value']:.3f}."
                            if p["spearman"]["value"] is not None else ""))
    if "judge_vs_exact" in rel:
        b = rel["judge_vs_exact"]
        parts.append(f"**Does the rating separate right from wrong answers?** ({b['n']} verifiable answers, "
                     f"{b['n_correct']} right):\n\n" + markdown_table({k: b[k] for k in ("auc", "point_biserial")},
                                                                        "judge vs exact"))
    if "by_length" in rel:
        rows = rel["by_length"]["judge"]
        cells = [f"{r['lo']}–{r['hi'] or '∞'} tokens: {r['mean']:.2f} (n={r['n']})" for r in rows if r["n"]]
        parts.append("Judge score by input length: " + "; ".join(cells) + f". {len(rel['truncated'])} input(s) "
                     "were middle-truncated to the window.")
    if "answered_without_document" in rel:
        parts.append(f"No-document control: {len(rel['answered_without_document'])} of {rel['no_document_checked']} "
                     "questions were answered right **without** the document: "
                     f"{', '.join(rel['answered_without_document']) or 'none'}.")
    return "\n\n".join(parts)


def load_judgment_scores(path) -> dict[str, list[float]]:
    """{idx: [rating of each judge run]} from a judgments.jsonl (the runs' ratings, not just their mean)."""
    path = Path(path)
    if path.is_dir():
        path = path / "judgments.jsonl"
    if not path.exists():
        raise LongAlignError(f"{path}: not found; run `longalign judge` in that run directory first")
    out = {}
    for k, r in enumerate(read_jsonl(path, allow_partial_last_line=True), 1):
        if "idx" not in r:
            raise LongAlignError(f"{path}:{k}: a judgment row without 'idx'")
        ratings = [run["rating"] for run in r.get("runs") or [] if run.get("rating") is not None]
        if not ratings and r.get("score") is not None:
            ratings = [r["score"]]
        if ratings:
            out[str(r["idx"])] = ratings
    return out


def compare_runs(run_a, run_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two judged runs (A − B) over their shared items and judge repetitions."""
    a, b = load_judgment_scores(run_a), load_judgment_scores(run_b)
    res = paired_compare(a, b, n_boot=n_boot, seed=seed)
    res.update(run_a=str(run_a), run_b=str(run_b))
    keys = [k for k in a if k in b]  # judge-vs-judge: the same answers rated by two judges agree how well?
    res["agreement"] = reliability_report([sum(a[k]) / len(a[k]) for k in keys], [sum(b[k]) / len(b[k]) for k in keys],
                                          n_boot=min(n_boot, 1000), seed=seed)
    return res


def compare_text(c: dict) -> str:
    if not c["n"]:
        return f"No items judged in both {c['run_a']} and {c['run_b']}."
    es = "–" if c["effect_size"] is None else f"{c['effect_size']:.2f}"
    es_ci = "" if c["effect_size_ci"][0] is None else f" (CI {c['effect_size_ci'][0]:.2f}–{c['effect_size_ci'][1]:.2f})"
    real = c["ci"][0] is not None and (c["ci"][0] > 0 or c["ci"][1] < 0)
    return (f"A = `{c['run_a']}`, B = `{c['run_b']}`, {c['n']} shared items: mean {c['mean_a']:.2f} vs {c['mean_b']:.2f}, "
            f"A − B = **{c['mean_diff']:+.2f}** (95% CI {c['ci'][0]:+.2f} to {c['ci'][1]:+.2f}, items and judge runs "
            f"resampled), effect size d_z {es}{es_ci}, permutation p = {c['p_value']:.3g}; A better on {c['wins_a']}, "
            f"B on {c['wins_b']}, ties {c['ties']}. "
            + ("The interval excludes 0." if real else "The interval includes 0: this difference is within the noise.")
            + _agreement_line(c.get("agreement")))


def _agreement_line(a: dict | None) -> str:
    """When A and B are two judges over the same answers: how well they agree (judge-vs-judge)."""
    if not a or a["spearman"]["value"] is None:
        return ""
    f = lambda k: "–" if a[k]["value"] is None else f"{a[k]['value']:.2f}"  # noqa: E731
    return (f" If A and B are two judges of the same answers, their agreement: Spearman {f('spearman')} "
            f"(CI {a['spearman']['lo']:.2f}–{a['spearman']['hi']:.2f}), weighted κ {f('weighted_kappa')}, "
            f"Krippendorff α {f('krippendorff_alpha')}, leniency of A {f('leniency')}.")


# ---------------------------------------------------------------- judging a run's predictions, keyed reuse
ITEM_FIELDS = ("query", "answer", "prediction", "few_shots")  # what the judge reads of an item
PASS_THROUGH = ("n_prompt_tokens", "n_input_tokens", "truncated", "no_doc_exact", "no_doc_prediction")


def judge_mode(ec, proxy_only: bool = False) -> tuple[str, bool]:
    """(mode, batch): "llm" or "proxy" from eval.judge_mode (`proxy_only`: proxy); batch when judge_mode=batch,
    the LLM judge through the provider's Batch API (same requests, same rows)."""
    mode = "proxy" if proxy_only else ec.judge_mode
    if mode not in ("llm", "batch", "proxy"):
        raise LongAlignError(f"eval.judge_mode={mode!r}: choose llm, batch or proxy")
    batch = mode == "batch"
    return ("llm" if batch else mode), batch


@dataclasses.dataclass
class Judged:
    """What judge_predictions did: the rows (input order), the scoring used, how many rows were reused, extended
    or judged anew (`log`, `extended`), the client's usage, and when judging began (after the client was made)."""
    rows: list[dict]
    scoring: str | None
    log: ReuseLog
    extended: int
    client_stats: dict | None
    started: float


def judge_predictions(ec, model_cfg, items: list[dict], out_path: Path, mode: str = "llm", batch: bool = False,
                      batch_dir: Path | None = None) -> Judged:
    """Judge `items` (inputs.predictions) into the judgments file `out_path`, reusing what it already holds.

    A row is reused only when its reuse key (provenance.py) is unchanged: the judge (provenance.judge_identity:
    backend, model, base_url, a local judge's weights, scoring, template, settings) and what it read of the item
    (ITEM_FIELDS). Edited items are judged again, alone; a row with fewer runs than eval.judge_runs gets the
    missing runs, one with more keeps its first ones; rows of items no longer given are dropped. Rows are appended
    as they are judged (an interrupted run resumes) and the file ends in input order. `mode` and `batch` come
    from judge_mode; with batch, the requests go through the provider's Batch API (state under `batch_dir`).
    """
    out_path = Path(out_path)
    scoring = resolve_scoring(ec) if mode == "llm" else None
    if batch and scoring == "probs":
        raise LongAlignError("eval.judge_mode=batch sends the judge's text requests as a batch and parses their "
                             "[[n]] ratings: set eval.judge_scoring=parse (or auto with an API judge), or judge_mode=llm")
    template = load_template(ec.judge_prompt_file) if mode == "llm" else None
    judge_part = judge_identity(ec, judge_config(ec).judge_backend, mode, scoring, template)
    keys = {it["idx"]: reuse_key(judge=judge_part, item={k: it.get(k) for k in ITEM_FIELDS}) for it in items}
    log = ReuseLog()
    done, groups, extended = _reusable_judgments(out_path, items, keys, ec.judge_runs if mode == "llm" else 0, log)
    for it in items:  # the rows kept, their pass-through fields (human score, exact...) refreshed from the input
        if it["idx"] in done:
            done[it["idx"]] = _row(done[it["idx"]], it, mode, keys[it["idx"]])
    resumed = out_path.exists()
    if resumed:  # this judging's rows only (stale ones go); rows being extended stay until replaced
        write_jsonl(out_path, [done.get(it["idx"]) or extended[it["idx"]] for it in items
                               if it["idx"] in done or it["idx"] in extended])
    todo = [it for g in groups.values() for it in g]
    local = judge_config(ec).judge_backend == "local"
    client = make_judge_client(ec, model_cfg) if mode == "llm" and todo and not (scoring == "probs" and local) else None
    scorer = make_rating_scorer(ec, model_cfg, client) if scoring == "probs" and todo else None
    started = time.time()
    step = max(8, 2 * ec.judge_concurrency)
    kw = dict(runs=ec.judge_runs, max_attempts=ec.judge_max_attempts, seed=ec.seed, temperature=ec.judge_temperature,
              max_new_tokens=ec.judge_max_new_tokens)
    for first, group in sorted(groups.items()):  # first = 0: new rows; > 0: rows judged with fewer runs, extended
        if batch and client is not None:  # every run of every case in one batch; then the loop below reads the cache
            def judge_all(group=group, first=first):
                return judge_items(client, group, template, first_run=first, **kw)

            run_batched(client, judge_all, Path(batch_dir or out_path.parent / "batches"),
                        "judge" if not first else f"judge-runs{first + 1}+", poll_s=ec.judge_batch_poll_s)
        for s in range(0, len(group), step):
            chunk = group[s:s + step]
            judged = judge_items(client, chunk, template, scorer=scorer, first_run=first, **kw) if client or scorer \
                else [{"idx": it["idx"], "score": None} for it in chunk]
            for it, j in zip(chunk, judged, strict=False):
                if first:
                    j = merge_runs(extended[it["idx"]], j)
                row = _row(j, it, mode, keys[it["idx"]])
                append_jsonl(out_path, row)
                done[it["idx"]] = row
    rows = [done[it["idx"]] for it in items]
    if resumed and todo:  # in input order, the extended rows in place of their shorter versions
        write_jsonl(out_path, rows)
    return Judged(rows, scoring, log, len(extended), client.stats if client else None, started)


def _reusable_judgments(path: Path, items: list[dict], keys: dict, runs: int, log: ReuseLog):
    """Sort the rows of an earlier judgments.jsonl: (done {idx: row reused as it is, cut to `runs` runs},
    groups {first run to judge: [items]}, extended {idx: row to extend with runs len(row.runs)..runs-1}).
    Every item whose key changed (or that has no row) is in groups[0]; `log` counts and explains."""
    old: dict[str, dict] = {}
    if path.exists():
        for r in read_jsonl(path, allow_partial_last_line=True):
            old[str(r.get("idx"))] = r  # the last row of an idx wins (an extension appended after its original)
    done, groups, extended = {}, {}, {}
    for it in items:
        idx, row = it["idx"], old.get(it["idx"])
        if row is None:
            groups.setdefault(0, []).append(it)
            continue
        diff = changed_parts(row.get("reuse"), keys[idx])
        have = len(row.get("runs") or [])
        if diff:
            log.recompute(", ".join(diff) + (" changed" if isinstance(row.get("reuse"), dict) else ""))
            groups.setdefault(0, []).append(it)
        elif runs and have < runs:
            log.recompute(f"judged with {have} run(s), judge_runs={runs}")
            extended[idx] = row
            groups.setdefault(have, []).append(it)
        else:
            log.reused += 1
            done[idx] = merge_runs(row, None, runs) if runs and have > runs else row
    return done, groups, extended


def merge_runs(row: dict, new: dict | None, keep: int | None = None) -> dict:
    """A judgment row over the runs of `row` followed by those of `new` (its extension; None: none), cut to the
    first `keep` runs; the score (mean of the rated runs), method, failures, usage and cost are recomputed."""
    runs = list(row.get("runs") or []) + list((new or {}).get("runs") or [])
    runs = runs[:keep] if keep else runs
    ratings = [r["rating"] for r in runs if r.get("rating") is not None]
    methods = sorted({r["method"] for r in runs if r.get("rating") is not None and r.get("method")})
    usage = {"input_tokens": 0, "output_tokens": 0}
    for r in runs:
        for a in r.get("attempts") or []:
            for k in usage:
                usage[k] += int((a.get("usage") or {}).get(k, 0) or 0)
    return {**row, **(new or {}), "runs": runs, "score": sum(ratings) / len(ratings) if ratings else None,
            "score_method": (methods[0] if len(methods) == 1 else "mixed") if methods else None,
            "n_failed_runs": len(runs) - len(ratings), "failed": not ratings, "usage": usage,
            "cost_usd": sum(a.get("cost_usd") or 0.0 for r in runs for a in r.get("attempts") or [])}


def _row(j: dict, it: dict, mode: str, key: dict) -> dict:
    """A judgments.jsonl row: the judge's part `j` plus what the item passes through (refreshed on reuse)."""
    row = {**j, "task": it.get("task"), "prediction": it.get("prediction", ""), "reference": it["answer"],
           "proxy": proxy_scores(it.get("prediction", ""), it["answer"]), "exact": it.get("exact"),
           "human_score": it.get("human_score"), "mode": mode, **{k: it[k] for k in PASS_THROUGH if k in it},
           "reuse": key}
    if "n_prompt_tokens" in it and "n_input_tokens" in it:
        row["truncated_tokens"] = max(0, int(it["n_prompt_tokens"]) - int(it["n_input_tokens"]))
    return row


# ---------------------------------------------------------------- inputs
def meta_eval_items(cases) -> list[dict]:
    """LongBench-Chat's meta-evaluation: judge each rated example answer (its rating held out as the human score)
    with the case's other examples as the calibration set."""
    items = []
    for c in cases:
        shots = c.few_shots
        for k, s in enumerate(shots):
            items.append({"idx": f"{c.idx}#{k}", "task": c.task, "query": c.query, "answer": c.answer,
                          "prediction": s["answer"], "few_shots": shots[:k] + shots[k + 1:],
                          "human_score": s["score"], "meta": c.meta})
    return items


def read_human_scores(path) -> dict[str, float]:
    """A JSONL of {idx, score} human ratings (1-10); errors name file:line."""
    out = {}
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or "idx" not in obj or not isinstance(obj.get("score"), (int, float)) \
                or isinstance(obj.get("score"), bool):
            raise LongAlignError(f"{path}:{line}: expected {{\"idx\": ..., \"score\": number}}")
        out[str(obj["idx"])] = float(obj["score"])
    return out


def summarize(rows: list[dict], seed: int = 0) -> dict:
    """Headline numbers over judgment rows: judge mean + bootstrap CI, proxy means, failures, usage, agreement."""
    judge = [r["score"] for r in rows if r.get("score") is not None]
    ci = bootstrap_ci(judge, seed=seed)
    f1 = bootstrap_ci([r["proxy"]["token_f1"] for r in rows], seed=seed)
    rl = bootstrap_ci([r["proxy"]["rouge_l"] for r in rows], seed=seed)
    attempts = [a for r in rows for run in r.get("runs", []) for a in run["attempts"]]
    out = {"n": len(rows), "judged": len(judge), "judge_mean": ci["mean"], "judge_ci_lo": ci["lo"],
           "judge_ci_hi": ci["hi"], "failed_cases": sum(bool(r.get("failed")) for r in rows if "runs" in r),
           "failed_runs": sum(r.get("n_failed_runs", 0) for r in rows),
           "unparseable_replies": sum(a["rating"] is None for a in attempts), "judge_calls": len(attempts),
           "parsing": parse_stats(rows),
           "proxy_token_f1": f1["mean"], "proxy_token_f1_ci": [f1["lo"], f1["hi"]],
           "proxy_rouge_l": rl["mean"], "proxy_rouge_l_ci": [rl["lo"], rl["hi"]],
           "input_tokens": sum(r.get("usage", {}).get("input_tokens", 0) for r in rows),
           "output_tokens": sum(r.get("usage", {}).get("output_tokens", 0) for r in rows),
           "cost_usd": round(sum(r.get("cost_usd", 0.0) for r in rows), 6)}
    human = [r.get("human_score") for r in rows]
    if any(h is not None for h in human):
        out["agreement_judge_human"] = agreement([r.get("score") for r in rows], human)
        out["agreement_proxy_human"] = agreement([r["proxy"]["rouge_l"] for r in rows], human)
    exact = [r.get("exact") for r in rows]
    if any(e is not None for e in exact):
        out["exact_mean"] = bootstrap_ci([e for e in exact if e is not None])["mean"]
        out["agreement_judge_exact"] = agreement([r.get("score") for r in rows], exact)
    return out


def scores_figure(rows: list[dict], title: str | None = None):
    """Per case: judge runs (dots) and their mean (bar) beside the proxy ROUGE-L mapped to 1-10 (diamond)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, ax = plots.figure(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.0))
    xs = list(range(len(rows)))
    means = [r["score"] if r.get("score") is not None else 0 for r in rows]
    ax.bar(xs, means, color=plots.CYCLE[0], alpha=0.55, label="judge (mean of runs)")
    for x, r in zip(xs, rows, strict=False):
        runs = [run["rating"] for run in r.get("runs", []) if run["rating"] is not None]
        ax.scatter([x] * len(runs), runs, color=plots.CYCLE[0], s=14, zorder=3,
                   label="judge run" if x == 0 and runs else None)
    failed = [x for x, r in zip(xs, rows, strict=True) if r.get("failed")]
    if failed:
        ax.scatter(failed, [0.4] * len(failed), marker="x", color=plots.CYCLE[3], s=30, zorder=4,
                   label="judge gave no parseable rating")
    ax.scatter(xs, [r["proxy"]["proxy_10"] for r in rows], marker="D", color=plots.CYCLE[1], s=22, zorder=4,
               label="proxy: 1 + 9·ROUGE-L")
    ex = [(x, r["exact"]) for x, r in zip(xs, rows, strict=True) if r.get("exact") is not None]
    if ex:
        ax.scatter([x for x, _ in ex], [1 + 9 * e for _, e in ex], marker="^", color=plots.CYCLE[2], s=30, zorder=4,
                   label="exact (verifiable task): 10 right, 1 wrong")
    if any(r.get("human_score") is not None for r in rows):
        ax.scatter(xs, [r.get("human_score") for r in rows], marker="_", color="black", s=140, zorder=5,
                   label="human / rubric score")
    ax.set_xticks(xs, [str(r["idx"]) for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("score (1-10)")
    ax.set_title(title or "Judge ratings per case")
    ax.legend(loc="upper right", fontsize=7)
    return fig
