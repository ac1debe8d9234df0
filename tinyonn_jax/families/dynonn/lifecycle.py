"""Expert pool management (DynMoE seed 004, Tiny-ONN seed 003) as pure, jittable functions.

Every gate owns a fixed pool of ``max_experts`` slots; ``PoolState.live`` masks the live ones.
Each train step adds its routed-token counts to a ring buffer of the last ``lifecycle_window``
steps and accumulates the normalised inputs of "homeless" tokens (no expert above threshold).
Every ``lifecycle_period`` steps the host calls ``lifecycle_update``:

  * dead = live experts with no routed token in the window (only if the window saw traffic);
  * ``regenerate=False``: dead experts are removed (masked), upstream ``remove_experts``;
    ``regenerate=True``: dead experts are re-initialised in place (weights, a random unit
    prototype, threshold 0) and stay live (seed 003);
  * add: if homeless tokens were seen and a slot is free, the first free slot (preferring slots
    free before this maintenance over just-removed ones) becomes live with fresh weights,
    prototype = normalised mean of those tokens' inputs, threshold 0;
  * every changed expert gets its routing history cleared and its optimizer-state slices
    (e.g. Adam mu and nu) reset to zero, so stale moments neither move a removed expert nor
    kick a new one. Step counters shared by all parameters (Adam's bias correction) are kept.

The family-independent parts (ring buffer, plan, expert slices, events) are
``tinyonn_jax.nn.lifecycle``; this module lays them over the gates of every layer group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.model import SITES, init_live, per_group
from tinyonn_jax.families.dynonn.modules import expert_axes, init_layers
from tinyonn_jax.families.dynonn.residuals import Aux
from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn import lifecycle as pools
from tinyonn_jax.nn.lifecycle import EVENT_KINDS, Event


class PoolState(NamedTuple):
    """Live masks and routing records of every gate. G groups, E slots, W window, D hidden."""

    live: dict  # site -> (G, E) bool
    history: dict  # site -> (W, G, E) float32 routed-token counts of the last W steps
    homeless_sum: dict  # site -> (G, D) sum of normalised inputs of homeless tokens
    homeless_count: dict  # site -> (G,) number of homeless tokens since the last maintenance
    cursor: jax.Array  # int32: steps recorded so far (ring position = cursor % W)
    key: jax.Array  # PRNG key for re-initialisation


def site_name(site: str, group: int) -> str:
    """Name of one gate for logs and dashboards, e.g. ``ffn_0``."""
    return f"{site}_{group}"


def init_pool(cfg: DynOnnConfig, key: jax.Array) -> PoolState:
    """Initial pool: the first ``init_experts`` slots live, empty records."""
    g, e, w, d = cfg.groups, cfg.max_experts, cfg.lifecycle_window, cfg.hidden
    return PoolState(
        live=init_live(cfg),
        history={s: jnp.zeros((w, g, e), jnp.float32) for s in SITES},
        homeless_sum={s: jnp.zeros((g, d), jnp.float32) for s in SITES},
        homeless_count={s: jnp.zeros((g,), jnp.float32) for s in SITES},
        cursor=jnp.int32(0), key=key)


def step_records(aux: Aux, valid: jax.Array, cfg: DynOnnConfig) -> dict:
    """Per site: routed counts (G,E), homeless input sum (G,D) and count (G,) of one step.

    aux from ``model.forward``; valid (B,T) in {0, 1}.
    """
    v = valid.astype(jnp.float32)
    out = {}
    for s in SITES:
        r = aux.site(s)
        counts = jnp.sum(r.mask * v[None, ..., None], axis=(1, 2))
        hv = r.homeless * v[None]
        hsum = jnp.einsum("pbtd,pbt->pd", gamoe.normalize(r.u.astype(jnp.float32)), hv)
        out[s] = (per_group(counts, cfg), per_group(hsum, cfg),
                  per_group(jnp.sum(hv, axis=(1, 2)), cfg))
    return out


def record(pool: PoolState, recs: dict) -> PoolState:
    """Write one step's ``step_records`` into the window and the homeless accumulators."""
    return pool._replace(
        history={s: pools.push(pool.history[s], pool.cursor, recs[s][0]) for s in SITES},
        homeless_sum={s: pool.homeless_sum[s] + recs[s][1] for s in SITES},
        homeless_count={s: pool.homeless_count[s] + recs[s][2] for s in SITES},
        cursor=pool.cursor + 1)


