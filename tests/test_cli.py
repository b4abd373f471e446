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
