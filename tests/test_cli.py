"""cli.py / pipeline.py: `longalign --help` lists the stages, errors are one clear line, runs resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from longalign_lib.cli import main
from longalign_lib.stages import NAMES


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "longalign_lib.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in [*NAMES, "run", "config"]:
        assert f"    {name}" in out


def test_bad_setting_is_one_clear_line(capsys):
    assert main(["config", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown setting 'nope'" in err[0]


def test_config_prints_resolved_settings(capsys):
    assert main(["config", "--preset", "paper", "--set", "train.lr=1e-6"]) == 0
    out = capsys.readouterr().out
    assert "lr: 1.0e-06" in out and "max_length: 65536" in out


def test_check_stage_and_resumable_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--stages", "check", "--run-dir", str(run_dir), "--prompt", "Say hello."]) == 0
    check = json.loads((run_dir / "check.json").read_text())
    assert check["records"] == 5 and check["reply"] and (run_dir / "figures" / "label_mask.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "## check" in report and "label_mask.png" in report and (run_dir / "config.yaml").exists()
    capsys.readouterr()
    assert main(["run", "--stages", "check", "--run-dir", str(run_dir)]) == 0
    assert "done earlier, skipped" in capsys.readouterr().out


def test_unknown_stage_in_run(tmp_path, capsys):
    assert main(["run", "--stages", "check,bogus", "--run-dir", str(tmp_path)]) == 2
    assert "unknown stage" in capsys.readouterr().err


def _fake_stages(monkeypatch, calls, result=None):
    """The real registry (names, settings, reads) with run functions that record their call and write one file."""
    import dataclasses

    from longalign_lib import pipeline
    from longalign_lib.stages import STAGES, StageResult

    def fake(stage):
        def run(cfg, run_dir, args):
            calls.append(stage.name)
            (Path(run_dir) / f"{stage.name}.out").write_text(f"{stage.name} {len(calls)}\n")
            return result or StageResult({"n": len(calls)}, [f"{stage.name}.out"], f"{stage.name} ran")
        return dataclasses.replace(stage, run=run)

    monkeypatch.setattr(pipeline, "STAGES", tuple(fake(s) for s in STAGES))


def test_dry_run_does_not_mark_stage_done(tmp_path, monkeypatch):
    from longalign_lib import pipeline
    from longalign_lib.config import load_config
    from longalign_lib.stages import StageResult

    _fake_stages(monkeypatch, [], StageResult(dry_run=True))
    pipeline.run_one("synth", load_config("cpu-demo"), tmp_path)
    assert not (tmp_path / "stages" / "synth.json").exists()
    _fake_stages(monkeypatch, [])
    pipeline.run_one("synth", load_config("cpu-demo"), tmp_path)
    assert (tmp_path / "stages" / "synth.json").exists()


def test_rerun_after_a_changed_setting_reruns_that_stage_and_downstream(tmp_path, monkeypatch):
    from longalign_lib import pipeline
    from longalign_lib.config import load_config

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    pipeline.run_all(load_config("cpu-demo"), tmp_path)
    assert calls == list(NAMES)
    calls.clear()
    pipeline.run_all(load_config("cpu-demo"), tmp_path)
    assert calls == []
    assert "Reused from an earlier run (settings and inputs unchanged): " + ", ".join(NAMES) in \
        (tmp_path / "report.md").read_text()
    cfg = load_config("cpu-demo", ["train.lr=1e-6"])  # longalign run --set train.lr=1e-6
    pipeline.run_all(cfg, tmp_path)
    assert calls == ["train", "eval", "judge", "needle"]
    report = (tmp_path / "report.md").read_text()
    assert "unchanged): check, corpus, synth, tokenize, analyze, pack." in report and "| train | ran |" in report
    calls.clear()
    pipeline.run_all(cfg, tmp_path)
    assert calls == []
    (tmp_path / "synth.out").write_text("long.jsonl edited by hand\n")  # a stage file changed: its readers rerun
    pipeline.run_all(cfg, tmp_path)
    assert calls == ["tokenize", "analyze", "pack", "train", "eval", "judge", "needle"]
    calls.clear()
    src = tmp_path / "extra.jsonl"
    src.write_text("{}\n")
    cfg2 = load_config("cpu-demo", ["train.lr=1e-6", f"data.extra_files=[{src}]"])
    pipeline.run_all(cfg2, tmp_path, stages=["check", "tokenize"])
    assert calls == ["tokenize"]
    calls.clear()
    src.write_text("{}\n{}\n")  # a file a setting names changed: the stage reruns
    pipeline.run_all(cfg2, tmp_path, stages=["check", "tokenize"])
    assert calls == ["tokenize"]
    calls.clear()
    pipeline.run_all(cfg2, tmp_path, stages=["check", "tokenize"], force=True)
    assert calls == ["check", "tokenize"]


def _file_with_every_bad_input(path: Path) -> list[dict]:
    """Two good sample records, one starting with a UTF-8 BOM and holding U+2028/U+0085 in its answer, around a
    broken JSON line and a line that is not UTF-8. Returns the good records."""
    from longalign_lib.io import read_jsonl

    from .conftest import SAMPLE

    good = read_jsonl(SAMPLE)[3:5]
    good[0]["messages"][-1]["content"] += "\u2028next paragraph\x85end"
    path.write_bytes(b"\n".join([b"\xef\xbb\xbf" + json.dumps(good[0], ensure_ascii=False).encode(),
                                 b'{"messages": [', b'{"messages": "caf\xe9"}',
                                 json.dumps(good[1], ensure_ascii=False).encode()]) + b"\n")
    return good


def test_check_and_tokenize_report_every_bad_line_and_keep_every_good_one(tmp_path, capsys):
    """Fails on a7eda25: `longalign check` crashed with a raw UnicodeDecodeError on the undecodable line; with that
    line gone, the BOM aborted at line 1 and U+2028/U+0085 split the first record into 3 bad lines; `longalign
    tokenize` stopped at the first bad line."""
    data = tmp_path / "mixed.jsonl"
    _file_with_every_bad_input(data)
    want = [f"{data}:2: invalid JSON", f"{data}:3: not valid UTF-8 (byte 0xe9"]
    run = tmp_path / "run"
    assert main(["check", "--set", f"data_file={data}", "--run-dir", str(run), "--prompt", "Hi."]) == 0
    out, err = capsys.readouterr()
    for w in want:
        assert f"longalign: check: skipped {w}" in err
    check = json.loads((run / "check.json").read_text())
    assert check["records"] == 2 and check["format"]["kept"] == 2 and check["format"]["rejected"] == {}
    assert [b[:len(w)] for b, w in zip(check["bad_lines"], want, strict=True)] == want
    assert json.loads(out)["bad_lines"] == check["bad_lines"] == check["format"]["bad_lines"]

    # the tokenize stage (stage 2) over the same file: the same two reasons, both good records tokenized
    assert main(["tokenize", "--set", f"data.extra_files=[{data}]", "--set", "data.max_length=4096",
                 "--set", "data.mix_sample=false", "--run-dir", str(run)]) == 0
    out, err = capsys.readouterr()
    for w in want:
        assert f"longalign: tokenize: skipped {w}" in err
    summary = json.loads((run / "tokenize.json").read_text())
    assert summary["kept"] == 2 and [b[:len(w)] for b, w in zip(summary["bad_lines"], want, strict=True)] == want
    assert json.loads(out)["bad_lines"] == summary["bad_lines"]
    assert "2 input lines skipped" in (run / "stages" / "tokenize.json").read_text()


def test_a_data_file_with_no_good_line_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\xff\xfe{\n")
    assert main(["check", "--set", f"data_file={data}", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}: no line of this file is a valid JSON record" in err[0] and "UTF-8" in err[0]


def test_synth_dry_run_plans_the_requested_size_without_key_or_corpus(tmp_path, capsys, monkeypatch):
    """Fails on a7eda25: the paper preset's dry run built a corpus first (129 documents found offline, ~30 s),
    planned those instead of the 10,000 asked for, then stopped for want of OPENAI_API_KEY."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = tmp_path / "run"
    assert main(["synth", "--preset", "paper", "--run-dir", str(run), "--dry-run"]) == 0
    plan = json.loads((run / "synth_plan.json").read_text())
    assert plan["documents"] == 10_000 and plan["calls"] == 20_000 and plan["questions"]["cached"] is None
    assert plan["output_tokens"] == 10_000 * (1024 + 1024) and plan["cost_usd"] > 0  # paper: 1024-token caps
    assert 8000 < plan["scale"]["mean_doc_tokens"] < 64000 and "corpus.n_docs=10000" in plan["estimated_from"]
    assert not (run / "corpus.jsonl").exists() and not (run / "long.jsonl").exists()
    assert "10,000 documents" in capsys.readouterr().out
    assert main(["synth", "--preset", "paper", "--run-dir", str(run), "--dry-run", "--set", "synth.max_docs=40"]) == 0
    assert json.loads((run / "synth_plan.json").read_text())["documents"] == 40


def test_formatting_module_reports_bad_input_in_one_line(tmp_path):
    """Fails on a7eda25: `python -m longalign_lib.formatting` printed a traceback for a missing file."""
    for args, want in (([str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
                       ([str(Path(__file__))], "no line of this file is a valid JSON record")):
        r = subprocess.run([sys.executable, "-m", "longalign_lib.formatting", *args], capture_output=True, text=True)
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and want in r.stderr, r.stderr
