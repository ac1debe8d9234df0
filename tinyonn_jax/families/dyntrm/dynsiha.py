"""DynSIHA+ as the original code built it (``attn_layout="qkv_routers"``): per-head q, k and v
composed from a shared latent-head library. The seed's layout is ``latent_heads.py``.

For each physical head h the normalised input slice u (B,T,H,Dh) is routed three times (own
prototypes and gates for q, k and v) over the P latent heads of one shared ExpertMLP library, and
``q = sum_p z_q,p E_p(u)`` (likewise k, v). Because the three compositions read the same u and the
same library, the library is evaluated once per step and only the weighting differs.
Then causal scaled dot-product attention (optionally with 1D RoPE) and an output projection.
"""

from __future__ import annotations

import jax

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import QKV, Probes
from tinyonn_jax.nn import experts
from tinyonn_jax.nn.attention import attend, rope
from tinyonn_jax.nn.routing import Route, route


def route_attention(params: dict, u: jax.Array, cfg: ModelConfig,
                    live: jax.Array | None = None) -> dict[str, Route]:
    """Route u (B,T,H,Dh) for q, k and v -> {c: Route with z (B,T,H,P)}.

    ``live`` (P,) bool, optional: library entries outside it are absent (expert lifecycle).
    """
    return {
        c: route(u, params[f"proto_{c}"], params[f"gate_{c}"], cfg.attn_routing, cfg.attn_top_k,
                 live=live)
        for c in QKV
    }


def library_stats_in_backward(cfg: ModelConfig) -> bool:
    """Whether the latent-head library returns its SARS statistics from its backward pass.

    With ``scan`` evaluation, its backward forms each of q, k, v's cotangents through every
    latent head anyway, so the statistics cost row norms there, where recomputing them after the
    backward pass costs four more matmuls per latent head (``sars.surprise.token_stats_scan``).
    They are kept per step as 3 sites x 3 values x P latent heads per (token, head), three
    times the q, k, v cotangents at the default sizes: small next to the activations every
    step keeps without remat, too much for ``remat`` (whose point is to keep little per step),
    which therefore keeps the cotangents and computes the statistics afterwards.
    """
    return (cfg.attn_kind == "dynsiha" and not cfg.latent_heads and cfg.remat == "none"
            and experts.resolve_dispatch(cfg.attn_dispatch) == "scan")


def compose_qkv(params: dict, u: jax.Array, z: dict[str, jax.Array],
                probes: Probes | None, dispatch: str = "dense",
                capacity_frac: float = 1.0,
                stats_sink: jax.Array | None = None) -> dict[str, jax.Array]:
    """q, k, v (B,T,H,Dh) = sum_p z_c,p E_p(u) (+ the zero probe of the site, one step's).

    The library is evaluated once and weighted three times. Dense (batched, or one expert at a
    time with ``scan``): on every (token, head, expert); sparse: on the (token, head, expert)
    triples active for q, k or v, each once. With a zero ``stats_sink`` (B,T,H,P,3,3) (``scan``
    only, see ``library_stats_in_backward``) the sink's cotangent is the SARS statistics of q, k
    and v (``experts.apply_scan_stats_shared``).
    """
    dispatch = experts.resolve_dispatch(dispatch)
    if stats_sink is not None:
        if dispatch != "scan":
            raise ValueError(f"a statistics sink needs the scan evaluation, not {dispatch!r}")
        outs = experts.apply_scan_stats_shared(params["library"], u, tuple(z[c] for c in QKV),
                                               stats_sink, keep_hidden=False)
    elif dispatch == "sparse":
        outs = experts.apply_sparse_shared(params["library"], u, tuple(z[c] for c in QKV),
                                           capacity_frac)
    elif dispatch == "scan":
        # K = head width: the library's matmuls are cheap to redo in the backward pass.
        outs = experts.apply_scan(params["library"], u, tuple(z[c] for c in QKV),
                                  remat="recompute")
    else:
        y = experts.bank_outputs(params["library"], u)
        outs = tuple(experts.combine(z[c], y) for c in QKV)  # three weightings, one library
    return {c: a if probes is None else a + probes.site(c).astype(a.dtype)
            for c, a in zip(QKV, outs, strict=True)}


def attention_core(params: dict, u: jax.Array, z: dict[str, jax.Array],
                   probes: Probes | None, positions: jax.Array,
                   segment_ids: jax.Array, cfg: ModelConfig,
                   stats_sink: jax.Array | None = None) -> jax.Array:
    """Everything after routing: compose q/k/v, RoPE, causal attention, o_proj -> (B,T,D)."""
    qkv = compose_qkv(params, u, z, probes, cfg.attn_dispatch, cfg.attn_capacity, stats_sink)
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    if cfg.rope != "none":
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
    o = attend(q, k, v, segment_ids, implementation=cfg.attention)
    o = o.reshape(*o.shape[:2], -1)
    return o @ params["o_proj"].astype(o.dtype)
