"""The whole model: embedding -> DynTRM recursion -> (final norm) -> LM head.

``forward(params, tokens, cfg) -> (logits, aux)`` is a pure function of a parameter pytree.
``aux`` (``residuals.Aux``) holds, stacked over refinement steps S, every residual later stages
need: expert inputs u and the routing (weights z, decisions, active-expert counts k) of every
call site, per-step hidden states, logits and halting logits. Zero ``probes``
(``residuals.Probes``) added to every aggregated expert output make the cotangents dL/dA of all
call sites available from the same backward pass (see ``families.dyntrm.sars``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax import backend, validate
from tinyonn_jax.families.dyntrm import dynsiha, modules, recursion
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import Aux, Probes
from tinyonn_jax.nn import context, experts
from tinyonn_jax.nn.norm import layer_norm

Params = dict


def compute_dtype(cfg: ModelConfig):
    """The activation dtype of ``cfg`` on the platform being traced for."""
    return backend.compute_dtype(cfg.compute_dtype)


def make_readout(cfg: ModelConfig):
    """``readout(params, x) -> (h, logits)``: final norm (if any) then the LM head, in float32."""

    def readout(params: Params, x: jax.Array):
        h = layer_norm(params["final_ln"], x, cfg.ln_eps) if cfg.final_norm else x
        logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return h, logits

    return readout


def probe_shapes(cfg: ModelConfig, batch: int, length: int) -> Probes:
    """Shapes of the zero probes: ``Probes`` with shape tuples in place of arrays, None for the
    probes that do not exist. One per routed call site, stacked over steps: (S,B,T,D) for the
    outputs of the latent heads (attn) and the FFN experts, (S,B,T,H,Dh) for q, k, v.

    When the FFN experts are evaluated one at a time (``scan``) or sparsely, a statistics sink
    ``ffn_stats`` (S,B,T,E,3) joins them: its cotangent is the FFN's SARS statistics, computed
    by the experts' own backward pass (``experts.apply_with_stats``). Likewise ``attn_stats``
    (S,B,T,H,P,3,3) for q, k, v of the latent-head library when
    ``dynsiha.library_stats_in_backward``.
    """
    s, h, dh = cfg.max_refinement_steps, cfg.num_heads, cfg.head_dim
    shapes = {site: (s, batch, length, cfg.hidden) if site in ("attn", "ffn")
              else (s, batch, length, h, dh) for site in cfg.routed_sites}
    if "ffn" in shapes and experts.stats_sink_dispatch(cfg.ffn_dispatch):
        shapes["ffn_stats"] = (s, batch, length, cfg.num_ffn_experts, experts.NUM_STAT_CHANNELS)
    if "q" in shapes and dynsiha.library_stats_in_backward(cfg):
        shapes["attn_stats"] = (s, batch, length, h, cfg.num_attn_experts, len(dynsiha.QKV),
                                experts.NUM_STAT_CHANNELS)
    return Probes(**shapes)


def zero_probes(cfg: ModelConfig, batch: int, length: int) -> Probes:
    """Float32 zeros of ``probe_shapes``."""
    return Probes._make(None if shape is None else jnp.zeros(shape, jnp.float32)
                        for shape in probe_shapes(cfg, batch, length))


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return params["embed"][tokens].astype(compute_dtype(cfg))


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            probes: Probes | None = None,
            live: dict | None = None) -> tuple[jax.Array, Aux]:
    """tokens (B,T) int -> logits (B,T,V) float32 after all refinement steps, aux residuals.

    ``live`` {pool: (P,) bool} (``lifecycle.PoolState.live``; pools ``attn`` and ``ffn``)
    leaves the dead experts out of routing; None: every expert is live.

    ``aux.steps`` (``residuals.StepResiduals``, leading axis S = refinement steps): with
    ``attn_layout="latent_heads"`` u_latent (S,B,T,D) and attn with z and mask (S,B,T,P), k
    (S,B,T); with ``"qkv_routers"`` u_attn (S,B,T,H,Dh) and q, k, v with z and mask
    (S,B,T,H,P), k (S,B,T,H); u_ffn (S,B,T,D); ffn with
    z and mask (S,B,T,E), k (S,B,T); overflow counts (S,) of sparse dispatch; hidden (S,B,T,D),
    logits (S,B,T,V), halt_logits (S,B,2). ``aux.context``: positions and segment ids.

    Raises ``ValueError`` for inputs that do not fit ``cfg`` (``validate.check_forward_inputs``:
    shapes, dtypes and the parameter tree, also under ``jax.jit``; token ids outside
    ``[0, cfg.vocab_size)`` when ``tokens`` is concrete).
    """
    validate.check_forward_inputs(params, tokens, cfg, modules.param_layout(cfg), positions,
                                  segment_ids)
    ctx = context.make_context(tokens, positions, segment_ids, live, cfg.rope)
    x = embed(params, tokens, cfg)
    _, steps = recursion.refine(params, x, ctx, cfg, probes, make_readout(cfg))
    return steps.logits[-1], Aux(steps=steps, context=ctx)


def forward_adaptive(params: Params, tokens: jax.Array, cfg: ModelConfig, *,
                     threshold: float | None = None, positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None,
                     depth: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inference with early exit: logits (B,T,V) and refinement steps used per row (B,).

    A row stops by the rule of ``cfg.halting`` (``halting.py``; ``threshold`` overrides
    ``cfg.halt_threshold`` of the learned rule), or, with ``depth`` (B,) int, after exactly
    ``depth[b]`` steps (clipped to [1, max_refinement_steps]). Inputs are checked as in
    ``forward``.
    """
    validate.check_forward_inputs(params, tokens, cfg, modules.param_layout(cfg), positions,
                                  segment_ids)
    ctx = context.make_context(tokens, positions, segment_ids, rope=cfg.rope)
    readout = make_readout(cfg)
    x, steps = recursion.refine_adaptive(params, embed(params, tokens, cfg), ctx, cfg, readout,
                                         threshold, depth)
    return readout(params, x)[1], steps


def count_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
