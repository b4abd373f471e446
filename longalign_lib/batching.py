"""Stage 3 — batch plans (naive, sorted, packed) and exact per-token loss weights for one optimizer step.

Run as: longalign pack --preset cpu-demo      (writes <run_dir>/batching.json, plans/, figures/)
Usage:
    from longalign_lib.batching import plan_epoch, step_token_weights, materialize, collate_packed
    plan = plan_epoch(lengths, n_target, cfg.batching, epoch=0)      # deterministic from (cfg.seed, epoch)
    for step in plan.steps:                                           # one optimizer step
        w = step_token_weights(step, plan.n_target, "sequence", plan.source)  # {item id: weight per target token}
        for mb in step.ranks[rank]:                                    # this rank's accumulation micro-steps
            batch = collate_packed(materialize(plan, mb, dataset), w)  # [1, T] + cu_seq_lens + loss_weights
            loss = (batch["loss_weights"][:, 1:] * ce(logits[:, :-1], labels[:, 1:])).sum()  # then backward

The three strategies of the LongAlign paper (section 3.2):
- naive: shuffle, then micro-batches of `batch_size` sequences padded to the longest;
- sorted: sort by length, cut consecutive groups (fixed `batch_size`, or filling a padded-token budget), shuffle
  the groups — little padding, but a step holds only long or only short sequences;
- packed: concatenate sequences into rows of at most `max_pack_tokens` — next-fit in shuffled order (what LongAlign
  does) or global best-fit-decreasing over all sequences (O(n log n), no windows). BFD fills rows but sorts by
  length, so its rows are long-only or short-only and random steps of them are as biased as sorted batching;
  `pack_mix=window` (BFD inside shuffled windows of `pack_window` steps' worth of tokens) spreads long and short
  records over the steps again for a little fill (notebook 03 measures fill and bias of each).
Every plan says, per optimizer step, which micro-batches each data-parallel rank runs ([rank][micro_step]).

Loss weights (`step_token_weights`): per-token weights w_i for every sequence i of the step such that
Σ_i w_i · Σ_j loss_ij, summed over ALL micro-batches and ALL ranks of the step, is the chosen reduction:
  token     — w = 1 / Σ_step N_i: mean over every target token of the step (what HF/TRL do);
  pack_mean — w_i = 1 / (P · N_pack(i)): mean within each pack row, then over the step's P rows (the paper's L′,
              Eq. 3 — biased towards sequences that share a pack with few target tokens);
  sequence  — w_i = 1 / (M · N_i): each sequence's mean loss, averaged over the step's M sequences (Eq. 2/4).
The trainer SUMS micro-batch losses over accumulation and ranks (undoing DDP's gradient averaging).

Targets are counted as the loss sees them (formatting.count_targets): an item's position 0 is never a target.
Over-long sequences (longer than `max_pack_tokens`) are truncated (right or middle), skipped or split into
pieces, and counted. A plan item is a dataset index, or — for split pieces — an id ≥ len(dataset) that
`plan.source` maps back; `plan.views` holds the kept token ranges of truncated items and pieces, `plan.masked`
the positions of an item that are never targets:
- middle truncation joins head and tail with consecutive positions; the first token after the cut is no target
  (it never followed the token before it);
- split: piece 0 is the first `max_pack_tokens` tokens; each later piece starts with the `split_overlap` tokens
  before its first new token, as context only. A piece attends only within itself: its first new token sees
  `split_overlap` tokens of context, nothing earlier in the sequence. Every target is trained once, by one piece.
  All pieces of a sequence run in ONE optimizer step, in rows of their own, and count as ONE sequence of Eq. 2
  (M counts it once; each of its target tokens weighs 1/(M · N_total)). A split sequence that needs more
  micro-batches than world_size × grad_accum gets a step of its own size (counter `oversized_steps`); the trainer
  then gives every step that many micro-steps, filling the others with empty ones.
"""
from __future__ import annotations

import gc
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import BatchConfig
from .formatting import count_targets
from .io import LongAlignError, dumps_line, read_json, write_json

IGNORE = -100
STRATEGIES = ("naive", "sorted", "packed")
PACKERS = ("bfd", "next_fit")
PACK_MIXES = ("none", "window")
REDUCTIONS = ("token", "pack_mean", "sequence")
OVERLONG = ("truncate", "skip", "split")


# ----------------------------------------------------------------------------------------------------- plan types
@dataclass(slots=True)
class MicroBatch:
    """One forward/backward pass on one rank: `packs[row]` = item ids in that row (one id per row when padded)."""

    packs: list[list[int]]
    lengths: list[list[int]]  # tokens of each item, parallel to packs
    n_target: list[list[int]]  # target tokens of each item (labels != -100, first position excluded)
    padded: bool = False  # True: rows padded to the longest (naive/sorted); False: packed rows
    capacity: int = 0  # packed: the row budget (max_pack_tokens)
    row_lengths: list[int] = field(default=None, repr=False)  # tokens per row (derived)

    def __post_init__(self):
        if self.row_lengths is None:
            self.row_lengths = [sum(x) for x in self.lengths]

    @property
    def n_sequences(self) -> int:
        return sum(len(p) for p in self.packs)

    @property
    def tokens(self) -> int:
        """Real (non-pad) tokens."""
        return sum(self.row_lengths)

    @property
    def slots(self) -> int:
        """Token slots reserved: rows × longest row (padded) or rows × capacity (packed)."""
        if not self.packs:
            return 0
        m = max(self.row_lengths)
        return len(self.packs) * (m if self.padded else max(self.capacity, m))

    @property
    def computed_tokens(self) -> int:
        """Tokens the model actually runs over: padding included for padded rows."""
        if not self.packs:
            return 0
        return len(self.packs) * max(self.row_lengths) if self.padded else self.tokens

    def to_dict(self) -> dict:
        """Rows of item ids with their lengths, target counts and cu_seqlens (boundaries; position_ids restart at
        each one)."""
        cu = [[0, *np.cumsum(r).tolist()] for r in self.lengths]
        return {"packs": self.packs, "lengths": self.lengths, "n_target": self.n_target, "cu_seqlens": cu}


