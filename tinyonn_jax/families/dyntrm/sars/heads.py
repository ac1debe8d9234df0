"""Exact per-(query token, latent head) parameter gradients of the latent-head layout.

The attn site (``latent_heads.py``) computes ``A_t = sum_p z_tp y_tp`` with y_tp = o_tp Wo_p, o_tp
head p's attention context at query t. With g_t = dL/dA_t (the probe's cotangent) held fixed, the
share of query t and head p is ``f_tp = <g_t, z_tp y_tp>``; its importance is O_tp = |f_tp| and
its cost C_tp the norm of the gradient of f_tp with respect to head p's parameters (Wq_p, Wk_p,
Wv_p, Wo_p). For one head (index p dropped), x = x_n (T, D) the head's input, q, k (after RoPE),
v its queries, keys and values, pi_ts its attention probabilities, a_t = sum_s pi_ts v_s:

  delta_t = z_t Wo g_t                       the cotangent of a_t
  dl_ts   = pi_ts (delta_t.v_s - delta_t.a_t)    the cotangent of the logit q_t.k_s / sqrt(Dh)
  dWo = z_t a_t g_t^T                    ||.|| = z_t ||a_t|| ||g_t||
  dWv = xbar_t delta_t^T, xbar_t = sum_s pi_ts x_s        ||.|| = ||xbar_t|| ||delta_t||
  dWq = x_t (R_t^T dq_t)^T, dq_t = sum_s dl_ts k_s / sqrt(Dh)     ||.|| = ||x_t|| ||dq_t||
  dWk = sum_s x_s (R_s^T q_t)^T dl_ts / sqrt(Dh)

R_t is the RoPE rotation at t's position (identity without RoPE); it is orthogonal, so it drops
out of the norms of dWq. Without RoPE dWk is rank 1: ||dWk|| = ||sum_s dl_ts x_s|| ||q_t||
/ sqrt(Dh). With RoPE, R_s rotates each pair i of coordinates by its own angle a_s,i
(pos_s th_i in 1D; the sum over axes of coordinate times frequency with grid coordinates,
``nn.attention.rope_angles``), so q^T R_s R_s'^T q = sum_i |q_(i)|^2 cos(a_s,i - a_s',i) and

  ||dWk||^2 = sum_i |q_t,(i)|^2 (||sum_s dl_ts cos(a_s,i) x_s||^2
                                  + ||sum_s dl_ts sin(a_s,i) x_s||^2) / Dh

over the Dh/2 pairs i = (e, e + Dh/2) of ``nn.attention.rope``. Everything is an einsum over
(B, P, T, T) attention tensors, O(T^2) per head. The RoPE key term is the largest: it forms the
cos and sin sums for every (query, pair), (B,P,T,Dh,D) from T^2 Dh D multiply-adds per head,
D/2 times the attention's own T^2 Dh (exact per-token costs form every per-token dWk, each a sum
of T outer products); ``token_grad_norms`` evaluates it in groups of heads when it would not fit
``max_elems``.
Summed over query tokens the same products give each head's exact gradient from the site
(``site_head_grads``); summed over steps those are ``jax.grad`` of the stacked heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm.latent_heads import HEAD_WEIGHTS, head_qkv
from tinyonn_jax.nn.attention import packed_mask, rope, rope_angles

MAX_ELEMS = 1 << 27  # float32 elements of the largest intermediate per group of heads (512 MB)


class HeadGradNorms(NamedTuple):
    """Per (query token, latent head) quantities of the attn site, weighted by z. All (B,T,P)."""

    c_q: jax.Array  # ||dWq_p|| of f_tp = <g_t, z_tp y_tp>
    c_k: jax.Array  # ||dWk_p||
    c_v: jax.Array  # ||dWv_p||
    c_o: jax.Array  # ||dWo_p||
    attribution: jax.Array  # f_tp = z_tp <g_t, y_tp> (signed)


class _Head(NamedTuple):
    """One forward of the heads and the cotangents shared by the statistics and the gradients."""

    x: jax.Array  # (B,T,D) float32 input x_n
    q: jax.Array  # (B,T,P,Dh) queries after RoPE
    k: jax.Array  # (B,T,P,Dh) keys after RoPE
    pi: jax.Array  # (B,P,T,T) attention probabilities (query t, key s)
    a: jax.Array  # (B,T,P,Dh) contexts a_t = sum_s pi_ts v_s
    delta: jax.Array  # (B,T,P,Dh) z_t Wo g_t
    f: jax.Array  # (B,T,P) z_t <g_t, y_t> = <delta_t, a_t>
    dl: jax.Array  # (B,P,T,T) cotangent of the scaled logits


def _forward_and_cotangents(heads: dict, xn: jax.Array, z: jax.Array, g: jax.Array,
                            positions: jax.Array, segment_ids: jax.Array,
                            rope_base: float | None) -> _Head:
    """The heads' attention recomputed in float32 from x_n, and the cotangents of module
    docstring (g and z held fixed)."""
    x = xn.astype(jnp.float32)
    heads = {w: heads[w].astype(jnp.float32) for w in HEAD_WEIGHTS}
    q, k, v = head_qkv(heads, x)
    if rope_base is not None:
        q, k = rope(q, positions, rope_base), rope(k, positions, rope_base)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btpe,bspe->bpts", q, k) * scale
    logits = jnp.where(packed_mask(segment_ids)[:, None], logits, jnp.finfo(jnp.float32).min)
    pi = jax.nn.softmax(logits, axis=-1)
    a = jnp.einsum("bpts,bspe->btpe", pi, v)
    delta = z.astype(jnp.float32)[..., None] * jnp.einsum(
        "btd,ped->btpe", g.astype(jnp.float32), heads["wo"])
    f = jnp.sum(delta * a, axis=-1)
    dv = jnp.einsum("btpe,bspe->bpts", delta, v)
    dl = pi * (dv - jnp.moveaxis(f, 1, -1)[..., None])
    return _Head(x=x, q=q, k=k, pi=pi, a=a, delta=delta, f=f, dl=dl)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _rope_key_norm_sq(hd: _Head, positions: jax.Array, rope_base: float) -> jax.Array:
    """||dWk||^2 * Dh with RoPE, 1D or per-axis (module docstring): (B,T,P).

    The cos and sin sums of every rotation pair come out of one matmul, dl (P*T, S) against
    the rotated inputs (S, Dh*D): the (B,P,T,Dh,D) result is the costliest tensor of the site.
    """
    (b, t, d), half = hd.x.shape, hd.q.shape[-1] // 2
    angles = rope_angles(positions, half, rope_base)  # (B,S,half)
    trig = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)  # (B,S,2*half)
    xs = (trig[..., None] * hd.x[:, :, None, :]).reshape(b, t, 2 * half * d)
    w = jnp.einsum("bpts,bsk->bptk", hd.dl, xs).reshape(*hd.dl.shape[:3], 2, half, d)
    w_sq = jnp.moveaxis(jnp.sum(jnp.square(w), axis=(-1, -3)), 1, 2)  # (B,T,P,half): cos + sin
    q_pair = jnp.square(hd.q[..., :half]) + jnp.square(hd.q[..., half:])  # (B,T,P,half)
    return jnp.sum(q_pair * w_sq, axis=-1)


def _norms(heads: dict, xn: jax.Array, z: jax.Array, g: jax.Array, positions: jax.Array,
           segment_ids: jax.Array, rope_base: float | None) -> HeadGradNorms:
    """``token_grad_norms`` for all heads at once."""
    hd = _forward_and_cotangents(heads, xn, z, g, positions, segment_ids, rope_base)
    dh = hd.q.shape[-1]
    c_o = z.astype(jnp.float32) * _norm(hd.a) * _norm(g.astype(jnp.float32))[..., None]
    xbar = jnp.einsum("bpts,bsd->btpd", hd.pi, hd.x)
    c_v = _norm(xbar) * _norm(hd.delta)
    dq = jnp.einsum("bpts,bspe->btpe", hd.dl, hd.k) / math.sqrt(dh)
    c_q = _norm(hd.x)[..., None] * _norm(dq)
    if rope_base is None:
        c_k = _norm(jnp.einsum("bpts,bsd->btpd", hd.dl, hd.x)) * _norm(hd.q) / math.sqrt(dh)
    else:
        c_k = jnp.sqrt(_rope_key_norm_sq(hd, positions, rope_base) / dh)
    return HeadGradNorms(c_q=c_q, c_k=c_k, c_v=c_v, c_o=c_o, attribution=hd.f)


def _group_size(p: int, per_head: int, max_elems: int) -> int:
    """The largest divisor of P whose group of heads keeps ``per_head`` elements each in budget."""
    fits = [c for c in range(1, p + 1) if p % c == 0 and c * per_head <= max_elems]
    return max(fits, default=1)


def token_grad_norms(heads: dict, xn: jax.Array, z: jax.Array, g: jax.Array,
                     positions: jax.Array, segment_ids: jax.Array, rope_base: float | None,
                     max_elems: int = MAX_ELEMS) -> HeadGradNorms:
    """Per (query token, latent head) gradient norms and attribution of the attn site.

    heads: ``wq``, ``wk``, ``wv`` (P,D,Dh), ``wo`` (P,Dh,D); x_n (B,T,D); z (B,T,P); g (B,T,D);
    positions, segment_ids (B,T); ``rope_base`` None without RoPE. Heads are processed in groups
    (``lax.map`` over groups, einsums inside) so that the largest intermediate, (B,P,T,Dh,D)
    with RoPE or (B,P,T,T), stays within ``max_elems`` float32 elements.
    """
    (b, t, d), p, dh = xn.shape, z.shape[-1], heads["wq"].shape[-1]
    per_head = b * t * max(t, d * (dh if rope_base is not None else 1))
    c = _group_size(p, per_head, max_elems)
    if c == p:
        return _norms(heads, xn, z, g, positions, segment_ids, rope_base)
    grouped = {w: heads[w].reshape(p // c, c, *heads[w].shape[1:]) for w in HEAD_WEIGHTS}
    zg = jnp.moveaxis(z.reshape(b, t, p // c, c), 2, 0)  # (groups, B, T, c)
    out = jax.lax.map(lambda hz: _norms(hz[0], xn, hz[1], g, positions, segment_ids, rope_base),
                      (grouped, zg))  # each (groups, B, T, c)
    return HeadGradNorms._make(jnp.moveaxis(a, 0, 2).reshape(b, t, p) for a in out)


def site_head_grads(heads: dict, xn: jax.Array, z: jax.Array, g: jax.Array,
                    positions: jax.Array, segment_ids: jax.Array,
                    rope_base: float | None) -> dict:
    """Exact gradient of the attn site w.r.t. each latent head, summed over its query tokens.

    Shapes as in ``token_grad_norms``. Returns {'wq', 'wk', 'wv': (P,D,Dh), 'wo': (P,Dh,D)}, the
    layout of the heads: the gradient of sum_t <g_t, A_t> with x_n held fixed.
    """
    hd = _forward_and_cotangents(heads, xn, z, g, positions, segment_ids, rope_base)
    scale = 1.0 / math.sqrt(hd.q.shape[-1])
    dq = jnp.einsum("bpts,bspe->btpe", hd.dl, hd.k) * scale  # cotangent of the rotated q_t
    dk = jnp.einsum("bpts,btpe->bspe", hd.dl, hd.q) * scale  # ... of the rotated k_s
    if rope_base is not None:  # back through the rotation: R^T = the rotation by -position
        dq, dk = rope(dq, -positions, rope_base), rope(dk, -positions, rope_base)
    return {
        "wq": jnp.einsum("btd,btpe->pde", hd.x, dq),
        "wk": jnp.einsum("bsd,bspe->pde", hd.x, dk),
        "wv": jnp.einsum("bpts,bsd,btpe->pde", hd.pi, hd.x, hd.delta),
        "wo": jnp.einsum("btp,btpe,btd->ped", z.astype(jnp.float32), hd.a,
                         g.astype(jnp.float32)),
    }
