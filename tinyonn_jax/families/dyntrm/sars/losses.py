"""Meta losses of SARS: shaping routing logits with the (stop-gradient) goodness signal.

The routing logits ``r = u . proto^T / sqrt(d) - gate`` are recomputed from the stored expert
inputs (held constant), so the meta loss reaches only the routing (``meta``) parameters and costs
one small einsum per site. ``r`` equals z on active experts and keeps a gradient on inactive ones,
so a gate that closed can reopen. Variants (reference.md section 3):

  entropy_plus     mean H(softmax(r + sg(G)))   (default; the original's final form)
  entropy_minus    mean H(softmax(r - sg(G)))   (seed 000: prior = posterior - likelihood)
  entropy_plain    mean H(softmax(r))
  dyntrm_original  mean H(softmax(G(z)))        G recomputed with live z and C proportional to z
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.config import ModelConfig
from tinyonn_jax.families.dyntrm.sars.surprise import SiteStats, goodness
from tinyonn_jax.nn import routing


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy (nats) of softmax over the last axis."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def site_routers(params: dict, cfg: ModelConfig) -> dict[str, tuple]:
    """(proto, gate, mode, top_k, aux key of u) per call site kind."""
    sites = cfg.routed_sites
    attn = params["block"]["attn"]
    out = {c: (attn[f"proto_{c}"], attn[f"gate_{c}"], cfg.attn_routing, cfg.attn_top_k, "u_attn")
           for c in ("q", "k", "v") if c in sites}
    if "ffn" in sites:
        ffn = params["block"]["ffn"]
        out["ffn"] = (ffn["proto"], ffn["gate"], cfg.ffn_routing, cfg.ffn_top_k, "u_ffn")
    return out


def site_meta_loss(r: jax.Array, stats: SiteStats, mode: str, top_k: int,
                    variant: str) -> jax.Array:
    g = jax.lax.stop_gradient(stats.goodness)
    if variant == "entropy_plus":
        return entropy(r + g)
    if variant == "entropy_minus":
        return entropy(r - g)
    if variant == "entropy_plain":
        return entropy(r)
    if variant == "dyntrm_original":
        z = routing.weights(r, routing.decide(r, mode, top_k), mode)
        zs = jax.lax.stop_gradient(z)
        c_unit = jax.lax.stop_gradient(jnp.where(zs > 0, stats.c / jnp.where(zs > 0, zs, 1), 0))
        return entropy(goodness(jax.lax.stop_gradient(stats.o), z, z * c_unit))
    raise ValueError(f"unknown meta loss {variant!r}")


def meta_loss(params: dict, aux: dict, stats: dict[str, SiteStats], valid: jax.Array,
              cfg: ModelConfig, variant: str) -> jax.Array:
    """Mean over sites, steps and valid tokens of the chosen meta loss. valid (B,T)."""
    total = 0.0
    routers = site_routers(params, cfg)
    for site, (proto, gate, mode, top_k, u_key) in routers.items():
        u = jax.lax.stop_gradient(aux[u_key])
        r = routing.prototype_scores(u, proto, gate)
        per_tok = site_meta_loss(r, stats[site], mode, top_k, variant)  # (S,B,T[,H])
        w = valid.reshape(1, *valid.shape, *([1] * (per_tok.ndim - 3)))
        w = jnp.broadcast_to(w, per_tok.shape)
        total = total + jnp.sum(per_tok * w) / jnp.maximum(jnp.sum(w), 1.0)
    return total / len(routers)
