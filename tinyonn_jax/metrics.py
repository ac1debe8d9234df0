"""Metrics every family reports, computed inside jit into one flat dict.

One definition each: the masked mean, the output entropy tau, token and exact accuracy, and the
predictive-integrity score PI of seed 003, ``exp(-alpha ((1 - gamma) L / tau + gamma S))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax import loss as task_loss

TAU_FLOOR = 1e-9  # PI divides by tau; a fully confident model has tau -> 0


def masked_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """Weighted mean of x over every axis; w broadcasts to x's shape. 0 when no weight."""
    w = jnp.broadcast_to(w, x.shape)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def output_entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """tau: mean entropy (nats) of the predicted distribution over weighted tokens.

    logits (B,T,V), weights (B,T).
    """
    probs = jax.nn.softmax(logits, -1)
    return masked_mean(-jnp.sum(probs * jnp.log(probs + 1e-30), -1), weights)


def pi_score(main_loss: jax.Array, tau: jax.Array, surprise: jax.Array, alpha: float,
             gamma: float) -> jax.Array:
    """Predictive integrity ``exp(-alpha ((1 - gamma) L / tau + gamma S))`` (seed 003)."""
    return jnp.exp(-alpha * ((1.0 - gamma) * main_loss / jnp.maximum(tau, TAU_FLOOR)
                             + gamma * surprise))


def task_metrics(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """``train/token_acc``, ``train/exact_acc``, ``train/tau`` and ``train/tokens`` of a batch.

    logits (B,T,V); batch holds targets, weights, segment_ids (B,T).
    """
    w = batch["weights"]
    return {
        "train/token_acc": masked_mean(task_loss.token_correct(logits, batch["targets"]), w),
        "train/exact_acc": jnp.mean(task_loss.row_exact(logits, batch["targets"], w)),
        "train/tau": output_entropy(logits, w),
        "train/tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }
