"""io.py: atomic writes, line-numbered JSONL errors, resumable appends."""
from __future__ import annotations

import pytest

from longalign_lib.io import LongAlignError, append_jsonl, read_jsonl, write_json, write_jsonl


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.jsonl"
    write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert read_jsonl(p) == [{"a": 1}]
    assert [f.name for f in tmp_path.iterdir()] == ["x.jsonl"]  # no temp file left behind


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(LongAlignError, match=r"d.jsonl:3: invalid JSON"):
        read_jsonl(p)
    with pytest.raises(LongAlignError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_append_repairs_torn_last_line(tmp_path):
    p = tmp_path / "s.jsonl"
    append_jsonl(p, {"i": 0})
    with open(p, "a") as f:
        f.write('{"i": 1, "tex')  # a run killed mid-line
    assert read_jsonl(p, allow_partial_last_line=True) == [{"i": 0}]
    append_jsonl(p, {"i": 1})
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]


def test_write_json_handles_numpy(tmp_path):
    import numpy as np

    write_json(tmp_path / "m.json", {"x": np.arange(3), "y": np.float32(1.5).item()})
    assert (tmp_path / "m.json").read_text().count("\n") > 1
