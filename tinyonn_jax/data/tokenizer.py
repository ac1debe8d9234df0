"""The 18-token ARC vocabulary, grid <-> token conversion and task serialisation.

Token layout of a training sequence (one test pair)::

    bos
    [ims] IN_1 [ime] [ims] OUT_1 [ime]   ... one block per demonstration pair
    [ims] TEST_IN [ime] [ims] TEST_OUT [ime]
    eos

A grid is written row by row, colour ``c`` as token ``8 + c``, rows separated by ``NEWLINE``.
There is no trailing separator after the last row, so ``H`` rows of width ``W`` take
``H * W + H - 1`` tokens and ``tokens_to_grid`` is the exact inverse of ``grid_to_tokens``.

Loss weights (``serialize_task``) are 1 exactly where the *target* is part of an output grid
(cells and its row separators), that output's closing ``ime``, or the final ``eos``; the model
is never asked to predict inputs, ``bos`` or the opening ``ims`` of an output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyonn_jax.data.tasks import MAX_GRID_SIZE, NUM_COLORS, Task

PAD = 0  # also the unknown token of the original tokenizer
BOS = 1
EOS = 2
PROBLEM = 3  # in the original vocabulary, never emitted
SOLUTION = 4  # in the original vocabulary, never emitted
NEWLINE = 5  # row separator
IM_START = 6
IM_END = 7
COLOR_OFFSET = 8  # colour c -> token COLOR_OFFSET + c
VOCAB_SIZE = COLOR_OFFSET + NUM_COLORS  # 18

TOKEN_NAMES = (
    "<pad>",
    "<bos>",
    "<eos>",
    "problem",
    "solution",
    "\\n",
    "<im_start>",
    "<im_end>",
    *(str(c) for c in range(NUM_COLORS)),
)


class MalformedGrid(ValueError):
    """A token sequence does not decode to a valid grid; ``reason`` is a short code.

    Reasons: ``empty``, ``bad_token``, ``empty_row``, ``ragged``, ``too_large``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"malformed grid ({reason}): {detail}")


