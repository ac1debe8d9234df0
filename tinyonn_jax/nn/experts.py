"""Stacked expert banks: ExpertMLP ``E_p(u) = silu(u W1_p) W2_p`` (no bias), P on a leading axis.

Shapes: W1 (P, Din, F), W2 (P, F, Dout); expert inputs u (..., Din); routing weights z (..., P).
Three evaluations of ``sum_p z_p E_p(u)``, equal when nothing overflows: ``apply_dense`` (every
expert on every token in one batched einsum, the layout for accelerators), ``apply_scan`` (the
same, one expert at a time: the fast layout on CPU) and ``apply_sparse`` (active pairs only,
grouped by expert with a fixed capacity). ``resolve_dispatch`` maps ``auto`` to one of them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tinyonn_jax.nn import expert_vjps, variables
from tinyonn_jax.nn.expert_vjps import NUM_STAT_CHANNELS


def init_bank(key: jax.Array, num_experts: int, d_in: int, d_hidden: int, d_out: int) -> dict:
    """Variance-scaled normal init (std 1/sqrt(fan_in)), the scale of a default Linear layer."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (num_experts, d_in, d_hidden)) / jnp.sqrt(d_in)
    w2 = jax.random.normal(k2, (num_experts, d_hidden, d_out)) / jnp.sqrt(d_hidden)
    return {"w1": w1.astype(jnp.float32), "w2": w2.astype(jnp.float32)}


def bank_hidden(bank: dict, u: jax.Array) -> jax.Array:
    """Pre-activations of every expert: u (..., Din) -> h (..., P, F)."""
    return jnp.einsum("...d,pdf->...pf", u, bank["w1"].astype(u.dtype))


def bank_outputs(bank: dict, u: jax.Array) -> jax.Array:
    """Every expert's output: u (..., Din) -> y (..., P, Dout)."""
    h = bank_hidden(bank, u)
    return jnp.einsum("...pf,pfo->...po", jax.nn.silu(h), bank["w2"].astype(u.dtype))


def combine(z: jax.Array, y: jax.Array) -> jax.Array:
    """Aggregate expert outputs by routing weights: z (..., P), y (..., P, Dout) -> (..., Dout)."""
    return jnp.einsum("...p,...po->...o", z.astype(y.dtype), y)


def apply_dense(bank: dict, u: jax.Array, z: jax.Array) -> jax.Array:
    """``sum_p z_p E_p(u)``: u (..., Din), z (..., P) -> (..., Dout)."""
    return combine(z, bank_outputs(bank, u))


# --- sparse dispatch -------------------------------------------------------------------------
# Group (token, expert) pairs by expert into a fixed number of slots per expert, run one batched
# matmul over (P, C) slots, and scatter-add the weighted results back. Work is proportional to
# P * C instead of P * N; pairs beyond an expert's capacity are dropped and counted.


def capacity(n_rows: int, frac: float) -> int:
    """Slots per expert for ``n_rows`` routed rows: ``ceil(frac * n_rows)``, at least 1."""
    return max(1, min(n_rows, math.ceil(frac * n_rows)))


def queue_positions(mask: jax.Array) -> jax.Array:
    """Place of each active (row, expert) pair in its expert's queue, rows in order: (N, P)."""
    return jnp.cumsum(mask, axis=0, dtype=jnp.int32) - 1


def dispatch_indices(mask: jax.Array, cap: int) -> jax.Array:
    """Row index held by each expert slot: mask (N, P) -> idx (P, C); empty slots hold N.

    Rows keep their order inside an expert's queue, so the first ``cap`` active rows win.
    """
    n, p = mask.shape
    pos = queue_positions(mask)
    keep = mask & (pos < cap)
    target = jnp.where(keep, jnp.arange(p, dtype=jnp.int32) * cap + pos, p * cap)
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, p))
    idx = jnp.full((p * cap,), n, jnp.int32).at[target.reshape(-1)].set(
        rows.reshape(-1), mode="drop")
    return idx.reshape(p, cap)