@dataclass
class Step:
    """One optimizer step: `ranks[r]` = the micro-batches rank r runs, in accumulation order."""

    index: int
    ranks: list[list[MicroBatch]]
    source: Any = field(default=None, repr=False, compare=False)  # item id → dataset row (its Plan's `source`)

    def micro_batches(self):
        for rank in self.ranks:
            yield from rank

    @property
    def n_items(self) -> int:
        """Items in the step: the pieces of a split sequence count one each."""
        return sum(mb.n_sequences for mb in self.micro_batches())

    @property
    def n_sequences(self) -> int:
        """M of Eq. 2: the dataset sequences in the step, the pieces of a split sequence counted once (needs
        `source`, which a Plan sets on its steps; without it every item counts)."""
        if self.source is None:
            return self.n_items
        return len({int(self.source[i]) for i in self.item_ids})

    @property
    def tokens(self) -> int:
        return sum(mb.tokens for mb in self.micro_batches())

    @property
    def item_ids(self) -> list[int]:
        return [i for mb in self.micro_batches() for p in mb.packs for i in p]


@dataclass
class Plan:
    """One epoch's batch plan plus what it cost (counters) and how to map items back to dataset rows."""

    strategy: str
    packer: str
    epoch: int
    seed: int
    capacity: int
    batch_size: int
    grad_accum: int
    world_size: int
    steps: list[Step]
    source: np.ndarray  # item id → dataset index
    lengths: np.ndarray  # item id → tokens after truncation/splitting (0: not planned)
    n_target: np.ndarray  # item id → target tokens after truncation/splitting
    views: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # item id → kept [start, end) ranges
    counters: dict = field(default_factory=dict)
    masked: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # item id → never-target [a, b) ranges

    def __post_init__(self):
        for st in self.steps:  # so Step.n_sequences counts the pieces of a split sequence once
            if st.source is None:
                st.source = self.source

    def n_sequences(self, step: Step) -> int:
        """M of Eq. 2: the dataset sequences in `step` (the pieces of a split sequence count once)."""
        return len({int(self.source[i]) for i in step.item_ids})

    @property
    def name(self) -> str:
        return f"packed-{self.packer}" if self.strategy == "packed" else self.strategy

    def micro_batches(self):
        for s in self.steps:
            yield from s.micro_batches()

    def to_dict(self, steps: bool = True) -> dict:
        d = {k: getattr(self, k) for k in ("strategy", "packer", "epoch", "seed", "capacity", "batch_size",
                                            "grad_accum", "world_size")}
        d["counters"] = self.counters
        d["views"] = {str(k): v for k, v in self.views.items()}
        d["masked"] = {str(k): v for k, v in self.masked.items()}
        moved = np.flatnonzero(self.source != np.arange(len(self.source)))
        d["pieces"] = {str(i): int(self.source[i]) for i in moved.tolist()}  # split pieces → dataset row
        if steps:
            d["steps"] = [[[mb.to_dict() for mb in rank] for rank in s.ranks] for s in self.steps]
        return d


# ---------------------------------------------------------------------------------------------------- validation
def check_batching_config(cfg) -> None:
    """One clear error for a batching setting outside its choices (strategy, packer, pack_mix, loss_reduction, overlong)."""
    def bad(key, value, choices):
        raise LongAlignError(f"batching.{key}={value!r}: choose one of {', '.join(choices)} (--set batching.{key}=...)")

    if cfg.strategy not in STRATEGIES:
        bad("strategy", cfg.strategy, STRATEGIES)
    if cfg.packer not in PACKERS:
        bad("packer", cfg.packer, PACKERS)
    if getattr(cfg, "pack_mix", "none") not in PACK_MIXES:
        bad("pack_mix", cfg.pack_mix, PACK_MIXES)
    if cfg.loss_reduction not in REDUCTIONS:
        bad("loss_reduction", cfg.loss_reduction, REDUCTIONS)
    if cfg.overlong not in OVERLONG:
        bad("overlong", cfg.overlong, OVERLONG)
    if cfg.truncate_side not in ("right", "middle"):
        bad("truncate_side", cfg.truncate_side, ("right", "middle"))
    if cfg.sorted_mode not in ("fixed", "token_budget"):
        bad("sorted_mode", cfg.sorted_mode, ("fixed", "token_budget"))
    if cfg.balance not in ("auto", "none", "tokens", "cost"):
        bad("balance", cfg.balance, ("auto", "none", "tokens", "cost"))
    for key in ("max_pack_tokens", "batch_size", "grad_accum", "world_size", "balance_window", "pack_window"):
        if int(getattr(cfg, key, 1)) < 1:
            raise LongAlignError(f"batching.{key}={getattr(cfg, key)!r}: must be a positive integer")
    if cfg.overlong == "split" and not 0 < int(cfg.split_overlap) < int(cfg.max_pack_tokens):
        raise LongAlignError(f"batching.split_overlap={cfg.split_overlap!r}: must be at least 1 and below "
                             f"batching.max_pack_tokens={cfg.max_pack_tokens}")


# ------------------------------------------------------------------------------------------ over-long sequences
def keep_ranges(length: int, limit: int, side: str) -> list[tuple[int, int]]:
    """Token ranges kept when truncating a `length`-token sequence to `limit`: right, or middle (start + end)."""
    if length <= limit:
        return [(0, length)]
    if side == "right":
        return [(0, limit)]
    head = limit // 2
    return [(0, head), (length - (limit - head), length)]


def cut_masks(ranges) -> list[tuple[int, int]]:
    """Positions of a truncated item (in its own coordinates) that are never targets: the first token after each
    cut. Head and tail are joined with consecutive positions, but the token after a cut did not follow the one
    before it, so it is not trained to (its label becomes -100).

    >>> cut_masks([(0, 5), (95, 100)])
    [(5, 6)]
    """
    out, pos = [], 0
    for k, (s, e) in enumerate(ranges):
        if k and e > s:
            out.append((pos, pos + 1))
        pos += e - s
    return out


def split_ranges(length: int, limit: int, overlap: int) -> list[tuple[int, int, int]]:
    """(view start, first new token, end) of each piece of a `length`-token sequence split into pieces of at most
    `limit` tokens. Piece 0 is [0, limit); every later piece repeats the `overlap` tokens before its first new token
    as context (never as targets), so each target of the sequence is trained exactly once, by one piece.

    >>> split_ranges(25, 10, 1)
    [(0, 0, 10), (9, 10, 19), (18, 19, 25)]
    """
    if not 0 < overlap < limit:
        raise LongAlignError(f"batching.split_overlap={overlap}: must be at least 1 and below max_pack_tokens={limit}")
    out = [(0, 0, min(limit, length))]
    while out[-1][2] < length:
        new = out[-1][2]
        out.append((new - overlap, new, min(length, new - overlap + limit)))
    return out


def item_labels(labels, ranges=None, masked=None) -> list:
    """The labels of a plan item: `labels` cut to its kept `ranges`, with its `masked` positions set to -100."""
    lab = list(labels) if ranges is None else [t for s, e in ranges for t in labels[s:e]]
    for a, b in masked or ():
        lab[a:b] = [IGNORE] * (b - a)
    return lab


