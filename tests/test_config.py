"""config.py: presets, typed overrides, clear errors."""
from __future__ import annotations

import pytest

from longalign_lib.config import list_presets, load_config, parse_override, save_config
from longalign_lib.io import LongAlignError


def test_all_presets_load_and_differ():
    assert {"cpu-demo", "gpu-small", "paper"} <= set(list_presets())
    cpu, gpu, paper = (load_config(p) for p in ("cpu-demo", "gpu-small", "paper"))
    assert cpu.data.max_length < gpu.data.max_length < paper.data.max_length == 65536
    # the paper's hyper-parameters
    assert paper.train.lr == 2e-5 and paper.train.adam_beta2 == 0.95 and paper.train.weight_decay == 0.0
    assert paper.train.warmup_ratio == 0.03 and paper.train.epochs == 2 and paper.model.rope_base_factor == 200.0
    assert paper.batching.loss_reduction == "sequence"


def test_overrides_are_typed():
    cfg = load_config("cpu-demo", ["train.lr=1e-5", "train.max_steps=7", "train.bf16=true",
                                   "eval.needle_lengths=[100, 200]", "model.name=/tmp/m", "data.long_ratio=none"])
    assert cfg.train.lr == 1e-5 and cfg.train.max_steps == 7 and cfg.train.bf16 is True
    assert cfg.eval.needle_lengths == [100, 200] and cfg.model.name == "/tmp/m" and cfg.data.long_ratio is None
    assert parse_override("a.b=3") == (["a", "b"], 3)


@pytest.mark.parametrize("bad, msg", [
    ("train.lrr=1", "unknown setting 'lrr'"),
    ("train.max_steps=abc", "expected an integer"),
    ("train.bf16=3", "expected true/false"),
    ("nokey", "expected key=value"),
    ("train=3", "expected a mapping"),
])
def test_bad_overrides_are_clear(bad, msg):
    with pytest.raises(LongAlignError, match=msg):
        load_config("cpu-demo", [bad])


def test_unknown_preset_and_yaml_file(tmp_path):
    with pytest.raises(LongAlignError, match="unknown preset 'nope'"):
        load_config("nope")
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  lr: 3.0e-4\n")
    assert load_config(str(p)).train.lr == 3e-4
    p.write_text("train: [unclosed\n")
    with pytest.raises(LongAlignError, match=r"mine.yaml:\d+: invalid YAML"):
        load_config(str(p))


def test_saved_config_reloads(tmp_path):
    cfg = load_config("gpu-small", ["train.lr=4e-5"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(path))
    assert again.train.lr == 4e-5 and again.to_dict()["data"] == cfg.to_dict()["data"]