@dataclass(frozen=True)
class Decoded:
    """Result of decoding a generation: ``grid`` (H, W) int8 or ``None`` with the ``reason``."""

    grid: np.ndarray | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the generation decoded to a grid."""
        return self.grid is not None


def grid_token_count(h: int, w: int) -> int:
    """Number of tokens of an (h, w) grid: cells plus h - 1 row separators."""
    return h * w + h - 1


def grid_to_tokens(grid: np.ndarray) -> np.ndarray:
    """Encode an (H, W) grid of colours 0-9 as an int32 token vector of length H*W + H - 1."""
    g = np.asarray(grid)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"grid must be a non-empty 2-D array, got shape {g.shape}")
    if g.min() < 0 or g.max() >= NUM_COLORS:
        raise ValueError(f"grid values must be colours 0-9, got {g.min()}..{g.max()}")
    h, w = g.shape
    # Append a separator column, flatten, and drop the final separator.
    body = np.empty((h, w + 1), dtype=np.int32)
    body[:, :w] = g.astype(np.int32) + COLOR_OFFSET
    body[:, w] = NEWLINE
    return body.reshape(-1)[:-1]


def tokens_to_grid(tokens: np.ndarray) -> np.ndarray:
    """Decode tokens written by ``grid_to_tokens`` back to an (H, W) int8 grid.

    Raises ``MalformedGrid`` (never an obscure error) for an empty input, any token that is not
    a colour or ``NEWLINE``, an empty row (including a leading/trailing/double separator),
    ragged rows, or a grid larger than 30x30.
    """
    t = np.asarray(tokens).reshape(-1)
    if t.size == 0:
        raise MalformedGrid("empty", "no tokens")
    if t.dtype.kind not in "iu":
        raise MalformedGrid("bad_token", f"tokens must be integers, got dtype {t.dtype}")
    is_color = (t >= COLOR_OFFSET) & (t < VOCAB_SIZE)
    is_sep = t == NEWLINE
    bad = np.flatnonzero(~(is_color | is_sep))
    if bad.size:
        raise MalformedGrid(
            "bad_token",
            f"token {int(t[bad[0]])} at index {int(bad[0])} is "
            "neither a colour nor a row separator",
        )
    seps = np.flatnonzero(is_sep)
    bounds = np.concatenate([[-1], seps, [t.size]])
    lengths = np.diff(bounds) - 1
    if (lengths == 0).any():
        raise MalformedGrid("empty_row", f"row {int(np.argmax(lengths == 0))} has no cells")
    h, w = lengths.size, int(lengths[0])
    if (lengths != w).any():
        r = int(np.argmax(lengths != w))
        raise MalformedGrid("ragged", f"row {r} has {int(lengths[r])} cells, row 0 has {w}")
    if h > MAX_GRID_SIZE or w > MAX_GRID_SIZE:
        raise MalformedGrid("too_large", f"{h}x{w} exceeds {MAX_GRID_SIZE}x{MAX_GRID_SIZE}")
    return (t[is_color] - COLOR_OFFSET).astype(np.int8).reshape(h, w)


def decode_generation(tokens: np.ndarray) -> Decoded:
    """Decode generated tokens (after the prompt's final ``ims``) into a grid or a reason.

    Generation stops at ``ime``/``eos``; everything from the first of those on is ignored. Never
    raises for bad content: a malformed answer is a ``Decoded(None, reason)``.
    """
    t = np.asarray(tokens).reshape(-1)
    stops = np.flatnonzero((t == IM_END) | (t == EOS))
    if stops.size:
        t = t[: stops[0]]
    try:
        return Decoded(tokens_to_grid(t))
    except MalformedGrid as e:
        return Decoded(None, e.reason)


def _blocks(task: Task, test_index: int, with_answer: bool) -> list[tuple[np.ndarray, bool]]:
    """The sequence as (token chunk, is-answer) pieces; is-answer marks tokens to be predicted."""
    if not 0 <= test_index < len(task.test):
        raise IndexError(
            f"task {task.task_id!r} has {len(task.test)} test pairs, test_index={test_index}"
        )
    ims = np.array([IM_START], np.int32)
    ime = np.array([IM_END], np.int32)
    pieces: list[tuple[np.ndarray, bool]] = [(np.array([BOS], np.int32), False)]

    def output(grid: np.ndarray) -> None:
        pieces.extend([(ims, False), (grid_to_tokens(grid), True), (ime, True)])

    for inp, out in task.train:
        pieces.extend([(ims, False), (grid_to_tokens(inp), False), (ime, False)])
        output(out)
    test_in, test_out = task.test[test_index]
    pieces.extend([(ims, False), (grid_to_tokens(test_in), False), (ime, False)])
    if with_answer:
        if test_out is None:
            raise ValueError(
                f"task {task.task_id!r} test[{test_index}] has no known output; "
                "it can be used for generation (serialize_prompt) only"
            )
        output(test_out)
        pieces.append((np.array([EOS], np.int32), True))
    else:
        pieces.append((ims, False))
    return pieces


def serialize_task(task: Task, test_index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Serialise a task with the answer of ``test[test_index]`` for teacher-forced training.

    Returns ``(tokens, targets, weights)``, each of shape (T,): ``tokens`` int32, ``targets``
    int32 with ``targets[t] = tokens[t + 1]`` and ``targets[T - 1] = PAD``, ``weights`` float32
    equal to 1.0 where ``targets[t]`` is an answer token (output grid cells and separators, the
    output's closing ``ime``, the final ``eos``) and 0.0 elsewhere.
    """
    pieces = _blocks(task, test_index, with_answer=True)
    tokens = np.concatenate([p for p, _ in pieces])
    is_answer = np.concatenate([np.full(p.size, a, dtype=bool) for p, a in pieces])
    targets = np.empty_like(tokens)
    targets[:-1] = tokens[1:]
    targets[-1] = PAD
    weights = np.zeros(tokens.size, np.float32)
    weights[:-1] = is_answer[1:]
    return tokens, targets, weights


def serialize_prompt(task: Task, test_index: int = 0) -> np.ndarray:
    """Tokens (T,) int32 of a generation prompt: demonstrations, then ``TEST_IN [ime] [ims]``.

    The prompt contains nothing about the answer, not even its size (the original's generation
    length leaked it); generation should run to ``ime``/``eos`` or a fixed budget such as
    ``max_answer_tokens()``.
    """
    return np.concatenate([p for p, _ in _blocks(task, test_index, with_answer=False)])


def max_answer_tokens() -> int:
    """Token budget that fits any legal answer: a 30x30 grid plus its closing ``ime``."""
    return grid_token_count(MAX_GRID_SIZE, MAX_GRID_SIZE) + 1


def sequence_length(task: Task, test_index: int = 0) -> int:
    """Length of ``serialize_task(task, test_index)`` computed from grid shapes only."""
    n = 2  # bos, eos
    pairs = (*task.train, task.test[test_index])
    for inp, out in pairs:
        n += grid_token_count(*inp.shape) + 2
        if out is None:
            raise ValueError(f"task {task.task_id!r} test[{test_index}] has no known output")
        n += grid_token_count(*out.shape) + 2
    return n
