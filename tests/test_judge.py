"""Judge: prompt assembly (shuffled rated examples, no document), robust rating parsing, retries and failures,
the judge over real HTTP (OpenAI wire format on 127.0.0.1), the `judge` stage, proxy scores and statistics."""
from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest

from longalign_lib.io import LongAlignError, read_json, read_jsonl
from longalign_lib.judge import (
    REMINDER,
    build_judge_prompt,
    fill,
    judge_items,
    load_template,
    needle_judge_scorer,
    parse_rating,
    rating_matches,
)
from longalign_lib.scoring import agreement, bootstrap_ci, proxy_scores, rouge_l, token_f1

SHOTS = [{"answer": "Alpha answer", "score": 10}, {"answer": "Beta answer", "score": 6},
         {"answer": "Gamma answer", "score": 3}, {"answer": "Delta answer", "score": 1}]


# ---------------------------------------------------------------- prompt assembly
@pytest.mark.parametrize("name", ["default", "rating_first"])
def test_bundled_templates_assemble_everything_but_the_document(name):
    tpl = load_template(name)
    prompt, order = build_judge_prompt(tpl, "Who is Naomi?", "Ruth's mother-in-law.", "Her aunt.", SHOTS,
                                       random.Random(1))
    assert "Who is Naomi?" in prompt and "Ruth's mother-in-law." in prompt and "Her aunt." in prompt
    assert sorted(order) == [0, 1, 2, 3] and "[[" in prompt and "{" not in prompt.replace("[[", "")
    for s in SHOTS:  # every example keeps its own rating, right above it
        assert re.search(rf"rated {s['score']}/10\]\n{s['answer']}", prompt)
    shown = [m.group(1) for m in re.finditer(r"\n(Alpha|Beta|Gamma|Delta) answer", prompt)]
    assert shown == [SHOTS[i]["answer"].split()[0] for i in order]  # displayed in the shuffled order


def test_examples_are_reshuffled_between_runs():
    tpl = load_template()
    orders = {tuple(build_judge_prompt(tpl, "q", "r", "a", SHOTS, random.Random(s))[1]) for s in range(30)}
    assert len(orders) > 5 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_fill_is_one_pass_and_no_examples_is_explicit():
    out = fill("Q={question} R={reference} A={answer} E={examples}", question="{reference}", reference="ref",
               answer="{question}", examples="ex")
    assert out == "Q={reference} R=ref A={question} E=ex"
    prompt, order = build_judge_prompt(load_template(), "q", "r", "", [], random.Random(0))
    assert order == [] and "(no rated examples" in prompt and "(empty answer)" in prompt


def test_template_file_option_and_errors(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("Q: {question}\nRef: {reference}\nAns: {answer}\n{examples}\nRate as [[n]].", encoding="utf-8")
    assert load_template(str(good)).startswith("Q: {question}")
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: {question}\nRef: {reference}\n", encoding="utf-8")
    with pytest.raises(LongAlignError, match=r"bad\.txt.*\{answer\}"):
        load_template(str(bad))
    with pytest.raises(LongAlignError, match="rating_first"):
        load_template("no_such_template")


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, want, how", [
    ("Good answer.\n[[7]]", 7.0, "double_brackets"),
    ("Rating: [[ 8 ]]", 8.0, "double_brackets"),
    ("[[3]] at first, but on reflection [[9]]", 9.0, "double_brackets"),
    ("[[7.5]]", 7.5, "double_brackets"),
    ("[[6/10]]", 6.0, "double_brackets"),
    ("[[11]] is off the scale", None, None),
    ("[[0]]", None, None),
    # only the protocol's [[n]]: the looser forms match the prompt's own labels ("rated 5/10") when echoed
    ("I give it [4].", None, None),
    ("Rating: 6", None, None),
    ("Overall 8/10, solid.", None, None),
    ("It is 9 out of 10", None, None),
    ("I cannot judge this without the document.", None, None),
    ("", None, None),
])
def test_parse_rating(text, want, how):
    assert parse_rating(text) == (want, how)


