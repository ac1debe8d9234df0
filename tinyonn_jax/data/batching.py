"""Static-shape batches: power-of-two length buckets, first-fit packing, resumable streaming.

A batch is a dict of numpy arrays, all of shape (B, T) with T one of the buckets::

    inputs       int32    token ids (PAD on padding)
    targets      int32    next token of the same sequence (PAD at its end and on padding)
    weights      float32  loss weight of each target (0 on padding)
    segment_ids  int32    0 on padding, k = 1, 2, ... for the k-th sequence packed in the row
    positions    int32    position inside its own sequence (0 on padding)

Attention must not cross segments (mask with ``segment_ids``), and rotary positions come from
``positions``, so a packed sequence sees exactly what it would see alone. Targets are shifted per
sequence before packing, so no sequence is ever trained to predict the next one's ``bos``.

Sequences longer than ``max_len`` are skipped and counted, never truncated: truncation would
cut the answer (which sits at the end) and train on an unanswerable prompt.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tinyonn_jax.data.augment import SWAPS_AXES, View, sample_views
from tinyonn_jax.data.tasks import Task
from tinyonn_jax.data.tokenizer import PAD, grid_token_count, serialize_task

Batch = dict[str, np.ndarray]
Sequence3 = tuple[np.ndarray, np.ndarray, np.ndarray]  # (tokens, targets, weights), each (L,)
RowPlan = tuple[int, ...]  # item indices packed into one row
BatchPlan = tuple[int, tuple[RowPlan, ...]]  # (bucket length T, B rows)


def bucket_sizes(min_bucket: int, max_len: int) -> tuple[int, ...]:
    """Row lengths ``min_bucket * 2**k`` below ``max_len``, then ``max_len`` itself.

    With power-of-two ``min_bucket`` and ``max_len`` these are exactly the powers of two between
    them; a non-power-of-two ``max_len`` is kept as the last bucket so nothing that fits
    ``max_len`` is ever skipped.
    """
    if min_bucket <= 0 or max_len <= 0:
        raise ValueError(f"min_bucket and max_len must be > 0, got {min_bucket}, {max_len}")
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; ``ValueError`` if none is (caller skips the sequence)."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def plan_batches(
    lengths: Sequence[int], batch_size: int, buckets: Sequence[int], lookahead: int = 64
) -> list[BatchPlan]:
    """Pack items (by length, in order) into batches of ``batch_size`` rows.

    Each batch takes the bucket that fits the longest of the next ``batch_size`` pending items,
    then fills its rows first-fit from the next ``lookahead`` pending items, so short sequences
    fill the tail of rows. Items that do not fit wait for a later batch; every item appears in
    exactly one batch (the caller must drop items longer than the largest bucket beforehand).
    """
    if lookahead < batch_size:
        raise ValueError(f"lookahead={lookahead} must be >= batch_size={batch_size}")
    n = len(lengths)
    taken = np.zeros(n, dtype=bool)
    head, plans = 0, []
    while True:
        while head < n and taken[head]:
            head += 1
        if head == n:
            return plans
        window = []
        j = head
        while j < n and len(window) < lookahead:
            if not taken[j]:
                window.append(j)
            j += 1
        t = pick_bucket(max(lengths[i] for i in window[:batch_size]), buckets)
        free = [t] * batch_size
        rows: list[list[int]] = [[] for _ in range(batch_size)]
        for i in window:
            for r in range(batch_size):
                if lengths[i] <= free[r]:
                    rows[r].append(i)
                    free[r] -= lengths[i]
                    taken[i] = True
                    break
        plans.append((t, tuple(tuple(r) for r in rows)))


def build_batch(rows: Sequence[Sequence[Sequence3]], length: int) -> Batch:
    """Pack rows of serialised sequences into one (B, T=length) batch dict (see module doc)."""
    b = len(rows)
    inputs = np.full((b, length), PAD, np.int32)
    targets = np.full((b, length), PAD, np.int32)
    weights = np.zeros((b, length), np.float32)
    segment_ids = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    for r, seqs in enumerate(rows):
        at = 0
        for k, (tok, tgt, w) in enumerate(seqs, start=1):
            n = tok.size
            if at + n > length:
                raise ValueError(f"row {r} overflows: {at + n} tokens > bucket {length}")
            inputs[r, at : at + n] = tok
            targets[r, at : at + n] = tgt
            weights[r, at : at + n] = w
            segment_ids[r, at : at + n] = k
            positions[r, at : at + n] = np.arange(n)
            at += n
    return {
        "inputs": inputs,
        "targets": targets,
        "weights": weights,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def padding_waste(batch: Batch) -> float:
    """Fraction of the batch's token slots that are padding."""
    return float((batch["segment_ids"] == 0).mean())


