"""The global epoch plan: which sample every rank takes at every step, as pure arithmetic.

For one source and one epoch the *global sequence* is a pure function of (seed, source index, epoch,
manifest sample counts), never of Python's hash seed, the world size or worker start order:

    raw sequence   shards in an order permuted by (seed, source, epoch) (drawn with replacement in
                   ``resampled`` mode), each shard's samples in file order, numbered 0..N-1
    sigma sequence the raw sequence cut into windows of ``window`` positions, each window permuted
                   by (seed, source, epoch, window index): a uniform shuffle inside the window

The data position of a source is the set of sigma positions already consumed in its current epoch
(a sorted list of disjoint intervals): world-size independent. A layout (world size) continues from it
like this: the unconsumed positions, in sigma order, form the remaining sequence rho of length R; rank r
owns rho[r*T:(r+1)*T] with T = R // world_size, and every rank consumes its segment at the same pace
(lock-step), so all ranks always hold the same number of batches. The last R % world_size positions
are dropped when the epoch ends (counted in ``dropped``): at most world_size - 1 samples per epoch.

Several sources are mixed per step: each rank's batch of b samples is split into per-source counts by
largest remainder on the cumulative requested weights (the same on every rank), so the observed
proportions track the requested ones to within one sample per source and rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

# Leading domain tags keep the seed streams apart even when their other entries coincide.
TAG_SHARDS, TAG_WINDOW, TAG_AUGMENT = 1, 2, 3

Intervals = list[tuple[int, int]]  # sorted, disjoint, non-empty [start, stop) ranges


def merge_intervals(intervals: Sequence[tuple[int, int]]) -> Intervals:
    """Sort and merge overlapping or touching ranges; drop empty ones."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def complement(intervals: Intervals, total: int) -> Intervals:
    """The ranges of [0, total) not covered by ``intervals``."""
    out, pos = [], 0
    for a, b in intervals:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < total:
        out.append((pos, total))
    return out


class EpochPlan:
    """The global sample sequence of one source in one epoch."""

    def __init__(self, counts: Sequence[int], seed: int, source: int, epoch: int, window: int,
                 resampled: bool = False) -> None:
        n = len(counts)
        rng = np.random.default_rng([TAG_SHARDS, seed, source, epoch])
        self.shards = rng.integers(0, n, n) if resampled else rng.permutation(n)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64)[self.shards])])
        self.total = int(self.offsets[-1])
        self.window = max(1, int(window))
        self.seed, self.source, self.epoch = seed, source, epoch

    @lru_cache(maxsize=64)
    def _window_perm(self, w: int) -> np.ndarray:
        size = min(self.window, self.total - w * self.window)
        return np.random.default_rng([TAG_WINDOW, self.seed, self.source, self.epoch, w]).permutation(size)

    def raw(self, sigma: np.ndarray) -> np.ndarray:
        """Raw positions (shard-order, file-order numbering) of sigma positions."""
        sigma = np.asarray(sigma, dtype=np.int64)
        out = np.empty_like(sigma)
        windows = sigma // self.window
        for w in np.unique(windows):
            sel = windows == w
            base = int(w) * self.window
            out[sel] = base + self._window_perm(int(w))[sigma[sel] - base]
        return out

    def locate(self, raw: int) -> tuple[int, int]:
        """(index into the epoch's shard order, sample index inside that shard) of a raw position."""
        j = int(np.searchsorted(self.offsets, raw, side="right")) - 1
        return j, int(raw - self.offsets[j])


def rho_ranges(free: Intervals, start: int, stop: int) -> Intervals:
    """Sigma ranges of remaining-sequence indices [start, stop) given the free (unconsumed) ranges."""
    out, seen = [], 0
    for a, b in free:
        length = b - a
        lo, hi = max(start - seen, 0), min(stop - seen, length)
        if lo < hi:
            out.append((a + lo, a + hi))
        seen += length
        if seen >= stop:
            break
    return out


