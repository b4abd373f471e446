"""What produced a result: a model's weights fingerprint, and the reuse keys stage 5 and the LLM cache compare.

Usage:
    from longalign_lib.provenance import weights_fingerprint, model_fingerprint, reuse_key, ReuseLog
    weights_fingerprint("runs/demo/model")       # changes when the folder's weights or config change
    model_fingerprint("smollm2-135m-instruct")   # a model spec (bundled name, folder, hub id) → fingerprint
    key = reuse_key(model=fp, settings={...}, row={...})   # {"key": ..., "parts": {...}}
    log = ReuseLog(); log.check(stored_row.get("reuse"), key)   # True → reuse; else counted with its reason

The rule (docs/architecture.md, "Every reuse is keyed by what produced it"): a prediction, judgment, needle cell
or cached LLM reply is reused only when every part of its key is unchanged; otherwise it is recomputed, and the
stage reports how many rows it reused and why it recomputed the others.

A weights fingerprint hashes, for every file of a model folder (a transformers or peft folder, or a single
weights file such as a GGUF): its relative name and size; the whole content of files up to SMALL_FILE bytes
(config.json, adapter_config.json, the safetensors index, the tokenizer, a small adapter); and for larger files
their modification time, the safetensors header (tensor names, shapes, offsets) and MAX_SAMPLES blocks of
SAMPLE_BYTES spread over the file. A model retrained into the same folder is rewritten (new mtime, new bytes) and
so gets a new fingerprint; checking a 0.5 GB checkpoint reads about 1 MB of it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from .models import BUNDLED, resolve

SMALL_FILE = 8 << 20  # files up to 8 MiB are hashed whole
SAMPLE_BYTES = 64 << 10  # larger ones: this many bytes at each of MAX_SAMPLES evenly spaced places
MAX_SAMPLES = 16


def digest(obj) -> str:
    """A short stable hash of any JSON-able value (dict order ignored).

    >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
    True
    >>> len(digest("x"))
    16
    """
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _hash_file(h, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return
        st = path.stat()
        h.update(str(st.st_mtime_ns).encode())
        head = f.read(8)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:  # the header: every tensor's name, dtype, shape, offset
            n = int.from_bytes(head, "little")
            if 0 < n <= SMALL_FILE:
                h.update(f.read(n))
        for k in range(MAX_SAMPLES):
            f.seek((size - SAMPLE_BYTES) * k // max(MAX_SAMPLES - 1, 1))
            h.update(f.read(SAMPLE_BYTES))


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A 16-hex-digit fingerprint of a model folder (or one weights file): see the module docstring.

    Hidden files and `checkpoint-*` subfolders (trainer state, not the model) are left out.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text('{"hidden_size": 64}')
    >>> _ = (d / "model.safetensors").write_bytes(b"weights v1")
    >>> before = weights_fingerprint(d)
    >>> before == weights_fingerprint(d)
    True
    >>> _ = (d / "model.safetensors").write_bytes(b"weights v2")   # retrained into the same folder
    >>> before == weights_fingerprint(d)
    False
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder or file")
    h = hashlib.sha256()
    if p.is_file():
        files = [p]
        root = p.parent
    else:
        root = p
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") or part.startswith("checkpoint-") for part in f.relative_to(p).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        _hash_file(h, f, size)
    return h.hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    """The fingerprint of the model a spec names (models.load_model_and_tokenizer's specs): a bundled name is
    fingerprinted in its converted folder, a local folder or file by weights_fingerprint, a `random:` spec by
    its config; a hub id that is not on disk by its name alone (the hub revision is not checked)."""
    spec = str(spec)
    rand = spec.startswith("random:")
    name = spec.removeprefix("random:")
    path = Path(resolve(name) if name in BUNDLED else os.path.expanduser(name))
    fp = weights_fingerprint(path) if path.exists() else "name:" + digest(name)
    return ("random:" if rand else "") + fp


def judge_identity(ec, backend: str, mode: str = "llm", scoring: str | None = None,
                   template: str | None = None) -> dict:
    """Who judged and how (the judge part of a judgment's or a judge-scored needle cell's key): the mode; for the
    LLM judge (EvalConfig `ec`, its resolved `backend`) the model, endpoint (base_url), a local judge's weights
    fingerprint, the scoring, the template text and the sampling settings. `judge_runs` is not part of it: the
    judge stage extends a row judged with fewer runs and keeps the first judge_runs runs of one with more."""
    if mode != "llm":
        return {"mode": mode}
    return {"mode": mode, "backend": backend, "model": ec.judge_model, "base_url": ec.judge_base_url,
            "weights": model_fingerprint(ec.judge_model) if backend == "local" else None,
            "scoring": scoring, "template": digest(template), "temperature": ec.judge_temperature,
            "max_new_tokens": ec.judge_max_new_tokens, "max_attempts": ec.judge_max_attempts, "seed": ec.seed,
            "top_logprobs": ec.judge_top_logprobs if scoring == "probs" else None}


def reuse_key(**parts) -> dict:
    """{"key": hash of all parts, "parts": {name: hash of that part}}: stored with a result, compared on reuse.

    >>> k = reuse_key(model="abc", settings={"max_new_tokens": 32})
    >>> sorted(k["parts"]) == ["model", "settings"] and len(k["key"]) == 16
    True
    """
    hashed = {name: digest(value) for name, value in parts.items()}
    return {"key": digest(hashed), "parts": hashed}


def changed_parts(stored: dict | None, key: dict) -> list[str]:
    """The parts of `key` that differ from a stored key (all of "written before reuse keys" when none was stored).

    >>> old = reuse_key(model="a", settings=1)
    >>> changed_parts(old, reuse_key(model="b", settings=1))
    ['model']
    >>> changed_parts(None, old)
    ['no reuse key (written by an older version)']
    """
    if not isinstance(stored, dict) or "parts" not in stored:
        return ["no reuse key (written by an older version)"]
    if stored.get("key") == key["key"]:
        return []
    return [n for n in key["parts"] if stored["parts"].get(n) != key["parts"][n]] or ["key"]


class ReuseLog:
    """Counts results reused and recomputed, with the reasons; `summary()` goes into a stage's metrics.

    >>> log = ReuseLog()
    >>> k = reuse_key(model="a")
    >>> log.check(k, k), log.check(reuse_key(model="b"), k), log.check(None, k)
    (True, False, False)
    >>> log.summary()
    {'reused': 1, 'recomputed': 2, 'why': {'model changed': 1, 'no reuse key (written by an older version)': 1}}
    """

    def __init__(self):
        self.reused = 0
        self.recomputed = 0
        self.why: Counter = Counter()

    def check(self, stored: dict | None, key: dict) -> bool:
        """True when the stored key equals `key` (reuse); else count a recomputation and its reasons."""
        diff = changed_parts(stored, key)
        if not diff:
            self.reused += 1
            return True
        self.recompute(", ".join(diff) + (" changed" if stored and "parts" in stored else ""))
        return False

    def recompute(self, reason: str) -> None:
        self.recomputed += 1
        self.why[reason] += 1

    def summary(self) -> dict:
        return {"reused": self.reused, "recomputed": self.recomputed, "why": dict(self.why)}

    def text(self, what: str) -> str:
        """One sentence for a stage report, e.g. "3 predictions reused, 2 recomputed (model changed: 2)"."""
        why = "; ".join(f"{r}: {n}" for r, n in self.why.items())
        return f"{self.reused} {what} reused, {self.recomputed} recomputed" + (f" ({why})" if why else "")
