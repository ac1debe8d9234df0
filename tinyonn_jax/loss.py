"""The task objective: weighted next-token cross entropy and the ACT halting loss.

Batches carry already-shifted ``targets`` (B,T) and ``weights`` (B,T) (1 on output-grid tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over weighted tokens of -log p(target). logits (...,T,V), targets/weights (...,T)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def token_correct(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1) == targets


def row_exact(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Per row: every weighted token predicted right. (...,B,T) -> (...,B) bool."""
    ok = token_correct(logits, targets) | (weights <= 0)
    return jnp.all(ok, axis=-1)


def act_loss(halt_logits: jax.Array, step_logits: jax.Array, targets: jax.Array,
             weights: jax.Array) -> jax.Array:
    """BCE of ``q_halt - q_continue`` against "this step's prediction is exactly right" (TRM).

    halt_logits (S,B,2), step_logits (S,B,T,V). Rows without weighted tokens are ignored.
    """
    correct = jax.lax.stop_gradient(row_exact(step_logits, targets, weights)).astype(jnp.float32)
    x = halt_logits[..., 0] - halt_logits[..., 1]
    bce = jnp.maximum(x, 0) - x * correct + jnp.log1p(jnp.exp(-jnp.abs(x)))
    has = (jnp.sum(weights, axis=-1) > 0).astype(jnp.float32)[None]
    return jnp.sum(bce * has) / jnp.maximum(jnp.sum(has) * x.shape[0], 1.0)
