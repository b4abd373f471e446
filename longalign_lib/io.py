"""Small, safe file helpers shared by every stage: atomic writes, JSONL with line-numbered errors, resumable appends.

Usage: `from longalign_lib.io import read_jsonl, write_jsonl, append_jsonl, write_json, write_metrics`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
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
        import dataclasses

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


def iter_jsonl(path: str | os.PathLike, allow_partial_last_line: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-empty line; a bad line raises LongAlignError naming file and line.

    `allow_partial_last_line` tolerates a truncated final line (a run killed mid-write) by ignoring it.
    """
    path = Path(path)
    if not path.exists():
        raise LongAlignError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_last_line and i == len(lines) and not line.endswith("\n"):
                return
            raise LongAlignError(
                f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno}); fix or remove this line"
            ) from None


def read_jsonl(path: str | os.PathLike, allow_partial_last_line: bool = False) -> list[Any]:
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
