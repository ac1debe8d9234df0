"""Batching: static shapes, packing keeps every token, no silent truncation, exact resume."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest

from tinyonn_jax.config import DataConfig
from tinyonn_jax.data.augment import sample_views
from tinyonn_jax.data.batching import (
    BatchStream,
    bucket_sizes,
    build_batch,
    pack_sequences,
    padding_waste,
    pick_bucket,
    plan_batches,
    view_sequence_length,
)
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.data.tokenizer import BOS, EOS, PAD, serialize_task

# Skipping over-long sequences is expected with these small max_len values.
pytestmark = pytest.mark.filterwarnings("ignore:BatchStream epoch")

KEYS = {
    "inputs": np.int32,
    "targets": np.int32,
    "weights": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}


@functools.cache
def small_tasks(n: int = 24) -> list[Task]:
    return list(load_tasks("arc1", "train", max_tasks=n))


def unpack(batch: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Recover every packed sequence from a batch using only segment_ids."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        for k in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == k)
            assert idx.size and (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(idx.size))
            out.append(tuple(batch[key][r, idx] for key in ("inputs", "targets", "weights")))
        pad = seg == 0
        assert (batch["inputs"][r, pad] == PAD).all() and (batch["weights"][r, pad] == 0).all()
        assert (batch["positions"][r, pad] == 0).all()
    return out


def test_buckets() -> None:
    assert bucket_sizes(64, 4096) == (64, 128, 256, 512, 1024, 2048, 4096)
    assert bucket_sizes(64, 1000) == (64, 128, 256, 512, 1000)
    assert bucket_sizes(512, 256) == (256,)
    assert pick_bucket(65, (64, 128)) == 128 and pick_bucket(64, (64, 128)) == 64
    with pytest.raises(ValueError, match="exceeds"):
        pick_bucket(129, (64, 128))


def test_plan_places_every_item_once_within_capacity() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, 300).tolist()
    buckets = bucket_sizes(32, 512)
    plans = plan_batches(lengths, 3, buckets, lookahead=16)
    seen = sorted(i for _, rows in plans for row in rows for i in row)
    assert seen == list(range(300))
    for t, rows in plans:
        assert t in buckets and len(rows) == 3
        assert all(sum(lengths[i] for i in row) <= t for row in rows)


def test_pack_keeps_every_token_and_skips_long_ones() -> None:
    seqs = [serialize_task(t, j) for t in small_tasks() for j in range(len(t.test))]
    max_len = 1024
    batches, skipped = pack_sequences(seqs, batch_size=2, min_bucket=128, max_len=max_len)
    long = [s for s in seqs if s[0].size > max_len]
    assert skipped == len(long) > 0
    got = [s for b in batches for s in unpack(b)]
    key = lambda s: s[0].tobytes()  # noqa: E731
    expected = sorted((s for s in seqs if s[0].size <= max_len), key=key)
    got = sorted(got, key=key)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for b in batches:
        assert {k: v.dtype for k, v in b.items()} == KEYS
        assert b["inputs"].shape[1] in bucket_sizes(128, max_len)
    # Packing beats one sequence per row: at most half the row slots are padding here.
    waste = np.mean([padding_waste(b) for b in batches])
    assert 0.0 <= waste < 0.5


def test_build_batch_rejects_overflow() -> None:
    seq = serialize_task(small_tasks()[0])
    with pytest.raises(ValueError, match="overflows"):
        build_batch([[seq]], seq[0].size - 1)


def test_view_sequence_length_matches_serialisation() -> None:
    for task in small_tasks():
        for view in sample_views(task, 8, np.random.default_rng(0)):
            for j in range(len(task.test)):
                assert (
                    view_sequence_length(task, view, j)
                    == serialize_task(view.apply(task), j)[0].size
                )


def cfg(**kw) -> DataConfig:
    base = dict(max_len=2048, batch_size=2, min_bucket=256, views_per_task=2, seed=3)
    return DataConfig(**{**base, **kw})


def take(stream: BatchStream, n: int) -> list[tuple[dict, dict]]:
    return [next(stream) for _ in range(n)]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_stream_epoch_is_complete_and_untruncated() -> None:
    tasks = small_tasks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = BatchStream(tasks, cfg(max_len=1024))
    n = stream.num_batches()
    seqs = [s for b, _ in take(stream, n) for s in unpack(b)]
    for tok, tgt, w in seqs:  # each packed sequence is whole: bos ... eos
        assert tok[0] == BOS and tok[-1] == EOS and tgt[-1] == PAD
        np.testing.assert_array_equal(tgt[:-1], tok[1:])
        assert w.sum() > 0
    assert len(seqs) + stream.skipped["too_long"] == len(tasks) * 2
    assert stream.skipped["too_long"] > 0 and stream.skipped_tasks  # skip path exercised
    assert 0.0 < stream.padding_waste < 0.5
    assert stream.position == {"epoch": 1, "index": 0}


def test_stream_resume_gives_identical_batches() -> None:
    tasks = small_tasks()
    c = cfg()
    stream = BatchStream(tasks, c)
    n0 = stream.num_batches()
    run = take(stream, n0 + 4)  # crosses into epoch 1
    for cut in (0, 1, n0 - 1, n0, n0 + 1):
        pos = run[cut][1]
        resumed = BatchStream(tasks, c, start=pos)
        for (b, p), (b_ref, p_ref) in zip(take(resumed, 2), run[cut + 1 : cut + 3], strict=True):
            assert_same(b, b_ref)
            assert p == p_ref


def test_stream_is_deterministic_and_seeded() -> None:
    tasks = small_tasks(8)
    a = take(BatchStream(tasks, cfg()), 3)
    b = take(BatchStream(tasks, cfg()), 3)
    c = take(BatchStream(tasks, cfg(), seed=4), 3)
    for (x, _), (y, _) in zip(a, b, strict=True):
        assert_same(x, y)
    assert any(
        x["inputs"].shape != z["inputs"].shape or (x["inputs"] != z["inputs"]).any()
        for (x, _), (z, _) in zip(a, c, strict=True)
    )


def test_stream_epochs_differ_and_augment_off_is_plain() -> None:
    tasks = small_tasks(8)
    plain = BatchStream(tasks, cfg(augment=False), shuffle=False)
    got = [s[0] for b, _ in take(plain, plain.num_batches()) for s in unpack(b)]
    expected = [x for x in (serialize_task(t)[0] for t in tasks) if x.size <= 2048]
    assert plain.skipped["too_long"] == len(tasks) - len(expected)
    assert sorted(x.tobytes() for x in got) == sorted(x.tobytes() for x in expected)
    aug = BatchStream(tasks, cfg())
    e0 = take(aug, aug.num_batches())
    e1 = take(aug, 1)
    assert e0[-1][1] == {"epoch": 1, "index": 0} and e1[0][1]["epoch"] == 1
    assert e0[0][0]["inputs"].tobytes() != e1[0][0]["inputs"].tobytes()


def test_stream_skips_tasks_without_answers_and_rejects_bad_start() -> None:
    t = small_tasks()[0]
    hidden = dataclasses.replace(t, task_id="hidden", test=((t.test[0][0], None),))
    with pytest.warns(UserWarning, match="no_test_output"):
        stream = BatchStream([hidden, t], cfg())
    assert stream.skipped_tasks == {"hidden": "no_test_output"}
    with pytest.raises(ValueError, match="past the end"):
        BatchStream([t], cfg(), start={"epoch": 0, "index": 99})
    with pytest.raises(ValueError, match="start"):
        BatchStream([t], cfg(), start={"epoch": 0})
    with pytest.raises(ValueError, match="no usable sequence"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BatchStream([t], cfg(max_len=64, min_bucket=64))
