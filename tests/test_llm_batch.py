"""llm_batch.py over real HTTP: OpenAI files + batches and Anthropic message batches on 127.0.0.1 — submit, poll,
fold into the cache, partly failed batches, a kill in the middle of polling and a resume that repeats nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longalign_lib.io import LongAlignError, read_jsonl, write_jsonl
from longalign_lib.llm import make_client
from longalign_lib.llm_batch import batch_summary, load_states, run_batched

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[{"role": "user", "content": f"question number {i}"}] for i in range(5)]


def _client(server, backend, tmp_path, **kw):
    url = server.openai_url if backend == "openai" else server.anthropic_url
    return make_client(backend, "test-model", base_url=url, cache_dir=tmp_path / "cache",
                       prices={"test-model": [1.0, 2.0]}, **kw)


def _step(client):
    return lambda: client.chat_many(PROMPTS, progress=False, max_new_tokens=16)


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_batch_round_trip_folds_into_the_cache_at_half_price(llm_server, tmp_path, backend, monkeypatch):
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-batch-SECRET-42")
    c = _client(llm_server, backend, tmp_path, api_key_env="BATCH_TEST_KEY")
    replies, rounds = run_batched(c, _step(c), tmp_path / "batches", "t", poll_s=0.01, progress=False)
    assert rounds == 1 and [r.text for r in replies] == [f"echo: question number {i}" for i in range(5)]
    assert llm_server.count == 0, "batch mode sends no interactive request"
    create = "/v1/batches" if backend == "openai" else "/v1/messages/batches"
    assert llm_server.posts(create) == 1 and len(llm_server.batch_items) == 5
    assert llm_server.posts("/v1/files") == (1 if backend == "openai" else 0)
    (st,) = load_states(tmp_path / "batches")
    assert st["folded"] and st["ok"] == 5 and not st["failed"] and st["batch_id"] in st["_path"]
    # usage at half price: (3 words in × $1 + 4 words out × $2) / 1e6 / 2 per request
    assert c.stats["cost_usd"] == pytest.approx(5 * (3 * 1.0 + 4 * 2.0) / 1e6 / 2)
    assert c.stats["batch_items"] == 5 and c.stats["input_tokens"] == 15 and c.stats["output_tokens"] == 20
    assert any("sk-batch-SECRET-42" in str(h.values()) for h in llm_server.headers)  # sent in the header only
    for f in [*(tmp_path / "batches").glob("*.json"), *(tmp_path / "cache").rglob("*.json")]:
        assert "sk-batch-SECRET-42" not in f.read_text()
    # a second run (a new process) finds everything cached: not one request of any kind
    before = list(llm_server.log)
    c2 = _client(llm_server, backend, tmp_path)
    again, rounds = run_batched(c2, _step(c2), tmp_path / "batches", "t", poll_s=0.01, progress=False)
    assert rounds == 0 and [r.text for r in again] == [r.text for r in replies] and llm_server.log == before


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_partly_failed_batch_is_reported_and_retried_in_a_follow_up_batch(llm_server, tmp_path, backend, capsys):
    llm_server.batch_fail_items = 2
    c = _client(llm_server, backend, tmp_path)
    replies, rounds = run_batched(c, _step(c), tmp_path / "batches", "t", poll_s=0.01, progress=False)
    assert rounds == 2 and all(r.text.startswith("echo: question number") for r in replies)
    first, second = sorted(load_states(tmp_path / "batches"), key=lambda s: s["created"])
    assert len(first["failed"]) == 2 and "scripted batch item failure" in next(iter(first["failed"].values()))
    assert len(second["keys"]) == 2 and not second["failed"]  # only the failed ones went again
    assert len(llm_server.batch_items) == 7 and llm_server.count == 0
    assert "2 failed" in capsys.readouterr().out
    s = batch_summary(tmp_path / "batches")
    assert s["failed_items"] == 2 and len(s["batches"]) == 2 and s["items"] == 7


def test_failed_items_retried_interactively_and_give_up_after_max_attempts(llm_server, tmp_path):
    llm_server.batch_fail_items = 1
    c = _client(llm_server, "openai", tmp_path)
    replies, _ = run_batched(c, _step(c), tmp_path / "b1", "t", poll_s=0.01, retry="interactive", progress=False)
    assert len(replies) == 5 and llm_server.count == 1  # the one failed item, sent interactively
    assert llm_server.posts("/v1/batches") == 1
    # a request that fails in every batch stops the run with its error after max_attempts submissions
    llm_server.batch_fail_items = 100
    c = _client(llm_server, "openai", tmp_path / "other")
    with pytest.raises(LongAlignError, match="failed in 2 batches.*scripted batch item failure"):
        run_batched(c, _step(c), tmp_path / "b2", "t", poll_s=0.01, max_attempts=2, progress=False)


def test_batch_mode_needs_a_batch_api(tmp_path):
    c = make_client("local", "smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(LongAlignError, match="no Batch API"):
        run_batched(c, lambda: None, tmp_path / "b", "t")


def _docs(n: int) -> list[dict]:
    from tests.test_synth import _docs as docs

    return docs(n)


def test_synth_batch_mode_kill_during_polling_then_resume_repeats_no_request(llm_server, tmp_path):
    """The issue's acceptance test: two rounds (questions, answers) as two batches; the process is killed while
    it polls the first; the rerun polls the same batch id, sends no request twice and nothing interactively."""
    from longalign_lib.cli import main
    from tests.test_synth import fake_model

    llm_server.responder = fake_model
    llm_server.batch_hold = True
    write_jsonl(tmp_path / "corpus.jsonl", _docs(4))
    run = tmp_path / "run"
    args = ["synth", "--run-dir", str(run), "--set", "synth.backend=openai", "--set",
            f"synth.base_url={llm_server.openai_url}", "--set", "synth.model=fake-model", "--set", "synth.n_short=0",
            "--set", f"synth.cache_dir={tmp_path / 'cache'}", "--set", f"synth.corpus_file={tmp_path / 'corpus.jsonl'}",
            "--set", "synth.mode=batch", "--set", "synth.batch_poll_s=0.05", "--set", "synth.max_new_tokens=64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longalign_lib.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and llm_server.log.count("GET /v1/batches/batch_1") < 3:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        assert llm_server.log.count("GET /v1/batches/batch_1") >= 3, "the first batch was never polled"
    finally:
        proc.kill()
        proc.wait()
    (st,) = load_states(run / "batches")
    assert st["batch_id"] == "batch_1" and not st["folded"] and len(st["keys"]) == 4
    assert llm_server.posts("/v1/batches") == 1 and not (run / "long.jsonl").exists()

    llm_server.batch_hold = False
    assert main(args) == 0  # the rerun: resumes batch_1, then the answer round
    assert llm_server.posts("/v1/batches") == 2 and llm_server.posts("/v1/files") == 2
    assert llm_server.count == 0, "no interactive request"
    bodies = [json.dumps(b, sort_keys=True) for b in llm_server.batch_items]
    assert len(bodies) == len(set(bodies)) == 8, "every request sent exactly once (4 question lists, 4 answers)"
    records = read_jsonl(run / "long.jsonl")
    summary = json.loads((run / "synth.json").read_text())
    assert len(records) + sum(summary["long"]["rejected"].values()) == 4 and records
    assert summary["batches"]["batches"] == ["batch_1", "batch_2"] and summary["long"]["batch_rounds"] == 2
    assert summary["llm"]["mode"] == "batch" and summary["llm"]["batch_items"] == 8
    # and one more rerun costs nothing at all
    n = len(llm_server.log)
    assert main(args) == 0 and len(llm_server.log) == n


def test_judge_batch_mode_one_batch_for_every_run(llm_server, tmp_path):
    from longalign_lib.cli import main
    from tests.test_judge import _judge_responder

    llm_server.responder = _judge_responder
    preds = [{"idx": str(i), "query": f"Q{i}?", "answer": "the reference", "prediction": p, "few_shots": []}
             for i, p in enumerate(["good answer", "bad answer", "good again"])]
    write_jsonl(tmp_path / "predictions.jsonl", preds)
    args = ["judge", "--run-dir", str(tmp_path / "run"), "--predictions", str(tmp_path / "predictions.jsonl"),
            "--set", "eval.judge_mode=batch", "--set", "eval.judge_backend=anthropic", "--set",
            f"eval.judge_base_url={llm_server.anthropic_url}", "--set", "eval.judge_model=claude-judge",
            "--set", f"eval.judge_cache_dir={tmp_path / 'cache'}", "--set", "eval.judge_batch_poll_s=0.01",
            "--set", "eval.judge_runs=2"]
    assert main(args) == 0
    assert llm_server.posts("/v1/messages/batches") == 1 and len(llm_server.batch_items) == 6
    assert llm_server.count == 0
    rows = {r["idx"]: r for r in read_jsonl(tmp_path / "run" / "judgments.jsonl")}
    assert rows["0"]["score"] == 8.0 and rows["1"]["score"] == 2.0 and rows["2"]["score"] == 8.0
    assert json.loads((tmp_path / "run" / "judge_summary.json").read_text())["judge"]["batch"] is True
