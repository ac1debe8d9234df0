"""Prototype routing: CAPR (dynamic K), top-k, and routing-off; plus DRLN (``mas``).

Every router maps expert inputs ``u`` (..., d) and per-expert prototypes (P, d) and gates (P,)
to routing weights ``z`` (..., P) with the contract
  * ``z >= 0`` everywhere and ``z == 0`` exactly where an expert is inactive;
  * ``k`` (...,) is the number of active experts per token, computed here and only here.

The hard decision (``mask``) is separated from the weights so that callers can take it outside a
rematerialised region: recomputation in low precision can then never flip a ``> 0`` decision.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


class Route(NamedTuple):
    """Routing of one call site. Shapes: scores, mask, z (..., P); k (...)."""

    scores: jax.Array  # u . proto^T / sqrt(d) - gate, the pre-threshold routing logits
    mask: jax.Array  # bool, active experts
    z: jax.Array  # routing weights, 0 where inactive
    k: jax.Array  # int32 number of active experts


def mas(v: jax.Array, axis: int = -1) -> jax.Array:
    """DRLN: divide by the largest magnitude along ``axis`` (linear, parameter free)."""
    return v / (jnp.max(jnp.abs(v), axis=axis, keepdims=True) + 1e-9)


def prototype_scores(u: jax.Array, proto: jax.Array, gate: jax.Array) -> jax.Array:
    """CAPR logits ``u . proto^T / sqrt(d) - gate``: (..., d), (P, d), (P,) -> (..., P).

    Computed in float32 whatever the compute dtype, at ``Precision.HIGHEST`` (a TPU would
    otherwise round the float32 operands to bfloat16), so routing decisions are
    precision-stable.
    """
    d = u.shape[-1]
    s = jnp.einsum("...d,pd->...p", u.astype(jnp.float32), proto.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return s / jnp.sqrt(jnp.float32(d)) - gate.astype(jnp.float32)


def decide(scores: jax.Array, mode: str, top_k: int,
           live: jax.Array | None = None) -> jax.Array:
    """The hard routing decision (bool mask (..., P)); carries no gradient.

    ``live`` (P,) bool, optional: experts outside it (free slots of a pool) are never chosen;
    top-k picks among the live ones only.
    """
    scores = jax.lax.stop_gradient(scores)
    if live is not None:
        scores = jnp.where(live, scores, -jnp.inf)
    if mode == "capr":
        mask = scores > 0
    elif mode == "topk":
        _, idx = jax.lax.top_k(scores, top_k)
        mask = jnp.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.int32), axis=-2) > 0
    elif mode == "dense":
        mask = jnp.ones(scores.shape, dtype=bool)
    else:
        raise ValueError(f"unknown routing mode {mode!r}")
    return mask if live is None else mask & live


def weights(scores: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Routing weights for a given decision.

    capr: the raw ReLU weights ``relu(scores)`` (the original's aggregation, no renormalisation);
    topk: softmax of the selected scores; dense: uniform over the chosen experts (``1/P``
    with every expert live; routing switched off).
    """
    if mode == "capr":
        return jnp.where(mask, scores, 0.0)
    if mode == "topk":
        m = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
        e = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(m)), 0.0)
        return e / jnp.sum(e, axis=-1, keepdims=True)
    if mode == "dense":
        m = mask.astype(scores.dtype)
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    raise ValueError(f"unknown routing mode {mode!r}")


def route(u: jax.Array, proto: jax.Array, gate: jax.Array, mode: str, top_k: int, *,
          live: jax.Array | None = None) -> Route:
    """Route expert inputs u (..., d) over P experts -> Route with z, mask, k of shape (..., P).

    ``live`` (P,) bool, optional: experts outside it are absent (mask False, z = 0, not counted
    in k), so a pool of fixed size P can hold free slots (expert lifecycle).
    """
    scores = prototype_scores(u, proto, gate)
    # Tagged so that a rematerialised step reuses the forward's decisions
    # (``families.dyntrm.recursion.remat_body``).
    # Only the bool mask is saved: the weights follow from it and the recomputed scores, so a
    # recomputation can change a weight by rounding but never which experts are active.
    mask = checkpoint_name(decide(scores, mode, top_k, live), "routing")
    z = weights(scores, mask, mode)
    return Route(scores=scores, mask=mask, z=z, k=jnp.sum(mask, axis=-1, dtype=jnp.int32))


def weights_for_decision(u: jax.Array, proto: jax.Array, gate: jax.Array, mask: jax.Array,
                         mode: str) -> jax.Array:
    """``route(...).z`` for a decision already taken: the weights from the scores of u and the
    given mask (SARS keeps every step's bool masks and rebuilds z from them)."""
    return weights(prototype_scores(u, proto, gate), mask, mode)
