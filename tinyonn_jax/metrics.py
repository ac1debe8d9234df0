"""Metrics every family reports, computed inside jit into one flat dict.

One definition each: the masked mean, the output entropy tau, token and exact accuracy, and the
predictive-integrity score of seed 002, ``PI_FORMULA``. ``SEED002_METRICS`` names the metrics
of seed 002's table that the families emit and the core dashboard plots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax import loss as task_loss

TAU_FLOOR = 1e-9  # PI divides by tau; a fully confident model has tau -> 0

# The one PI formula (seed 002's table), as README.md and the core dashboard write it.
PI_FORMULA = "pi_score = exp(-alpha * (main_loss / tau + gamma * surprise))"

# Seed 002's metrics under the names the families emit (name -> what it is). Families emit the
# ones they define; the dashboards say "not defined for this family" for the others.
SEED002_METRICS: dict[str, str] = {
    "train/main_loss": "cross entropy of the predicted tokens (L)",
    "train/gating_loss": "the routing (gating) objective of the family's meta parameters",
    "train/sparsity_loss": "the sparsity loss on the number of chosen experts (DynONN only)",
    "train/avg_k": "mean number of experts chosen per routed token, over the routed sites",
    "train/main_acc": "token accuracy: argmax of the logits == target",
    "train/gating_acc": "argmax of the routing == argmin of the surprise over the routed experts",
    "train/surprise": "S: mean per-expert gradient norm of the main loss alone",
    "train/pi_score": PI_FORMULA,
    "train/tau": "mean entropy (nats) of the predicted token distribution",
    "train/num_experts": "experts in the model's pools (live slots where there is a lifecycle)",
    "train/lambda": "lambda(PI), the balance share of the gating loss (DynONN only)",
}


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
    """Predictive integrity ``exp(-alpha (L / tau + gamma S))`` (``PI_FORMULA``, seed 002).

    tau is floored at ``TAU_FLOOR``: a fully confident model would otherwise divide by zero.
    """
    return jnp.exp(-alpha * (main_loss / jnp.maximum(tau, TAU_FLOOR) + gamma * surprise))


def task_metrics(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """``train/token_acc`` (also under seed 002's name ``train/main_acc``), ``train/exact_acc``,
    ``train/tau`` and ``train/tokens`` of a batch.

    logits (B,T,V); batch holds targets, weights, segment_ids (B,T).
    """
    w = batch["weights"]
    acc = masked_mean(task_loss.token_correct(logits, batch["targets"]), w)
    return {
        "train/token_acc": acc, "train/main_acc": acc,
        "train/exact_acc": jnp.mean(task_loss.row_exact(logits, batch["targets"], w)),
        "train/tau": output_entropy(logits, w),
        "train/tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }
