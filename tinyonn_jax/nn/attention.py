"""Attention primitives shared by every family: head split, RoPE, the causal segment-local mask
and float32 softmax attention. Shapes: (B, T, H, Dh) per head, masks (B, Tq, Tk)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, D) -> (B, T, H, D/H)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position encoding over the last axis: x (B,T,H,Dh), positions (B,T)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # (B,T,1,half)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                   k_seg: jax.Array) -> jax.Array:
    """Causal, segment-local mask (B, Tq, Tk) from absolute slot indices and segment ids."""
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return causal & (q_seg[:, :, None] == k_seg[:, None, :])


def packed_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal, segment-local mask (B, T, T) of a packed batch whose slots are in order."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    return attention_mask(slots, slots, segment_ids, segment_ids)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
    """Softmax attention in float32: q (B,Tq,H,Dh), k/v (B,Tk,H,Dh), mask (B,Tq,Tk) -> (B,Tq,H,Dh).

    Every query must be allowed at least one key (itself), so no row is all -inf.
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
