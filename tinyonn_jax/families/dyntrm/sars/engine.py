"""One pass of SARS over the refinement steps: statistics, goodness, meta loss and its gradient.

``lax.scan`` over steps: for each step the closed-form per-token statistics of every call site
(``surprise``; those of the FFN experts under the ``scan`` and ``sparse`` evaluations, and of the
latent-head library when ``dynsiha.library_stats_in_backward``, come ready from their own
backward pass, ``experts.apply_with_stats`` / ``experts.apply_scan_stats_shared``), the
goodness, the meta loss of that step and its gradient with respect to the routing parameters,
and running sums for the metrics. Per step and site it reads the expert inputs u, the bool
routing decisions and the probe cotangents (or the statistics sinks); the routing weights z
are rebuilt from u and the decisions (a small matmul) rather than kept in f32 for every step.
Nothing else of size (S, tokens, experts) is kept: the FFN experts' statistics sink is, and the
latent-head library's only without remat (``dynsiha.library_stats_in_backward``), so under
remat the memory of a SARS step grows with the refinement steps as slowly as the main step's.
The latent attention heads (site ``attn``) recompute their attention from the stored input x_n
and the batch layout for their closed forms (``sars/heads.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import ATTN, QKV, Aux, Probes, StepResiduals
from tinyonn_jax.families.dyntrm.sars import losses, surprise
from tinyonn_jax.nn import routing
from tinyonn_jax.nn.context import Context


class SarsResult(NamedTuple):
    meta_loss: jax.Array  # scalar, mean over steps, sites and valid tokens
    g_meta: dict  # params-shaped tree: meta-loss gradient on routing leaves, zeros elsewhere
    metrics: dict  # scalars: sars/C_mean[/site], sars/O_mean, sars/goodness_{pos,neg,zero},
    # sars/gating_acc[/site]


class _StepInputs(NamedTuple):
    """What the SARS pass reads of one refinement step (``lax.scan`` slices off the S axis)."""

    inputs: StepResiduals  # only the expert inputs u_attn (B,T,H,Dh), u_latent, u_ffn (B,T,D)
    masks: dict[str, jax.Array]  # site -> (B,T,H,P) / (B,T,E) bool routing decisions
    g: Probes  # the output cotangents the statistics need (others None) and the sinks'


def _router_leaves(params: dict, cfg: ModelConfig) -> dict:
    """{site: {'proto': ..., 'gate': ...}} of every routed call site."""
    return {site: {"proto": r.proto, "gate": r.gate}
            for site, r in losses.site_routers(params, cfg).items()}


def _scatter_router_grads(params: dict, g: dict, cfg: ModelConfig) -> dict:
    """Place per-site router gradients into a zero tree shaped like ``params``."""
    out = jax.tree.map(jnp.zeros_like, params)
    for site, leaves in g.items():
        if site == "ffn":
            out["block"]["ffn"]["proto"] = leaves["proto"]
            out["block"]["ffn"]["gate"] = leaves["gate"]
        else:  # proto_q / gate_q ... of the qkv routers, proto_attn / gate_attn of the heads
            out["block"]["attn"][f"proto_{site}"] = leaves["proto"]
            out["block"]["attn"][f"gate_{site}"] = leaves["gate"]
    return out


def _step_stats(params: dict, x: _StepInputs, z: dict[str, jax.Array], cfg: ModelConfig,
                importance: str, ctx: Context) -> dict:
    """SiteStats (HeadStats for attn) of every routed site of one step; z: site -> its routing
    weights; ctx: the batch layout (positions, segment ids) the latent heads attend with."""
    block = params["block"]
    stats = {}
    if ATTN in z:
        stats[ATTN] = surprise.head_token_stats(block["attn"], x.inputs.u_latent, z[ATTN],
                                                x.g.attn, ctx.positions, ctx.segment_ids, cfg,
                                                importance)
    attn_sites = [c for c in QKV if c in z]
    if x.g.attn_stats is not None:  # the library's backward pass computed them
        stats.update(zip(attn_sites, surprise.stats_from_shared_sink(
            tuple(z[c] for c in attn_sites), tuple(x.g.site(c) for c in attn_sites),
            x.g.attn_stats, importance), strict=True))
    elif attn_sites:
        lib = block["attn"]["library"]
        zs = tuple(z[c] for c in attn_sites)
        gs = tuple(x.g.site(c) for c in attn_sites)
        u = x.inputs.u_attn
        if cfg.attn_dispatch == "sparse":  # the forward's shared dispatch of q, k, v
            got = surprise.token_stats_sparse_shared(lib, u, zs, gs, cfg.attn_capacity,
                                                     importance)
        else:
            got = surprise.dense_token_stats(lib, u, zs, gs, importance, cfg.attn_dispatch)
        stats.update(zip(attn_sites, got, strict=True))
    if x.g.ffn_stats is not None:  # the FFN experts' backward pass computed them
        stats["ffn"] = surprise.stats_from_sink(z["ffn"], x.g.ffn, x.g.ffn_stats, importance)
    elif "ffn" in z:
        bank = block["ffn"]["bank"]
        u = x.inputs.u_ffn
        if cfg.ffn_dispatch == "sparse":
            stats["ffn"] = surprise.token_stats_sparse(bank, u, z["ffn"], x.g.ffn,
                                                       cfg.capacity_frac, importance)
        else:
            stats["ffn"] = surprise.dense_token_stats(bank, u, (z["ffn"],), (x.g.ffn,),
                                                      importance, cfg.ffn_dispatch)[0]
    return stats


def _gating_hits(z: jax.Array, mask: jax.Array, c: jax.Array,
                 w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hits, informative rows) of one site and step for ``sars/gating_acc``: a row (token[,
    head]) is informative when valid (w) and some routed expert has a cost C > 0 (C is 0 where
    the loss does not depend on the output); a hit when its largest routing weight is the
    routed expert of least C. z, mask, c (..., P); w (...)."""
    informative = w * jnp.any(mask & (c > 0), axis=-1)
    pick = jnp.argmax(jnp.where(mask, z, -jnp.inf), axis=-1)
    best = jnp.argmin(jnp.where(mask, c, jnp.inf), axis=-1)
    return jnp.sum((pick == best) * informative), jnp.sum(informative)


