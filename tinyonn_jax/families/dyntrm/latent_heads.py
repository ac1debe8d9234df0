"""DynSIHA+ in the latent-head layout of seed 000 section 2.1: each token picks attention heads.

One router reads the normalised input x_n = LN1(x) (B,T,D): prototypes ``proto_attn`` (P, D)
and gates ``gate_attn`` (P,) give routing weights z (B,T,P) (``nn.routing.route``: CAPR with a
dynamic number of heads, top-k, or dense). Latent head p is a full attention head with its own
``wq``, ``wk``, ``wv`` (P, D, Dh) and ``wo`` (P, Dh, D) slices. Keys and values are computed for
every head at every token (dense), causal segment-local attention (1D RoPE on q and k when
``rope != "none"``) gives head p's context o_tp at query t, its output is y_tp = o_tp Wo_p, and
the sublayer's output is the routed sum ``A_t = sum_p z_tp y_tp``: the weights gate the heads per
query token. A head that is inactive for a query adds nothing to that query but still serves
keys and values to the others.

Only the dense evaluation exists: ``attn_dispatch`` ``auto``, ``dense`` and ``scan`` all mean
it, and the config refuses ``sparse`` for this layout. The SARS closed forms of the layout are in
``sars/heads.py``.

Shapes: B batch, T tokens, D hidden, P latent heads, Dh = hidden / num_heads head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.nn.attention import attend, rope
from tinyonn_jax.nn.routing import Route, route

HEAD_WEIGHTS = ("wq", "wk", "wv", "wo")  # the parameters of one latent head, stacked over P


def route_heads(params: dict, xn: jax.Array, cfg: ModelConfig,
                live: jax.Array | None = None) -> Route:
    """Route x_n (B,T,D) over the latent heads -> Route with z (B,T,P).

    ``live`` (P,) bool, optional: heads outside it are absent (expert lifecycle).
    """
    return route(xn, params["proto_attn"], params["gate_attn"], cfg.attn_routing,
                 cfg.attn_top_k, live=live)


def head_qkv(params: dict, xn: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of every latent head before RoPE: x_n (B,T,D) -> 3 x (B,T,P,Dh)."""
    return tuple(jnp.einsum("btd,pde->btpe", xn, params[w].astype(xn.dtype))
                 for w in ("wq", "wk", "wv"))


def combine_heads(params: dict, z: jax.Array, o: jax.Array) -> jax.Array:
    """``A_t = sum_p z_tp o_tp Wo_p``: z (B,T,P), head contexts o (B,T,P,Dh) -> (B,T,D).

    The weights scale the contexts before the output projection, so the (B,T,P,D) head outputs
    are never formed.
    """
    zo = z.astype(o.dtype)[..., None] * o
    return jnp.einsum("btpe,ped->btd", zo, params["wo"].astype(o.dtype))


def head_contexts(params: dict, xn: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  cfg: ModelConfig) -> jax.Array:
    """Every latent head's attention context at every query: x_n (B,T,D) -> o (B,T,P,Dh)."""
    q, k, v = head_qkv(params, xn)
    if cfg.rope != "none":
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
    return attend(q, k, v, segment_ids, implementation=cfg.attention)


def attention_core(params: dict, xn: jax.Array, z: jax.Array, probe: jax.Array | None,
                   positions: jax.Array, segment_ids: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
    """Everything after routing: ``A = sum_p z_p y_p`` (+ the step's zero probe) -> (B,T,D)."""
    a = combine_heads(params, z, head_contexts(params, xn, positions, segment_ids, cfg))
    return a if probe is None else a + probe.astype(a.dtype)
