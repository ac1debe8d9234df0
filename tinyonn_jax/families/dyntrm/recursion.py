"""DynTRM: one shared pre-norm block applied for N refinement steps with ``lax.scan``.

Block: ``x += attn(LN1 x); x += ffn(LN2 x)``. With ``model.remat`` the whole step is
rematerialised except the routing decisions, which are saved (``remat_body``): the backward pass
reuses the forward's decisions, so a recomputation can never flip one (seed 002).

The ACT halting head reads the mean of the normalised hidden state over a row's valid tokens and
emits (q_halt, q_continue) per refinement step. Training runs all steps; inference may stop each
row early (``refine_adaptive``, by the rule of ``model.halting``, see ``halting.py``, or after a
given per-row depth) with fixed shapes: finished rows are frozen with ``jnp.where`` and the
``while_loop`` ends when every row has halted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm import dense, dynmoe, dynsiha, halting, latent_heads
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import Probes, SiteResidual, StepResiduals
from tinyonn_jax.nn import attention, experts
from tinyonn_jax.nn.context import Context
from tinyonn_jax.nn.norm import layer_norm

ROUTING_NAME = "routing"  # checkpoint name of the routing decisions (bool masks)


def remat_body(fn, policy: str):
    """Rematerialise a whole refinement step, except its routing decisions.

    Routing masks are tagged ``ROUTING_NAME`` (``model.routing.route``); every policy saves
    them, so the backward pass reuses the forward's decisions and a recomputation (in bf16,
    with another fusion) can never flip a ``> 0`` decision (seed 002's inner/outer
    checkpointing). The weights are recomputed from the saved masks: saving them too would
    store a second copy of the weights z the step already returns for SARS (scan
    residuals and scan outputs are separate buffers). ``full`` saves nothing else;
    ``save_dots`` also keeps matmul results.
    """
    if policy == "none":
        return fn
    keep = jax.checkpoint_policies.save_only_these_names(ROUTING_NAME)
    if policy == "full":
        return jax.checkpoint(fn, policy=keep, prevent_cse=False)
    if policy == "save_dots":
        both = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots, keep)
        return jax.checkpoint(fn, policy=both, prevent_cse=False)
    raise ValueError(f"unknown remat policy {policy!r}")


def block_step(block: dict, x: jax.Array, probes: Probes | None, ctx: Context,
               cfg: ModelConfig) -> tuple[jax.Array, StepResiduals]:
    """One refinement step. x (B,T,D) -> (x, residuals of every expert call site).

    ``probes`` holds one step's zero probes (no S axis). The returned residuals leave
    ``hidden``, ``logits`` and ``halt_logits`` None (``refine`` adds them).
    """
    dt = x.dtype
    # Dense baselines (``dense``) have no call site: no u/z/k residuals, no probes.
    res = StepResiduals()
    if cfg.attn_kind == "mha":
        x = dense.mha_sublayer(block, x, ctx.positions, ctx.segment_ids, cfg)
    elif cfg.latent_heads:  # seed 000 section 2.1: one router picks latent heads per token
        xn = layer_norm(block["ln1"], x, cfg.ln_eps)
        ra = latent_heads.route_heads(block["attn"], xn, cfg,
                                      live=None if ctx.live is None else ctx.live.get("attn"))
        x = x + latent_heads.attention_core(block["attn"], xn, ra.z,
                                            None if probes is None else probes.attn,
                                            ctx.positions, ctx.segment_ids, cfg).astype(dt)
        res = res._replace(u_latent=xn, attn=SiteResidual(ra.z, ra.mask, ra.k))
    else:
        u = attention.split_heads(layer_norm(block["ln1"], x, cfg.ln_eps), cfg.num_heads)
        routes = dynsiha.route_attention(block["attn"], u, cfg, live=None if ctx.live is None
                                         else ctx.live.get("attn"))
        z = {c: r.z for c, r in routes.items()}
        x = x + dynsiha.attention_core(block["attn"], u, z, probes, ctx.positions,
                                         ctx.segment_ids, cfg,
                                         None if probes is None else probes.attn_stats
                                         ).astype(dt)
        overflow = dict.fromkeys(routes)
        if cfg.attn_dispatch == "sparse":  # q, k, v share one dispatch of the library
            cap = experts.capacity(u.size // u.shape[-1], cfg.attn_capacity)
            kept = experts.kept_pairs(experts.union_mask([r.z > 0 for r in routes.values()]), cap)
            overflow = {c: experts.dropped_count(r.z > 0, kept) for c, r in routes.items()}
        res = res._replace(u_attn=u, **{c: SiteResidual(r.z, r.mask, r.k, overflow[c])
                                        for c, r in routes.items()})
    if cfg.use_ffn and cfg.ffn_kind == "swiglu":
        x = dense.swiglu_sublayer(block, x, cfg)
    elif cfg.use_ffn:
        uf = layer_norm(block["ln2"], x, cfg.ln_eps)
        rf = dynmoe.route_ffn(block["ffn"], uf, cfg,
                              live=None if ctx.live is None else ctx.live.get("ffn"))
        x = x + dynmoe.ffn_core(block["ffn"], uf, rf.z, None if probes is None else probes.ffn,
                                cfg.ffn_dispatch, cfg.capacity_frac,
                                None if probes is None else probes.ffn_stats).astype(dt)
        overflow_f = None
        if cfg.ffn_dispatch == "sparse":
            cap_f = experts.capacity(uf.size // uf.shape[-1], cfg.capacity_frac)
            overflow_f = experts.overflow_count(rf.z > 0, cap_f)
        res = res._replace(u_ffn=uf, ffn=SiteResidual(rf.z, rf.mask, rf.k, overflow_f))
    return x, res


def refine(params: dict, x: jax.Array, ctx: Context, cfg: ModelConfig,
           probes: Probes | None, readout) -> tuple[jax.Array, StepResiduals]:
    """Scan the shared block over ``max_refinement_steps``.

    ``readout(params, x) -> (h_norm, logits)`` is applied after every step. ``probes`` (or None)
    carry a leading S axis. Returns the final hidden state (B,T,D) and the per-step residuals
    stacked on a leading step axis S.
    """

    def body(x, probes_s):
        x, res = block_step(params["block"], x, probes_s, ctx, cfg)
        h, logits = readout(params, x)
        halt = halting.halting_logits(params["halt"], h, ctx.valid)
        return x, res._replace(logits=logits, halt_logits=halt, hidden=x)

    return jax.lax.scan(remat_body(body, cfg.remat), x, probes, length=cfg.max_refinement_steps)


def refine_adaptive(params: dict, x: jax.Array, ctx: Context, cfg: ModelConfig,
                    readout, threshold: float | None = None,
                    depth: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inference with per-row early exit. Returns final hidden (B,T,D) and steps taken (B,).

    A row stops after the first step where ``halting.should_stop`` (``model.halting``; the
    learned rule with ``threshold`` if given) says so, or, with ``depth`` (B,) int, after
    ``depth[b]`` steps (clipped to [1, max_refinement_steps]) whatever the rule says: the
    same computation as a generation that decided its depths from the prompt.
    """
    b = x.shape[0]

    def cond(carry):
        s, _, halted, _ = carry
        return (s < cfg.max_refinement_steps) & ~jnp.all(halted)

    def body(carry):
        s, x, halted, steps = carry
        x_new, _ = block_step(params["block"], x, None, ctx, cfg)
        if depth is None:
            h, logits = readout(params, x_new)
            stop = halting.should_stop(params, h, logits, ctx.valid, cfg, threshold)
        else:
            stop = s + 1 >= depth
        x = jnp.where(halted[:, None, None], x, x_new)
        steps = steps + (~halted).astype(jnp.int32)
        return s + 1, x, halted | stop, steps

    init = (jnp.int32(0), x, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    _, x, _, steps = jax.lax.while_loop(cond, body, init)
    return x, steps
