"""Small, safe file helpers shared by every stage: atomic writes, JSONL with line-numbered errors, resumable appends.

Usage: `from longalign_lib.io import read_jsonl, load_jsonl, write_jsonl, append_jsonl, write_json, write_metrics`.
    f = load_jsonl("long.jsonl")     # f.rows [(line, obj)], f.bad [BadLine: "file:line: reason"], f.digest
    rows = read_jsonl("preds.jsonl") # strict: the first bad line raises LongAlignError("file:line: reason")
JSONL lines end at "\n" only and are decoded as strict UTF-8 (a leading BOM is accepted): load_jsonl keeps every
good line of training/eval data and reports each bad one; iter_jsonl/read_jsonl stop at the first.
Run the examples as: python -m pytest --doctest-modules longalign_lib/io.py
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the bundled data/ folder (sample, KJV texts)


def data_dir() -> Path:
    """The bundled data/ folder (sample_longalign.jsonl, kjv_*.txt): the one place every module finds it."""
    if not DATA_DIR.is_dir():
        raise LongAlignError(f"{DATA_DIR}: the bundled data folder is missing; run from a checkout of the cookbook")
    return DATA_DIR


class LongAlignError(Exception):
    """An error the user can fix. The CLI prints its message alone (no traceback) and exits with status 2."""


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, then rename)."""
    return _atomic_replace(Path(path), lambda f: f.write(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically."""
    return _atomic_replace(Path(path), lambda f: json.dump(obj, f, indent=indent, ensure_ascii=False, default=_default))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise LongAlignError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LongAlignError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or regenerate the file") from None


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_default) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write rows as JSON lines atomically: readers never see a half-written file."""
    def w(f):
        for r in rows:
            f.write(dumps_line(r))
    return _atomic_replace(Path(path), w)


BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BadLine:
    """One JSONL line that was not read: where it is and why. `str()` gives "file:line: reason"."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class JsonlFile:
    """What `load_jsonl` read: the good rows as (line number, object), every bad line, and the file's sha256."""

    path: Path
    rows: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    digest: str = ""

    @property
    def records(self) -> list:
        return [obj for _, obj in self.rows]

    def bad_lines(self) -> list[str]:
        """Every bad line as "file:line: reason" (what stage reports and JSON outputs list)."""
        return [str(b) for b in self.bad]


def parse_jsonl_line(data: bytes) -> Any:
    r"""One line's bytes → its JSON value; ValueError with a short reason when it is not valid UTF-8 or JSON.

    >>> parse_jsonl_line('{"a": "x\u2028y"}'.encode())
    {'a': 'x\u2028y'}
    >>> parse_jsonl_line(b'{"a": 1')
    Traceback (most recent call last):
    ...
    ValueError: invalid JSON (Expecting ',' delimiter at column 8); fix or remove this line
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1} of the line); "
                         "re-save the file as UTF-8 or remove this line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno}); fix or remove this line") from None


def split_jsonl(raw: bytes) -> list[tuple[int, bytes]]:
    r"""(line number, bytes) of each non-blank line. Lines end at b"\n" only (U+2028, U+0085 and other Unicode
    line breaks are ordinary characters inside a JSON string); a UTF-8 byte-order mark before line 1 is dropped.

    >>> split_jsonl(BOM + b'{"a": 1}\r\n\n{"b": "\xe2\x80\xa8"}')
    [(1, b'{"a": 1}\r'), (3, b'{"b": "\xe2\x80\xa8"}')]
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    return [(i, line) for i, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]


def load_jsonl(path: str | os.PathLike, allow_partial_last_line: bool = False) -> JsonlFile:
    r"""Read a JSONL file, keeping every good line and naming every bad one: the one JSONL reader of the project.

    Each line is decoded as strict UTF-8 and parsed on its own; a line that fails goes to `.bad` (file, line,
    reason) and reading goes on. `allow_partial_last_line` drops a final line without "\n" that does not parse
    (a run killed mid-write) without reporting it. A missing file, or one whose non-blank lines are all bad, raises
    one LongAlignError. Callers that must not lose data report `.bad_lines()`; iter_jsonl/read_jsonl raise on the
    first bad line instead.
    """
    path = Path(path)
    if not path.exists():
        raise LongAlignError(f"{path}: file not found")
    raw = path.read_bytes()
    out = JsonlFile(path, digest=hashlib.sha256(raw).hexdigest())
    lines = split_jsonl(raw)
    for k, (i, data) in enumerate(lines):
        try:
            out.rows.append((i, parse_jsonl_line(data)))
        except ValueError as e:
            if allow_partial_last_line and k == len(lines) - 1 and not raw.endswith(b"\n"):
                break
            out.bad.append(BadLine(str(path), i, str(e)))
    if out.bad and not out.rows:
        more = f" (and {len(out.bad) - 1} more bad line(s))" if len(out.bad) > 1 else ""
        raise LongAlignError(f"{path}: no line of this file is a valid JSON record; first: "
                             f"line {out.bad[0].line}: {out.bad[0].reason}{more}")
    return out


def bad_lines_note(bad: list, shown: int = 20) -> str:
    """Markdown for a stage report: how many input lines were skipped and why (the stage's JSON lists them all).

    >>> print(bad_lines_note(["d.jsonl:2: invalid JSON (Expecting value at column 1); fix or remove this line"]))
    <BLANKLINE>
    <BLANKLINE>
    **1 input line skipped** (not valid UTF-8 or not JSON; every good line was kept):
    - `d.jsonl:2: invalid JSON (Expecting value at column 1); fix or remove this line`
    """
    if not bad:
        return ""
    more = f"\n- … and {len(bad) - shown} more (all listed in the stage's JSON)" if len(bad) > shown else ""
    return (f"\n\n**{len(bad)} input line{'s' if len(bad) > 1 else ''} skipped** (not valid UTF-8 or not JSON; "
            "every good line was kept):\n" + "\n".join(f"- `{b}`" for b in bad[:shown]) + more)


def iter_jsonl(path: str | os.PathLike, allow_partial_last_line: bool = False) -> Iterator[tuple[int, Any]]:
    r"""Yield (line_number, object) for each non-blank line; a bad line raises LongAlignError naming file and line.

    Same reading rules as load_jsonl (lines end at "\n" only, strict UTF-8, a leading BOM is accepted), but strict:
    for files the project writes itself (caches, predictions) a bad line means something is wrong, so it stops.
    `allow_partial_last_line` tolerates a truncated final line (a run killed mid-write) by ignoring it.
    """
    path = Path(path)
    if not path.exists():
        raise LongAlignError(f"{path}: file not found")
    raw = path.read_bytes()
    lines = split_jsonl(raw)
    for k, (i, data) in enumerate(lines):
        try:
            obj = parse_jsonl_line(data)
        except ValueError as e:
            if allow_partial_last_line and k == len(lines) - 1 and not raw.endswith(b"\n"):
                return
            raise LongAlignError(f"{path}:{i}: {e}") from None
        yield i, obj


def read_jsonl(path: str | os.PathLike, allow_partial_last_line: bool = False) -> list[Any]:
    """Every object of a JSONL file (iter_jsonl: the first bad line raises, naming file and line)."""
    return [obj for _, obj in iter_jsonl(path, allow_partial_last_line)]


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one JSON line and flush it to disk: the resumable-stream primitive for long jobs.

    If a previous run died mid-line, the partial line is cut off first so the file stays valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = path.read_bytes()
                cut = data.rfind(b"\n") + 1
                f.seek(cut)
                f.truncate()
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps_line(row))
        f.flush()
        os.fsync(f.fileno())


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write `metrics.json` into `out_dir` (what each notebook's last cell calls; tests read it)."""
    return write_json(Path(out_dir) / "metrics.json", metrics)
