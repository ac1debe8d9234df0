"""The per-token layout of a packed batch (positions, segment ids), shared by every family."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Context(NamedTuple):
    """Per-token layout of a batch, constant across refinement steps. All (B, T)."""

    positions: jax.Array  # position inside the token's own packed sequence (RoPE)
    segment_ids: jax.Array  # 0 = padding, 1.. = packed sequence id (attention stays inside it)
    # Expert pools with free slots (lifecycle): pool name -> (P,) bool live mask; None = all live.
    live: dict | None = None

    @property
    def valid(self) -> jax.Array:
        return (self.segment_ids > 0).astype(jnp.float32)


def make_context(tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, live: dict | None = None) -> Context:
    """Default layout: one sequence per row, every slot valid, every expert live."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    return Context(positions=positions, segment_ids=segment_ids, live=live)
