"""One ExpertMLP ``E(x) = silu(x W1) W2`` at a time, and the custom VJPs that return the SARS
statistics from the expert bank's own backward pass.

The per-pair SARS quantities (``families/dyntrm/sars/surprise.py``) are by-products of the
backward pass of ``sum_p z_p E_p(u)``: with gw_p = g W2_p^T, the backward forms
dh_p = z_p gw_p * silu'(h_p) and dL/dz_p = <gw_p, a_p> = <g, E_p(u)>. ``scan_stats`` (rows
shared by Z weightings: the FFN, or q, k, v of the latent-head library) and ``slots_stats``
(the expert slots of a sparse dispatch) have their own backward rule that returns them, as the
cotangent of a zero ``sink``, from the pre-activations their forward kept (or, for narrow
experts, recomputed): the statistics cost row norms instead of more matmuls per expert after the
backward pass. Both loop over experts with ``lax.scan`` (two plain matmuls per expert).
``experts.apply_scan_stats``, ``apply_scan_stats_shared`` and ``apply_sparse_stats`` reshape
bank, inputs and sink for them.

Shapes: W1 (P, Din, F), W2 (P, F, Dout); rows x (R, Din); Z weightings of the same rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class StatChannels(NamedTuple):
    """The SARS statistics of one (row, expert) pair for one output cotangent g, unweighted by z.

    A statistics sink's cotangent holds them stacked on its last axis in this order
    (``stack`` / ``unstack``); ``sars.surprise.stats_from_sink`` weights them by z.
    """

    g_norm_a_norm: jax.Array  # ||g|| ||a_p||: the norm of dL/dW2_p of the row, over z_p
    gwd_norm_u_norm: jax.Array  # ||gw_p * silu'(h_p)|| ||u||: ... of dL/dW1_p, over z_p
    g_dot_y: jax.Array  # <g, E_p(u)> = dL/dz_p: the attribution, over z_p

    def stack(self) -> jax.Array:
        """(...) channels -> (..., 3), the layout of a statistics sink."""
        return jnp.stack(self, -1)

    @classmethod
    def unstack(cls, raw: jax.Array) -> StatChannels:
        """(..., 3) statistics (a sink's cotangent) -> the (...) channels."""
        return cls(*(raw[..., i] for i in range(len(cls._fields))))


NUM_STAT_CHANNELS = len(StatChannels._fields)  # the last axis of a statistics sink


def _row_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1))


