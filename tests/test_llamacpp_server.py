"""The `openai` backend against a real OpenAI-compatible server: llama-cpp-python's server hosting the bundled
SmolLM2-135M-Instruct GGUF, for synthesis (Self-Instruct + Magpie raw completions) and judging.

Run as (docs/howto.md):  python -m pytest -q tests/test_llamacpp_server.py
Skipped with the reason when `llama-cpp-python[server]` is not installed (it compiles llama.cpp; not in `all`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from longalign_lib.io import read_jsonl, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None
                       or importlib.util.find_spec("llama_cpp.server") is None,
                       reason="llama-cpp-python[server] is not installed: pip install 'llama-cpp-python[server]'"),
]


@pytest.fixture(scope="module")
def llamacpp_url(tmp_path_factory):
    """Start `python -m llama_cpp.server` on a free 127.0.0.1 port with the bundled GGUF; stop it afterwards."""
    from longalign_lib.models import bundled_gguf_path

    gguf = bundled_gguf_path()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1", "--verbose", "false"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"llama.cpp server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_synth_and_judge_through_llama_cpp_server(llamacpp_url, tmp_path):
    from longalign_lib.cli import main
    from tests.test_synth import _docs

    write_jsonl(tmp_path / "corpus.jsonl", _docs(2))
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--set", "synth.backend=openai", "--set", f"synth.base_url={llamacpp_url}",
              "--set", "synth.model=smollm2", "--set", f"synth.cache_dir={tmp_path / 'cache'}",
              "--set", f"synth.corpus_file={tmp_path / 'corpus.jsonl'}", "--set", "synth.max_new_tokens=64",
              "--set", "synth.question_max_new_tokens=96", "--set", "synth.concurrency=1",
              "--set", "synth.n_short=1", "--set", "synth.short_backend=openai", "--set", "synth.short_model=smollm2",
              "--set", "synth.short_tokenizer=smollm2-135m-instruct", "--set", "synth.short_max_new_tokens=48"]
    assert main(["synth", *common]) == 0
    summary = json.loads((run / "synth.json").read_text())
    llm = summary["llm"]
    # every document got a real answer from the server: kept or rejected by our filters, never an error
    assert summary["long"]["kept"] + sum(summary["long"]["rejected"].values()) == 2
    assert llm["requests"] >= 4 and llm["input_tokens"] > 500 and llm["output_tokens"] > 0
    magpie = summary["short"]["magpie"]
    assert magpie["attempts"] >= 1  # raw completions over /v1/completions with SmolLM2's chat template

    # the judge through the same server (the 135M model rarely writes a [[rating]]: replies are recorded anyway)
    preds = [{"idx": "1", "query": "Who kept the ledger?", "answer": "The lighthouse keeper.",
              "prediction": "The keeper of the lighthouse kept it.", "few_shots": []}]
    write_jsonl(tmp_path / "preds.jsonl", preds)
    assert main(["judge", "--run-dir", str(run), "--predictions", str(tmp_path / "preds.jsonl"),
                 "--set", f"eval.judge_base_url={llamacpp_url}", "--set", "eval.judge_model=smollm2",
                 "--set", f"eval.judge_cache_dir={tmp_path / 'cache'}", "--set", "eval.judge_runs=1",
                 "--set", "eval.judge_max_attempts=1", "--set", "eval.judge_max_new_tokens=48"]) == 0
    (row,) = read_jsonl(run / "judgments.jsonl")
    attempt = row["runs"][0]["attempts"][0]
    assert attempt["raw"].strip() and attempt["usage"]["input_tokens"] > 50 and not attempt["cached"]
    assert row["judge"] == {"backend": "openai", "model": "smollm2"}
    assert Path(run / "judge_summary.json").exists()