def overflow_count(mask: jax.Array, cap: int) -> jax.Array:
    """Active (row, expert) pairs that do not fit: sum_p max(count_p - cap, 0). mask (..., P)."""
    counts = jnp.sum(mask.reshape(-1, mask.shape[-1]), axis=0, dtype=jnp.int32)
    return jnp.sum(jnp.maximum(counts - cap, 0))


def union_mask(masks) -> jax.Array:
    """Pairs active in any of several masks of the same shape (one dispatch serves them all)."""
    return functools.reduce(jnp.logical_or, masks)


def kept_pairs(mask: jax.Array, cap: int) -> jax.Array:
    """The active pairs ``dispatch_indices`` gives a slot: mask (..., P) -> bool (..., P)."""
    m = mask.reshape(-1, mask.shape[-1])
    return (m & (queue_positions(m) < cap)).reshape(mask.shape)


def dropped_count(mask: jax.Array, kept: jax.Array) -> jax.Array:
    """Active pairs of ``mask`` left out by a dispatch that kept ``kept`` (``kept_pairs`` of
    ``mask`` or of a superset of it, such as the union of q, k and v)."""
    return jnp.sum(mask & ~kept, dtype=jnp.int32)


def gather_slots(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (N, D) -> (P, C, D); empty slots read a zero row."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])[idx]


def slot_weights(z: jax.Array, idx: jax.Array) -> jax.Array:
    """z (N, P) -> the weight of each slot's (row, expert) pair, (P, C); 0 on empty slots."""
    zp = jnp.concatenate([z, jnp.zeros((1, z.shape[-1]), z.dtype)])
    return jnp.take_along_axis(zp.T, idx, axis=1)


def scatter_rows(vals: jax.Array, idx: jax.Array, n: int) -> jax.Array:
    """Sum slot values (P, C, D) back into rows (N, D); empty slots land in a dropped row."""
    out = jnp.zeros((n + 1, vals.shape[-1]), vals.dtype)
    return out.at[idx.reshape(-1)].add(vals.reshape(-1, vals.shape[-1]))[:n]


def apply_sparse_shared(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
                        frac: float) -> tuple[jax.Array, ...]:
    """``sum_p z_p E_p(u)`` for several weightings ``zs`` of one bank over the same inputs.

    u (..., Din), each z (..., P) -> one (..., Dout) per z. A (row, expert) pair active in any z
    is dispatched and evaluated once, then weighted by every z (the q, k and v compositions of
    one latent-head library). Equals ``apply_dense`` per z when no expert receives more than
    ``capacity(N, frac)`` rows of the union; beyond that, later rows are dropped for all z.
    """
    lead = u.shape[:-1]
    u2 = u.reshape(-1, u.shape[-1])
    z2s = [z.reshape(-1, z.shape[-1]) for z in zs]
    n = u2.shape[0]
    active = union_mask([jax.lax.stop_gradient(z) > 0 for z in z2s])
    idx = dispatch_indices(active, capacity(n, frac))
    xe = gather_slots(u2, idx)  # (P, C, Din)
    h = jnp.einsum("pcd,pdf->pcf", xe, bank["w1"].astype(u.dtype))
    y = jnp.einsum("pcf,pfo->pco", jax.nn.silu(h), bank["w2"].astype(u.dtype))
    return tuple(
        scatter_rows(slot_weights(z, idx).astype(y.dtype)[..., None] * y, idx, n).reshape(
            *lead, y.shape[-1]) for z in z2s)


def apply_sparse(bank: dict, u: jax.Array, z: jax.Array, frac: float) -> jax.Array:
    """``sum_p z_p E_p(u)`` over the active pairs only: u (..., Din), z (..., P) -> (..., Dout).

    The active set is ``z > 0`` (the routing contract); equals ``apply_dense`` when no expert
    receives more than ``capacity(N, frac)`` rows.
    """
    return apply_sparse_shared(bank, u, (z,), frac)[0]


# --- dense composition, one expert at a time ----------------------------------------------
# Same sums as ``apply_dense``, evaluated by a ``lax.scan`` over the expert axis: each iteration
# is two plain matmuls on contiguous weights (u @ W1_p, silu, @ W2_p), and only one expert's
# activations exist at a time (``SCAN_REMAT`` decides what the backward keeps of them), summed
# into a float32 accumulator whatever the compute dtype. On CPU this avoids the re-layouts
# of the (tokens, experts, hidden) tensors the batched form needs (bench/dispatch.py); on
# accelerators the batched form keeps the many small matmuls in one kernel.


SCAN_REMAT = {
    # What one expert's iteration keeps for the backward pass.
    "recompute": jax.checkpoint_policies.nothing_saveable,  # cheap matmuls: redo them
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # costly matmuls: keep their outputs
}


def apply_scan(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
               remat: str = "recompute") -> tuple[jax.Array, ...]:
    """``sum_p z_p E_p(u)`` for each weighting in ``zs``: u (..., Din), z (..., P) -> (..., Dout).

    ``remat`` (``SCAN_REMAT``): whether the backward recomputes each expert's matmuls or keeps
    them (one (N, F) and one (N, Dout) array per expert).
    """
    lead = u.shape[:-1]
    u2 = u.reshape(-1, u.shape[-1])
    zt = jnp.stack([z.reshape(-1, z.shape[-1]).T for z in zs], 1)  # (P, Z, N)

    def one_expert(acc, xs):
        w1, w2, zp = xs  # (Din, F), (F, Dout), (Z, N)
        _, y = expert_vjps.expert_forward(w1, w2, u2)
        return acc + zp.astype(jnp.float32)[:, :, None] * y.astype(jnp.float32)[None], None

    body = jax.checkpoint(one_expert, policy=SCAN_REMAT[remat], prevent_cse=False)
    acc = jnp.zeros((len(zs), u2.shape[0], bank["w2"].shape[-1]), jnp.float32)
    acc, _ = jax.lax.scan(body, acc, (bank["w1"], bank["w2"], zt))
    return tuple(a.astype(u.dtype).reshape(*lead, a.shape[-1]) for a in acc)


# --- SARS statistics from the backward pass --------------------------------------------------
# The evaluations above whose backward pass also returns the per-pair SARS statistics, as the
# cotangent of a zero ``sink`` whose last axis holds ``expert_vjps.StatChannels``: the custom
# VJPs of ``expert_vjps`` on the flattened rows (``apply_scan_stats``: one weighting, the FFN;
# ``apply_scan_stats_shared``: q, k, v of the latent-head library) or on the expert slots of
# a sparse dispatch (``apply_sparse_stats``).


def apply_scan_stats(bank: dict, u: jax.Array, z: jax.Array, sink: jax.Array) -> jax.Array:
    """``apply_scan`` for one weighting, with a zero ``sink`` (..., P, 3) whose cotangent is,
    per (row, expert), ``StatChannels``: ``||g|| ||a_p||``, ``||gw_p * silu'(h_p)|| ||u||`` and
    ``<g, E_p(u)>``, g being the cotangent of the output. ``sars.surprise.stats_from_sink``
    turns them into SiteStats. The forward keeps every expert's pre-activations (as ``apply``
    with ``scan`` does); gradients of bank, u and z equal those of ``apply_scan``.
    """
    return apply_scan_stats_shared(bank, u, (z,), sink[..., None, :], keep_hidden=True)[0]


def apply_scan_stats_shared(bank: dict, u: jax.Array, zs: tuple[jax.Array, ...],
                            sink: jax.Array, keep_hidden: bool) -> tuple[jax.Array, ...]:
    """``apply_scan`` for several weightings ``zs`` of one bank over the same inputs (the q, k
    and v of the latent-head library), with a zero ``sink`` (..., P, Z, 3): its cotangent
    holds ``StatChannels`` per (row, expert, weighting), each from its own output cotangent.

    ``keep_hidden``: the forward keeps every expert's pre-activations for the backward (wide
    experts) instead of recomputing them there (narrow experts: one cheap matmul).
    """
    lead, p = u.shape[:-1], zs[0].shape[-1]
    z3 = jnp.stack([z.reshape(-1, p) for z in zs])  # (Z, N, P)
    out = expert_vjps.scan_stats(keep_hidden, bank["w1"], bank["w2"], u.reshape(-1, u.shape[-1]),
                                 z3, sink.reshape(-1, p, len(zs), NUM_STAT_CHANNELS))
    return tuple(o.reshape(*lead, o.shape[-1]) for o in out)


def apply_sparse_stats(bank: dict, u: jax.Array, z: jax.Array, sink: jax.Array,
                       frac: float) -> jax.Array:
    """``apply_sparse`` with the statistics sink of ``apply_scan_stats`` (..., P, 3).

    The active pairs are gathered into expert slots as in ``apply_sparse``; each slot reads its
    pair's sink entry, so the statistics land on the pairs the forward computed and are zero for
    inactive and dropped pairs (as z is).
    """
    lead, p = u.shape[:-1], z.shape[-1]
    u2, z2 = u.reshape(-1, u.shape[-1]), z.reshape(-1, p)
    s2 = sink.reshape(-1, p, NUM_STAT_CHANNELS)
    n = u2.shape[0]
    idx = dispatch_indices(jax.lax.stop_gradient(z2) > 0, capacity(n, frac))  # (P, C)
    sp = jnp.concatenate([s2, jnp.zeros((1, *s2.shape[1:]), s2.dtype)])
    se = sp[idx, jnp.arange(p)[:, None]]  # (P, C, 3): each slot's (row, expert) entry
    ye = expert_vjps.slots_stats(bank["w1"], bank["w2"], gather_slots(u2, idx),
                                 slot_weights(z2, idx), se)
    return scatter_rows(ye, idx, n).reshape(*lead, ye.shape[-1])


def apply_with_stats(bank: dict, u: jax.Array, z: jax.Array, sink: jax.Array, dispatch: str,
                     frac: float) -> jax.Array:
    """``apply`` for the evaluations that return SARS statistics through a sink (``scan`` and
    ``sparse``; see ``stats_sink_dispatch``)."""
    dispatch = resolve_dispatch(dispatch)
    if dispatch == "sparse":
        return apply_sparse_stats(bank, u, z, sink, frac)
    if dispatch == "scan":
        return apply_scan_stats(bank, u, z, sink)
    raise ValueError(f"dispatch {dispatch!r} computes SARS statistics from probes, not a sink")


def stats_sink_dispatch(dispatch: str) -> bool:
    """Whether an expert bank evaluated this way returns its statistics through a sink."""
    return resolve_dispatch(dispatch) in ("scan", "sparse")


def resolve_dispatch(dispatch: str) -> str:
    """``auto`` -> ``scan`` on the CPU backend, ``dense`` elsewhere; other modes unchanged."""
    if dispatch == "auto":
        return "scan" if jax.default_backend() == "cpu" else "dense"
    return dispatch


def apply(bank: dict, u: jax.Array, z: jax.Array, dispatch: str, frac: float) -> jax.Array:
    """Dense, one-expert-at-a-time or sparse composition, as configured."""
    dispatch = resolve_dispatch(dispatch)
    if dispatch == "sparse":
        return apply_sparse(bank, u, z, frac)
    if dispatch == "scan":  # one bank of wide experts (the FFN's): matmuls worth keeping
        return apply_scan(bank, u, (z,), remat="save_dots")[0]
    return apply_dense(bank, u, z)


class ExpertBank(nnx.Module):
    """A stacked ExpertMLP bank: ``w1`` (P, Din, F), ``w2`` (P, F, Dout), expert axis 0."""

    def __init__(self, key: jax.Array, num_experts: int, d_in: int, d_hidden: int, d_out: int):
        bank = init_bank(key, num_experts, d_in, d_hidden, d_out)
        self.w1 = variables.main(bank["w1"], expert_axis=0)
        self.w2 = variables.main(bank["w2"], expert_axis=0)