@dataclass
class _Items:
    source: np.ndarray
    lengths: np.ndarray
    n_target: np.ndarray
    views: dict
    counters: dict
    masked: dict = field(default_factory=dict)


def prepare_items(lengths, n_target, cfg, labels=None) -> _Items:
    """Apply the over-long policy; returns per-item arrays (items ≥ n are split pieces) and counters.

    `labels` (optional: a sequence of label lists, e.g. a dataset column) makes target counts of truncated items
    and pieces exact; without it they are estimated (answers assumed at the end) and counted as estimated.
    Target counts follow formatting.count_targets (as the loss sees them): an item's position 0 and the positions in
    `masked` (the token after a middle cut; the context a split piece repeats) are never targets.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n_target is None:
        nt = np.maximum(lens - 1, 0)
    else:
        nt = np.asarray(n_target, dtype=np.int64)
        if len(nt) != n:
            raise LongAlignError(f"n_target has {len(nt)} entries but lengths has {n}; pass one count per sequence")
    if n and (lens.min() < 0 or nt.min() < 0):
        raise LongAlignError("lengths and n_target must be non-negative token counts")
    cap = int(cfg.max_pack_tokens)
    src = np.arange(n, dtype=np.int64)
    out_len, out_nt = lens.copy(), nt.copy()
    views: dict[int, list[tuple[int, int]]] = {}
    masked: dict[int, list[tuple[int, int]]] = {}
    counters = {"sequences": n, "overlong": 0, "truncated": 0, "skipped_overlong": 0, "split": 0, "pieces": 0,
                "skipped_no_target": 0, "n_target_estimated": 0}
    extra_src, extra_len, extra_nt = [], [], []
    long_idx = np.flatnonzero(lens > cap)
    counters["overlong"] = int(len(long_idx))
    for i in long_idx.tolist():
        L, N = int(lens[i]), int(nt[i])
        if cfg.overlong == "skip":
            out_len[i] = out_nt[i] = 0
            counters["skipped_overlong"] += 1
        elif cfg.overlong == "truncate":
            r = keep_ranges(L, cap, cfg.truncate_side)
            views[i] = r
            if cut_masks(r):
                masked[i] = cut_masks(r)
            out_len[i] = cap
            if labels is not None:
                out_nt[i] = count_targets(item_labels(labels[i], r, masked.get(i)))
            else:  # answers sit at the end of a chat record: right truncation cuts them first, middle keeps them
                out_nt[i] = max(0, N - (L - cap)) if cfg.truncate_side == "right" else min(N, cap - cap // 2 - 1)
                counters["n_target_estimated"] += 1
            counters["truncated"] += 1
        else:  # split into pieces of at most cap tokens; piece 0 keeps the dataset index as its id
            counters["split"] += 1
            for k, (v, new, e) in enumerate(split_ranges(L, cap, int(cfg.split_overlap))):
                item = i if k == 0 else n + len(extra_src)
                views[item] = [(v, e)]
                if new > v:
                    masked[item] = [(0, new - v)]
                if labels is not None:
                    pn = count_targets(item_labels(labels[i], views[item], masked.get(item)))
                else:
                    pn = int(round(N * (e - new) / L))
                    counters["n_target_estimated"] += 1
                if k == 0:
                    out_len[i], out_nt[i] = e - v, pn
                else:
                    extra_src.append(i)
                    extra_len.append(e - v)
                    extra_nt.append(pn)
                counters["pieces"] += 1
    if extra_src:
        src = np.concatenate([src, np.asarray(extra_src, np.int64)])
        out_len = np.concatenate([out_len, np.asarray(extra_len, np.int64)])
        out_nt = np.concatenate([out_nt, np.asarray(extra_nt, np.int64)])
    no_target = (out_nt <= 0) & (out_len > 0)
    counters["skipped_no_target"] = int(no_target.sum())
    out_len[no_target] = 0  # a sequence without target tokens adds nothing to any reduction: not planned
    out_nt[out_len == 0] = 0
    return _Items(src, out_len, out_nt, views, counters, masked)


# ------------------------------------------------------------------------------------------------------ packers
def next_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Next-fit in the given order: keep adding to the current pack; open a new one when the next item does not fit."""
    packs, cur, used = [], [], 0
    for i, L in enumerate(np.asarray(lengths).tolist()):
        if cur and used + L > capacity:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += L
    if cur:
        packs.append(cur)
    return packs