def expert_forward(w1: jax.Array, w2: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One expert on rows x (R, Din): pre-activations h (R, F) and output y (R, Dout)."""
    h = x @ w1.astype(x.dtype)
    return h, jax.nn.silu(h) @ w2.astype(x.dtype)


def expert_pair_stats(w2: jax.Array, x: jax.Array, h: jax.Array, g: jax.Array):
    """SARS statistics of one expert for Z output cotangents of the same rows, with the products
    its backward pass shares with them.

    Rows x (R, Din), pre-activations h = x W1 (R, F), cotangents g (Z, R, Dout). Returns
    a = silu(h) (R, F), gw = g W2^T and gwd = gw * silu'(h) (Z, R, F), and raw (Z, R, 3):
    ``StatChannels`` per row and cotangent, stacked.
    """
    sig = jax.nn.sigmoid(h)
    a = h * sig
    gw = jnp.einsum("zro,fo->zrf", g, w2.astype(g.dtype))  # each cotangent through W2
    gwd = gw * (sig * (1.0 + h * (1.0 - sig)))  # ... and through the SiLU
    dw = jnp.sum((gw * a).astype(jnp.float32), -1)
    raw = StatChannels(g_norm_a_norm=_row_norm(g) * _row_norm(a),
                       gwd_norm_u_norm=_row_norm(gwd) * _row_norm(x), g_dot_y=dw).stack()
    return a, gw, gwd, raw


def expert_backward(w1, w2, x, w, h, g):
    """Backward of ``sum_z w_z[:, None] * E(x)`` for one expert and Z weightings of the same rows:
    rows x (R, Din), weights w (Z, R), pre-activations h (R, F), output cotangents g (Z, R, Dout).

    Returns dW1, dW2, dx (R, Din) in float32, dw (Z, R) = <g_z, E(x)> and the statistics
    (Z, R, 3) of every weighting.
    """
    a, _, gwd, raw = expert_pair_stats(w2, x, h, g)
    dh = jnp.einsum("zr,zrf->rf", w.astype(gwd.dtype), gwd)
    dw1 = (x.T @ dh).astype(w1.dtype)
    dw2 = (a.T @ jnp.einsum("zr,zro->ro", w.astype(g.dtype), g)).astype(w2.dtype)
    dx = (dh @ w1.T.astype(dh.dtype)).astype(jnp.float32)
    return dw1, dw2, dx, StatChannels.unstack(raw).g_dot_y, raw


# --- dense rows: every expert on every row ---------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_stats(keep_hidden: bool, w1: jax.Array, w2: jax.Array, u: jax.Array, z: jax.Array,
               sink: jax.Array) -> jax.Array:
    """``sum_p z_p E_p(u)`` for Z weightings: u (N, Din), z (Z, N, P) -> (Z, N, Dout).

    The zero ``sink`` (N, P, Z, 3) receives, as its cotangent, the ``StatChannels`` of every
    (row, expert, weighting), each from its own output cotangent. ``keep_hidden``: the forward
    keeps every expert's pre-activations for the backward (wide experts) instead of recomputing
    them there (narrow experts: one cheap matmul).
    """
    return _scan_stats_fwd(keep_hidden, w1, w2, u, z, sink)[0]


def _scan_stats_fwd(keep_hidden, w1, w2, u, z, sink):
    del sink

    def one_expert(acc, xs):
        a1, a2, zp = xs  # (Din, F), (F, Dout), (Z, N)
        h, y = expert_forward(a1, a2, u)
        acc = acc + zp.astype(jnp.float32)[:, :, None] * y.astype(jnp.float32)[None]
        return acc, h if keep_hidden else None

    acc = jnp.zeros((z.shape[0], u.shape[0], w2.shape[-1]), jnp.float32)
    acc, hs = jax.lax.scan(one_expert, acc, (w1, w2, jnp.moveaxis(z, -1, 0)))
    return acc.astype(u.dtype), (w1, w2, u, z, hs)


def _scan_stats_bwd(keep_hidden, res, g):
    w1, w2, u, z, hs = res

    def one_expert(du, xs):
        a1, a2, zp, h = xs
        if not keep_hidden:
            h = u @ a1.astype(u.dtype)
        dw1, dw2, dx, dz, raw = expert_backward(a1, a2, u, zp, h, g)
        return du + dx, (dw1, dw2, dz, raw)

    du, (dw1, dw2, dz, raw) = jax.lax.scan(one_expert, jnp.zeros(u.shape, jnp.float32),
                                           (w1, w2, jnp.moveaxis(z, -1, 0), hs))
    # dz (P, Z, N) -> (Z, N, P); raw (P, Z, N, 3) -> the sink's (N, P, Z, 3)
    return (dw1, dw2, du.astype(u.dtype), jnp.moveaxis(dz, 0, -1).astype(z.dtype),
            jnp.transpose(raw, (2, 0, 1, 3)))


scan_stats.defvjp(_scan_stats_fwd, _scan_stats_bwd)


# --- expert slots of a sparse dispatch -------------------------------------------------------


@jax.custom_vjp
def slots_stats(w1: jax.Array, w2: jax.Array, xe: jax.Array, we: jax.Array,
                se: jax.Array) -> jax.Array:
    """Each expert on its slots: xe (P, C, Din), slot weights we (P, C) -> we * E_p(xe)
    (P, C, Dout).

    The zero ``se`` (P, C, 3) receives, as its cotangent, each slot's ``StatChannels``.
    """
    return _slots_stats_fwd(w1, w2, xe, we, se)[0]


def _slots_stats_fwd(w1, w2, xe, we, se):
    del se

    def one_expert(_, xs):
        a1, a2, x, w = xs  # (Din, F), (F, Dout), (C, Din), (C,)
        h, y = expert_forward(a1, a2, x)
        return None, ((w.astype(y.dtype)[:, None] * y), h)

    _, (ye, hs) = jax.lax.scan(one_expert, None, (w1, w2, xe, we))
    return ye, (w1, w2, xe, we, hs)


def _slots_stats_bwd(res, ge):
    w1, w2, xe, we, hs = res

    def one_expert(_, xs):
        a1, a2, x, w, h, g = xs
        dw1, dw2, dx, dw, raw = expert_backward(a1, a2, x, w[None], h, g[None])
        return None, (dw1, dw2, dx.astype(x.dtype), dw[0].astype(w.dtype), raw[0])

    _, grads = jax.lax.scan(one_expert, None, (w1, w2, xe, we, hs, ge))
    return grads


slots_stats.defvjp(_slots_stats_fwd, _slots_stats_bwd)