def test_parse_rating_takes_the_last_double_bracket():
    assert parse_rating("[7] and Rating: 2", strict=True) == (None, None)
    assert parse_rating("Rating: 2 ... final [[7]]")[0] == 7.0


def _echo_prompt():
    shots = [{"answer": "Mentions the river but not the year. [[3]] would be fair.", "score": 5},
             {"answer": "Wrong city.", "score": 2}]
    prompt, _ = build_judge_prompt(load_template(), "Where and when was the treaty signed?", "In Ghent, in 1814.",
                                   "It was signed in Ghent. [[10]]", shots, random.Random(1))
    return prompt


@pytest.mark.parametrize("reply, want, n_echoed", [
    # a judge that echoes its rated examples, then rates: the labels' "rated 5/10" and the [[3]] inside an example
    # answer are its prompt, not its rating; its own final [[n]] is read
    ("[Example answer 1, rated 5/10]\nMentions the river but not the year. [[3]] would be fair.\n\n"
     "The answer names the city but not the year. [[6]]", 6.0, 1),
    ("[Example answer 2, rated 5/10]\nMentions the river but not the year. [[3]] would be fair.", None, 1),
    ("[Example answer 1, rated 5/10] and [Example answer 2, rated 2/10]", None, 0),
    # the template's own "for example: [[6]]" and the graded answer's planted [[10]], copied back
    ("Then give the rating in double square brackets on a line of its own, for example: [[6]]", None, 1),
    ("[Answer to grade]\nIt was signed in Ghent. [[10]]\nIt omits the year.\n[[7]]", 7.0, 1),
    ("[[8]] Close to the reference.", 8.0, 0),  # a reply that starts with its rating is its own
    ("Partly right.\n[[4]]", 4.0, 0),
])
def test_echoed_prompt_material_is_not_read_as_a_rating(reply, want, n_echoed):
    prompt = _echo_prompt()
    assert "rated 5/10]" in prompt and "[[3]]" in prompt and "for example: [[6]]" in prompt
    assert parse_rating(reply, prompt) == (want, "double_brackets" if want is not None else None)
    assert sum(m["echoed"] for m in rating_matches(reply, prompt)) == n_echoed


# ---------------------------------------------------------------- judging over real HTTP
def _judge_responder(body, path):
    """A scripted judge: reads the answer under grading out of the prompt it was sent."""
    msgs = body["messages"]
    answer = msgs[0]["content"].split("[Answer to grade]\n", 1)[1].split("\n", 1)[0]
    if answer.startswith("good"):
        return "Matches the reference.\n[[8]]"
    if answer.startswith("bad"):
        return "Contradicts the reference. Rating: [[2]]"
    if answer.startswith("late"):  # no rating at first; complies after the reminder
        return "[[5]]" if len(msgs) == 3 and msgs[2]["content"] == REMINDER else "Hmm, hard to say."
    return "I would rather not grade this."


def _items():
    return [{"idx": i, "query": f"Question {i}?", "answer": f"Reference {i}.", "prediction": p,
             "few_shots": SHOTS, "context": "SECRET-DOCUMENT " * 50}
            for i, p in [("1", "good answer"), ("2", "bad answer"), ("3", "late answer"), ("4", "hopeless answer")]]


