"""The per-token layout of a packed batch (positions, segment ids), shared by every family."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.nn.positions import rotary_positions


class Context(NamedTuple):
    """Per-token layout of a batch, constant across refinement steps. All (B, T)."""

    # What RoPE rotates by (nn.positions.rotary_positions): (B,T) index inside the token's own
    # packed sequence, or (B,T,3) grid coordinates with rope="rope2d".
    positions: jax.Array
    segment_ids: jax.Array  # 0 = padding, 1.. = packed sequence id (attention stays inside it)
    # Expert pools with free slots (lifecycle): pool name -> (P,) bool live mask; None = all live.
    live: dict | None = None

    @property
    def valid(self) -> jax.Array:
        return (self.segment_ids > 0).astype(jnp.float32)


def make_context(tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, live: dict | None = None,
                 rope: str = "rope1d") -> Context:
    """The layout of ``tokens`` (B, T); defaults: one sequence per row, every slot valid, every
    expert live. ``rope="rope2d"`` replaces the 1D positions by the tokens' grid coordinates."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    positions = rotary_positions(rope, tokens, positions, segment_ids)
    return Context(positions=positions, segment_ids=segment_ids, live=live)
