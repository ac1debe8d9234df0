"""Inference halting rules of the DynTRM recursion: should a row stop after this step?

Each rule reads one refinement step's readout, the normalised hidden state h (B,T,D) and the
logits (B,T,V), over a row's valid tokens (B,T) and answers per row (B,) bool:

  learned      the ACT head: ``sigmoid(q_halt - q_continue) > model.halt_threshold``, with
               (q_halt, q_continue) from ``halting_logits`` (trained by ``loss.act_loss``)
  uncertainty  the output entropy tau (seed 000 section 4): the mean over the row's valid tokens
               of the readout's softmax entropy is below ``model.halt_tau`` (nats)
  none         never: every row runs ``max_refinement_steps``

A row's depth is the first step after which its rule says stop (at least 1), or all steps.
``model.halting`` selects the rule (``should_stop``); training always runs every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.config import ModelConfig


def _row_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of x (B,T,...) over each row's valid tokens (B,T) -> (B,...); 0 for an empty row."""
    w = valid.reshape(*valid.shape, *([1] * (x.ndim - 2)))
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def halting_logits(params: dict, h: jax.Array, valid: jax.Array) -> jax.Array:
    """(q_halt, q_continue) per row from normalised hidden h (B,T,D), valid (B,T) -> (B, 2)."""
    return _row_mean(h, valid).astype(jnp.float32) @ params["w"] + params["b"]


def row_entropy(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean softmax entropy (nats) of logits (B,T,V) over each row's valid tokens -> (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _row_mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1), valid.astype(jnp.float32))


def learned_stop(halt_params: dict, h: jax.Array, valid: jax.Array,
                 threshold: float | jax.Array) -> jax.Array:
    """The ACT head's decision: sigmoid(q_halt - q_continue) > threshold. -> (B,) bool."""
    q = halting_logits(halt_params, h, valid)
    return jax.nn.sigmoid(q[:, 0] - q[:, 1]) > threshold


def uncertainty_stop(logits: jax.Array, valid: jax.Array, tau: float) -> jax.Array:
    """The output is certain enough: mean entropy over valid tokens < tau (nats). -> (B,) bool."""
    return row_entropy(logits, valid) < tau


def should_stop(params: dict, h: jax.Array, logits: jax.Array, valid: jax.Array,
                cfg: ModelConfig, threshold: float | jax.Array | None = None) -> jax.Array:
    """``model.halting``'s decision for every row after one step. -> (B,) bool.

    h (B,T,D) and logits (B,T,V) are the step's readout, valid (B,T) the tokens the rule reads;
    ``threshold`` overrides ``model.halt_threshold`` of the learned rule.
    """
    if cfg.halting == "learned":
        thr = cfg.halt_threshold if threshold is None else threshold
        return learned_stop(params["halt"], h, valid, thr)
    if cfg.halting == "uncertainty":
        return uncertainty_stop(logits, valid, cfg.halt_tau)
    if cfg.halting == "none":
        return jnp.zeros(h.shape[:1], bool)
    raise ValueError(f"unknown halting rule {cfg.halting!r}")
