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


def eval_metrics(logits: jax.Array, batch: dict) -> dict:
    """Teacher-forced ``eval/main_loss``, ``eval/token_acc``, ``eval/exact_acc`` of a batch."""
    t, w = batch["targets"], batch["weights"]
    correct = token_correct(logits, t)
    return {"eval/main_loss": cross_entropy(logits, t, w),
            "eval/token_acc": jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1.0),
            "eval/exact_acc": jnp.mean(row_exact(logits, t, w))}


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


def per_step_cross_entropy(step_logits: jax.Array, targets: jax.Array,
                           weights: jax.Array) -> jax.Array:
    """``cross_entropy`` of every refinement step: step_logits (S,B,T,V), targets/weights (B,T)
    -> (S,). Each step is normalised by the same weighted-token count as the final-step loss."""
    logp = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1)
    tgt = jnp.broadcast_to(targets, step_logits.shape[:-1])
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]  # (S,B,T)
    return jnp.sum(nll * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights), 1.0)


def deep_supervision_weights(step_weights: tuple[float, ...], num_steps: int) -> jax.Array:
    """Per-step CE weights (S,) normalised to sum 1; ``()`` puts all weight on the final step.

    Normalising keeps the mixed loss on the scale of one CE, so ``sars.w_act`` and the learning
    rate keep their meaning whatever weights are chosen.
    """
    if not step_weights:
        return jnp.zeros((num_steps,), jnp.float32).at[-1].set(1.0)
    if len(step_weights) != num_steps:
        raise ValueError(f"config train.deep_supervision={tuple(step_weights)!r}: length must "
                         f"equal model.max_refinement_steps={num_steps}")
    w = jnp.asarray(step_weights, jnp.float32)
    return w / jnp.sum(w)


def deep_supervision_loss(step_logits: jax.Array, targets: jax.Array, weights: jax.Array,
                          step_weights: tuple[float, ...]) -> jax.Array:
    """TRM-style deep supervision: ``sum_s w_s CE(logits_s)`` with normalised weights w (S,).

    step_logits (S,B,T,V); with ``step_weights=()`` this is the final step's cross entropy.
    """
    w = deep_supervision_weights(step_weights, step_logits.shape[0])
    return jnp.dot(w, per_step_cross_entropy(step_logits, targets, weights))
