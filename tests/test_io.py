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


def test_load_jsonl_keeps_every_good_line_and_names_every_bad_one(tmp_path):
    """Fails on a7eda25 (no load_jsonl; iter_jsonl raised a bare UnicodeDecodeError and rejected a BOM)."""
    from longalign_lib.io import load_jsonl

    p = tmp_path / "d.jsonl"
    rec = {"text": "one\u2028two\x85three\u2029four\x1cfive"}  # Unicode line breaks inside a string
    write_jsonl(p, [rec])
    assert read_jsonl(p) == [rec] and load_jsonl(p).rows == [(1, rec)]
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": \n\n{"b": "caf\xe9"}\n{"c": 3}\n{"d": ')
    f = load_jsonl(p, allow_partial_last_line=True)
    assert f.rows == [(1, {"a": 1}), (5, {"c": 3})]
    assert [(b.line, b.reason.split(" (")[0]) for b in f.bad] == [(2, "invalid JSON"), (4, "not valid UTF-8")]
    assert f.bad_lines()[1] == f"{p}:4: not valid UTF-8 (byte 0xe9 at byte 11 of the line); re-save the file as " \
                               "UTF-8 or remove this line"
    assert len(load_jsonl(p).bad) == 3  # without allow_partial_last_line the torn last line is reported too
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"c": 3}\n{"b": "\xe9"}\n')
    with pytest.raises(LongAlignError, match=rf"{p}:4: not valid UTF-8"):  # strict readers: a clear error
        read_jsonl(p)
    p.write_bytes(b"\xff\n{oops\n")
    with pytest.raises(LongAlignError, match=rf"{p}: no line of this file is a valid JSON record; first: line 1: "
                                             r"not valid UTF-8.*\(and 1 more bad line\(s\)\)"):
        load_jsonl(p)