def sars_pass(params: dict, aux: Aux, g_probes: Probes, valid: jax.Array, cfg: ModelConfig,
              importance: str, variant: str, live: dict | None = None) -> SarsResult:
    """Scan over refinement steps. aux / g_probes as returned by the forward and its vjp (the
    probes' cotangents); valid (B,T) marks real tokens; ``live`` {site: (P,) bool} (or None:
    every expert live) leaves dead experts out of the meta loss."""
    live = live or {}
    routers = losses.site_routers(params, cfg)
    steps = aux.steps

    def needs_g(site: str) -> bool:
        sink = {"ffn": g_probes.ffn_stats, ATTN: None}.get(site, g_probes.attn_stats)
        # A sink holds the statistics: the output cotangent then only serves the output_grad
        # importance, and is not kept for this pass otherwise.
        return sink is None or importance == "output_grad"

    xs = _StepInputs(
        inputs=StepResiduals(u_attn=steps.u_attn, u_latent=steps.u_latent, u_ffn=steps.u_ffn),
        masks={site: steps.site(site).mask for site in routers},  # z is rebuilt per step
        g=Probes(ffn_stats=g_probes.ffn_stats, attn_stats=g_probes.attn_stats,
                 **{site: g_probes.site(site) for site in routers if needs_g(site)}))
    leaves = _router_leaves(params, cfg)

    def step_loss(lv, x: _StepInputs, stats):
        total = 0.0
        for site, router in routers.items():
            r = routing.prototype_scores(jax.lax.stop_gradient(x.inputs.expert_input(site)),
                                         lv[site]["proto"], lv[site]["gate"])
            per_tok = losses.site_meta_loss(r, stats[site], router.mode, router.top_k,
                                            variant, live.get(site))  # (B,T[,H])
            w = jnp.broadcast_to(valid.reshape(*valid.shape, *([1] * (per_tok.ndim - 2))),
                                 per_tok.shape)
            total = total + jnp.sum(per_tok * w) / jnp.maximum(jnp.sum(w), 1.0)
        return total / len(routers)

    def body(carry, x: _StepInputs):
        loss_acc, grad_acc, sums = carry
        z = {site: jax.lax.stop_gradient(routing.weights_for_decision(
            x.inputs.expert_input(site), r.proto, r.gate, x.masks[site], r.mode))
            for site, r in routers.items()}
        stats = _step_stats(params, x, z, cfg, importance, aux.context)
        loss, grad = jax.value_and_grad(step_loss)(leaves, x, stats)
        new = {}
        for site, st in stats.items():
            w = valid.reshape(*valid.shape, *([1] * (st.c.ndim - 2)))
            active = x.masks[site] * w
            hits, informative = _gating_hits(z[site], x.masks[site], st.c, w[..., 0])
            new[site] = jnp.stack([jnp.sum(st.c * active), jnp.sum(st.o * active),
                                   jnp.sum((st.goodness > 0) * active),
                                   jnp.sum((st.goodness < 0) * active), jnp.sum(active),
                                   hits, informative])
        sums = {k: sums[k] + new[k] for k in sums}
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grad), sums), None

    init = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, leaves),
            {site: jnp.zeros((7,), jnp.float32) for site in routers})
    (loss, grad, sums), _ = jax.lax.scan(body, init, xs)
    steps = cfg.max_refinement_steps
    loss, grad = loss / steps, jax.tree.map(lambda g: g / steps, grad)
    m = {}
    for site, (c, o, _, _, n, hits, informative) in sums.items():
        m[f"sars/C_mean/{site}"] = c / jnp.maximum(n, 1.0)
        m[f"sars/O_mean/{site}"] = o / jnp.maximum(n, 1.0)
        m[f"sars/gating_acc/{site}"] = hits / jnp.maximum(informative, 1.0)
    tot = sum(sums.values())
    n_act = jnp.maximum(tot[4], 1.0)
    m["sars/C_mean"] = jnp.mean(jnp.stack([m[f"sars/C_mean/{s}"] for s in sums]))
    m["sars/O_mean"] = jnp.mean(jnp.stack([m[f"sars/O_mean/{s}"] for s in sums]))
    m["sars/goodness_pos"] = tot[2] / n_act
    m["sars/goodness_neg"] = tot[3] / n_act
    m["sars/goodness_zero"] = 1.0 - (tot[2] + tot[3]) / n_act
    # argmax routing weight == argmin per-token cost C over the routed experts (seed 002)
    m["sars/gating_acc"] = tot[5] / jnp.maximum(tot[6], 1.0)
    return SarsResult(meta_loss=loss, g_meta=_scatter_router_grads(params, grad, cfg), metrics=m)