def pack_sequences(
    seqs: Sequence[Sequence3], batch_size: int, min_bucket: int, max_len: int
) -> tuple[list[Batch], int]:
    """Pack a fixed list of sequences (e.g. an evaluation set) into batches.

    Returns ``(batches, n_skipped)`` where ``n_skipped`` counts sequences longer than
    ``max_len``; every other token appears in exactly one batch.
    """
    buckets = bucket_sizes(min_bucket, max_len)
    keep = [s for s in seqs if s[0].size <= max_len]
    plans = plan_batches(
        [s[0].size for s in keep], batch_size, buckets, lookahead=max(64, batch_size)
    )
    batches = [build_batch([[keep[i] for i in row] for row in rows], t) for t, rows in plans]
    return batches, len(seqs) - len(keep)


def view_sequence_length(task: Task, view: View, test_index: int) -> int:
    """Length of ``serialize_task(view.apply(task), test_index)`` without building it."""
    swap = SWAPS_AXES[view.transform]
    n = 2  # bos, eos
    for inp, out in (*task.train, task.test[test_index]):
        for g in (inp, out):
            h, w = (g.shape[1], g.shape[0]) if swap else g.shape
            n += grid_token_count(h, w) + 2  # the grid's ims and ime
    return n


class BatchStream:
    """Endless, resumable stream of augmented, packed batches over ``tasks``.

    Each epoch holds ``views_per_task`` augmentation views of every task (one identity view if
    ``augment`` is false); view ``v`` of a task trains on test pair ``v mod (#known test
    outputs)``, so tasks with several test pairs use all of them. Views and the epoch's order
    depend only on ``(seed, epoch)``, so any epoch can be rebuilt from scratch.

    Iterating yields ``(batch, position)``, where ``position = {"epoch": e, "index": i}`` is the
    cursor *after* this batch: a new ``BatchStream(tasks, config, seed=..., start=position)``
    yields exactly the batch that would have come next. Store it with the checkpoint.

    ``config`` is any object with ``max_len``, ``batch_size``, ``min_bucket``, ``augment``,
    ``views_per_task`` and ``seed`` (e.g. ``DataConfig``); ``batch_size`` is the global batch.

    ``rows`` (default: all) are the global row indices this stream builds, in the order given:
    a process of a multi-process run builds only its own rows (``parallel.local_rows``) of
    every global batch. The plan of every batch (which sequences go into which row of which
    bucket) is global: it needs only the sequences' lengths, which are cheap, and is the same
    for any ``rows``; only the chosen rows are serialised and packed. The position is therefore
    the same on every process, and a stream started at a saved position with other ``rows``
    (e.g. another process count) continues the same global stream.

    Counters, all global (from the plan, equal on every process whatever its ``rows``):
    ``skipped`` (a ``Counter`` of skipped sequences by reason, over the epochs built since
    construction), ``skipped_tasks`` (task id -> reason), ``padding_waste`` (pad fraction of
    all yielded global batches), ``batch_tokens`` (non-padding tokens of the last global
    batch).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        config: Any,
        *,
        seed: int | None = None,
        start: dict[str, int] | None = None,
        shuffle: bool = True,
        lookahead: int = 64,
        rows: Sequence[int] | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("BatchStream needs at least one task")
        self.tasks = list(tasks)
        self.max_len = int(config.max_len)
        self.batch_size = int(config.batch_size)
        self.views_per_task = int(config.views_per_task) if config.augment else 1
        self.augment = bool(config.augment)
        self.seed = int(config.seed if seed is None else seed)
        self.shuffle = shuffle
        self.lookahead = max(lookahead, self.batch_size)
        self.buckets = bucket_sizes(int(config.min_bucket), self.max_len)
        self.rows = np.arange(self.batch_size) if rows is None else np.asarray(rows, np.int64)
        if (self.rows.ndim != 1 or not self.rows.size or len(set(self.rows.tolist()))
                != self.rows.size or self.rows.min() < 0 or self.rows.max() >= self.batch_size):
            raise ValueError(f"rows must be distinct row indices in [0, {self.batch_size}), "
                             f"got {rows}")
        self.batch_tokens = 0
        self.skipped: Counter[str] = Counter()
        self.skipped_tasks: dict[str, str] = {}
        self._pad_slots = 0
        self._slots = 0
        start = start or {"epoch": 0, "index": 0}
        if set(start) != {"epoch", "index"} or min(start.values()) < 0:
            raise ValueError(f"start must be {{'epoch': e >= 0, 'index': i >= 0}}, got {start}")
        self._epoch = -1
        self._load_epoch(int(start["epoch"]))
        if start["index"] > len(self._plans):
            raise ValueError(
                f"start index {start['index']} is past the end of epoch "
                f"{start['epoch']} ({len(self._plans)} batches)"
            )
        self._index = int(start["index"])

    # -- epoch construction ----------------------------------------------------------------
    def _views(self, epoch: int, ti: int) -> list[View]:
        if not self.augment:
            return [View()]
        rng = np.random.default_rng([self.seed, epoch, ti])
        return sample_views(self.tasks[ti], self.views_per_task, rng)

    def _skip(self, task: Task, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_tasks.setdefault(task.task_id, reason)

    def _load_epoch(self, epoch: int) -> None:
        known_skips = len(self.skipped_tasks)
        items: list[tuple[int, View, int]] = []  # (task index, view, test index)
        for ti, task in enumerate(self.tasks):
            known = [j for j, (_, out) in enumerate(task.test) if out is not None]
            if not known:
                self._skip(task, "no_test_output")
                continue
            for v, view in enumerate(self._views(epoch, ti)):
                items.append((ti, view, known[v % len(known)]))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1 << 20]).permutation(len(items))
            items = [items[i] for i in order]
        lengths = [view_sequence_length(self.tasks[ti], view, j) for ti, view, j in items]
        kept = []
        for item, n in zip(items, lengths, strict=True):
            if n > self.max_len:
                self._skip(self.tasks[item[0]], "too_long")
            else:
                kept.append((item, n))
        if len(self.skipped_tasks) > known_skips:  # warn once per newly affected set, not per epoch
            new = list(self.skipped_tasks.items())[known_skips:]
            warnings.warn(
                f"BatchStream epoch {epoch}: {len(new)} more task(s) skipped in whole or "
                f"part (e.g. {new[0][0]!r}: {new[0][1]}); totals {dict(self.skipped)}",
                stacklevel=3,
            )
        if not kept:
            raise ValueError(
                f"no usable sequence in epoch {epoch}: all {len(items)} exceed "
                f"max_len={self.max_len} or lack a test output"
            )
        self._items = [it for it, _ in kept]
        self._lengths = [n for _, n in kept]
        self._plans = plan_batches(
            [n for _, n in kept], self.batch_size, self.buckets, self.lookahead
        )
        self._epoch = epoch

    def num_batches(self) -> int:
        """Number of batches in the current epoch."""
        return len(self._plans)

    @property
    def position(self) -> dict[str, int]:
        """Cursor of the next batch (what to pass as ``start`` to resume here)."""
        if self._index >= len(self._plans):
            return {"epoch": self._epoch + 1, "index": 0}
        return {"epoch": self._epoch, "index": self._index}

    @property
    def padding_waste(self) -> float:
        """Pad fraction over all global batches yielded so far (0.0 before the first)."""
        return self._pad_slots / self._slots if self._slots else 0.0

    # -- iteration -------------------------------------------------------------------------
    def _sequence(self, item: tuple[int, View, int]) -> Sequence3:
        ti, view, j = item
        return serialize_task(view.apply(self.tasks[ti]), j)

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, int]]]:
        return self

    def __next__(self) -> tuple[Batch, dict[str, int]]:
        if self._index >= len(self._plans):
            self._load_epoch(self._epoch + 1)
            self._index = 0
        t, plan = self._plans[self._index]
        batch = build_batch([[self._sequence(self._items[i]) for i in plan[r]]
                             for r in self.rows], t)
        self._index += 1
        self.batch_tokens = sum(self._lengths[i] for row in plan for i in row)
        self._pad_slots += t * self.batch_size - self.batch_tokens
        self._slots += t * self.batch_size
        return batch, self.position
