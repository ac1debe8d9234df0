"""GAMoE gate (DynMoE, seed 004): cosine prototypes, per-expert thresholds, dynamic K.

For expert inputs u (..., D), prototypes ``proto_sim`` (D, E), thresholds ``gates`` (E,) and a
learned logit scale ``c = exp(min(gate_log_scale, log 100))`` (upstream GAMoEGateT):

    s      = sigmoid(c * cos(u, proto_e)) * live_e          soft similarity, 0 on dead slots
    scores = s - sigmoid(c * gates_e)                      > 0  <=>  cos > gates (c > 0)
    active = scores > 0;   K = sum_e active                 top-any: K varies per token

Routing weights follow the contract of ``tinyonn_jax.nn.routing.Route``: ``z >= 0``,
``z == 0`` exactly where an expert is not routed, and ``k`` counts routed experts.
  * ``uniform``: ``z = a / K`` with ``a`` the 0/1 activation and a straight-through gradient
    into ``relu(scores)`` (upstream ``sign(relu(.))`` with identity backward).
  * ``normalized``: ``z = relu(scores) / sum relu(scores)`` over the active experts.
Tokens with K = 0 ("homeless") are dropped (upstream training) or sent to the live expert of
largest margin ``c (cos - gates)`` with weight 1, according to the fallback mode; ``homeless``
marks them either way so the expert pool manager can grow an expert for them.

The hard decision carries no gradient and can be supplied from outside (``decision=``), so the
forward may compute it once outside ``jax.checkpoint`` and a test may hold it fixed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.nn.routing import Route

FALLBACKS = ("always", "eval", "never")  # when K=0 tokens go to their best expert
WEIGHT_MODES = ("uniform", "normalized")
_MAX_LOG_SCALE = math.log(100.0)  # upstream clamps the logit scale at 100


class Gate(NamedTuple):
    """One gate evaluation. Shapes: cos, scores, margin, mask, z (..., E); k, homeless (...)."""

    cos: jax.Array  # float32 cosine similarity to every prototype
    scores: jax.Array  # float32 sigmoid(c cos) * live - sigmoid(c gates)
    margin: jax.Array  # float32 c (cos - gates): the gate's ranking of experts
    mask: jax.Array  # bool routed experts: threshold activations, or the fallback expert
    z: jax.Array  # routing weights, exactly 0 where not routed
    k: jax.Array  # int32 number of routed experts
    homeless: jax.Array  # bool: no expert passed its threshold (before any fallback)

    @property
    def route(self) -> Route:
        """The generic ``Route`` view (scores, mask, z, k) used by the other routers."""
        return Route(scores=self.scores, mask=self.mask, z=self.z, k=self.k)


class Decision(NamedTuple):
    """The hard part of a gate, (..., E) bool and (...) bool; no gradient flows through it."""

    mask: jax.Array
    homeless: jax.Array


def gate_params(proto_sim: jax.Array, init_t: float) -> dict:
    """Gate parameters around given prototypes (D, E): thresholds 0, logit scale 1 / init_t."""
    return {"proto_sim": proto_sim, "gates": jnp.zeros(proto_sim.shape[-1:], jnp.float32),
            "gate_log_scale": jnp.asarray(math.log(1.0 / init_t), jnp.float32)}


def init_gate(key: jax.Array, dim: int, max_experts: int, init_t: float) -> dict:
    """proto_sim (D, E) orthogonal, gates (E,) = 0, gate_log_scale () = log(1 / init_t)."""
    return gate_params(jax.nn.initializers.orthogonal()(key, (dim, max_experts), jnp.float32),
                       init_t)


def logit_scale(params: dict) -> jax.Array:
    """The learned positive scale ``exp(min(gate_log_scale, log 100))``."""
    return jnp.exp(jnp.minimum(params["gate_log_scale"], _MAX_LOG_SCALE))


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Unit L2 norm along ``axis`` (0 stays 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis, keepdims=True), 1e-24))


def cosine(params: dict, u: jax.Array) -> jax.Array:
    """cos(u, proto_e) in float32 at ``Precision.HIGHEST``: u (..., D) -> (..., E)."""
    return jnp.einsum("...d,de->...e", normalize(u.astype(jnp.float32)),
                      normalize(params["proto_sim"].astype(jnp.float32), axis=0),
                      precision=jax.lax.Precision.HIGHEST)


def gate_scores(params: dict, cos: jax.Array, live: jax.Array) -> jax.Array:
    """``sigmoid(c cos) * live - sigmoid(c gates)``: (..., E); dead experts are always < 0."""
    c = logit_scale(params)
    s = jax.nn.sigmoid(cos * c) * live.astype(jnp.float32)
    return s - jax.nn.sigmoid(params["gates"] * c)


def margin_logits(params: dict, cos: jax.Array) -> jax.Array:
    """``c (cos - gates)``: the unsquashed routing logit (> 0 where scores > 0, up to sigmoid
    saturation); used to rank experts."""
    return logit_scale(params) * (cos - params["gates"])


def fallback_on(mode: str, training: bool) -> bool:
    """Whether K=0 tokens go to their best expert under ``mode`` in this phase."""
    if mode not in FALLBACKS:
        raise ValueError(f"unknown fallback mode {mode!r}; expected one of {FALLBACKS}")
    return mode == "always" or (mode == "eval" and not training)


def decide(scores: jax.Array, margin: jax.Array, live: jax.Array, fallback: bool) -> Decision:
    """Threshold activations, plus the live expert of largest margin for homeless tokens if
    ``fallback``. scores, margin (..., E); live (E,). Carries no gradient.

    Activation reads ``scores`` (so relu(scores) > 0 on every active expert, even where the
    sigmoids saturate); the fallback ranks by margin, the expert closest to accepting the token
    (ranking by scores would favour experts with saturated, very high thresholds).
    """
    scores, margin = jax.lax.stop_gradient(scores), jax.lax.stop_gradient(margin)
    active = scores > 0
    homeless = ~jnp.any(active, axis=-1)
    if fallback:
        best = jnp.argmax(jnp.where(live, margin, -jnp.inf), axis=-1)
        pick = jax.nn.one_hot(best, scores.shape[-1], dtype=jnp.bool_) & live
        active = active | (homeless[..., None] & pick)
    return Decision(mask=active, homeless=homeless)


def gate_weights(scores: jax.Array, decision: Decision, mode: str) -> jax.Array:
    """Routing weights (..., E) for a decision; exactly 0 outside ``decision.mask``."""
    thr = decision.mask & ~decision.homeless[..., None]  # experts that passed their threshold
    r = jnp.where(thr, jax.nn.relu(scores), 0.0)
    if mode == "uniform":
        # 1 + (r - sg(r)) is exactly 1 in value and carries d/d scores (the upstream STE).
        a = jnp.where(thr, 1.0 + (r - jax.lax.stop_gradient(r)), 0.0)
        z = a / jnp.maximum(jnp.sum(thr, axis=-1, keepdims=True), 1).astype(jnp.float32)
    elif mode == "normalized":
        z = r / jnp.maximum(jnp.sum(r, axis=-1, keepdims=True), 1e-30)
    else:
        raise ValueError(f"unknown weight mode {mode!r}; expected one of {WEIGHT_MODES}")
    # A homeless token's routed expert (if any) is its fallback and takes the whole token.
    return jnp.where(decision.homeless[..., None], decision.mask.astype(jnp.float32), z)


def gate(params: dict, u: jax.Array, live: jax.Array, *, fallback: bool, weight_mode: str,
         decision: Decision | None = None) -> Gate:
    """Evaluate the gate on u (..., D) with live experts ``live`` (E,) bool.

    ``decision`` replaces the hard routing decision (mask and homeless flags), e.g. to replay
    the decision of an earlier forward; the weights are then recomputed for that decision.
    """
    cos = cosine(params, u)
    scores = gate_scores(params, cos, live)
    margin = margin_logits(params, cos)
    if decision is None:
        decision = decide(scores, margin, live, fallback)
    z = gate_weights(scores, decision, weight_mode)
    return Gate(cos=cos, scores=scores, margin=margin, mask=decision.mask, z=z,
                k=jnp.sum(decision.mask, axis=-1, dtype=jnp.int32), homeless=decision.homeless)


def routing_record(u: jax.Array, g: Gate, valid: jax.Array) -> tuple[jax.Array, ...]:
    """Per-expert routed-token counts (E,), and the sum (D,) and count () of the normalised
    inputs of homeless tokens, over valid tokens: u (..., D), valid (...) in {0, 1}."""
    v = valid.astype(jnp.float32)
    lead = tuple(range(v.ndim))
    counts = jnp.sum(g.mask * v[..., None], axis=lead)
    hv = g.homeless * v
    hsum = jnp.sum(normalize(u.astype(jnp.float32)) * hv[..., None], axis=lead)
    return counts, hsum, jnp.sum(hv)
