"""Exact per-expert parameter gradients from the cotangents of aggregated expert outputs.

Every expert call site computes ``A = sum_p z_p E_p(u)`` with ``E_p(u) = silu(u W1_p) W2_p``. The
forward adds a zero probe to every A, so one ``jax.vjp`` yields ``g = dL/dA`` for every site and
refinement step alongside the main gradient. With ``h_p = u W1_p`` and ``a_p = silu(h_p)``:

  dL/dW2_p (one token) = z_p a_p^T g               ->  ||.|| = z_p ||a_p|| ||g||
  dL/dW1_p (one token) = z_p u^T [(g W2_p^T) * silu'(h_p)]
                                                   ->  ||.|| = z_p ||(g W2_p^T) * silu'(h_p)|| ||u||

Summing the outer products over tokens gives the exact per-site gradients (``site_expert_grads``).
Importance: the attribution ``O_p = |<g, z_p E_p(u)>|`` (first-order loss change if expert p were
removed) or the original's ``max_d |g|`` (identical for every p: kept for comparison only).
Goodness (seed 000): ``G = mas(O) * (mas(z) - mas(C))`` over the expert axis.

The latent attention heads (site ``attn``, ``attn_layout="latent_heads"``) are full attention
heads, not ExpertMLPs: their closed forms are in ``sars/heads.py`` and come here as ``HeadStats``
with the same ``c``, ``o`` and ``goodness``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import ATTN, QKV, Aux, Probes
from tinyonn_jax.families.dyntrm.sars import heads
from tinyonn_jax.nn import experts
from tinyonn_jax.nn.expert_vjps import StatChannels, expert_pair_stats
from tinyonn_jax.nn.routing import mas


class SiteStats(NamedTuple):
    """Per-token, per-expert quantities of one kind of call site. All (S, ..., P)."""

    c: jax.Array  # ||dL/dW_p|| per token: sqrt(||dW1_p||^2 + ||dW2_p||^2)
    c_w1: jax.Array
    c_w2: jax.Array
    o: jax.Array  # importance
    goodness: jax.Array


class HeadStats(NamedTuple):
    """Per (query token, latent head) quantities of the attn site. All (B,T,P) for one step,
    (S,B,T,P) from ``all_site_stats``."""

    c: jax.Array  # ||d f_tp / d(Wq_p, Wk_p, Wv_p, Wo_p)|| with f_tp = <g_t, z_tp y_tp>
    c_q: jax.Array  # the parts: ||dWq_p||, ...
    c_k: jax.Array
    c_v: jax.Array
    c_o: jax.Array
    o: jax.Array  # importance
    goodness: jax.Array


def head_token_stats(attn: dict, u: jax.Array, z: jax.Array, g: jax.Array,
                     positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig,
                     importance: str) -> HeadStats:
    """HeadStats of one step of the attn site: the latent heads' parameters ``attn``, their input
    x_n (B,T,D), routing z (B,T,P), the probe's cotangent g (B,T,D), positions and segment ids
    (B,T) of the batch."""
    n = heads.token_grad_norms(attn, u, z, g, positions, segment_ids,
                               cfg.rope_base if cfg.rope != "none" else None)
    st = site_stats(z, g, n.c_q, jnp.sqrt(n.c_k**2 + n.c_v**2 + n.c_o**2), n.attribution,
                    importance)  # c = sqrt(c_q^2 + rest^2): the norm over all four matrices
    return HeadStats(c=st.c, c_q=n.c_q, c_k=n.c_k, c_v=n.c_v, c_o=n.c_o, o=st.o,
                     goodness=st.goodness)


def silu_grad(h: jax.Array) -> jax.Array:
    s = jax.nn.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


def _norm(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))


def site_stats(z: jax.Array, g: jax.Array, c_w1: jax.Array, c_w2: jax.Array,
               attribution: jax.Array, importance: str) -> SiteStats:
    """Assemble a site's SiteStats from its per-pair gradient norms (..., P).

    ``attribution`` is ``z_p <g, E_p(u)>`` per pair; with ``importance="output_grad"`` the
    importance is the original's ``max_d |g|`` instead (the same for every expert).
    """
    c = jnp.sqrt(jnp.square(c_w1) + jnp.square(c_w2))
    if importance == "attribution":
        o = jnp.abs(attribution)
    elif importance == "output_grad":
        o = jnp.broadcast_to(jnp.max(jnp.abs(g), axis=-1)[..., None], z.shape)
    else:
        raise ValueError(f"unknown importance {importance!r}")
    return SiteStats(c=c, c_w1=c_w1, c_w2=c_w2, o=o, goodness=goodness(o, z, c))


def token_stats(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...], gs: tuple[jax.Array, ...],
                importance: str) -> tuple[SiteStats, ...]:
    """Per-token C, O and G for sites that share expert inputs u (the q, k, v of one step).

    u (..., Din); each z (..., P); each g (..., Dout). The pre-activations are computed once and
    shared by all sites, mirroring the forward.
    """
    h = experts.bank_hidden(bank, u)  # (..., P, F)
    a, da = jax.nn.silu(h), silu_grad(h)
    a_norm, u_norm = _norm(a), _norm(u)[..., None]
    out = []
    for z, g in zip(zs, gs, strict=True):  # over call sites sharing u, never over experts
        gw = jnp.einsum("...o,pfo->...pf", g, bank["w2"])
        out.append(site_stats(z, g, z * _norm(gw * da) * u_norm, z * _norm(g)[..., None] * a_norm,
                              z * jnp.sum(gw * a, axis=-1), importance))
    return tuple(out)


def stats_from_sink(z: jax.Array, g: jax.Array | None, raw: jax.Array,
                    importance: str) -> SiteStats:
    """SiteStats from the cotangent of a statistics sink (``experts.apply_with_stats``).

    raw (..., P, 3) holds ``StatChannels`` per pair, unweighted; z (..., P); g (..., Dout) only
    serves the ``output_grad`` importance (may be None for ``attribution``).
    """
    ch = StatChannels.unstack(raw)
    return site_stats(z, g, z * ch.gwd_norm_u_norm, z * ch.g_norm_a_norm, z * ch.g_dot_y,
                      importance)


def stats_from_shared_sink(zs: tuple[jax.Array, ...], gs: tuple, raw: jax.Array,
                           importance: str) -> tuple[SiteStats, ...]:
    """``stats_from_sink`` for sites sharing one bank (q, k, v): raw (..., P, Z, 3) holds the
    statistics of site i at ``[..., i, :]`` (``experts.apply_scan_stats_shared``)."""
    return tuple(stats_from_sink(z, g, raw[..., i, :], importance)
                 for i, (z, g) in enumerate(zip(zs, gs, strict=True)))


def token_stats_scan(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
                     gs: tuple[jax.Array, ...], importance: str) -> tuple[SiteStats, ...]:
    """``token_stats`` computed one expert at a time (``lax.scan`` over the expert axis).

    The same closed forms on contiguous (N, F) matmuls per expert, as the ``scan`` dispatch of
    the forward does; never differentiated (the meta loss treats the statistics as constants).
    """
    lead = zs[0].shape[:-1]
    u2 = u.reshape(-1, u.shape[-1]).astype(jnp.float32)
    g3 = jnp.stack([g.reshape(-1, g.shape[-1]) for g in gs]).astype(jnp.float32)  # (Z, N, Dout)

    def one_expert(_, xs):
        w1, w2 = xs  # (Din, F), (F, Dout)
        return None, expert_pair_stats(w2, u2, u2 @ w1, g3)[3]  # (Z, N, 3)

    _, raw = jax.lax.scan(one_expert, None, (bank["w1"], bank["w2"]))  # (P, Z, N, 3)
    raw = jnp.transpose(raw, (2, 0, 1, 3))  # (N, P, Z, 3): the layout of a statistics sink
    return stats_from_shared_sink(zs, gs, raw.reshape(*lead, *raw.shape[1:]), importance)


def dense_token_stats(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
                      gs: tuple[jax.Array, ...], importance: str,
                      dispatch: str) -> tuple[SiteStats, ...]:
    """``token_stats`` by the dense evaluation the forward used (batched, or ``scan``)."""
    if experts.resolve_dispatch(dispatch) == "scan":
        return token_stats_scan(bank, u, zs, gs, importance)
    return token_stats(bank, u, zs, gs, importance)


def token_stats_sparse_shared(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
                              gs: tuple[jax.Array, ...], frac: float,
                              importance: str) -> tuple[SiteStats, ...]:
    """``token_stats`` on the active (row, expert) pairs only (sparse dispatch).

    Uses the forward's dispatch (``experts.apply_sparse_shared``: the union of the sites'
    active sets, same capacity, same order), so the quantities are exact for every pair the
    forward computed and zero for dropped and inactive pairs, like z. The pre-activations are
    computed once per slot and shared by the sites.
    """
    lead, p = zs[0].shape[:-1], zs[0].shape[-1]
    u2 = u.reshape(-1, u.shape[-1])
    n = u2.shape[0]
    z2s = [z.reshape(-1, p) for z in zs]
    idx = experts.dispatch_indices(experts.union_mask([z > 0 for z in z2s]),
                                   experts.capacity(n, frac))  # (P, C)
    ue = experts.gather_slots(u2, idx)
    h = jnp.einsum("pcd,pdf->pcf", ue, bank["w1"])
    a, da = jax.nn.silu(h), silu_grad(h)
    a_norm, u_norm = _norm(a), _norm(ue)
    cols = jnp.broadcast_to(jnp.arange(p)[:, None], idx.shape)

    def to_rows(v):  # (P, C) slot values -> (N, P); empty slots write into a dropped row
        return jnp.zeros((n + 1, p), v.dtype).at[idx, cols].set(v)[:n].reshape(*lead, p)

    out = []
    for z, z2, g in zip(zs, z2s, gs, strict=True):  # over sites sharing u, never over experts
        ge, ze = experts.gather_slots(g.reshape(-1, g.shape[-1]), idx), \
            experts.slot_weights(z2, idx)
        gw = jnp.einsum("pco,pfo->pcf", ge, bank["w2"])
        out.append(site_stats(z, g, to_rows(ze * _norm(gw * da) * u_norm),
                              to_rows(ze * _norm(ge) * a_norm),
                              to_rows(ze * jnp.sum(gw * a, axis=-1)), importance))
    return tuple(out)


def token_stats_sparse(bank: dict, u: jax.Array, z: jax.Array, g: jax.Array, frac: float,
                       importance: str) -> SiteStats:
    """``token_stats_sparse_shared`` for a single site (the FFN experts)."""
    return token_stats_sparse_shared(bank, u, (z,), (g,), frac, importance)[0]


def goodness(o: jax.Array, z: jax.Array, c: jax.Array) -> jax.Array:
    """Seed 000: ``mas(O) * (mas(z) - mas(C))`` over the last (expert) axis."""
    return mas(o) * (mas(z) - mas(c))


def all_site_stats(params: dict, aux: Aux, g_probes: Probes, cfg: ModelConfig,
                   importance: str = "attribution") -> dict[str, SiteStats]:
    """SiteStats for 'q', 'k', 'v' (S,B,T,H,P) and 'ffn' (S,B,T,E), HeadStats for 'attn'
    (S,B,T,P), of the sites that exist, mapped over steps.

    ``g_probes``: the probes' cotangents. ``lax.map`` over refinement steps keeps peak memory at
    one step's pre-activations.
    """
    block = params["block"]
    steps = aux.steps

    def attn_step(xs):
        u, zq, zk, zv, gq, gk, gv = xs
        lib = block["attn"]["library"]
        if cfg.attn_dispatch == "sparse":
            return token_stats_sparse_shared(lib, u, (zq, zk, zv), (gq, gk, gv),
                                             cfg.attn_capacity, importance)
        return dense_token_stats(lib, u, (zq, zk, zv), (gq, gk, gv), importance,
                                 cfg.attn_dispatch)

    stats = {}
    if g_probes.attn_stats is not None:  # computed by the latent-head library's backward pass
        stats.update(zip(QKV, stats_from_shared_sink(
            tuple(steps.site(c).z for c in QKV), tuple(g_probes.site(c) for c in QKV),
            g_probes.attn_stats, importance), strict=True))
    elif "q" in cfg.routed_sites:
        q, k, v = jax.lax.map(attn_step, (steps.u_attn, steps.q.z, steps.k.z, steps.v.z,
                                          g_probes.q, g_probes.k, g_probes.v))
        stats.update(q=q, k=k, v=v)
    if ATTN in cfg.routed_sites:
        ctx = aux.context

        def heads_step(xs):
            u, z, g = xs
            return head_token_stats(block["attn"], u, z, g, ctx.positions, ctx.segment_ids, cfg,
                                    importance)

        stats[ATTN] = jax.lax.map(heads_step, (steps.u_latent, steps.attn.z, g_probes.attn))
    if g_probes.ffn_stats is not None:  # computed by the FFN experts' backward pass
        stats["ffn"] = stats_from_sink(steps.ffn.z, g_probes.ffn, g_probes.ffn_stats, importance)
    elif "ffn" in cfg.routed_sites:
        def ffn_step(xs):
            u, z, g = xs
            if cfg.ffn_dispatch == "sparse":
                return token_stats_sparse(block["ffn"]["bank"], u, z, g, cfg.capacity_frac,
                                          importance)
            return dense_token_stats(block["ffn"]["bank"], u, (z,), (g,), importance,
                                     cfg.ffn_dispatch)[0]

        stats["ffn"] = jax.lax.map(ffn_step, (steps.u_ffn, steps.ffn.z, g_probes.ffn))
    return stats


def site_expert_grads(bank: dict, u: jax.Array, z: jax.Array, g: jax.Array) -> dict:
    """Exact gradient of one call site w.r.t. each expert, summed over its tokens.

    u (N, Din), z (N, P), g (N, Dout) with N = all token positions of the site (flatten first).
    Returns {'w1': (P, Din, F), 'w2': (P, F, Dout)}, the same layout as the bank.
    """
    h = experts.bank_hidden(bank, u)
    a = jax.nn.silu(h)
    gw = jnp.einsum("no,pfo->npf", g, bank["w2"])
    dh = z[..., None] * gw * silu_grad(h)
    return {"w1": jnp.einsum("nd,npf->pdf", u, dh), "w2": jnp.einsum("np,npf,no->pfo", z, a, g)}


def expert_grad_norms(bank_grad: dict) -> jax.Array:
    """Per-expert norm of a bank-shaped gradient {'w1': (P,...), 'w2': (P,...)} -> (P,)."""
    sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in bank_grad.values())
    return jnp.sqrt(sq)


def site_inputs(aux: Aux, g_probes: Probes, site: str, step: int):
    """(u, z, g) of one site at one step, flattened to (N, .) rows for ``site_expert_grads``."""
    u = aux.steps.expert_input(site)[step]
    z, g = aux.steps.site(site).z[step], g_probes.site(site)[step]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return flat(u), flat(z), flat(g)