def test_judge_over_http_protocol_retries_failures_cost(llm_server, tmp_path):
    from longalign_lib.llm import make_client

    llm_server.responder = _judge_responder
    llm_server.push(status=429)  # one rate-limit answer on the way: llm.py retries it
    client = make_client("openai", "judge-m", base_url=llm_server.openai_url, cache_dir=tmp_path / "cache",
                         prices={"judge-m": [1.0, 2.0]}, api_key_env="NO_SUCH_KEY_VAR")
    rows = judge_items(client, _items(), load_template(), runs=2, max_attempts=3, progress=False)
    by = {r["idx"]: r for r in rows}
    assert by["1"]["score"] == 8.0 and by["2"]["score"] == 2.0 and by["3"]["score"] == 5.0
    assert by["4"]["score"] is None and by["4"]["failed"] and by["4"]["n_failed_runs"] == 2
    assert all(len(run["attempts"]) == 3 for run in by["4"]["runs"])  # every try recorded
    assert [len(run["attempts"]) for run in by["3"]["runs"]] == [2, 2]
    # 2 + 2 + 4 + 6 judge calls, plus the 429
    assert llm_server.count == 15 and client.stats["retries"] == 1, (llm_server.count, client.stats, [[len(r["attempts"]) for r in x["runs"]] for x in rows])
    assert not any("SECRET-DOCUMENT" in json.dumps(b) for b in llm_server.bodies)  # never the document
    retry = next(b for b in llm_server.bodies if len(b.get("messages", [])) == 3)
    assert retry["messages"][1]["role"] == "assistant" and retry["messages"][2]["content"] == REMINDER
    u = by["1"]["usage"]
    assert u["input_tokens"] > 50 and by["1"]["cost_usd"] == pytest.approx((u["input_tokens"] + 2 * u["output_tokens"]) / 1e6)
    # the two runs of a case see their examples in different orders (for at least one case)
    assert any(r["runs"][0]["order"] != r["runs"][1]["order"] for r in rows)


def test_judge_over_http_anthropic_format(llm_server, tmp_path):
    from longalign_lib.llm import make_client

    llm_server.responder = _judge_responder
    client = make_client("anthropic", "claude-judge", base_url=llm_server.anthropic_url, cache_dir=False,
                         api_key_env="NO_SUCH_KEY_VAR")
    rows = judge_items(client, _items()[:3], load_template(), runs=2, max_attempts=2, progress=False)
    assert [r["score"] for r in rows] == [8.0, 2.0, 5.0] and llm_server.by_path == {"/v1/messages": 8}


def _stage_cfg(llm_server, tmp_path, *extra):
    from longalign_lib.config import load_config

    return load_config("cpu-demo", [f"eval.judge_base_url={llm_server.openai_url}", "eval.judge_model=judge-m",
                                    f"eval.judge_cache_dir={tmp_path / 'cache'}", "eval.judge_max_attempts=2",
                                    "eval.judge_prompt_file=default", "eval.judge_runs=2", *extra])  # the protocol: 2 runs


def test_judge_stage_over_http_with_human_scores_and_resume(llm_server, tmp_path):
    from longalign_lib.pipeline import run_one

    llm_server.responder = _judge_responder
    preds = tmp_path / "predictions.jsonl"
    rows = [{**it, "exact": None} for it in _items()[:3]]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({"idx": i, "score": s}) + "\n" for i, s in [("1", 9), ("2", 1), ("3", 6)]))
    cfg = _stage_cfg(llm_server, tmp_path)
    res = run_one("judge", cfg, tmp_path, _args(human_scores=str(human)))
    out = read_jsonl(tmp_path / "judgments.jsonl")
    assert [r["score"] for r in out] == [8.0, 2.0, 5.0] and all(r["judge"]["backend"] == "openai" for r in out)
    assert all(0 <= r["proxy"]["rouge_l"] <= 1 for r in out)
    m = res.metrics
    assert m["judge_mean"] == 5.0 and m["judge_ci_lo"] <= 5.0 <= m["judge_ci_hi"] and m["spearman_judge_human"] == 1.0
    summary = read_json(tmp_path / "judge_summary.json")
    assert summary["agreement_judge_human"]["kendall"] == pytest.approx(1.0) and summary["unparseable_replies"] == 2
    assert (tmp_path / "figures" / "judge_scores.png").stat().st_size > 10_000
    calls = llm_server.count
    run_one("judge", cfg, tmp_path)  # finished cases are not judged again
    assert llm_server.count == calls


