"""Meta losses of SARS: shaping routing logits with the (stop-gradient) goodness signal.

The routing logits ``r = u . proto^T / sqrt(d) - gate`` are recomputed from the stored expert
inputs (held constant), so the meta loss reaches only the routing (``meta``) parameters and costs
one small einsum per site. ``r`` equals z on active experts and keeps a gradient on inactive
ones, so a gate that closed can reopen.

Seed 000 (section 3.1) reads the routing as Bayesian inversion, log p(z) = log p(z|x) - log p(x|z):
the routing logits r are the posterior and the goodness G stands in for the likelihood, so the
prior the router should sharpen is r - G. Every variant lowers an entropy over experts; what
differs is which logits it sharpens, hence where a meta step moves the routing mass
softmax(r) (tested in tests/test_meta_direction.py):

  entropy_minus    mean H(softmax(r - sg(G)))   default, seed 000. Sharpens r - G: mass moves
                                                AWAY from high-goodness experts, toward experts
                                                the router already prefers at low likelihood.
  entropy_plus     mean H(softmax(r + sg(G)))   the original code from Oct 16 on. Sharpens
                                                r + G: mass moves TOWARD high-goodness experts.
  entropy_plain    mean H(softmax(r))           sharpens the current routing; G plays no part.
  dyntrm_original  mean H(softmax(G(z)))        the original DynTRM: G recomputed with the live
                                                weights z (C proportional to z) and not detached;
                                                sharpens softmax(G(z)), no fixed direction
                                                relative to the goodness of the forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import ATTN, QKV
from tinyonn_jax.families.dyntrm.sars.surprise import SiteStats, goodness
from tinyonn_jax.nn import routing

_ABSENT = -1e30  # the logit of an absent (dead) expert in ``entropy``


def entropy(logits: jax.Array, live: jax.Array | None = None) -> jax.Array:
    """Entropy (nats) of softmax over the last axis; with ``live`` (P,) bool, of the softmax
    over the live experts only (dead ones are absent: probability 0, no gradient)."""
    if live is not None:
        # A finite floor, not -inf: exp underflows to exactly 0 and 0 * logp stays 0 (and so
        # does its gradient), where -inf would give 0 * inf = NaN.
        logits = jnp.where(live, logits, _ABSENT)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class SiteRouter(NamedTuple):
    """The router of one call site kind: its parameters and its configuration."""

    proto: jax.Array  # (P, Din) prototypes
    gate: jax.Array  # (P,) gates
    mode: str  # routing mode (``routing.decide``)
    top_k: int


def site_routers(params: dict, cfg: ModelConfig) -> dict[str, SiteRouter]:
    """The router of every routed call site, by site name (``residuals.SITES`` order)."""
    sites = cfg.routed_sites
    attn = params["block"]["attn"]
    out = {c: SiteRouter(attn[f"proto_{c}"], attn[f"gate_{c}"], cfg.attn_routing, cfg.attn_top_k)
           for c in (*QKV, ATTN) if c in sites}  # attn: proto_attn, gate_attn of latent heads
    if "ffn" in sites:
        ffn = params["block"]["ffn"]
        out["ffn"] = SiteRouter(ffn["proto"], ffn["gate"], cfg.ffn_routing, cfg.ffn_top_k)
    return out


def site_meta_loss(r: jax.Array, stats: SiteStats, mode: str, top_k: int,
                    variant: str, live: jax.Array | None = None) -> jax.Array:
    """The meta loss ``variant`` of one site per token: routing logits r (..., P) and the
    site's statistics (..., P) -> (...). ``sars.engine`` averages it over valid tokens.
    ``live`` (P,) bool, optional: dead experts are left out of every entropy."""
    g = jax.lax.stop_gradient(stats.goodness)
    if variant == "entropy_plus":
        return entropy(r + g, live)
    if variant == "entropy_minus":
        return entropy(r - g, live)
    if variant == "entropy_plain":
        return entropy(r, live)
    if variant == "dyntrm_original":
        z = routing.weights(r, routing.decide(r, mode, top_k, live), mode)
        zs = jax.lax.stop_gradient(z)
        c_unit = jax.lax.stop_gradient(jnp.where(zs > 0, stats.c / jnp.where(zs > 0, zs, 1), 0))
        return entropy(goodness(jax.lax.stop_gradient(stats.o), z, z * c_unit), live)
    raise ValueError(f"unknown meta loss {variant!r}")
