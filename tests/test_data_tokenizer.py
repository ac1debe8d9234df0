"""Tokenizer: exact grid round trips on every real task, loss weights, malformed generations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyonn_jax.data import tokenizer as tk
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.data.tokenizer import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    NEWLINE,
    PAD,
    MalformedGrid,
    decode_generation,
    grid_to_tokens,
    sequence_length,
    serialize_prompt,
    serialize_task,
    tokens_to_grid,
)

SETS = [("arc1", "train"), ("arc1", "eval"), ("arc2", "train"), ("arc2", "eval")]


def test_vocabulary_layout() -> None:
    assert (PAD, BOS, EOS, tk.PROBLEM, tk.SOLUTION, NEWLINE, IM_START, IM_END) == tuple(range(8))
    assert tk.COLOR_OFFSET == 8 and tk.VOCAB_SIZE == 18 and len(tk.TOKEN_NAMES) == 18


def test_grid_layout_has_no_trailing_separator() -> None:
    toks = grid_to_tokens(np.array([[1, 2, 3], [4, 5, 6]]))
    np.testing.assert_array_equal(toks, [9, 10, 11, NEWLINE, 12, 13, 14])
    assert toks.dtype == np.int32


def _split_blocks(tokens: np.ndarray) -> list[np.ndarray]:
    """Contents of every [ims] ... [ime] block, found by scanning (independent of the encoder)."""
    blocks, start = [], None
    for i, t in enumerate(tokens.tolist()):
        if t == IM_START:
            assert start is None
            start = i + 1
        elif t == IM_END:
            blocks.append(tokens[start:i])
            start = None
    return blocks


@pytest.mark.parametrize("source,split", SETS)
def test_every_real_task_round_trips(source: str, split: str) -> None:
    for task in load_tasks(source, split):
        for j in range(len(task.test)):
            tokens, _, _ = serialize_task(task, j)
            assert tokens.size == sequence_length(task, j)
            assert tokens[0] == BOS and tokens[-1] == EOS
            expected = [g for pair in (*task.train, task.test[j]) for g in pair]
            blocks = _split_blocks(tokens[1:-1])
            assert len(blocks) == len(expected)
            for block, grid in zip(blocks, expected, strict=True):
                back = tokens_to_grid(block)
                assert back.dtype == np.int8
                np.testing.assert_array_equal(back, grid)


def _independent_weights(task: Task, test_index: int) -> np.ndarray:
    """Expected weights built by walking the pieces by hand, without the serializer."""
    pairs = (*task.train, task.test[test_index])
    label: list[int] = [0]  # bos
    for inp, out in pairs:
        h, w = inp.shape
        label += [0] * (1 + h * w + h - 1 + 1)  # ims IN ime: never predicted
        h, w = out.shape
        label += [0] + [1] * (h * w + h - 1) + [1]  # ims (not predicted) OUT ime
    label.append(1)  # eos
    label_arr = np.array(label, np.float32)
    return np.append(label_arr[1:], 0.0)  # weight t belongs to target t = token t + 1


@pytest.mark.parametrize("source,split", SETS[:2])
def test_weights_mark_exactly_the_outputs(source: str, split: str) -> None:
    for task in load_tasks(source, split):
        tokens, targets, weights = serialize_task(task, len(task.test) - 1)
        assert tokens.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
        np.testing.assert_array_equal(targets[:-1], tokens[1:])
        assert targets[-1] == PAD and weights[-1] == 0.0
        np.testing.assert_array_equal(weights, _independent_weights(task, len(task.test) - 1))


def test_weighted_targets_of_a_small_task() -> None:
    inp, out = np.array([[1]], np.int8), np.array([[2, 3]], np.int8)
    task = Task("x", train=((inp, out),), test=((out, inp),))
    tokens, targets, weights = serialize_task(task)
    c = lambda v: 8 + v  # noqa: E731
    assert tokens.tolist() == [
        BOS,
        IM_START,
        c(1),
        IM_END,
        IM_START,
        c(2),
        c(3),
        IM_END,
        IM_START,
        c(2),
        c(3),
        IM_END,
        IM_START,
        c(1),
        IM_END,
        EOS,
    ]
    weighted = targets[weights == 1].tolist()
    assert weighted == [c(2), c(3), IM_END, c(1), IM_END, EOS]


def test_prompt_is_prefix_and_leaks_no_answer_size() -> None:
    task = load_tasks("arc1", max_tasks=5)[4]
    tokens, _, _ = serialize_task(task)
    prompt = serialize_prompt(task)
    np.testing.assert_array_equal(prompt, tokens[: prompt.size])
    assert prompt[-2:].tolist() == [IM_END, IM_START]
    # A different answer (other shape) leaves the prompt unchanged.
    other = Task(task.task_id, task.train, ((task.test[0][0], np.zeros((7, 3), np.int8)),))
    np.testing.assert_array_equal(serialize_prompt(other), prompt)
    assert tk.max_answer_tokens() == 30 * 30 + 29 + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_random_grids_round_trip(h: int, w: int, seed: int) -> None:
    grid = np.random.default_rng(seed).integers(0, 10, (h, w)).astype(np.int8)
    toks = grid_to_tokens(grid)
    assert toks.size == tk.grid_token_count(h, w)
    np.testing.assert_array_equal(tokens_to_grid(toks), grid)


def _c(*vals: int) -> list[int]:
    return [8 + v for v in vals]


MALFORMED = {
    "empty": ([], "empty"),
    "bos_inside": (_c(1) + [BOS] + _c(2), "bad_token"),
    "unused_token": (_c(1, 2) + [tk.PROBLEM], "bad_token"),
    "out_of_vocab": (_c(1) + [18], "bad_token"),
    "negative": ([-1] + _c(1), "bad_token"),
    "trailing_separator": (_c(1, 2) + [NEWLINE], "empty_row"),
    "leading_separator": ([NEWLINE] + _c(1, 2), "empty_row"),
    "double_separator": (_c(1) + [NEWLINE, NEWLINE] + _c(1), "empty_row"),
    "only_separator": ([NEWLINE], "empty_row"),
    "ragged": (_c(1, 2) + [NEWLINE] + _c(3), "ragged"),
    "too_wide": (_c(*([0] * 31)), "too_large"),
    "too_tall": ((_c(0) + [NEWLINE]) * 30 + _c(0), "too_large"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_generation_has_a_reason(name: str) -> None:
    toks, reason = MALFORMED[name]
    with pytest.raises(MalformedGrid) as info:
        tokens_to_grid(np.array(toks, np.int32))
    assert info.value.reason == reason and reason in str(info.value)
    decoded = decode_generation(np.array(toks + [IM_END], np.int32))
    assert decoded.grid is None and decoded.reason == reason and not decoded.ok


def test_float_tokens_are_rejected() -> None:
    with pytest.raises(MalformedGrid, match="bad_token"):
        tokens_to_grid(np.array([8.0, 9.0]))


def test_decode_generation_stops_at_end_tokens() -> None:
    toks = np.array(_c(1, 2) + [NEWLINE] + _c(3, 4) + [IM_END] + _c(5, 5, 5) + [EOS], np.int32)
    d = decode_generation(toks)
    assert d.ok and d.reason is None
    np.testing.assert_array_equal(d.grid, [[1, 2], [3, 4]])
    d = decode_generation(np.array(_c(7) + [EOS, IM_END], np.int32))
    np.testing.assert_array_equal(d.grid, [[7]])
    assert decode_generation(np.array([IM_END], np.int32)).reason == "empty"


def test_bad_test_index() -> None:
    task = load_tasks("arc1", max_tasks=1)[0]
    with pytest.raises(IndexError, match="test_index=5"):
        serialize_task(task, 5)