def test_judge_stage_without_predictions_runs_the_meta_evaluation(llm_server, tmp_path):
    from longalign_lib.pipeline import run_one

    bench = tmp_path / "bench.jsonl"
    shots = [{"answer": "good one", "score": 9}, {"answer": "bad one", "score": 2}, {"answer": "good two", "score": 8}]
    bench.write_text(json.dumps({"idx": "q1", "query": "Q?", "context": "doc", "answer": "A.", "few_shots": shots}) + "\n")
    llm_server.responder = _judge_responder
    res = run_one("judge", _stage_cfg(llm_server, tmp_path, f"eval.bench_file={bench}"), tmp_path)
    out = read_jsonl(tmp_path / "judgments.jsonl")
    assert [r["idx"] for r in out] == ["q1#0", "q1#1", "q1#2"] and [r["human_score"] for r in out] == [9, 2, 8]
    assert "meta-evaluation" in res.report
    held_out = [b for b in llm_server.bodies if "[Answer to grade]\nbad one" in b["messages"][0]["content"]]
    assert held_out and all("rated 2/10]\nbad one" not in b["messages"][0]["content"] for b in held_out)


def _echoing_responder(body, path):
    """A judge that copies its prompt back: the rated examples' labels and bodies, then (for "good") its own rating;
    "copy" answers never add one of their own until they get the reminder."""
    msgs = body["messages"]
    prompt = msgs[0]["content"]
    answer = prompt.split("[Answer to grade]\n", 1)[1].split("\n", 1)[0]
    if len(msgs) == 3:  # the reminder
        return "[[4]]"
    echo = prompt[prompt.index("[Example answer 1"):prompt.index("[Question]")].strip()  # labels + [[3]] example
    return echo + ("\n\nThe answer matches the reference.\n[[8]]" if answer.startswith("good") else "")


def test_judge_stage_ignores_echoed_labels_and_reports_the_parse_rate(llm_server, tmp_path):
    from longalign_lib.pipeline import run_one

    shots = [{"answer": "Some of it. [[3]] at most.", "score": 5}, {"answer": "Nothing right.", "score": 1}]
    rows = [{"idx": i, "query": f"Question {i}?", "answer": f"Reference {i}.", "prediction": p, "few_shots": shots}
            for i, p in [("1", "good answer"), ("2", "copy answer")]]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    llm_server.responder = _echoing_responder
    res = run_one("judge", _stage_cfg(llm_server, tmp_path), tmp_path)
    by = {r["idx"]: r for r in read_jsonl(tmp_path / "judgments.jsonl")}
    # main read "rated 5/10" (or the example's [[3]]) as the rating; the judge's own [[8]] / post-reminder [[4]] count
    assert by["1"]["score"] == 8.0 and by["2"]["score"] == 4.0
    first = by["2"]["runs"][0]["attempts"][0]
    assert first["rating"] is None and first["echoed_ratings"] == [3.0] and "rated 5/10" in first["raw"]
    parsing = read_json(tmp_path / "judge_summary.json")["parsing"]
    # 2 runs x ("good": 1 try) + 2 runs x ("copy": 2 tries) = 6 replies read, 4 parsed
    assert parsing == {"attempted": 6, "parsed": 4, "unparseable": 2, "rate": pytest.approx(4 / 6),
                       "echoed_ignored": 4, "prob_weighted": 0}
    assert res.metrics["judge_parse_rate"] == pytest.approx(0.667, abs=1e-3)
    assert "4 of 6 parsed (67 %), 2 unparseable; 4 [[n]] copied" in res.report


