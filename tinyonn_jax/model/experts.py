"""Stacked expert banks: ExpertMLP ``E_p(u) = silu(u W1_p) W2_p`` (no bias), P on a leading axis.

Shapes: W1 (P, Din, F), W2 (P, F, Dout); expert inputs u (..., Din); routing weights z (..., P).
The dense path evaluates every expert on every token and weights by z; it is exact and, for many
narrow experts, the fastest layout on accelerators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_bank(key: jax.Array, num_experts: int, d_in: int, d_hidden: int, d_out: int) -> dict:
    """Variance-scaled normal init (std 1/sqrt(fan_in)), the scale of a default Linear layer."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (num_experts, d_in, d_hidden)) / jnp.sqrt(d_in)
    w2 = jax.random.normal(k2, (num_experts, d_hidden, d_out)) / jnp.sqrt(d_hidden)
    return {"w1": w1.astype(jnp.float32), "w2": w2.astype(jnp.float32)}


def bank_hidden(bank: dict, u: jax.Array) -> jax.Array:
    """Pre-activations of every expert: u (..., Din) -> h (..., P, F)."""
    return jnp.einsum("...d,pdf->...pf", u, bank["w1"].astype(u.dtype))


def bank_outputs(bank: dict, u: jax.Array) -> jax.Array:
    """Every expert's output: u (..., Din) -> y (..., P, Dout)."""
    h = bank_hidden(bank, u)
    return jnp.einsum("...pf,pfo->...po", jax.nn.silu(h), bank["w2"].astype(u.dtype))


def combine(z: jax.Array, y: jax.Array) -> jax.Array:
    """Aggregate expert outputs by routing weights: z (..., P), y (..., P, Dout) -> (..., Dout)."""
    return jnp.einsum("...p,...po->...o", z.astype(y.dtype), y)


def apply_dense(bank: dict, u: jax.Array, z: jax.Array) -> jax.Array:
    """``sum_p z_p E_p(u)``: u (..., Din), z (..., P) -> (..., Dout)."""
    return combine(z, bank_outputs(bank, u))
