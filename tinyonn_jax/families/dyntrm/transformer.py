"""The whole model: embedding -> DynTRM recursion -> (final norm) -> LM head.

``forward(params, tokens, cfg) -> (logits, aux)`` is a pure function of a parameter pytree.
``aux`` holds, stacked over refinement steps S, every residual later stages need: expert inputs u
and routing weights z of every call site, active-expert counts k, per-step hidden states, logits
and halting logits. Zero ``probes`` added to every aggregated expert output make the cotangents
dL/dA of all call sites available from the same backward pass (see ``tinyonn_jax.sars``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax import validate
from tinyonn_jax.config import ModelConfig
from tinyonn_jax.families.dyntrm import dynsiha, recursion
from tinyonn_jax.nn import context, experts
from tinyonn_jax.nn.norm import init_layer_norm, layer_norm

Params = dict


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
    """Parameters of the full model as a nested dict of float32 arrays."""
    k_emb, k_block, k_head = jax.random.split(key, 3)
    params = {
        "embed": cfg.init_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden)),
        "block": recursion.init_block(k_block, cfg),
        "lm_head": jax.random.normal(k_head, (cfg.hidden, cfg.vocab_size)) / np.sqrt(cfg.hidden),
        "halt": recursion.init_halting(cfg),
    }
    if cfg.final_norm:
        params["final_ln"] = init_layer_norm(cfg.hidden)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def make_readout(cfg: ModelConfig):
    """``readout(params, x) -> (h, logits)``: final norm (if any) then the LM head, in float32."""

    def readout(params: Params, x: jax.Array):
        h = layer_norm(params["final_ln"], x, cfg.ln_eps) if cfg.final_norm else x
        logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return h, logits

    return readout


def probe_shapes(cfg: ModelConfig, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the zero probes: one per call site kind, stacked over steps.

    When the FFN experts are evaluated one at a time (``scan``) or sparsely, a statistics sink
    ``recursion.FFN_STATS`` (S,B,T,E,3) joins them: its cotangent is the FFN's SARS statistics,
    computed by the experts' own backward pass (``experts.apply_with_stats``). Likewise
    ``recursion.ATTN_STATS`` (S,B,T,H,P,3,3) for q, k, v of the latent-head library when
    ``dynsiha.library_stats_in_backward``.
    """
    s, h, dh = cfg.max_refinement_steps, cfg.num_heads, cfg.head_dim
    shapes = {site: (s, batch, length, cfg.hidden) if site == "ffn" else (s, batch, length, h, dh)
              for site in cfg.routed_sites}
    if "ffn" in shapes and experts.stats_sink_dispatch(cfg.ffn_dispatch):
        shapes[recursion.FFN_STATS] = (s, batch, length, cfg.num_ffn_experts,
                                       len(experts.STAT_CHANNELS))
    if "q" in shapes and dynsiha.library_stats_in_backward(cfg):
        shapes[recursion.ATTN_STATS] = (s, batch, length, h, cfg.num_attn_experts,
                                        len(dynsiha.QKV), len(experts.STAT_CHANNELS))
    return shapes


def zero_probes(cfg: ModelConfig, batch: int, length: int) -> dict[str, jax.Array]:
    return {k: jnp.zeros(v, jnp.float32) for k, v in probe_shapes(cfg, batch, length).items()}


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return params["embed"][tokens].astype(compute_dtype(cfg))


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            probes: dict | None = None) -> tuple[jax.Array, dict]:
    """tokens (B,T) int -> logits (B,T,V) float32 after all refinement steps, aux residuals.

    aux keys (leading axis S = refinement steps): u_attn (S,B,T,H,Dh), z_q/z_k/z_v (S,B,T,H,P)
    with their bool decisions mask_q/mask_k/mask_v, k_q/k_k/k_v (S,B,T,H), u_ffn (S,B,T,D),
    z_ffn and mask_ffn (S,B,T,E), k_ffn (S,B,T), hidden (S,B,T,D),
    logits (S,B,T,V), halt_logits (S,B,2); plus 'context' (positions, segment ids).

    Raises ``ValueError`` for inputs that do not fit ``cfg`` (``validate.check_forward_inputs``:
    shapes, dtypes and the parameter tree, also under ``jax.jit``; token ids outside
    ``[0, cfg.vocab_size)`` when ``tokens`` is concrete).
    """
    validate.check_forward_inputs(params, tokens, cfg, positions, segment_ids)
    ctx = context.make_context(tokens, positions, segment_ids)
    x = embed(params, tokens, cfg)
    _, aux = recursion.refine(params, x, ctx, cfg, probes, make_readout(cfg))
    aux["context"] = ctx
    return aux["logits"][-1], aux


def forward_adaptive(params: Params, tokens: jax.Array, cfg: ModelConfig, *,
                     threshold: float | None = None, positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inference with ACT early exit: logits (B,T,V) and refinement steps used per row (B,).

    Inputs are checked as in ``forward``.
    """
    validate.check_forward_inputs(params, tokens, cfg, positions, segment_ids)
    ctx = context.make_context(tokens, positions, segment_ids)
    thr = cfg.halt_threshold if threshold is None else threshold
    readout = make_readout(cfg)
    x, steps = recursion.refine_adaptive(params, embed(params, tokens, cfg), ctx, cfg, readout,
                                         thr)
    return readout(params, x)[1], steps


def count_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
