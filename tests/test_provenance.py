"""provenance.py and the reuse rule: every reuse (predictions, judgments, needle cells, LLM replies) is keyed by what
produced it — the model's weights, the settings, the inputs and the endpoint — and recomputed when that changed.

Issue 22 point 1: `longalign run --set train.lr=1e-3` after a first run retrained the model but stage 5 resumed
every prediction, judgment and needle cell of the old model. Each test here fails on a7eda25.
"""
from __future__ import annotations

import doctest
import json
import os

import pytest

from longalign_lib.config import load_config
from longalign_lib.io import read_json, read_jsonl
from longalign_lib.llm import make_client
from longalign_lib.pipeline import run_one


def test_doctests():
    from longalign_lib import provenance

    assert doctest.testmod(provenance).failed == 0


def _save_weights(folder, seed: int):
    """Write seeded random weights of the tiny architecture into `folder` (a model "retrained" in place)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    with torch.no_grad():  # wider than the default init: greedy answers then differ between seeds (not all blanks)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def tiny_saved(tiny):
    """The 2-layer tiny model with real (seeded random) weights on disk: loads and generates in well under a second."""
    _save_weights(tiny, 0)
    return tiny


def test_weights_fingerprint_changes_when_a_model_is_rewritten_in_place(tmp_path, monkeypatch, tiny_saved):
    from longalign_lib import provenance
    from longalign_lib.provenance import model_fingerprint, weights_fingerprint

    fp = weights_fingerprint(tiny_saved)
    assert fp == weights_fingerprint(tiny_saved) == model_fingerprint(str(tiny_saved))
    assert model_fingerprint(f"random:{tiny_saved}") == "random:" + fp
    assert model_fingerprint("some-org/not-on-disk").startswith("name:")
    # a large weights file (sampled, not read whole): same size, same mtime, other bytes → another fingerprint
    monkeypatch.setattr(provenance, "SMALL_FILE", 1 << 10)
    big = tmp_path / "m" / "model.safetensors"
    big.parent.mkdir()
    (big.parent / "config.json").write_text("{}")
    big.write_bytes(bytes(range(256)) * 4096)
    st = big.stat()
    before = weights_fingerprint(big.parent)
    big.write_bytes(bytes(reversed(range(256))) * 4096)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(big.parent) != before
    # a peft adapter folder: the adapter weights are hashed whole; checkpoint-* folders are not the model
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"r": 8}')
    (ad / "adapter_model.safetensors").write_bytes(b"A" * 100)
    a1 = weights_fingerprint(ad)
    (ad / "checkpoint-2").mkdir()
    (ad / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    assert weights_fingerprint(ad) == a1
    (ad / "adapter_model.safetensors").write_bytes(b"B" * 100)
    assert weights_fingerprint(ad) != a1


# ---------------------------------------------------------------- the LLM request cache
def test_cache_key_includes_base_url(llm_server, tmp_path):
    """Two servers serving the same alias must not share replies: another base_url misses the cache."""
    kw = dict(cache_dir=tmp_path / "cache", api_key_env="NO_SUCH_KEY_VAR")
    a = make_client("openai", "same-alias", base_url=llm_server.openai_url, **kw)
    other_url = llm_server.openai_url.replace("127.0.0.1", "localhost")  # the same server under another address
    assert other_url != llm_server.openai_url
    b = make_client("openai", "same-alias", base_url=other_url, **kw)
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert a.cache_key(msgs, {}) != b.cache_key(msgs, {})
    assert not a.chat(msgs).cached and a.chat(msgs).cached
    assert not b.chat(msgs).cached and llm_server.count == 2


def test_cache_key_includes_the_local_models_weights(tmp_path, tiny_saved):
    """A local model retrained into the same folder misses the cache (the key carries its weights fingerprint)."""
    import shutil

    folder = tmp_path / "local-model"
    shutil.copytree(tiny_saved, folder)
    msgs = [{"role": "user", "content": "Hi"}]
    key = make_client("local", str(folder), cache_dir=tmp_path / "c").cache_key(msgs, {"max_new_tokens": 4})
    assert make_client("local", str(folder), cache_dir=tmp_path / "c").cache_key(msgs, {"max_new_tokens": 4}) == key
    _save_weights(folder, 1)
    assert make_client("local", str(folder), cache_dir=tmp_path / "c").cache_key(msgs, {"max_new_tokens": 4}) != key


# ---------------------------------------------------------------- eval: predictions
def _bench(path, n=2):
    rows = [{"idx": f"c{i}", "query": f"What code does box {i} hold?",
             "context": f"Box {i} holds code {4000 + i}. " + "Filler about the weather. " * 8,
             "answer": str(4000 + i), "few_shots": [{"answer": str(4000 + i), "score": 10}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_recomputes_predictions_of_a_retrained_model_and_a_changed_setting(tmp_path, tiny_saved):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_saved, model_dir)
    sets = [f"eval.bench_file={_bench(tmp_path / 'bench.jsonl')}", f"eval.model={model_dir}",
            "eval.max_new_tokens=4", "model.device=cpu"]
    first = run_one("eval", load_config("cpu-demo", sets), tmp_path)
    assert first.metrics["resumed"] == 0
    again = run_one("eval", load_config("cpu-demo", sets), tmp_path)
    assert again.metrics["resumed"] == 2  # nothing changed: reused
    before = read_jsonl(tmp_path / "predictions.jsonl")
    _save_weights(model_dir, 1)  # retrained into the same folder (what `longalign run --set train.lr=...` does)
    res = run_one("eval", load_config("cpu-demo", sets), tmp_path)
    after = read_jsonl(tmp_path / "predictions.jsonl")
    assert res.metrics["resumed"] == 0 and [r["prediction"] for r in after] != [r["prediction"] for r in before]
    assert res.metrics["recomputed"] == 2 and len(after) == 2 and again.metrics["recomputed"] == 0
    assert res.metrics["recompute_why"] == {"model changed": 2} and "model changed: 2" in res.report
    res = run_one("eval", load_config("cpu-demo", [*sets, "eval.max_new_tokens=3"]), tmp_path)
    assert all(r["n_new_tokens"] <= 3 for r in read_jsonl(tmp_path / "predictions.jsonl"))
    assert res.metrics["recomputed"] == 2 and res.metrics["recompute_why"] == {"settings changed": 2}


# ---------------------------------------------------------------- judge: judgments
def _responder(body, path):
    answer = body["messages"][0]["content"].split("[Answer to grade]")[-1]
    return "Matches. [[8]]" if "good" in answer else "Wrong. [[2]]"


def _judge_cfg(llm_server, tmp_path, runs: int):
    return load_config("cpu-demo", [f"eval.judge_base_url={llm_server.openai_url}", "eval.judge_model=judge-m",
                                    f"eval.judge_cache_dir={tmp_path / 'cache'}", "eval.judge_prompt_file=default",
                                    f"eval.judge_runs={runs}"])


def _predictions(path, preds: dict):
    path.write_text("".join(json.dumps({"idx": i, "query": f"Q{i}?", "answer": f"Ref {i}.", "prediction": p,
                                        "few_shots": [{"answer": "x", "score": 5}, {"answer": "y", "score": 7}]})
                            + "\n" for i, p in preds.items()), encoding="utf-8")


def test_judge_rejudges_only_the_edited_predictions(llm_server, tmp_path):
    llm_server.responder = _responder
    _predictions(tmp_path / "predictions.jsonl", {"1": "good answer", "2": "good answer", "3": "bad answer"})
    cfg = _judge_cfg(llm_server, tmp_path, 1)
    res = run_one("judge", cfg, tmp_path)
    assert res.metrics["judge_mean"] == 6.0 and llm_server.count == 3
    _predictions(tmp_path / "predictions.jsonl", {"1": "good answer", "2": "bad answer now", "3": "bad answer"})
    res = run_one("judge", cfg, tmp_path)
    assert llm_server.count == 4  # one call: row 2 only
    assert res.metrics["reused"] == 2 and res.metrics["recomputed"] == 1
    assert res.metrics["recompute_why"] == {"item changed": 1} and res.metrics["judge_mean"] == 4.0
    rows = read_jsonl(tmp_path / "judgments.jsonl")
    assert [(r["idx"], r["prediction"], r["score"]) for r in rows] == [
        ("1", "good answer", 8.0), ("2", "bad answer now", 2.0), ("3", "bad answer", 2.0)]


def test_judge_after_fresh_predictions_and_more_runs(llm_server, tmp_path):
    """`longalign eval --eval-fresh` then `longalign judge --set eval.judge_runs=3`: new answers are judged anew with
    3 runs; unchanged answers judged with 1 run are extended by runs 2 and 3 (run 1 is not asked again)."""
    llm_server.responder = _responder
    _predictions(tmp_path / "predictions.jsonl", {"1": "good answer", "2": "good answer"})
    run_one("judge", _judge_cfg(llm_server, tmp_path, 1), tmp_path)
    assert llm_server.count == 2
    _predictions(tmp_path / "predictions.jsonl", {"1": "good answer", "2": "bad fresh answer"})
    res = run_one("judge", _judge_cfg(llm_server, tmp_path, 3), tmp_path)
    rows = read_jsonl(tmp_path / "judgments.jsonl")
    assert [len(r["runs"]) for r in rows] == [3, 3] and [r["runs"][-1]["run"] for r in rows] == [2, 2]
    assert [r["score"] for r in rows] == [8.0, 2.0] and res.metrics["judge_mean"] == 5.0
    assert llm_server.count == 2 + 2 + 3  # row 1: runs 2-3 only; row 2: all 3 runs
    assert res.metrics["extended"] == 1 and res.metrics["recomputed"] == 1 and res.metrics["reused"] == 0
    summary = read_json(tmp_path / "judge_summary.json")
    assert summary["judge_calls"] == 6 and summary["judge"]["runs"] == 3
    res = run_one("judge", _judge_cfg(llm_server, tmp_path, 2), tmp_path)  # fewer runs: the first 2 are kept
    assert llm_server.count == 7 and res.metrics["reused"] == 2
    assert [len(r["runs"]) for r in read_jsonl(tmp_path / "judgments.jsonl")] == [2, 2]


# ---------------------------------------------------------------- needle: cells
def test_needle_setting_or_model_change_reruns_the_cells(tmp_path, tiny_saved):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_saved, model_dir)
    sets = [f"eval.model={model_dir}", "eval.needle_lengths=[64]", "eval.needle_depths=[0.0, 1.0]",
            "eval.needle_max_new_tokens=3", "model.device=cpu"]
    res = run_one("needle", load_config("cpu-demo", sets), tmp_path)
    before = read_json(tmp_path / "needle.json")["cells"]
    assert res.metrics["cells"] == 2 and len(read_jsonl(tmp_path / "needle_cells.jsonl")) == 2
    res = run_one("needle", load_config("cpu-demo", [*sets, "eval.needle_max_new_tokens=2"]), tmp_path)
    after = read_json(tmp_path / "needle.json")["cells"]
    assert [c["prediction"] for c in after] != [c["prediction"] for c in before]  # answers of 2 tokens, not 3
    assert len(read_jsonl(tmp_path / "needle_cells.jsonl")) == 2  # the stale cells left the file
    assert res.metrics["reused"] == 0 and res.metrics["recompute_why"] == {"run changed": 2}
    assert run_one("needle", load_config("cpu-demo", [*sets, "eval.needle_max_new_tokens=2"]),
                   tmp_path).metrics["reused"] == 2
    _save_weights(model_dir, 2)
    res = run_one("needle", load_config("cpu-demo", [*sets, "eval.needle_max_new_tokens=2"]), tmp_path)
    assert res.metrics["recomputed"] == 2 and read_json(tmp_path / "needle.json")["recomputed"] == 2


# ---------------------------------------------------------------- cpu-demo: train.lr reaches the loss
def test_cpu_demo_lr_changes_loss_last(tiny, tmp_path):
    """The cpu-demo preset trains 2 steps; with a warm-up step at lr 0 the loss of step 2 never saw train.lr."""
    from longalign_lib import train

    def loss_last(lr, d):
        cfg = load_config("cpu-demo", [f"model.name=random:{tiny}", "train.tensorboard=false", "model.device=cpu",
                                       f"train.lr={lr}"])
        log = train.train(cfg, tmp_path / d, save_model=False)["log"]
        assert [r["step"] for r in log] == [1, 2] and log[0]["lr"] > 0
        return log[-1]["loss"]

    assert loss_last(5e-5, "a") != loss_last(1e-3, "b")
