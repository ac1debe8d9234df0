"""Expert lifecycle over fixed pools (DynMoE seed 004, Tiny-ONN seed 003): the generic parts.

A pool is a fixed bank of E expert slots with a live mask (..., E) (leading axes: e.g. the
layer groups of a family). A family records, every train step, how many tokens each slot
received (a ring buffer over the last W steps) and the inputs of "homeless" tokens (no expert
chosen); at a maintenance it plans, per pool:

  * dead = live experts that received no token in the window, if the pool saw traffic at all
    (an empty window gives no verdict);
  * remove (seed 004) or regenerate in place (seed 003) the dead ones;
  * add: if homeless tokens were seen and a slot is free, the first free slot (a slot free before
    this maintenance is preferred over one just removed, so a removal and an addition stay
    two experts) becomes live.

The family re-initialises the changed experts' parameters and resets their optimizer moments
with ``map_expert_slices``, which finds a parameter's expert slices in any tree mirroring the
parameters (the parameters, gradients, an EMA, optimizer moments inside an optax state) by its
path and its declared expert axis. Everything here is jittable except ``events_from`` (host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EVENT_KINDS = ("remove", "add", "regenerate")

# A leaf's parameter path (its dict keys) -> (pool name, declared expert axis).
SliceTable = dict[tuple[str, ...], tuple[str, int]]


class Event(NamedTuple):
    """A lifecycle event, in the field order of ``observe.dashboards.LifecycleEvent``."""

    step: int
    kind: str  # remove | add | regenerate
    expert_id: int
    site: str  # the pool's name in logs and dashboards


def push(history: jax.Array, cursor: jax.Array, counts: jax.Array) -> jax.Array:
    """Write one step's routed-token counts (..., E) into the ring buffer (W, ..., E) at
    ``cursor % W`` (the oldest step once the window is full)."""
    return history.at[cursor % history.shape[0]].set(counts.astype(history.dtype))


def window_counts(history: jax.Array) -> jax.Array:
    """Routed-token counts over the window: (W, ..., E) -> (..., E)."""
    return jnp.sum(history, axis=0)


def plan(live: jax.Array, routed: jax.Array, homeless: jax.Array,
         regenerate: bool) -> dict[str, jax.Array]:
    """Which slots to remove, regenerate and add: {kind: (..., E) bool}.

    live (..., E) bool; routed (..., E) routed-token counts over the window; homeless (...)
    homeless tokens seen since the last maintenance.
    """
    seen = jnp.any(live & (routed > 0), axis=-1, keepdims=True)  # no traffic: no verdict
    dead = live & (routed <= 0) & seen
    none = jnp.zeros_like(dead)
    remove = none if regenerate else dead
    free = ~live | remove
    # Prefer a slot that was already free, so a removal and an addition stay two experts.
    rank = free.astype(jnp.int32) + (~live).astype(jnp.int32)
    first = jax.nn.one_hot(jnp.argmax(rank, axis=-1), free.shape[-1], dtype=jnp.bool_)
    return {"remove": remove, "add": first & free & (homeless > 0)[..., None],
            "regenerate": dead if regenerate else none}


def slice_table(axes: dict, pool_of: Callable[[tuple[str, ...]], str | None]) -> SliceTable:
    """The per-expert leaves of a declared expert-axis tree (``variables.expert_axes``):
    {path: (pool, axis)} for every leaf with an axis >= 0 that ``pool_of(path)`` assigns to a
    pool (None: not part of any pool)."""
    table = {}
    for path, ax in jax.tree_util.tree_flatten_with_path(axes)[0]:
        keys = tuple(k.key for k in path)
        pool = pool_of(keys) if ax >= 0 else None
        if pool is not None:
            table[keys] = (pool, int(ax))
    return table


def _lookup(table: SliceTable, keys: list, lengths: list[int]):
    """(param path, (pool, axis)) of the longest table path that ends ``keys``, else None.

    Inside an optax state a parameter's path is preceded by the state's own keys (a partition
    label, a moment's field), so a leaf is matched by its path's tail.
    """
    for n in lengths:
        tail = tuple(keys[-n:]) if len(keys) >= n else None
        if tail in table:
            return tail, table[tail]
    return None


def expert_mask(m: jax.Array, axis: int, ndim: int) -> jax.Array:
    """A (..., E) slot mask broadcastable against a leaf whose expert axis is ``axis``: its
    leading axes meet the leaf's leading axes, E meets ``axis``."""
    shape = [1] * ndim
    shape[: m.ndim - 1] = m.shape[:-1]
    shape[axis] = m.shape[-1]
    return m.reshape(shape)


def map_expert_slices(tree, masks: dict[str, jax.Array], fn: Callable, table: SliceTable):
    """Replace the expert slices selected by ``masks`` {pool: (..., E) bool} in any tree that
    mirrors the parameters; ``fn(pool, path, leaf)`` gives the new values (leaf-shaped).

    A leaf is per-expert if its path ends in a path of ``table`` whose pool is in ``masks`` and
    its shape fits the mask (a factored optimizer statistic does not: it is left alone). Every
    other leaf, and every unselected slice, is returned bit-identical.
    """
    lengths = sorted({len(k) for k in table}, reverse=True)

    def f(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        hit = _lookup(table, keys, lengths)
        if hit is None or hit[1][0] not in masks:
            return leaf
        param_path, (pool, ax) = hit
        m = masks[pool]
        lead = m.ndim - 1
        if (leaf.ndim <= ax or leaf.shape[:lead] != m.shape[:-1]
                or leaf.shape[ax] != m.shape[-1]):
            return leaf
        return jnp.where(expert_mask(m, ax, leaf.ndim), fn(pool, param_path, leaf), leaf)

    return jax.tree_util.tree_map_with_path(f, tree)


def zero_slices(tree, masks: dict[str, jax.Array], table: SliceTable):
    """``map_expert_slices`` setting the selected slices to zero (e.g. Adam's mu and nu of
    changed experts; step counters shared by all parameters are not per-expert and stay)."""
    return map_expert_slices(tree, masks, lambda pool, path, leaf: jnp.zeros_like(leaf), table)


def events_from(p: dict[str, dict[str, jax.Array]], step: int,
                name: Callable[[str, tuple[int, ...]], str] = lambda pool, lead: pool,
                ) -> list[Event]:
    """Host side: a plan {kind: {pool: (..., E) bool}} as events (kinds in ``EVENT_KINDS``
    order, then pools, then slots); ``name(pool, leading index)`` names the site."""
    out = []
    for kind in EVENT_KINDS:
        for pool, m in p.get(kind, {}).items():
            for idx in np.argwhere(np.asarray(m)):
                out.append(Event(int(step), kind, int(idx[-1]),
                                 name(pool, tuple(int(i) for i in idx[:-1]))))
    return out