@pytest.mark.parametrize("scoring", ["parse", "probs"])
def test_judge_keeps_judge_concurrency_requests_in_flight(llm_server, tmp_path, scoring):
    """eval.judge_concurrency bounds the requests in flight, and the judge fills it: all runs of all cases go out
    together (main sent one run at a time, and a probability-weighted judge one request at a time)."""
    import time as _time

    from longalign_lib.pipeline import run_one

    def slow(body, path):
        _time.sleep(0.15)
        return "7]] Fine." if body["messages"][-1]["role"] == "assistant" else "Fine. [[7]]"

    llm_server.responder = slow
    llm_server.logprobs = lambda body, text: [{"token": "7", "logprob": -0.1, "top_logprobs": [
        {"token": "7", "logprob": -0.1}]}]
    rows = [{"idx": str(i), "query": f"Q{i}?", "answer": "R.", "prediction": "P.", "few_shots": SHOTS[:2]} for i in range(3)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = run_one("judge", _stage_cfg(llm_server, tmp_path, "eval.judge_concurrency=4",
                                      f"eval.judge_scoring={scoring}"), tmp_path)
    assert llm_server.count == 6 and res.metrics["judged"] == 3  # 3 cases x 2 runs
    assert llm_server.max_inflight == 4  # reached, never exceeded


def test_proxy_only_mode_needs_no_server(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    (tmp_path / "predictions.jsonl").write_text(json.dumps(
        {"idx": 1, "query": "Q", "answer": "Ruth is the great-grandmother of David", "prediction": "Ruth is David's great-grandmother"}) + "\n")
    res = run_one("judge", load_config("cpu-demo", ["eval.judge_mode=proxy"]), tmp_path)
    assert res.metrics["mode"] == "proxy" and res.metrics["judge_mean"] is None
    assert 0.5 < res.metrics["proxy_token_f1"] < 1.0


def test_library_reads_and_judges_a_runs_predictions_with_keyed_reuse(tmp_path):
    """The judge stage's seams as library calls: inputs.predictions reads a run's predictions (+ human scores),
    judge.judge_predictions keeps every row whose item is unchanged and judges an edited one again."""
    from longalign_lib import inputs
    from longalign_lib.config import load_config
    from longalign_lib.judge import judge_mode, judge_predictions

    cfg = load_config("cpu-demo")
    preds = [{"idx": k, "query": f"Q{k}", "answer": f"answer number {k}", "prediction": f"answer {k}"} for k in range(3)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (tmp_path / "human.jsonl").write_text(json.dumps({"idx": 1, "score": 7}) + "\n")
    items, source = inputs.predictions(cfg, tmp_path, human_scores=tmp_path / "human.jsonl")
    assert source == str(tmp_path / "predictions.jsonl") and [it["idx"] for it in items] == ["0", "1", "2"]
    assert [it.get("human_score") for it in items] == [None, 7.0, None]
    mode, batch = judge_mode(cfg.eval, proxy_only=True)
    out = tmp_path / "judgments.jsonl"
    first = judge_predictions(cfg.eval, cfg.model, items, out, mode, batch)
    assert (mode, batch, first.scoring, first.client_stats) == ("proxy", False, None, None)
    assert (first.log.reused, first.log.recomputed) == (0, 0) and len(read_jsonl(out)) == 3
    items[2]["prediction"] = "an edited answer"
    again = judge_predictions(cfg.eval, cfg.model, items, out, mode, batch)
    assert (again.log.reused, again.log.recomputed, dict(again.log.why)) == (2, 1, {"item changed": 1})
    assert [r["prediction"] for r in read_jsonl(out)] == ["answer 0", "answer 1", "an edited answer"]
    assert again.rows[1]["human_score"] == 7.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"idx": 0, "query": "Q"}) + "\n")
    with pytest.raises(LongAlignError, match=r"bad.jsonl:1: missing field\(s\) \['answer', 'prediction'\]"):
        inputs.predictions(cfg, tmp_path, tmp_path / "bad.jsonl")
    with pytest.raises(LongAlignError, match="eval.judge_mode='vote'"):
        judge_mode(SimpleNamespace(judge_mode="vote"))


def test_needle_judge_scorer_over_http(llm_server, tmp_path):
    llm_server.responder = lambda body, path: "Correct. [[9]]"
    cfg = _stage_cfg(llm_server, tmp_path)
    score = needle_judge_scorer(cfg.eval, "The cake has cardamom.", "What does the cake have?")
    assert score("cardamom", {"length": 100, "depth": 0.5}) == pytest.approx(0.9)