class _NextAtLeast:
    """Set of integers in [0, cap] with 'smallest member ≥ x' in O(1) word operations (two-level 64-bit bitset)."""

    def __init__(self, cap: int):
        self.words = [0] * (cap // 64 + 1)
        self.top = 0  # bit w set ⇔ words[w] != 0

    def add(self, v: int) -> None:
        w = v >> 6
        if not self.words[w]:
            self.top |= 1 << w
        self.words[w] |= 1 << (v & 63)

    def remove(self, v: int) -> None:
        w = v >> 6
        self.words[w] &= ~(1 << (v & 63))
        if not self.words[w]:
            self.top &= ~(1 << w)

    def at_least(self, v: int) -> int | None:
        w = v >> 6
        if w < len(self.words):
            m = self.words[w] >> (v & 63)
            if m:
                return v + ((m & -m).bit_length() - 1)
        t = self.top >> (w + 1)
        if not t:
            return None
        w2 = w + 1 + ((t & -t).bit_length() - 1)
        m = self.words[w2]
        return (w2 << 6) + ((m & -m).bit_length() - 1)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Global best-fit-decreasing over ALL items (no windows): each item, longest first, goes into the open pack
    with the least room that still fits it. Exact BFD (ties between packs of equal room broken arbitrarily),
    O(n log n): packs are bucketed by remaining room; runs of equal sizes are placed bucket by bucket."""
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    if lens.max() > capacity:
        raise ValueError(f"item of {int(lens.max())} tokens exceeds the pack capacity {capacity}")
    order = np.argsort(-lens, kind="stable")
    sl = lens[order]
    pack_of = np.empty(n, dtype=np.int64)  # per sorted position
    # items larger than half the capacity can never share a pack with each other: one new pack each
    n_big = int((sl > capacity // 2).sum())
    pack_of[:n_big] = np.arange(n_big)
    n_packs = n_big
    room = _NextAtLeast(capacity)
    buckets: dict[int, list[int]] = {}

    def file_pack(left: int, pack: int) -> None:
        """Index an open pack under the room it has left."""
        lst = buckets.get(left)
        if lst is None:
            buckets[left] = [pack]
            room.add(left)
        else:
            lst.append(pack)

    if n_big:
        rem = capacity - sl[:n_big]
        for r, b in zip(rem.tolist(), range(n_big), strict=False):
            file_pack(r, b)
    rest = sl[n_big:]
    if len(rest):
        # runs of equal size: starts and sizes (rest is non-increasing)
        change = np.flatnonzero(np.diff(rest)) + 1
        starts = np.concatenate([[0], change]).tolist()
        ends = np.concatenate([change, [len(rest)]]).tolist()
        sizes = rest[starts].tolist()
        pos = n_big
        out = pack_of
        for s, a, e in zip(sizes, starts, ends, strict=False):
            k = e - a
            if s == 0:  # empty items never happen in plans; put each in its own pack to stay well defined
                out[pos:pos + k] = np.arange(n_packs, n_packs + k)
                n_packs += k
                pos += k
                continue
            while k:
                r = room.at_least(s)
                if r is None:  # open new packs, each taking as many items of size s as fit
                    t = capacity // s
                    nb = -(-k // t)
                    ids = np.repeat(np.arange(n_packs, n_packs + nb), t)[:k]
                    out[pos:pos + k] = ids
                    pos += k
                    for j in range(nb):
                        took = t if j < nb - 1 else k - t * (nb - 1)
                        file_pack(capacity - took * s, n_packs + j)
                    n_packs += nb
                    k = 0
                    break
                lst = buckets[r]
                t = r // s
                q = min(len(lst), -(-k // t))
                taken = lst[len(lst) - q:]
                del lst[len(lst) - q:]
                if not lst:
                    del buckets[r]
                    room.remove(r)
                for j, b in enumerate(taken):
                    took = t if (j < q - 1 or k >= q * t) else k - t * (q - 1)
                    if took == 1:
                        out[pos] = b
                    else:
                        out[pos:pos + took] = b
                    pos += took
                    file_pack(r - took * s, b)
                k -= min(k, q * t)
    # group sorted positions by pack, map back to original indices
    by_pack = np.argsort(pack_of, kind="stable")
    counts = np.bincount(pack_of, minlength=n_packs)
    items = order[by_pack]
    return [a.tolist() for a in np.split(items, np.cumsum(counts)[:-1])]


# ------------------------------------------------------------------------------------------------------ planning
def _rows_for(strategy: str, items: _Items, cfg, rng: np.random.Generator, live: np.ndarray) -> list[list[list[int]]]:
    """Micro-batches as lists of rows of the item ids `live` (before grouping into steps)."""
    L = items.lengths
    B = int(cfg.batch_size)
    if strategy == "naive":
        perm = live[rng.permutation(len(live))]
        pl = perm.tolist()
        return [[[i] for i in pl[j:j + B]] for j in range(0, len(pl), B)]
    if strategy == "sorted":
        # tie-break equal lengths randomly so the groups differ between epochs
        perm = live[rng.permutation(len(live))]
        srt = perm[np.argsort(L[perm], kind="stable")]
        groups: list[np.ndarray] = []
        if cfg.sorted_mode == "fixed":
            groups = [srt[j:j + B] for j in range(0, len(srt), B)]
        else:
            budget = int(cfg.sort_token_budget or cfg.batch_size * cfg.max_pack_tokens)
            # ascending lengths: a group's padded size is count × its last (longest) length
            sl = L[srt].tolist()
            start = 0
            for j in range(1, len(sl) + 1):
                if j == len(sl) or (j - start + 1) * sl[j] > budget:
                    groups.append(srt[start:j])
                    start = j
        order = rng.permutation(len(groups)).tolist()
        groups = [g.tolist() for g in groups]
        return [[[i] for i in groups[g]] for g in order]
    # packed
    cap = int(cfg.max_pack_tokens)
    if cfg.packer == "next_fit":
        perm = live[rng.permutation(len(live))]
        pl = perm.tolist()
        packs = [[pl[j] for j in p] for p in next_fit(L[perm], cap)]
    else:
        mix = getattr(cfg, "pack_mix", "none")
        per_step = B * int(cfg.world_size) * int(cfg.grad_accum)  # packs per optimizer step
        if mix == "window":
            packs = _windowed_bfd(live[rng.permutation(len(live))], L, cap, per_step * int(cfg.pack_window), rng)
        else:
            ll = live.tolist()
            packs = [[ll[j] for j in p] for p in best_fit_decreasing(L[live], cap)]
            packs = [packs[j] for j in rng.permutation(len(packs)).tolist()]
        for p in packs:  # order inside a pack does not change any loss; shuffle it for variety
            rng.shuffle(p)
    return [packs[j:j + B] for j in range(0, len(packs), B)]


def _windowed_bfd(order: np.ndarray, L: np.ndarray, cap: int, rows_per_window: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """BFD inside consecutive windows of the shuffled items `order`, each holding about `rows_per_window` rows'
    worth of tokens; packs shuffled within their window, windows kept in order (pack_mix=window)."""
    budget = rows_per_window * cap
    out: list[list[int]] = []
    lens = L[order]
    start, acc = 0, 0
    for j in range(len(order) + 1):
        if j == len(order) or (acc and acc + int(lens[j]) > budget):
            ids = order[start:j].tolist()
            win = [[ids[k] for k in p] for p in best_fit_decreasing(lens[start:j], cap)]
            out.extend(win[k] for k in rng.permutation(len(win)).tolist())
            start, acc = j, 0
        if j < len(order):
            acc += int(lens[j])
    return out


def _micro(rows: list[list[int]], lt: list[int], nt: list[int], padded: bool, cap: int) -> MicroBatch:
    lens = [[lt[i] for i in r] for r in rows]
    return MicroBatch(packs=rows, lengths=lens, n_target=[[nt[i] for i in r] for r in rows], padded=padded,
                      capacity=cap, row_lengths=[sum(x) for x in lens])


def _assign_ranks(units: list[MicroBatch], W: int, G: int, key: list[float] | None) -> list[list[MicroBatch]]:
    """Spread one step's micro-batches over W ranks × G micro-steps: in order (key None) or greedily by cost (LPT)."""
    ranks: list[list[MicroBatch]] = [[] for _ in range(W)]
    if key is None:
        for j, u in enumerate(units):  # micro-step k of rank r is unit k*W + r (DistributedSampler-like)
            ranks[j % W].append(u)
        return ranks
    load = [0.0] * W
    cap = -(-len(units) // W)
    for j in sorted(range(len(units)), key=lambda j: -key[j]):
        r = min((r for r in range(W) if len(ranks[r]) < cap), key=lambda r: load[r])
        ranks[r].append(units[j])
        load[r] += key[j]
    return ranks


@dataclass
class CostModel:
    """Modelled time of a micro-batch, t = a·Σlen + b·Σlen² + c: `balance="cost"` groups micro-batches of similar
    cost into one step; simulate.py runs whole plans through it (see its docstring for the constants)."""

    a: float = 1.0e-4  # seconds per token
    b: float = 2.0e-9  # seconds per token² of attention span
    c: float = 0.0  # seconds per micro-batch
    sequence_parallel: int = 1  # GPUs sharing a row: each runs T/N tokens and 1/N of the heads' attention

    @classmethod
    def from_config(cls, cfg, sequence_parallel: int = 1) -> CostModel:
        return cls(float(cfg.cost_a), float(cfg.cost_b), float(getattr(cfg, "cost_c", 0.0)),
                   max(1, int(sequence_parallel)))

    def features(self, mb) -> tuple[float, float]:
        """(linear tokens, quadratic term) the micro-batch runs: padded rows count their padding."""
        if not mb.packs:
            return 0.0, 0.0
        if mb.padded:
            L = max(mb.row_lengths)
            return float(len(mb.packs) * L), float(len(mb.packs) * L * L)
        return float(mb.tokens), float(sum(n * n for row in mb.lengths for n in row))

    def micro_batch(self, mb) -> float:
        if not mb.packs:
            return 0.0
        x, x2 = self.features(mb)
        return (self.a * x + self.b * x2) / self.sequence_parallel + self.c

    def to_dict(self) -> dict:
        out = {"a": self.a, "b": self.b, "c": self.c}
        if self.sequence_parallel > 1:
            out["sequence_parallel"] = self.sequence_parallel
        return out


def resolved_balance(cfg) -> str:
    """`balance: auto` means compute-balanced ranks (`cost`) when the plan has several ranks, else `none`.

    >>> from types import SimpleNamespace as NS
    >>> resolved_balance(NS(balance="auto", world_size=8)), resolved_balance(NS(balance="auto", world_size=1))
    ('cost', 'none')
    """
    if cfg.balance == "auto":
        return "cost" if int(cfg.world_size) > 1 else "none"
    return cfg.balance


def plan_epoch(lengths, n_target, cfg, epoch: int = 0, labels=None, sequence_parallel: int = 1) -> Plan:
    """Plan one epoch: which micro-batches each rank runs at each optimizer step. Deterministic in (cfg.seed, epoch).

    `lengths[i]`, `n_target[i]`: tokens and target tokens of dataset row i (`n_target` None: all but the first).
    `labels` (optional, a sequence of label lists) makes target counts of truncated/split items exact.
    `sequence_parallel` N (train.sequence_parallel): a plan "rank" is a group of N GPUs that splits each row, so
    a row of T tokens costs each GPU T/N tokens (and 1/N of its attention); counters record the per-GPU tokens.
    """
    check_batching_config(cfg)
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of small lists and no cycles: the cyclic collector would only rescan them
    try:
        return _plan_epoch(lengths, n_target, cfg, epoch, labels, max(1, int(sequence_parallel)))
    finally:
        if gc_was_on:
            gc.enable()


def _split_bundles(items: _Items) -> dict[int, list[int]]:
    """{dataset row: its planned pieces} for every split sequence with more than one piece left to train."""
    live = np.flatnonzero(items.lengths > 0)
    src = items.source[live]
    rows, counts = np.unique(src, return_counts=True)
    multi = set(rows[counts > 1].tolist())
    out: dict[int, list[int]] = {}
    for i, r in zip(live.tolist(), src.tolist(), strict=True):
        if r in multi:
            out.setdefault(r, []).append(i)
    return out


def _bundle_rows(pieces: list[int], B: int) -> list[list[list[int]]]:
    """The micro-batches of one split sequence: its pieces in order, one per row, `B` rows per micro-batch (a split
    sequence's rows hold nothing else, so its pieces never chain other sequences into its step)."""
    return [[[i] for i in pieces[j:j + B]] for j in range(0, len(pieces), B)]


def _fill_steps(blocks: list[list], per_step: int) -> list[list[list]]:
    """Group blocks (lists of micro-batches that must share a step) into steps of `per_step` micro-batches, in
    order. A block that does not fit in the open step opens the next one while later single blocks fill the open
    step; a block larger than `per_step` gets a step of its own size. Single blocks: plain slices of `per_step`."""
    steps, cur, n, pending = [], [], 0, []
    for b in blocks:
        if n and n + len(b) > per_step:
            pending.append(b)
        else:
            cur.append(b)
            n += len(b)
        while n >= per_step:
            steps.append(cur)
            cur, n = [], 0
            while pending and (n == 0 or n + len(pending[0]) <= per_step):
                cur.append(pending.pop(0))
                n += len(cur[-1])
    for b in pending:
        if n and n + len(b) > per_step:
            steps.append(cur)
            cur, n = [], 0
        cur.append(b)
        n += len(b)
    if cur:
        steps.append(cur)
    return steps


def _plan_epoch(lengths, n_target, cfg, epoch, labels, sequence_parallel=1) -> Plan:
    items = prepare_items(lengths, n_target, cfg, labels)
    rng = np.random.default_rng([int(cfg.seed), int(epoch)])
    strategy = cfg.strategy
    padded = strategy != "packed"
    cap = int(cfg.max_pack_tokens)
    lt, nt = items.lengths.tolist(), items.n_target.tolist()
    bundles = _split_bundles(items)  # a split sequence's pieces: planned together, trained in one step
    live = items.lengths > 0
    for pieces in bundles.values():
        live[pieces] = False
    rows = _rows_for(strategy, items, cfg, rng, np.flatnonzero(live))
    blocks = [[_micro(r, lt, nt, padded, cap)] for r in rows]
    if bundles:
        where = rng.integers(0, len(blocks) + 1, size=len(bundles)).tolist()
        extra: dict[int, list] = {}
        for pos, pieces in zip(where, bundles.values(), strict=True):
            extra.setdefault(pos, []).append([_micro(r, lt, nt, padded, cap)
                                              for r in _bundle_rows(pieces, int(cfg.batch_size))])
        blocks = [b for k in range(len(blocks) + 1) for b in extra.get(k, []) + blocks[k:k + 1]]
    W, G = int(cfg.world_size), int(cfg.grad_accum)
    per_step = W * G
    dropped = 0
    if cfg.drop_last:
        steps_ = _fill_steps(blocks, per_step)
        if steps_ and sum(map(len, steps_[-1])) < per_step:
            last = {id(b) for b in steps_[-1]}
            dropped = sum(map(len, steps_[-1]))
            blocks = [b for b in blocks if id(b) not in last]
    key_of = None
    balance = resolved_balance(cfg)
    if balance != "none":
        cm = CostModel.from_config(cfg, sequence_parallel)
        key_of = (lambda u: float(u.computed_tokens)) if balance == "tokens" else cm.micro_batch
        # regroup within windows of `balance_window` steps: similar-cost micro-batches share a step
        win = per_step * int(cfg.balance_window)
        regrouped, window, n = [], [], 0
        for b in blocks + [None]:
            if b is None or n >= win:
                regrouped.extend(sorted(window, key=lambda blk: -sum(key_of(u) for u in blk)))
                window, n = [], 0
            if b is not None:
                window.append(b)
                n += len(b)
        groups = _fill_steps(regrouped, per_step)
        full = [g for g in groups if sum(map(len, g)) >= per_step]
        tail = [g for g in groups if sum(map(len, g)) < per_step]
        order = rng.permutation(len(full))
        groups = [full[j] for j in order] + tail
    else:
        groups = _fill_steps(blocks, per_step)
    steps = []
    for s, g in enumerate(groups):
        units = [u for b in g for u in b]
        key = [key_of(u) for u in units] if key_of is not None else None
        steps.append(Step(index=s, ranks=_assign_ranks(units, W, G, key)))
    plan = Plan(strategy=strategy, packer=cfg.packer if strategy == "packed" else "", epoch=int(epoch),
                seed=int(cfg.seed), capacity=cap, batch_size=int(cfg.batch_size), grad_accum=G, world_size=W,
                steps=steps, source=items.source, lengths=items.lengths, n_target=items.n_target,
                views=items.views, counters=dict(items.counters), masked=items.masked)
    plan.counters.update(efficiency(plan))
    plan.counters["dropped_micro_batches"] = dropped
    plan.counters["oversized_steps"] = sum(1 for st in steps if sum(len(r) for r in st.ranks) > per_step)
    if sequence_parallel > 1:
        from .sequence_parallel import tokens_per_gpu  # torch: only for sequence-parallel plans

        longest = max((mb.tokens for mb in plan.micro_batches() if mb.packs), default=0)
        plan.counters["sequence_parallel"] = sequence_parallel
        plan.counters["max_tokens_per_gpu"] = tokens_per_gpu(longest, sequence_parallel)
    return plan



def _columns(ds) -> tuple:
    """(lengths, n_target, labels) of a tokenized dataset (a `datasets.Dataset` or a list of row dicts); target
    tokens counted from the labels as the loss sees them (formatting.count_targets), whatever a column says."""
    if isinstance(ds, list):
        lengths, labels = [r["length"] for r in ds], [r["labels"] for r in ds]
    else:
        lengths, labels = np.asarray(ds["length"]), ds["labels"]
    return lengths, [count_targets(y) for y in labels], labels


def make_plans(ds, cfg, epochs: float, sequence_parallel: int = 1) -> list[Plan]:
    """The plans of a training run: one per started epoch (`epochs` = train.epochs), a fractional last epoch
    keeping a prefix of its steps. `longalign pack` writes these plans and `longalign train` trains them: both
    call this function on the same dataset (inputs.training_set) with the same settings (cfg = cfg.batching,
    sequence_parallel = train.sequence_parallel: a plan rank is then a group of GPUs sharing each row)."""
    lengths, n_target, labels = _columns(ds)
    plans = []
    for e in range(max(1, math.ceil(epochs))):
        plan = plan_epoch(lengths, n_target, cfg, epoch=e, labels=labels, sequence_parallel=sequence_parallel)
        frac = epochs - e
        if frac < 1:
            plan.steps = plan.steps[:max(1, int(round(len(plan.steps) * frac)))]
        plans.append(plan)
    return plans


def plan_path(run_dir: str | Path, epoch: int) -> Path:
    """Where `longalign pack` writes epoch `epoch`'s plan: <run_dir>/plans/plan_epoch{epoch}.json."""
    return Path(run_dir) / "plans" / f"plan_epoch{epoch}.json"


def save_plans(plans: list[Plan], run_dir: str | Path) -> list[Path]:
    """Write every plan of make_plans (one JSON file per epoch); returns the paths."""
    return [write_json(plan_path(run_dir, p.epoch), p.to_dict(), indent=None) for p in plans]


def saved_plans_match(plans: list[Plan], run_dir: str | Path) -> bool | None:
    """True when <run_dir>/plans holds exactly these plans (what `pack` wrote is what is trained), False when a
    saved plan differs or is missing, None when `pack` wrote no plans there."""
    if not plan_path(run_dir, 0).exists():
        return None
    for p in plans:
        f = plan_path(run_dir, p.epoch)
        if not f.exists() or read_json(f) != json.loads(dumps_line(p.to_dict())):
            return False
    return not plan_path(run_dir, len(plans)).exists()


# ---------------------------------------------------------------------------------------------------- efficiency
def efficiency(plan: Plan) -> dict:
    """Fill rate (real tokens / reserved slots), padding fraction (pad / computed tokens), sequences per pack..."""
    tokens = slots = computed = rows = seqs = targets = n_mb = 0
    for mb in plan.micro_batches():
        if not mb.packs:
            continue
        rl = mb.row_lengths
        t, m, r = sum(rl), max(rl), len(rl)
        tokens += t
        rows += r
        n_mb += 1
        seqs += sum(map(len, mb.packs))
        targets += sum(map(sum, mb.n_target))
        slots += r * (m if mb.padded else max(mb.capacity, m))
        computed += r * m if mb.padded else t
    return {"planned_items": seqs, "tokens": tokens, "target_tokens": targets,
            "rows": rows, "micro_batches": n_mb, "steps": len(plan.steps),
            "fill_rate": tokens / slots if slots else 0.0,
            "padding_fraction": (computed - tokens) / computed if computed else 0.0,
            "seqs_per_row": seqs / rows if rows else 0.0}


def step_shares(plan: Plan, member) -> np.ndarray:
    """Per optimizer step, the share of its sequences for which `member[dataset row]` is true (e.g. the long
    records of a mix): the step-composition bias of a plan is the spread of these shares.

    >>> p = plan_epoch([9, 9, 3, 3], None, _cfg_doc(strategy="sorted", batch_size=2))
    >>> sorted(step_shares(p, np.array([True, True, False, False])).tolist())
    [0.0, 1.0]
    """
    member = np.asarray(member, dtype=bool)
    return np.array([float(member[plan.source[s.item_ids]].mean()) if s.item_ids else 0.0 for s in plan.steps])


def _cfg_doc(**kw):
    return BatchConfig(**kw)


def pack_fill(plan: Plan) -> np.ndarray:
    """Per-row fill: tokens / capacity (packed) or tokens / (longest row of its micro-batch) (padded)."""
    out = []
    for mb in plan.micro_batches():
        rl = mb.row_lengths
        denom = max(rl) if mb.padded else mb.capacity
        out.extend(r / denom for r in rl)
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------ loss weighting
def step_token_weights(step: Step, n_target=None, reduction: str = "sequence", source=None) -> dict[int, float]:
    """Per-target-token weight of every item of `step` so that the weighted loss SUM over all micro-batches and
    ranks of the step equals `reduction` (token | pack_mean | sequence). `n_target`: item id → target tokens
    (plan.n_target); None uses the counts recorded in the micro-batches. `source`: item id → dataset row
    (plan.source): under `sequence` the pieces of a split sequence are one sequence — counted once in M, each of
    its target tokens weighted 1/(M · N_total), N_total = its targets over all its pieces."""
    if reduction not in REDUCTIONS:
        raise LongAlignError(f"loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    rows: list[tuple[list[int], list[int]]] = []
    for mb in step.micro_batches():
        for p, nts in zip(mb.packs, mb.n_target, strict=False):
            rows.append((p, [int(n_target[i]) for i in p] if n_target is not None else nts))
    w: dict[int, float] = {}
    if reduction == "token":
        total = sum(sum(nts) for _, nts in rows)
        for p, nts in rows:
            for i, n in zip(p, nts, strict=False):
                w[i] = 1.0 / total if n > 0 else 0.0
    elif reduction == "sequence":
        seq = (lambda i: int(source[i])) if source is not None else (lambda i: i)  # noqa: E731
        n_seq: dict[int, int] = {}
        for p, nts in rows:
            for i, n in zip(p, nts, strict=False):
                n_seq[seq(i)] = n_seq.get(seq(i), 0) + n
        M = sum(1 for n in n_seq.values() if n > 0)
        for p, nts in rows:
            for i, n in zip(p, nts, strict=False):
                w[i] = 1.0 / (M * n_seq[seq(i)]) if n > 0 else 0.0
    else:
        P = sum(1 for _, nts in rows if sum(nts) > 0)
        for p, nts in rows:
            tot = sum(nts)
            for i, n in zip(p, nts, strict=False):
                w[i] = 1.0 / (P * tot) if tot > 0 and n > 0 else 0.0
    return w


def effective_sequence_weights(step: Step, reduction: str, n_target=None, source=None) -> dict[int, float]:
    """How much each item's MEAN token loss counts in the step loss: w_i · N_i (sums to 1 for every reduction).
    Under `sequence` every sequence gets 1/M (with `source`, the pieces of a split sequence share its 1/M);
    `token` favours long answers; `pack_mean` favours sequences whose pack has few target tokens."""
    w = step_token_weights(step, n_target, reduction, source)
    nt = {}
    for mb in step.micro_batches():
        for p, nts in zip(mb.packs, mb.n_target, strict=False):
            for i, n in zip(p, nts, strict=False):
                nt[i] = int(n_target[i]) if n_target is not None else n
    return {i: w[i] * nt[i] for i in w}


# ---------------------------------------------------------------------------------------------------- collation
def item_example(plan: Plan, item: int, row: Mapping[str, Any]) -> dict:
    """The tokens of plan item `item` from its dataset row: input_ids and labels cut to its kept ranges, labels -100
    at its masked positions (the token after a middle cut; a split piece's context); idx = the item id."""
    ids = row["input_ids"]
    r = plan.views.get(int(item))
    if r is not None:
        ids = [t for s, e in r for t in ids[s:e]]
    labels = item_labels(row["labels"], r, plan.masked.get(int(item)))
    return {"input_ids": list(ids), "labels": labels, "idx": int(item)}


def materialize(plan: Plan, mb: MicroBatch, dataset) -> list[dict]:
    """The examples of micro-batch `mb` in row order (flattened): `dataset[i]` must give input_ids and labels."""
    return [item_example(plan, i, dataset[int(plan.source[i])]) for p in mb.packs for i in p]


def _weights_for(examples: Sequence[Mapping], token_weights) -> list[float]:
    if token_weights is None:
        return [1.0] * len(examples)
    if isinstance(token_weights, (int, float)):
        return [float(token_weights)] * len(examples)
    if isinstance(token_weights, Mapping):
        try:
            return [float(token_weights[int(ex["idx"])]) for ex in examples]
        except KeyError as e:
            raise LongAlignError(f"collate: no loss weight for item {e.args[0]}; pass the weights of this step") from None
    w = list(token_weights)
    if len(w) != len(examples):
        raise LongAlignError(f"collate: {len(w)} weights for {len(examples)} examples")
    return [float(x) for x in w]


def collate_packed(examples: Sequence[Mapping], token_weights=None) -> dict:
    """Concatenate examples into one packed row [1, T] for document-isolated attention.

    Returns input_ids, labels (-100 at each sequence's first position: nothing is predicted across a boundary),
    position_ids (restart at 0 per sequence), cu_seq_lens (int32, [n+1]), max_seqlen, loss_weights (float32,
    w_i on sequence i's target tokens, 0 elsewhere). Loss = Σ_t loss_weights[t] · CE(logits[t-1], labels[t]).
    `token_weights`: {idx: w} (examples carry "idx"), a list aligned with examples, a float, or None (1.0).
    A packed micro-batch of several rows (batch_size > 1) becomes one longer row: with per-sequence attention the
    row boundaries change nothing, and `pack_mean` weights already carry them.

    One packed row of two sequences, A (2 prompt + 2 answer tokens, weight 0.5) and B (1 prompt + 2 answer tokens,
    weight 0.25; its first label is overwritten, since position 4 would otherwise predict B from A's last token):

        t              0     1     2     3  |   4     5     6
        input_ids     11    12    13    14  |  21    22    23
        labels      -100  -100    13    14  |-100    22    23
        position_ids   0     1     2     3  |   0     1     2
        loss_weights   0     0   0.5   0.5  |   0  0.25  0.25
        cu_seq_lens   [0, 4, 7]   max_seqlen 4

    >>> row = collate_packed([{"idx": 0, "input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]},
    ...                       {"idx": 1, "input_ids": [21, 22, 23], "labels": [21, 22, 23]}],
    ...                      token_weights={0: 0.5, 1: 0.25})
    >>> row["input_ids"].tolist(), row["labels"].tolist()
    ([[11, 12, 13, 14, 21, 22, 23]], [[-100, -100, 13, 14, -100, 22, 23]])
    >>> row["position_ids"].tolist(), row["loss_weights"].tolist()
    ([[0, 1, 2, 3, 0, 1, 2]], [[0.0, 0.0, 0.5, 0.5, 0.0, 0.25, 0.25]])
    >>> row["cu_seq_lens"].tolist(), row["max_seqlen"]
    ([0, 4, 7], 4)
    """
    import torch

    if not examples:
        raise LongAlignError("collate_packed: empty micro-batch")
    ws = _weights_for(examples, token_weights)
    ids, labels, pos, lw, cu = [], [], [], [], [0]
    for ex, w in zip(examples, ws, strict=False):
        x, y = list(ex["input_ids"]), list(ex["labels"])
        if len(x) != len(y) or not x:
            raise LongAlignError(f"collate: example {ex.get('idx', '?')} has {len(x)} input_ids and {len(y)} labels")
        y[0] = IGNORE
        ids.extend(x)
        labels.extend(y)
        pos.extend(range(len(x)))
        lw.extend(0.0 if t == IGNORE else w for t in y)
        cu.append(cu[-1] + len(x))
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(cu[j + 1] - cu[j] for j in range(len(cu) - 1)),
            "loss_weights": torch.tensor([lw], dtype=torch.float32)}


def collate_padded(examples: Sequence[Mapping], token_weights=None, pad_id: int = 0) -> dict:
    """Right-pad examples to the longest: input_ids, attention_mask, labels (-100 on pads and position 0),
    position_ids, loss_weights [B, L] (same loss convention as collate_packed)."""
    import torch

    if not examples:
        raise LongAlignError("collate_padded: empty micro-batch")
    ws = _weights_for(examples, token_weights)
    L = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE, dtype=torch.long)
    lw = torch.zeros((B, L), dtype=torch.float32)
    for b, (ex, w) in enumerate(zip(examples, ws, strict=False)):
        x, y = ex["input_ids"], list(ex["labels"])
        if len(x) != len(y) or not x:
            raise LongAlignError(f"collate: example {ex.get('idx', '?')} has {len(x)} input_ids and {len(y)} labels")
        y[0] = IGNORE
        n = len(x)
        ids[b, :n] = torch.as_tensor(list(x), dtype=torch.long)
        att[b, :n] = 1
        yt = torch.as_tensor(y, dtype=torch.long)
        lab[b, :n] = yt
        lw[b, :n] = (yt != IGNORE).float() * w
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "position_ids": pos, "loss_weights": lw}