def records(pool: PoolState) -> dict:
    """Routed-token counts over the window: {site: (G, E)}."""
    return {s: pools.window_counts(h) for s, h in pool.history.items()}


def num_live(pool: PoolState) -> jax.Array:
    """Total live experts over all gates."""
    return sum(jnp.sum(m, dtype=jnp.int32) for m in pool.live.values())


def plan(pool: PoolState, cfg: DynOnnConfig) -> dict:
    """Which experts to remove, regenerate and add: {kind: {site: (G, E) bool}}."""
    out = {k: {} for k in EVENT_KINDS}
    rec = records(pool)
    for s in SITES:
        site_plan = pools.plan(pool.live[s], rec[s], pool.homeless_count[s], cfg.regenerate)
        for kind in EVENT_KINDS:
            out[kind][s] = site_plan[kind]
    return out


def map_expert_slices(tree, masks: dict, fn: Callable, cfg: DynOnnConfig, *,
                      names: tuple[str, ...] | None = None):
    """Replace the expert slices selected by ``masks`` {site: (G,E)} in any tree that mirrors
    the parameters (the params, their gradients, or optimizer moments inside an optax state).

    A leaf is per-expert if its path ends in ``['layers'][site][name]``, the parameter
    ``layers.site.name`` declares an expert axis (``modules.expert_axes(cfg)``; axis 0 is G),
    ``name`` is in ``names`` (default: every such parameter) and its shape matches the layout;
    ``fn(site, name, leaf)`` gives the new values.
    """
    def pool_of(keys: tuple[str, ...]) -> str | None:
        if len(keys) == 3 and keys[0] == "layers" and (names is None or keys[2] in names):
            return keys[1]
        return None

    table = pools.slice_table(expert_axes(cfg), pool_of)
    return pools.map_expert_slices(tree, masks, lambda s, path, leaf: fn(s, path[-1], leaf),
                                   table)


def lifecycle_update(params: dict, opt_state, pool: PoolState, cfg: DynOnnConfig):
    """One maintenance: returns (params, opt_state, pool, plan). Pure and jittable."""
    p = plan(pool, cfg)
    key, k_init = jax.random.split(pool.key)
    fresh = init_layers(k_init, cfg)
    for s in SITES:  # added experts start at the mean direction of the tokens they serve
        mean = gamoe.normalize(pool.homeless_sum[s])  # (G, D)
        proto = fresh[s]["proto_sim"]
        fresh[s]["proto_sim"] = jnp.where(p["add"][s][:, None, :], mean[:, :, None], proto)
    reinit = {s: p["regenerate"][s] | p["add"][s] for s in SITES}
    changed = {s: reinit[s] | p["remove"][s] for s in SITES}
    layers = map_expert_slices({"layers": params["layers"]}, reinit,
                               lambda s, n, leaf: fresh[s][n], cfg)["layers"]
    params = {**params, "layers": layers}
    opt_state = map_expert_slices(opt_state, changed, lambda s, n, leaf: jnp.zeros_like(leaf),
                                  cfg)
    pool = pool._replace(
        live={s: (pool.live[s] & ~p["remove"][s]) | p["add"][s] for s in SITES},
        history={s: jnp.where(changed[s][None], 0.0, pool.history[s]) for s in SITES},
        homeless_sum={s: jnp.zeros_like(v) for s, v in pool.homeless_sum.items()},
        homeless_count={s: jnp.zeros_like(v) for s, v in pool.homeless_count.items()},
        key=key)
    return params, opt_state, pool, p


def events_from(p: dict, step: int) -> list[Event]:
    """Host side: the plan's masks as a list of events (remove before add before regenerate)."""
    return pools.events_from(p, step, lambda s, lead: site_name(s, lead[0]))
