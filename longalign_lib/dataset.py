"""Stage 2 — the tokenized training set: LongAlign-10k records → a `datasets` Dataset on disk, never padded.

Run as: longalign tokenize --preset cpu-demo [--run-dir DIR] [--rebuild]
Usage:
    from longalign_lib.dataset import build_dataset, load_tokenized, mix
    ds, summary = build_dataset({"long": "runs/x/long.jsonl", "short": "runs/x/short.jsonl"}, tok, cfg.data,
                                "runs/x/tokenized", num_proc=2)
    ds = load_tokenized("runs/x/tokenized")      # columns: input_ids, labels, length, n_target, source, ...
    pairs = mix(long_records, short_records, ratio=0.5, seed=0)   # [(source, record)], deterministic

One row per kept record: `input_ids` and `labels` (int32; labels are -100 outside the assistant turns), `length`
and `n_target` (int64; targets as the loss sees them: formatting.count_targets), `source` ("long", "short" or a
file's stem), plus `origin` ("file:line") and `truncated`.
Sequences keep their own length: LongAlign stores every record padded to 65,536 int64 tokens; here a 300-token
chat takes 300 tokens on disk, and batching (stage 3) decides how sequences share a step.

Records are tokenized in parallel (`num_proc` worker processes, batched calls into the Rust tokenizer). A rebuild
happens only when the inputs, the tokenizer, the settings or the formatting code change: the key is stored with
the dataset. Rejected records (bad roles, empty answers, too long with truncation=skip, ...) are counted by reason,
never trained on. Files are read with io.load_jsonl: a line that is not valid UTF-8 or not JSON is skipped and listed
in summary["bad_lines"] ("file:line: reason", every one of them); every good line is kept; a file with no good line
stops the build with one error.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

from .formatting import RecordError, assistant_char_spans, count_targets, format_batch
from .io import LongAlignError, load_jsonl, write_json

COLUMNS = ("input_ids", "labels", "length", "n_target", "source")  # the contract stages 3 and 4 read
META_FILE = "longalign_dataset.json"  # inside the dataset folder: cache key + build summary
FORMAT_VERSION = "tokenize-v1"


# ----------------------------------------------------------------------------------------------- inputs
class _Group:
    """The records of one source: `items` are (origin "file:line", record); `bad` the lines of its files that could
    not be read ("file:line: reason"). Files are read on first use of `items`, so a cache hit only hashes them."""

    def __init__(self, source: str, described: str, digest: str, items: list | None = None,
                 files: tuple[Path, ...] = (), bad: list | None = None):
        self.source, self.described, self.digest, self.files = source, described, digest, files
        self._items, self.bad = items, list(bad or [])

    @property
    def items(self) -> list[tuple[str, object]]:
        if self._items is None:
            self._items = []
            for path in self.files:
                f = load_jsonl(path)
                self._items += [(f"{path}:{i}", rec) for i, rec in f.rows]
                self.bad += f.bad_lines()
        return self._items


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _read_lines(path: Path, source: str) -> _Group:
    if not path.exists():
        raise LongAlignError(f"{path}: file not found (check data.long_file / data.short_file / data.extra_files)")
    return _Group(source, str(path), _file_digest(path), files=(path,))


def _from_records(records: list, source: str) -> _Group:
    items, h = [], hashlib.sha256()
    for i, rec in enumerate(records, start=1):
        h.update(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
        items.append((f"<{source}>:{i}", rec))
    return _Group(source, f"{len(records)} in-memory records", h.hexdigest(), items=items)


def _groups(files_or_records) -> list[_Group]:
    """Accept a path, a list of paths, a list of records, {source: path | records} or [(source, path | records)]."""
    if isinstance(files_or_records, (str, os.PathLike)):
        files_or_records = [files_or_records]
    if isinstance(files_or_records, dict):
        if "messages" in files_or_records:
            raise LongAlignError("build_dataset: got one record; pass a list of records or {source: records}")
        pairs = list(files_or_records.items())
    elif isinstance(files_or_records, (list, tuple)):
        if files_or_records and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str)
                                    for r in files_or_records):
            pairs = list(files_or_records)  # [(source, path | records)]
        elif files_or_records and all(isinstance(r, dict) for r in files_or_records):
            pairs = [("records", list(files_or_records))]
        else:
            pairs = [(Path(p).stem, p) for p in files_or_records]
    else:
        raise LongAlignError(f"build_dataset: expected paths or records, got {type(files_or_records).__name__}")
    out: dict[str, _Group] = {}
    for source, value in pairs:
        g = _read_lines(Path(value), source) if isinstance(value, (str, os.PathLike)) else _from_records(list(value), source)
        if source in out:  # two files with one stem: one source
            prev = out[source]
            lazy = prev._items is None and g._items is None  # files only: still read on first use
            out[source] = _Group(source, f"{prev.described} + {g.described}",
                                 hashlib.sha256((prev.digest + g.digest).encode()).hexdigest(),
                                 items=None if lazy else prev.items + g.items, files=prev.files + g.files,
                                 bad=None if lazy else prev.bad + g.bad)
        else:
            out[source] = g
    if not out:
        raise LongAlignError("build_dataset: no input files or records given")
    return list(out.values())


# ----------------------------------------------------------------------------------------------- mixing
def _take(items: list, n: int, rng: random.Random) -> list:
    """n items without replacement; more than len(items) repeats whole copies, then a random remainder."""
    if n <= len(items):
        return [items[i] for i in sorted(rng.sample(range(len(items)), n))]
    if not items:
        raise LongAlignError(f"mix: asked for {n} records of a source that has none")
    reps, rest = divmod(n, len(items))
    return items * reps + [items[i] for i in sorted(rng.sample(range(len(items)), rest))]


def mix(long_records: list, short_records: list, ratio: float | None = None, counts: tuple | None = None,
        seed: int = 0) -> list[tuple[str, object]]:
    """Combine long and short data into one shuffled list of (source, record); deterministic given `seed`.

    ratio: the share of long records, 0..1 — the larger source is subsampled so the mix keeps as many records as
           possible (e.g. 100 long + 1000 short at ratio 0.5 → 100 + 100).
    counts: (n_long, n_short) exact numbers; None keeps all of that source; more than available repeats records
            (upsampling). With neither, every record is kept. Items may be anything (records, lines, ids).
    """
    if ratio is not None and counts is not None:
        raise LongAlignError("mix: give data.long_ratio or data.n_long/n_short, not both")
    n_l, n_s = len(long_records), len(short_records)
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise LongAlignError(f"data.long_ratio={ratio}: must be between 0 and 1")
        if ratio == 0.0:
            n_l = 0
        elif ratio == 1.0:
            n_s = 0
        elif n_l / max(1, n_l + n_s) > ratio:
            n_l = min(n_l, int(ratio / (1 - ratio) * n_s + 0.5))
        else:
            n_s = min(n_s, int((1 - ratio) / ratio * n_l + 0.5))
    elif counts is not None:
        want_l, want_s = counts
        n_l = n_l if want_l is None else int(want_l)
        n_s = n_s if want_s is None else int(want_s)
        if n_l < 0 or n_s < 0:
            raise LongAlignError(f"mix: counts must be >= 0, got {counts}")
    rng = random.Random(seed)
    picked = [("long", r) for r in _take(list(long_records), n_l, rng)] + \
             [("short", r) for r in _take(list(short_records), n_s, rng)]
    rng.shuffle(picked)
    return picked


# ----------------------------------------------------------------------------------------------- cache key
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the tokens: vocabulary/merges/normaliser, special tokens and the chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for name in ("formatting.py", "dataset.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _settings(cfg) -> dict:
    return {"max_length": cfg.max_length, "truncation": cfg.truncation, "long_ratio": cfg.long_ratio,
            "n_long": getattr(cfg, "n_long", None), "n_short": getattr(cfg, "n_short", None), "seed": cfg.seed}


def cache_key(groups: list[_Group], tokenizer, cfg) -> str:
    payload = {"inputs": [(g.source, g.digest) for g in groups], "tokenizer": tokenizer_fingerprint(tokenizer),
               "settings": _settings(cfg), "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- tokenizing
_WORKER: dict = {}


def _init_worker(tokenizer, max_length, truncation) -> None:
    _WORKER.update(tokenizer=tokenizer, max_length=max_length, truncation=truncation)


def _tokenize_chunk(records: list) -> dict:
    """Worker: records → flat int32 token ids + labels of the kept records, and a status per record.

    A rejected record keeps its reason in `status` (and contributes no tokens); "" means kept.
    """
    import numpy as np

    n = len(records)
    status, error = [""] * n, [""] * n
    lengths, n_target = np.zeros(n, np.int64), np.zeros(n, np.int64)
    truncated, dropped = np.zeros(n, bool), np.zeros(n, bool)
    ids_parts, label_parts = [], []
    for k, res in zip(range(n), format_batch(records, _WORKER["tokenizer"], _WORKER["max_length"],
                                          _WORKER["truncation"]), strict=True):
        if isinstance(res, RecordError):
            status[k], error[k] = res.reason, str(res)
            continue
        ids, labels = np.asarray(res.input_ids, np.int32), np.asarray(res.labels, np.int32)
        ids_parts.append(ids)
        label_parts.append(labels)
        lengths[k], n_target[k] = len(ids), count_targets(labels)
        truncated[k], dropped[k] = res.truncated, bool(res.meta.get("dropped_trailing_user"))
    empty = np.zeros(0, np.int32)
    return {"ids": np.concatenate(ids_parts) if ids_parts else empty,
            "labels": np.concatenate(label_parts) if label_parts else empty, "length": lengths,
            "n_target": n_target, "truncated": truncated, "dropped": dropped, "status": status, "error": error}


def _tokenize_all(lines: list, tokenizer, max_length, truncation, num_proc: int, chunk: int) -> list[dict]:
    """Tokenize in chunks, in `num_proc` worker processes (in order, so the result is the same for any num_proc)."""
    from tqdm import tqdm

    chunks = [lines[i:i + chunk] for i in range(0, len(lines), chunk)]
    bar = tqdm(total=len(lines), desc=f"tokenize ({num_proc} proc)", unit="rec", disable=len(lines) < 2 * chunk,
               mininterval=2.0)
    out = []
    if num_proc <= 1:
        _init_worker(tokenizer, max_length, truncation)
        for c in chunks:
            out.append(_tokenize_chunk(c))
            bar.update(len(c))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker: the workers are the parallelism
        try:
            with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, max_length, truncation)) as pool:
                for c, res in zip(chunks, pool.imap(_tokenize_chunk, chunks), strict=True):
                    out.append(res)
                    bar.update(len(c))
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
    bar.close()
    return out


def _to_arrow(parts: list[dict], sources: list[str], origins: list[str], keep):
    """Kept rows as one Arrow table (list<int32> columns built straight from the flat arrays: no per-row copies)."""
    import numpy as np
    import pyarrow as pa

    batches, row = [], 0
    for part in parts:
        n = len(part["status"])
        k = keep[row:row + n]
        lengths = part["length"][k]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        idx = np.flatnonzero(k) + row
        batches.append(pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(part["ids"])),
             pa.ListArray.from_arrays(offsets, pa.array(part["labels"])),
             pa.array(lengths), pa.array(part["n_target"][k]),
             pa.array([sources[i] for i in idx], pa.string()), pa.array([origins[i] for i in idx], pa.string()),
             pa.array(part["truncated"][k])],
            names=["input_ids", "labels", "length", "n_target", "source", "origin", "truncated"]))
        row += n
    return pa.Table.from_batches(batches)


def _summarise(parts: list[dict], sources: list[str], origins: list[str], truncation: str) -> dict:
    by_source: dict[str, dict] = {}
    rejected, examples, row = Counter(), [], 0
    for p in parts:
        for j, st in enumerate(p["status"]):
            src = sources[row + j]
            s = by_source.setdefault(src, {"total": 0, "kept": 0, "rejected": Counter(), "truncated": 0,
                                           "tokens": 0, "target_tokens": 0})
            s["total"] += 1
            if st == "":
                s["kept"] += 1
                s["truncated"] += int(p["truncated"][j])
                s["tokens"] += int(p["length"][j])
                s["target_tokens"] += int(p["n_target"][j])
            else:
                s["rejected"][st] += 1
                rejected[st] += 1
                if len(examples) < 20:
                    examples.append(f"{origins[row + j]}: {p['error'][j]}")
        row += len(p["status"])
    for s in by_source.values():
        s["rejected"] = dict(s["rejected"])
    n_trunc = sum(s["truncated"] for s in by_source.values())
    return {"total": row, "kept": sum(s["kept"] for s in by_source.values()), "rejected": dict(rejected),
            "truncated": {f"over_max_length ({truncation})": n_trunc} if n_trunc else {},
            "dropped_trailing_user": int(sum(p["dropped"].sum() for p in parts)),
            "tokens": sum(s["tokens"] for s in by_source.values()),
            "target_tokens": sum(s["target_tokens"] for s in by_source.values()),
            "by_source": by_source, "errors": examples}


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not (out_dir / META_FILE).exists():
        raise LongAlignError(f"{out_dir}: exists and is not a dataset written by `longalign tokenize`; refusing to "
                             "replace it — remove it or choose another data.tokenized_dir")


def _save_atomic(ds, out_dir: Path, meta: dict) -> None:
    """Write the dataset into a temp folder next to `out_dir`, then swap it in: readers never see half a dataset."""
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.save_to_disk(str(tmp))
        write_json(tmp / META_FILE, meta)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def cached_summary(out_dir: str | os.PathLike, key: str) -> dict | None:
    """The stored build summary when `out_dir` holds a complete dataset built under `key`; else None."""
    meta_path = Path(out_dir) / META_FILE
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    return meta if meta.get("key") == key else None


def build_dataset(files_or_records, tokenizer, cfg, out_dir: str | os.PathLike, num_proc: int | None = None,
                  rebuild: bool = False, chunk_size: int = 256):
    """Tokenize, mix and save records; returns (Dataset loaded from `out_dir`, summary dict).

    files_or_records: a JSONL path, a list of paths (source = file stem), a list of records (source "records"),
    or {source: path or list of records}. Sources named "long" and "short" are mixed by cfg.long_ratio or
    cfg.n_long/n_short (DataConfig); other sources are kept whole. When `out_dir` already holds a dataset built
    from the same inputs, tokenizer, settings and code, it is loaded instead (summary["cached"] is True).
    """
    import numpy as np
    from datasets import Dataset
    from datasets.table import InMemoryTable

    t0 = time.time()
    out_dir = Path(out_dir)
    groups = _groups(files_or_records)
    key = cache_key(groups, tokenizer, cfg)
    if not rebuild:
        meta = cached_summary(out_dir, key)
        if meta is not None:
            return load_tokenized(out_dir), {**meta["summary"], "cached": True, "seconds": round(time.time() - t0, 2)}
    _check_replaceable(out_dir)
    assistant_char_spans(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])

    by_name = {g.source: g for g in groups}
    counts = None
    if getattr(cfg, "n_long", None) is not None or getattr(cfg, "n_short", None) is not None:
        counts = (cfg.n_long, cfg.n_short)
    mix_info = None
    rows: list[tuple[str, tuple[str, str]]] = []
    if "long" in by_name and "short" in by_name and (cfg.long_ratio is not None or counts is not None):
        long_g, short_g = by_name.pop("long"), by_name.pop("short")
        rows = mix(long_g.items, short_g.items, ratio=cfg.long_ratio, counts=counts, seed=cfg.seed)
        picked = Counter(src for src, _ in rows)
        mix_info = {"long": {"available": len(long_g.items), "selected": picked["long"]},
                    "short": {"available": len(short_g.items), "selected": picked["short"]},
                    "long_ratio": cfg.long_ratio, "counts": counts, "seed": cfg.seed}
    elif cfg.long_ratio is not None or counts is not None:
        mix_info = {"skipped": f"mixing needs both 'long' and 'short' inputs; got {sorted(by_name)}"}
    for g in by_name.values():
        rows += [(g.source, item) for item in g.items]
    if not rows:
        why = f"; mixing kept none ({mix_info})" if mix_info else ""
        raise LongAlignError(f"build_dataset: no records to tokenize ({', '.join(g.described for g in groups)}{why})")

    lines = [line for _, (_, line) in rows]
    sources = [src for src, _ in rows]
    origins = [org for _, (org, _) in rows]
    nproc = max(1, int(num_proc or getattr(cfg, "num_proc", 1) or 1))
    nproc = min(nproc, max(1, len(rows) // chunk_size))  # a worker per chunk at least
    parts = _tokenize_all(lines, tokenizer, cfg.max_length, cfg.truncation, nproc, chunk_size)
    del lines
    status = [st for p in parts for st in p["status"]]
    summary = _summarise(parts, sources, origins, cfg.truncation)
    summary["bad_lines"] = [b for g in groups for b in g.bad]  # skipped unreadable lines, every one
    if not summary["kept"]:
        raise LongAlignError(f"build_dataset: every record was rejected ({summary['rejected']}); first: "
                             f"{summary['errors'][:1]}")
    keep = np.array([st == "" for st in status])
    final = Dataset(InMemoryTable(_to_arrow(parts, sources, origins, keep)))
    summary.update({"inputs": [{"source": g.source, "from": g.described, "records": len(g.items)} for g in groups],
                    "mix": mix_info, "settings": _settings(cfg), "num_proc": nproc, "key": key,
                    "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__)})
    _save_atomic(final, out_dir, {"key": key, "summary": summary})
    summary.update({"cached": False, "seconds": round(time.time() - t0, 2)})
    return load_tokenized(out_dir), summary


def is_tokenized(path: str | os.PathLike) -> bool:
    """True when `path` holds a saved dataset (what load_tokenized reads)."""
    path = Path(path)
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def load_tokenized(path: str | os.PathLike):
    """Load a dataset written by build_dataset; a clear LongAlignError when it is missing or not one of ours."""
    from datasets import Dataset

    path = Path(path)
    if not is_tokenized(path):
        raise LongAlignError(f"{path}: no tokenized dataset here; run `longalign tokenize` (or "
                             "dataset.build_dataset) first, or point data.tokenized_dir at one")
    try:
        ds = Dataset.load_from_disk(str(path))
    except Exception as e:  # a folder that is not a saved Dataset (e.g. a DatasetDict, or damaged files)
        raise LongAlignError(f"{path}: cannot load the tokenized dataset ({type(e).__name__}: {e}); "
                             "rebuild it with `longalign tokenize --rebuild`") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise LongAlignError(f"{path}: dataset lacks column(s) {missing} (has {ds.column_names}); rebuild it with "
                             "`longalign tokenize --rebuild`")
    return ds


def find_record(inputs, source: str, origin: str) -> dict:
    """The input record behind a dataset row, from its `source` and `origin` ("file:line", read back from the file,
    or "<source>:index" into the in-memory records given for `source` in `inputs`)."""
    where, _, pos_s = origin.rpartition(":")
    pos = int(pos_s)
    if not where.startswith("<"):  # "file:line": read it back from the file
        value = where
    else:
        value = dict(inputs.items() if isinstance(inputs, dict) else inputs)[source]
    if isinstance(value, (str, os.PathLike)):
        for line, rec in load_jsonl(value).rows:
            if line == pos:
                return rec
        raise LongAlignError(f"{origin}: no such record in {value} (the file changed since it was tokenized?)")
    return list(value)[pos - 1]


def split_sample(records: list[dict]) -> dict[str, list[dict]]:
    """The bundled sample holds both kinds: meta.task_type == 'short' → short, everything else → long."""
    out: dict[str, list[dict]] = {"long": [], "short": []}
    for r in records:
        out["short" if (r.get("meta") or {}).get("task_type") == "short" else "long"].append(r)
    return out