def rho_to_sigma(free: Intervals, start: int, stop: int) -> np.ndarray:
    """Sigma positions of remaining-sequence indices [start, stop)."""
    parts = [np.arange(a, b, dtype=np.int64) for a, b in rho_ranges(free, start, stop)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def split_batch(batch_size: int, weights: Sequence[float], taken: Sequence[int], total: int,
                world_size: int) -> list[int]:
    """Per-source counts (summing to ``batch_size``) for one rank's next batch.

    ``taken``/``total``: global samples delivered so far per source / overall. The target for each
    source is its weight times the global total after this step; counts are the floors of the per-rank
    share plus one extra for the largest remainders (lowest source index on ties): deterministic and
    the same on every rank.
    """
    after = total + batch_size * world_size
    want = [max(0.0, (w * after - t) / world_size) for w, t in zip(weights, taken)]
    scale = batch_size / sum(want) if sum(want) > 0 else 0.0
    want = [x * scale for x in want] if scale else [batch_size * w for w in weights]
    counts = [int(np.floor(x)) for x in want]
    order = sorted(range(len(want)), key=lambda i: (-(want[i] - counts[i]), i))
    for i in order[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class SourceCursor:
    """Where one rank stands in one source's current epoch under the current layout."""

    counts: np.ndarray  # int64 per shard: one buffer, no Python int per shard
    index: int  # source index (part of the seed)
    epoch: int
    consumed: Intervals  # sigma ranges consumed before this layout started
    seed: int
    window: int
    resampled: bool
    rank: int
    world_size: int
    done: int = 0  # samples this rank (and every rank) consumed from its segment under this layout
    dropped: int = 0  # samples dropped at epoch ends so far (global)
    plan: EpochPlan = field(init=False)
    free: Intervals = field(init=False)
    per_rank: int = field(init=False)

    def __post_init__(self) -> None:
        self._start_layout()

    def _start_layout(self) -> None:
        self.plan = EpochPlan(self.counts, self.seed, self.index, self.epoch, self.window, self.resampled)
        self.consumed = merge_intervals(self.consumed)
        self.free = complement(self.consumed, self.plan.total)
        remaining = sum(b - a for a, b in self.free)
        self.per_rank = remaining // self.world_size
        self.done = 0

    def take(self, n: int) -> list[tuple[int, np.ndarray]]:
        """Advance by ``n`` samples; return ``[(epoch, sigma positions)]`` of this rank's share."""
        out = []
        while n > 0:
            if self.done == self.per_rank:
                self._next_epoch()
                continue
            k = min(n, self.per_rank - self.done)
            start = self.rank * self.per_rank + self.done
            out.append((self.epoch, rho_to_sigma(self.free, start, start + k)))
            self.done += k
            n -= k
        return out

    def _next_epoch(self) -> None:
        remaining = sum(b - a for a, b in self.free)
        self.dropped += remaining - self.per_rank * self.world_size
        self.epoch += 1
        self.consumed = []
        self._start_layout()
        if self.per_rank == 0:
            raise ValueError(f"source {self.index}: an epoch of {self.plan.total} samples gives nothing to "
                             f"each of {self.world_size} ranks")

    def consumed_global(self) -> Intervals:
        """Sigma ranges consumed in the current epoch by all ranks together (world-size independent)."""
        spans = list(self.consumed)
        for r in range(self.world_size):
            start = r * self.per_rank
            spans += rho_ranges(self.free, start, start + self.done)
        return merge_intervals(spans)


class RankSchedule:
    """One rank's batches, step by step: per-source counts and the sigma positions of each part.

    Every DataLoader worker and the main process run their own copy from the same starting state, so
    they agree on batch ``i`` without talking to each other; only arithmetic is repeated.
    """

    def __init__(self, counts: Sequence[Sequence[int]], weights: Sequence[float], batch_size: int, *, seed: int,
                 window: int, resampled: bool, rank: int, world_size: int, state: list[dict] | None = None,
                 total: int = 0) -> None:
        self.weights = [float(w) / sum(weights) for w in weights]
        self.batch_size, self.world_size = batch_size, world_size
        state = state or [{"epoch": 0, "consumed": [], "taken": 0, "dropped": 0} for _ in counts]
        self.cursors = [
            SourceCursor(np.asarray(c, dtype=np.int64), i, int(st["epoch"]), pairs(st["consumed"]), seed, window,
                         resampled, rank, world_size, dropped=int(st["dropped"]))
            for i, (c, st) in enumerate(zip(counts, state))]
        self.taken = [int(st["taken"]) for st in state]
        self.total = int(total)

    def next(self) -> list[tuple[int, int, np.ndarray]]:
        """``[(source, epoch, sigma positions)]`` of this rank's next batch, in batch order."""
        parts = []
        split = split_batch(self.batch_size, self.weights, self.taken, self.total, self.world_size)
        for s, n in enumerate(split):
            if n:
                parts += [(s, epoch, sigma) for epoch, sigma in self.cursors[s].take(n)]
            self.taken[s] += n * self.world_size
        self.total += self.batch_size * self.world_size
        return parts

    def state(self) -> list[dict]:
        """Per source: epoch, consumed sigma ranges (flat list), global samples taken, dropped at epoch ends."""
        return [{"epoch": c.epoch, "consumed": [x for ab in c.consumed_global() for x in ab],
                 "taken": t, "dropped": c.dropped} for c, t in zip(self.cursors, self.taken)]


def pairs(flat: Sequence[int]) -> Intervals:
    """``[a0, b0, a1, b1, ...]`` -> ``[(a0, b0), (a1, b1), ...]`` (the saved form is a flat int list)."""
    if len(flat) % 2:
        raise ValueError("consumed ranges must be an even-length list")
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