def collate(plan: Plan, mb: MicroBatch, dataset, token_weights, pad_id: int = 0) -> dict:
    """collate_packed or collate_padded, whichever the plan's strategy needs."""
    exs = materialize(plan, mb, dataset)
    return collate_padded(exs, token_weights, pad_id) if mb.padded else collate_packed(exs, token_weights)


# ------------------------------------------------------------------------------------------------------- figures
def fill_histogram_figure(plans: dict[str, Plan], title: str | None = None):
    """Histogram of per-row fill (tokens / capacity for packed rows, / longest row for padded ones)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, ax = plots.figure(figsize=(7, 3.4))
    bins = np.linspace(0, 1, 41)
    for j, (name, plan) in enumerate(plans.items()):
        f = pack_fill(plan)
        color = plots.PALETTE.get(name.split("-")[0], plots.CYCLE[j % len(plots.CYCLE)])
        if name.endswith("next_fit"):
            color = plots.CYCLE[4]
        ax.hist(f, bins=bins, alpha=0.65, color=color, weights=np.full(len(f), 100.0 / max(1, len(f))),
                label=f"{name}: fill {plan.counters['fill_rate']:.1%}, {len(f):,} rows, "
                      f"{plan.counters['seqs_per_row']:.1f} seq/row")
    ax.set_xlabel("row fill (real tokens / row capacity)")
    ax.set_ylabel("% of rows")
    ax.legend(loc="upper left")
    ax.set_title(title or "Pack fill")
    return fig


def loss_weight_figure(step: Step, n_target=None, title: str | None = None, max_seqs: int = 40, source=None):
    """Per-sequence effective weight (share of the step loss given to each sequence's mean token loss) under the
    three reductions; sequences ordered by pack, labelled with their target-token count. Eq. 2 (`sequence`) is
    flat at 1/M; `token` follows N_i; `pack_mean` depends on who shares the pack. `source` (default: the step's,
    set by its Plan) maps items to dataset rows: the pieces of a split sequence share its 1/M and count once in M."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    ids, pack_of, nts = [], [], []
    rows = [(p, nt) for mb in step.micro_batches() for p, nt in zip(mb.packs, mb.n_target, strict=True)]
    for k, (p, nt) in enumerate(rows):
        for i, n in zip(p, nt, strict=True):
            ids.append(i)
            pack_of.append(k)
            nts.append(int(n_target[i]) if n_target is not None else n)
    ids, pack_of, nts = ids[:max_seqs], pack_of[:max_seqs], nts[:max_seqs]
    source = step.source if source is None else source
    eff = {r: effective_sequence_weights(step, r, n_target, source) for r in REDUCTIONS}
    fig, ax = plots.figure(figsize=(max(7, 0.28 * len(ids) + 2), 3.8))
    x = np.arange(len(ids))
    colors = {"token": plots.CYCLE[0], "pack_mean": plots.CYCLE[3], "sequence": plots.PALETTE["packed+weighting"]}
    for k, r in enumerate(REDUCTIONS):
        ax.bar(x + (k - 1) * 0.27, [eff[r][i] for i in ids], width=0.27, color=colors[r],
               label={"token": "token (HF/TRL mean over tokens)", "pack_mean": "pack_mean (paper's L′, Eq. 3)",
                      "sequence": "sequence (Eq. 2: every sequence 1/M)"}[r])
    for j in range(1, len(ids)):
        if pack_of[j] != pack_of[j - 1]:
            ax.axvline(j - 0.5, color="#bbbbbb", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([str(n) for n in nts], rotation=90, fontsize=7)
    ax.set_xlabel("sequences of one optimizer step, by pack (dotted lines); label = target tokens N_i")
    ax.set_ylabel("share of the step loss")
    ax.set_ylim(0, max(max(v.values()) for v in eff.values()) * 1.45)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.98), ncol=3, fontsize=7.5)
    m = len({int(source[i]) for i in step.item_ids}) if source is not None else step.n_items
    ax.set_title(title or f"Effective loss weight per sequence (M = {m} sequences in the step)")
    return fig
