"""When a generated answer can no longer decode to a grid, whatever follows.

``tokenizer.decode_generation`` rejects an answer with a token that is neither a colour nor a row
separator before the stop token, an empty row, rows of different widths, or more than 30 rows or
columns. ``AnswerState`` follows an answer token by token and flags it ``hopeless`` as soon as one
of those is certain: a bad token, a separator that closes an empty row or a row of another width
than the first, a row longer than the first (or than 30 cells), or a separator closing the 30th
row. A hopeless answer decodes to ``None`` whatever comes next, so a decoder can stop it there
without changing any score; the rule reads only the generated tokens, never an answer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.data.tasks import MAX_GRID_SIZE
from tinyonn_jax.data.tokenizer import COLOR_OFFSET, EOS, IM_END, NEWLINE, VOCAB_SIZE


class AnswerState(NamedTuple):
    """Per row (B,) int32: the first row's width (0 until it is closed), cells in the current row,
    rows closed so far."""

    width: jax.Array
    cells: jax.Array
    rows: jax.Array

    @classmethod
    def start(cls, batch: int) -> AnswerState:
        zero = jnp.zeros((batch,), jnp.int32)
        return cls(zero, zero, zero)

    def advance(self, token: jax.Array) -> tuple[AnswerState, jax.Array]:
        """The state after ``token`` (B,) and whether the answer is now hopeless (B,) bool."""
        is_cell = (token >= COLOR_OFFSET) & (token < VOCAB_SIZE)
        is_nl = token == NEWLINE
        is_stop = (token == IM_END) | (token == EOS)
        cells = self.cells + is_cell.astype(jnp.int32)
        limit = jnp.where(self.width > 0, self.width, MAX_GRID_SIZE)
        bad_row = is_nl & ((self.cells == 0) | ((self.width > 0) & (self.cells != self.width))
                           | (self.rows + 1 >= MAX_GRID_SIZE))
        hopeless = (~(is_cell | is_nl | is_stop)) | (is_cell & (cells > limit)) | bad_row
        new = AnswerState(
            width=jnp.where(is_nl & (self.width == 0), self.cells, self.width),
            cells=jnp.where(is_nl, 0, cells),
            rows=self.rows + is_nl.astype(jnp.int32))
        return new, hopeless
