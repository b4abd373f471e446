"""Batch APIs (OpenAI Batch, Anthropic Message Batches) for synthesis and judging: half the price, resumable.

Usage:
    from longalign_lib.llm_batch import run_batched
    result = run_batched(client, step, state_dir=run_dir / "batches", label="synth", poll_s=30)

`step()` is ordinary code that calls the client (chat/achat/chat_many) and treats `llm.Deferred` as "not yet".
`run_batched` calls it inside `client.deferring()`: every cache miss is recorded instead of sent. The recorded
requests go out as one batch per provider and request kind; the batch id is written to
`<state_dir>/<batch id>.json` right after the provider accepts it; the batch is polled with a progress bar until
it ends; each result is folded into the client's request cache (usage and cost at the batch discount); then
`step()` runs again, now on cache hits, and may defer the next round (Self-Instruct: questions, then answers).

Resume: a rerun (after a kill, a crash, a closed laptop) loads the state files, polls the batches still open
and sends only requests that no open batch holds and the cache lacks: no paid request is repeated. (The one
gap is a kill between the provider accepting a batch and the state file being written, a few milliseconds.)
Failed items (errors, expiry) are reported with their messages and stay uncached: `retry="batch"` sends them
again in a follow-up batch, `retry="interactive"` at once through the normal (full-price) path;
after `max_attempts` batch submissions of one request the run stops with the errors.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

from .io import LongAlignError, write_json
from .llm import Deferred, LLMClient, PendingRequest, Reply, run_sync

MAX_ITEMS = 10_000  # requests per batch (both providers allow more; smaller batches start sooner)
MAX_BYTES = 100 * 2**20  # request JSON per batch (OpenAI's file limit is 200 MB, Anthropic's 256 MB)


def load_states(state_dir: Path) -> list[dict]:
    """Every batch ever submitted from this run directory (one JSON file each)."""
    out = []
    for p in sorted(Path(state_dir).glob("*.json")) if Path(state_dir).exists() else []:
        try:
            st = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            raise LongAlignError(f"{p}: damaged batch state file; check the batch id on the provider's "
                                 "dashboard, then delete the file (its requests will be sent again)") from None
        st["_path"] = str(p)
        out.append(st)
    return out


def _save(st: dict) -> None:
    write_json(Path(st["_path"]), {k: v for k, v in st.items() if k != "_path"})


def _chunks(lines: list[dict]):
    chunk, size = [], 0
    for line in lines:
        n = len(json.dumps(line, ensure_ascii=False).encode("utf-8"))
        if chunk and (len(chunk) >= MAX_ITEMS or size + n > MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield chunk


def batch_summary(state_dir: Path) -> dict:
    """Batches, items, failed items and their first errors, for a stage's report."""
    states = load_states(state_dir)
    failed = [(st["batch_id"], cid, msg) for st in states for cid, msg in (st.get("failed") or {}).items()]
    return {"batches": [st["batch_id"] for st in states], "items": sum(len(st["keys"]) for st in states),
            "failed_items": len(failed), "errors": [f"{b}/{c}: {m}" for b, c, m in failed[:5]]}