def _args(**kw):
    from longalign_lib.pipeline import _defaults

    a = _defaults("judge")
    for k, v in kw.items():
        setattr(a, k, v)
    return a


# ---------------------------------------------------------------- proxy scores and statistics
def test_proxy_scores():
    assert token_f1("the cat sat", "the cat sat") == 1.0 and token_f1("dog", "cat") == 0.0
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rouge_l("Ruth married Boaz", "Ruth married Boaz") == 1.0 and rouge_l("", "x") == 0.0
    assert rouge_l("Boaz married Ruth", "Ruth married Boaz") < 1.0  # order matters for ROUGE-L, not for F1
    p = proxy_scores("Ruth married Boaz", "Ruth married Boaz")
    assert p == {"token_f1": 1.0, "rouge_l": 1.0, "proxy_10": 10.0}


def test_bootstrap_ci():
    ci = bootstrap_ci([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], seed=1)
    assert ci["mean"] == 5.5 and ci["lo"] < 5.5 < ci["hi"] and ci == bootstrap_ci(list(range(1, 11)), seed=1)
    wide = bootstrap_ci([1, 10] * 5, seed=0)
    narrow = bootstrap_ci([1, 10] * 200, seed=0)
    assert narrow["hi"] - narrow["lo"] < wide["hi"] - wide["lo"]
    assert bootstrap_ci([None, 4])["n"] == 1 and bootstrap_ci([])["mean"] is None


def test_agreement():
    a = agreement([1, 2, 3, 4], [10, 20, 30, 40])
    assert a["spearman"] == pytest.approx(1.0) and a["kendall"] == pytest.approx(1.0) and a["n"] == 4
    b = agreement([1, 2, 3, None], [3, 2, 1, 5])
    assert b["spearman"] == pytest.approx(-1.0) and b["n"] == 3
    assert agreement([5, 5, 5], [1, 2, 3])["spearman"] is None


# ---------------------------------------------------------------- scoring method, reliability, controls, comparison
def test_judge_stage_local_probability_weighted_on_longbench_chat_fixture(tmp_path, one_torch_thread):
    """The offline judge rates every human-rated answer of the fixture (leave-one-out) and the report carries the
    reliability table and the plain comparison with the paper's GPT-4 judge."""
    from pathlib import Path

    from longalign_lib.benchmarks import save_benchmark
    from longalign_lib.config import load_config
    from longalign_lib.longbench_chat import load_longbench_chat
    from longalign_lib.pipeline import run_one

    fixture = Path(__file__).resolve().parent.parent / "data" / "longbench_chat_sample"
    save_benchmark(tmp_path / "bench.jsonl", load_longbench_chat(fixture))
    cfg = load_config("cpu-demo", [f"eval.bench_file={tmp_path / 'bench.jsonl'}", "eval.judge_runs=1",
                                   "eval.reliability_boot=100", "eval.judge_prompt_file=rating_first",
                                   "eval.local_threads=1"])
    res = run_one("judge", cfg, tmp_path)
    out = read_jsonl(tmp_path / "judgments.jsonl")
    assert len(out) == 9 and all(r["score"] is not None and r["score_method"] == "prob_weighted" for r in out)
    assert all(0 < r["runs"][0]["attempts"][0]["mass"] <= 1 for r in out)
    rel = read_json(tmp_path / "judge_summary.json")["reliability"]
    assert rel["score_methods"] == {"prob_weighted": 9} and rel["judge_vs_human"]["n"] == 9
    assert res.metrics["judged"] == 9 and res.metrics["unparseable_replies"] == 0
    assert "0.844" in res.report and "human ratings" in res.report and "| spearman |" in res.report


