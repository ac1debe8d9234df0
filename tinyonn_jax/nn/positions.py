"""Rotary positions of a token sequence: 1D (index in its packed sequence) or 2D grid coordinates.

``rope1d`` rotates by the token's index inside its own packed sequence (``batch["positions"]``).
``rope2d`` rotates by three coordinates read off the tokens themselves (``data.tokenizer`` layout),
so they follow every augmentation and never depend on an answer:

    grid    number of ``<im_start>`` tokens up to and including this one (0 before the first grid)
    row     row of the token inside its grid
    column  column of the token inside its grid

A colour cell at (r, c) of the k-th grid of its sequence gets (k, r, c); the ``NEWLINE`` closing row
r of a W-wide grid gets (k, r, W) (the separator column) and the closing ``<im_end>`` (k, H-1, W);
the opening ``<im_start>`` gets (k, 0, 0). Tokens outside grids keep the coordinates of the last
grid position (``<bos>`` (0, 0, 0); ``<eos>`` after the last grid's ``<im_end>``). Every count
restarts where the segment id changes, so packed sequences and left padding see exactly what a
sequence alone sees.

The coordinates are a causal function of the tokens: ``grid_coordinates`` computes them for a
whole batch with cumulative sums and maxima (no loop over tokens), and ``GridCursor`` advances them
one token at a time for KV-cache decoding; both agree token for token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.data.tokenizer import COLOR_OFFSET, IM_START, NEWLINE, VOCAB_SIZE

GRID_AXES = 3  # (grid index, row, column)


def _last_at_or_before(flag: jax.Array, floor: jax.Array) -> jax.Array:
    """Index of the last True of ``flag`` (B, T) at or before each t, never below ``floor``."""
    idx = jnp.broadcast_to(jnp.arange(flag.shape[1], dtype=jnp.int32), flag.shape)
    return jnp.maximum(jax.lax.cummax(jnp.where(flag, idx, -1), axis=1), floor)


def _count_in(flag: jax.Array, start: jax.Array) -> jax.Array:
    """Number of True of ``flag`` (B, T) in [start[t], t) for every t (exclusive of t)."""
    before = jnp.cumsum(flag.astype(jnp.int32), axis=1) - flag.astype(jnp.int32)  # in [0, t)
    return before - jnp.take_along_axis(before, start, axis=1)


def grid_coordinates(tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """(grid, row, column) of every token: tokens, segment_ids (B, T) -> (B, T, 3) int32."""
    tokens = tokens.astype(jnp.int32)
    b, t = tokens.shape
    new_segment = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    seg_start = _last_at_or_before(new_segment, jnp.zeros((b, t), jnp.int32))
    is_ims = tokens == IM_START
    is_nl = tokens == NEWLINE
    is_cell = (tokens >= COLOR_OFFSET) & (tokens < VOCAB_SIZE)
    grid = _count_in(is_ims, seg_start) + is_ims.astype(jnp.int32)
    grid_start = _last_at_or_before(is_ims, seg_start)  # the grid's <im_start> (rows reset there)
    row = _count_in(is_nl, grid_start)
    # Columns restart at an <im_start> (itself included) and right after a NEWLINE.
    after_nl = jnp.concatenate([jnp.zeros((b, 1), bool), is_nl[:, :-1]], axis=1)
    row_start = _last_at_or_before(after_nl | is_ims, grid_start)
    col = _count_in(is_cell, row_start)
    return jnp.stack([grid, row, col], axis=-1)


class GridCursor(NamedTuple):
    """Counters after the tokens seen so far, each (B,) int32: grids opened, rows closed in the
    current grid, cells in the current row. ``step`` gives the next token's coordinates."""

    grid: jax.Array
    row: jax.Array
    col: jax.Array

    @classmethod
    def after(cls, token: jax.Array, coords: jax.Array) -> GridCursor:
        """The cursor after a token (B,) whose coordinates were ``coords`` (B, 3)."""
        g, r, c = coords[:, 0], coords[:, 1], coords[:, 2]
        is_nl = token == NEWLINE
        is_cell = (token >= COLOR_OFFSET) & (token < VOCAB_SIZE)
        return cls(grid=g, row=r + is_nl.astype(jnp.int32),
                   col=jnp.where(is_nl, 0, c + is_cell.astype(jnp.int32)))

    def step(self, token: jax.Array) -> tuple[jax.Array, GridCursor]:
        """Coordinates (B, 3) of the next token (B,) and the cursor after it."""
        is_ims = token == IM_START
        coords = jnp.stack([self.grid + is_ims.astype(jnp.int32),
                            jnp.where(is_ims, 0, self.row),
                            jnp.where(is_ims, 0, self.col)], axis=-1)
        return coords, GridCursor.after(token, coords)


def rotary_positions(mode: str, tokens: jax.Array, positions: jax.Array,
                     segment_ids: jax.Array) -> jax.Array:
    """What ``nn.attention.rope`` rotates by under ``mode``: ``positions`` (B, T) for ``rope1d``
    (and ``none``, where nothing rotates), the grid coordinates (B, T, 3) for ``rope2d``."""
    if mode == "rope2d":
        return grid_coordinates(tokens, segment_ids)
    return positions