class BatchRunner:
    """Submits, resumes, polls and folds the batches of one client; state lives in `state_dir`."""

    def __init__(self, client: LLMClient, state_dir: str | Path, poll_s: float = 30.0, retry: str = "batch",
                 max_attempts: int = 3, progress: bool = True, log=print):
        if not client.supports_batch:
            raise LongAlignError(f"backend {client.backend_name!r} has no Batch API: batch mode needs backend "
                                 "openai (api.openai.com or a server with /v1/files and /v1/batches) or anthropic")
        if retry not in ("batch", "interactive"):
            raise LongAlignError(f"batch_retry={retry!r}: choose batch or interactive")
        self.client, self.state_dir = client, Path(state_dir)
        self.poll_s, self.retry, self.max_attempts = float(poll_s), retry, max(1, int(max_attempts))
        self.progress, self.log = progress, log

    def _mine(self, states):
        c = self.client
        return [st for st in states if st.get("backend") == c.backend_name and st.get("model") == c.model]

    async def _submit(self, todo: list[PendingRequest], label: str) -> None:
        backend = self.client.backend
        by_kind: dict[str, list[PendingRequest]] = {}
        for p in todo:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, reqs in by_kind.items():
            ids = {f"r{i}_{p.key[:24]}": p for i, p in enumerate(reqs)}
            lines = [backend.batch_line(cid, kind, p.payload, p.params) for cid, p in ids.items()]
            for chunk in _chunks(lines):
                batch_id = await backend.batch_submit(chunk, label)
                cids = [x["custom_id"] for x in chunk]
                st = {"batch_id": batch_id, "backend": self.client.backend_name, "model": self.client.model,
                      "label": label, "kind": kind, "created": time.time(), "status": "submitted", "folded": False,
                      "keys": {cid: ids[cid].key for cid in cids},
                      "params": {cid: ids[cid].params for cid in cids}, "failed": {},
                      "_path": str(self.state_dir / f"{batch_id}.json")}
                _save(st)
                self.log(f"[longalign] batch {batch_id} submitted: {len(chunk)} {kind} requests ({label}); "
                         f"state in {st['_path']}")

    async def _poll_and_fold(self, open_states: list[dict]) -> None:
        from tqdm.auto import tqdm

        backend = self.client.backend
        total = sum(len(st["keys"]) for st in open_states)
        bar = tqdm(total=total, desc=f"batch ({len(open_states)} open)", disable=not self.progress)
        done_of: dict[str, int] = {}
        waiting = list(open_states)
        try:
            while waiting:
                still = []
                for st in waiting:
                    s = await backend.batch_status(st["batch_id"])
                    done_of[st["batch_id"]] = s["done"]
                    if s["status"] != st.get("status"):
                        st["status"] = s["status"]
                        _save(st)
                    if s["ended"]:
                        await self._fold(st)
                        done_of[st["batch_id"]] = len(st["keys"])
                    else:
                        still.append(st)
                bar.n = min(total, sum(done_of.values()))
                bar.set_postfix_str(", ".join(sorted({st.get("status", "?") for st in waiting})))
                bar.refresh()
                waiting = still
                if waiting:
                    await asyncio.sleep(self.poll_s)
        finally:
            bar.close()

    async def _fold(self, st: dict) -> None:
        c = self.client
        results = await c.backend.batch_results(st["batch_id"], dict.fromkeys(st["keys"], st.get("kind", "chat")))
        failed = {}
        for cid, key in st["keys"].items():
            r = results.get(cid)
            if r is None:
                failed[cid] = f"no result (batch {st.get('status', '?')})"
            elif r[0] == "ok":
                _, text, usage, model, meta = r
                reply = c.account(Reply(text, usage, model, cached=False, logprobs=meta.get("logprobs"),
                                        finish_reason=meta.get("finish_reason")), batch=True)
                c.cache_put(key, reply, st["params"].get(cid, {}), via=f"batch:{st['batch_id']}")
            else:
                failed[cid] = r[1]
        c.stats["batch_items"] += len(st["keys"])
        c.stats["batch_failed"] += len(failed)
        st.update(folded=True, failed=failed, ok=len(st["keys"]) - len(failed), folded_at=time.time())
        _save(st)
        msg = f"[longalign] batch {st['batch_id']} ended ({st.get('status')}): {st['ok']} results cached"
        if failed:
            first = next(iter(failed.items()))
            msg += (f", {len(failed)} failed (first: {first[0]}: {first[1]}); they are retried "
                    f"{'in a follow-up batch' if self.retry == 'batch' else 'interactively'}")
        self.log(msg)

    def flush(self, pending: list[PendingRequest], label: str) -> None:
        """Send what `pending` needs (resuming open batches first), wait for every open batch, fold results."""
        c = self.client
        self.state_dir.mkdir(parents=True, exist_ok=True)
        states = self._mine(load_states(self.state_dir))
        in_flight = {k for st in states if not st.get("folded") for k in st["keys"].values()}
        attempts = Counter(k for st in states for k in st["keys"].values())
        errors: dict[str, str] = {}
        for st in states:
            for cid, msg in (st.get("failed") or {}).items():
                errors[st["keys"][cid]] = f"{st['batch_id']}/{cid}: {msg}"
        todo = [p for p in pending if p.key not in in_flight and not c.is_cached_key(p.key)]
        interactive = [p for p in todo if attempts[p.key] and self.retry == "interactive"]
        todo = [p for p in todo if p not in interactive]
        spent = [p for p in todo if attempts[p.key] >= self.max_attempts]
        if spent:
            raise LongAlignError(f"{len(spent)} request(s) failed in {self.max_attempts} batches; last errors: "
                                 + "; ".join(errors.get(p.key, "?") for p in spent[:3])
                                 + f" (state: {self.state_dir}; set synth.batch_retry=interactive to send them "
                                   "one by one, or fix the cause and rerun)")

        async def go():
            async with c.session():
                if todo:
                    await self._submit(todo, label)
                open_states = [st for st in self._mine(load_states(self.state_dir)) if not st.get("folded")]
                if open_states:
                    await self._poll_and_fold(open_states)
                if interactive:
                    self.log(f"[longalign] retrying {len(interactive)} failed batch item(s) interactively")
                    await asyncio.gather(*(c._call(p.kind, p.payload, p.params) for p in interactive))

        run_sync(go())


def run_batched(client: LLMClient, step, state_dir: str | Path, label: str, poll_s: float = 30.0,
                retry: str = "batch", max_attempts: int = 3, max_rounds: int = 12, progress: bool = True,
                log=print):
    """Run `step()` until it defers nothing; each round's deferred requests go out as batches (see module doc).

    Returns the last `step()` result and the rounds' batch labels: (result, rounds).
    """
    runner = BatchRunner(client, state_dir, poll_s, retry, max_attempts, progress, log)
    for rnd in range(1, max_rounds + 1):
        with client.deferring() as pending:
            try:
                result = step()
            except Deferred:  # step gave up at its first deferred call: what it recorded is this round
                result = None
        if not pending:
            return result, rnd - 1
        runner.flush(list(pending.values()), f"{label}-round{rnd}")
    raise LongAlignError(f"{label}: still waiting for batch results after {max_rounds} rounds "
                         f"(see {state_dir}); rerun to continue")