def _write_judgments(path, per_item):
    path.mkdir(parents=True, exist_ok=True)
    rows = [{"idx": k, "score": sum(v) / len(v), "runs": [{"run": r, "rating": x} for r, x in enumerate(v)]}
            for k, v in per_item.items()]
    (path / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_two_runs(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    a = {str(i): [7 + (i % 3), 7.5 + (i % 3)] for i in range(12)}
    b = {str(i): [5 + ((i * 7) % 5) * 0.5, 5.5] for i in range(12)}
    _write_judgments(tmp_path / "A", a)
    _write_judgments(tmp_path / "B", {**b, "extra": [3]})
    res = run_one("judge", load_config("cpu-demo"), tmp_path / "cmp", _args(compare=[str(tmp_path / "A"), str(tmp_path / "B")]))
    c = read_json(tmp_path / "cmp" / "compare.json")
    d = [sum(a[k]) / 2 - sum(b[k]) / 2 for k in a]
    assert c["n"] == 12 and c["only_b"] == 1 and c["mean_diff"] == pytest.approx(sum(d) / 12)
    assert 0 < c["ci"][0] < c["mean_diff"] < c["ci"][1] and c["p_value"] == pytest.approx(2 / 4096)
    assert "excludes 0" in res.report and res.metrics["effect_size"] > 1
    # judge-vs-judge: the same items' mean ratings of A and B through the agreement statistics
    from longalign_lib.agreement import reliability_report

    keys = sorted(a, key=int)
    want = reliability_report([sum(a[k]) / 2 for k in keys], [sum(b[k]) / 2 for k in keys], n_boot=50)
    assert c["agreement"]["n"] == 12 and c["agreement"]["spearman"]["value"] == pytest.approx(want["spearman"]["value"])
    assert c["agreement"]["leniency"]["value"] == pytest.approx(c["mean_diff"]) and "two judges" in res.report
    _write_judgments(tmp_path / "A2", {k: [x + (0.5 if int(k) % 2 else -0.5) for x in v] for k, v in b.items()})
    same = run_one("judge", load_config("cpu-demo"), tmp_path / "cmp2", _args(compare=[str(tmp_path / "A2"), str(tmp_path / "B")]))
    assert "within the noise" in same.report
    with pytest.raises(LongAlignError, match="not found; run `longalign judge`"):
        run_one("judge", load_config("cpu-demo"), tmp_path / "cmp3", _args(compare=[str(tmp_path / "nope"), str(tmp_path / "B")]))


def test_judge_controls_truncation_length_and_no_document(tmp_path):
    from longalign_lib.config import load_config
    from longalign_lib.pipeline import run_one

    rows = [{"idx": f"c{i}", "query": "Q?", "answer": "teal", "prediction": "teal" if i % 2 else "ochre",
             "exact": float(i % 2), "n_prompt_tokens": n, "n_input_tokens": min(n, 1500), "truncated": n > 1500,
             "no_doc_exact": 1.0 if i == 1 else 0.0, "no_doc_prediction": "teal" if i == 1 else "?"}
            for i, n in enumerate([300, 800, 1200, 2500, 3000, 900])]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_one("judge", load_config("cpu-demo", ["eval.judge_mode=proxy", "eval.length_buckets=[1000, 2000]",
                                                    "eval.reliability_boot=50"]), tmp_path)
    out = {r["idx"]: r for r in read_jsonl(tmp_path / "judgments.jsonl")}
    assert out["c3"]["truncated_tokens"] == 1000 and out["c0"]["truncated_tokens"] == 0
    rel = read_json(tmp_path / "judge_summary.json")["reliability"]
    assert [b["n"] for b in rel["by_length"]["exact"]] == [3, 1, 2]
    assert rel["by_length"]["exact"][0]["mean"] == pytest.approx(2 / 3)
    assert [t["idx"] for t in rel["truncated"]] == ["c3", "c4"] and rel["answered_without_document"] == ["c1"]
    assert rel["proxy_vs_exact"]["auc"]["value"] == 1.0  # "teal" vs "ochre": the overlap proxy separates these
    assert "without** the document: c1" in res.report and "2 input(s) were middle-truncated" in res.report
