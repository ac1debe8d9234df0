"""Expert lifecycle of DynTRM (seeds 003, 004): live masks over fixed pools, as pure functions.

Two pools of fixed size, each with a live mask (P,): ``attn``, the P latent heads of DynSIHA+
(one mask for both layouts: the q, k, v routers of ``qkv_routers`` share the library, the one
router of ``latent_heads`` picks among the same P heads) and ``ffn``, the DynMoE experts. Dead
slots are absent from routing (``routing.route(..., live=)``: mask False, z = 0, not counted in
k), so they get no gradient, and the SARS meta loss leaves them out.

Every train step adds, per pool, the routed-token counts of that step (over refinement steps,
heads and the pool's routers) to a ring buffer of the last ``lifecycle_window`` steps, and
accumulates the unit-normalised inputs of "homeless" rows: valid (token[, head]) rows at a
refinement step where no router of the pool chose any expert (with CAPR routing). Every
``lifecycle_period`` steps ``lifecycle_update`` (``tinyonn_jax.nn.lifecycle.plan``):

  * dead = live experts routed no token in the window (only if the pool saw traffic);
  * ``regenerate=False``: dead experts are removed (seed 004); ``regenerate=True``: they are
    re-initialised in place (fresh weights, a fresh prototype, gate 0) and stay live (seed 003);
  * add: if homeless rows were seen and a slot is free, the first free slot becomes live with
    fresh weights, gate 0 and, for every prototype of the pool, the mean direction of the
    homeless inputs at the mean length of that prototype's live rows (CAPR scores are dot
    products, so the new expert's scores are of the size of its peers': positive for the
    tokens it was made for, without taking over every other token);
  * every changed expert's routing history is cleared and its optimizer moments (every leaf of
    the optimizer state that mirrors a per-expert parameter, along its declared expert axis)
    are zeroed; a re-initialised expert's EMA copy takes its new values. Everything else, other
    experts' parameters and moments included, is returned bit-identical.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import Aux
from tinyonn_jax.nn import lifecycle as pools
from tinyonn_jax.nn.lifecycle import EVENT_KINDS, Event

POOLS = ("attn", "ffn")  # also the module names under params["block"]


class PoolState(NamedTuple):
    """Live masks and routing records of the pools that exist. P slots, W window, Din the
    routers' input width (the prototypes' last axis)."""

    live: dict  # pool -> (P,) bool
    history: dict  # pool -> (W, P) float32 routed-token counts of the last W steps
    homeless_sum: dict  # pool -> (Din,) float32 sum of unit-normalised homeless inputs
    homeless_count: dict  # pool -> () float32 homeless rows since the last maintenance
    cursor: jax.Array  # int32: steps recorded so far (ring position = cursor % W)
    key: jax.Array  # PRNG key for re-initialisation


def pool_of_site(site: str) -> str:
    """The pool a call site routes over: ``ffn`` for the FFN, ``attn`` for q, k, v and attn."""
    return "ffn" if site == "ffn" else "attn"


def pools_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The pools that exist (a dense sublayer has none), in ``POOLS`` order."""
    have = {pool_of_site(s) for s in cfg.routed_sites}
    return tuple(p for p in POOLS if p in have)


def pool_size(cfg: ModelConfig, pool: str) -> int:
    return cfg.num_ffn_experts if pool == "ffn" else cfg.num_attn_experts


def keeps_pool(cfg: ModelConfig) -> bool:
    """Whether the family keeps a ``PoolState``: a lifecycle runs, or a pool starts with free
    slots. Otherwise every expert is live for good and the train state has no extras."""
    ps = pools_of(cfg)
    return bool(ps) and (cfg.lifecycle_period > 0
                         or any(cfg.initial_live[p] < pool_size(cfg, p) for p in ps))


def site_live(live: dict | None, site: str) -> jax.Array | None:
    """The (P,) live mask of the pool of ``site`` (None: every expert live)."""
    return None if live is None else live.get(pool_of_site(site))


def _pool_of_path(cfg: ModelConfig):
    have = pools_of(cfg)

    def pool_of(keys: tuple[str, ...]) -> str | None:
        return keys[1] if len(keys) > 2 and keys[0] == "block" and keys[1] in have else None

    return pool_of


@functools.cache
def slice_table(cfg: ModelConfig) -> pools.SliceTable:
    """Every per-expert parameter of the pools: {path: (pool, expert axis)}, from the declared
    axes (``modules.expert_axes``)."""
    return pools.slice_table(modules.expert_axes(cfg), _pool_of_path(cfg))


@functools.cache
def router_width(cfg: ModelConfig, pool: str) -> int:
    """Din of the pool's routers: the last axis of its prototypes (all of one width)."""
    shapes = jax.eval_shape(lambda k: modules.init_params(k, cfg), jax.random.key(0))
    widths = {leaf.shape[-1] for path, leaf in jax.tree_util.tree_flatten_with_path(
        shapes["block"][pool])[0] if str(path[-1].key).startswith("proto")}
    if len(widths) != 1:
        raise ValueError(f"pool {pool!r}: expected prototypes of one width, got {widths}")
    return widths.pop()


def init_pool(cfg: ModelConfig, key: jax.Array) -> PoolState:
    """Initial pool: the first ``initial_live[pool]`` slots live, empty records."""
    ps, w = pools_of(cfg), cfg.lifecycle_window
    return PoolState(
        live={p: jnp.arange(pool_size(cfg, p)) < cfg.initial_live[p] for p in ps},
        history={p: jnp.zeros((w, pool_size(cfg, p)), jnp.float32) for p in ps},
        homeless_sum={p: jnp.zeros((router_width(cfg, p),), jnp.float32) for p in ps},
        homeless_count={p: jnp.zeros((), jnp.float32) for p in ps},
        cursor=jnp.int32(0), key=key)


def _unit(x: jax.Array) -> jax.Array:
    """x / ||x|| along the last axis (0 stays 0)."""
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(n, 1e-12)


def step_records(aux: Aux, valid: jax.Array, cfg: ModelConfig) -> dict:
    """Per pool: routed-token counts (P,), homeless input sum (Din,) and count () of one step.

    aux from ``transformer.forward``; valid (B,T) in {0, 1}. A row is a (step, token[, head])
    of the pool's call sites; it counts once per router that chose an expert.
    """
    v = valid.astype(jnp.float32)
    routed = aux.steps.routed()
    out = {}
    for pool in pools_of(cfg):
        sites = [s for s in routed if pool_of_site(s) == pool]
        masks = [routed[s].mask for s in sites]  # each (S,B,T,[H],P)
        vw = v.reshape(1, *v.shape, *([1] * (masks[0].ndim - 4)))  # (1,B,T,[1])
        counts = sum(jnp.sum(m * vw[..., None], axis=tuple(range(m.ndim - 1))) for m in masks)
        home = ~jnp.any(functools.reduce(jnp.logical_or, masks), axis=-1) * vw  # (S,B,T,[H])
        u = _unit(aux.steps.expert_input(sites[0]).astype(jnp.float32))  # (S,B,T,[H],Din)
        out[pool] = (counts.astype(jnp.float32), jnp.einsum("...d,...->d", u, home),
                     jnp.sum(home))
    return out


def record(pool: PoolState, recs: dict) -> PoolState:
    """Write one step's ``step_records`` into the window and the homeless accumulators."""
    return pool._replace(
        history={p: pools.push(h, pool.cursor, recs[p][0]) for p, h in pool.history.items()},
        homeless_sum={p: s + recs[p][1] for p, s in pool.homeless_sum.items()},
        homeless_count={p: c + recs[p][2] for p, c in pool.homeless_count.items()},
        cursor=pool.cursor + 1)


def num_live(pool: PoolState) -> jax.Array:
    """Live experts over all pools (int32)."""
    return sum(jnp.sum(m, dtype=jnp.int32) for m in pool.live.values())


def plan(pool: PoolState, cfg: ModelConfig) -> dict:
    """Which experts to remove, regenerate and add: {kind: {pool: (P,) bool}}."""
    out = {k: {} for k in EVENT_KINDS}
    for p, live in pool.live.items():
        got = pools.plan(live, pools.window_counts(pool.history[p]), pool.homeless_count[p],
                         cfg.regenerate)
        for kind in EVENT_KINDS:
            out[kind][p] = got[kind]
    return out


def _leaf(tree: dict, path: tuple[str, ...]) -> jax.Array:
    for k in path:
        tree = tree[k]
    return tree


def lifecycle_update(params: dict, opt_state, ema, pool: PoolState, cfg: ModelConfig):
    """One maintenance: returns (params, opt_state, ema, pool, plan). Pure and jittable.

    ``ema`` (params-shaped, or None) is the train state's EMA of the parameters.
    """
    p = plan(pool, cfg)
    key, k_init = jax.random.split(pool.key)
    fresh = modules.init_params(k_init, cfg)
    mean = {q: _unit(s) for q, s in pool.homeless_sum.items()}  # (Din,) per pool

    def new_values(q: str, path: tuple[str, ...], leaf: jax.Array) -> jax.Array:
        name = path[-1]
        value = _leaf(fresh, path)
        if name.startswith("gate"):
            return jnp.zeros_like(value)
        if name.startswith("proto"):  # (P, Din): an added expert starts where its tokens are
            norms = jnp.sqrt(jnp.sum(jnp.square(leaf), axis=-1))  # (P,)
            live = pool.live[q]
            scale = jnp.sum(norms * live) / jnp.maximum(jnp.sum(live), 1)
            scale = jnp.where(scale > 0, scale, 1.0)
            add = p["add"][q][:, None]
            return jnp.where(add, (scale * mean[q])[None, :].astype(value.dtype), value)
        return value

    reinit = {q: p["regenerate"][q] | p["add"][q] for q in pool.live}
    changed = {q: reinit[q] | p["remove"][q] for q in pool.live}
    table = slice_table(cfg)
    params = pools.map_expert_slices(params, reinit, new_values, table)
    opt_state = pools.zero_slices(opt_state, changed, table)
    if ema is not None:  # a re-initialised expert's average restarts at its new values
        ema = pools.map_expert_slices(ema, reinit, lambda q, path, leaf: _leaf(params, path),
                                      table)
    pool = pool._replace(
        live={q: (m & ~p["remove"][q]) | p["add"][q] for q, m in pool.live.items()},
        history={q: jnp.where(changed[q][None], 0.0, h) for q, h in pool.history.items()},
        homeless_sum={q: jnp.zeros_like(s) for q, s in pool.homeless_sum.items()},
        homeless_count={q: jnp.zeros_like(c) for q, c in pool.homeless_count.items()},
        key=key)
    return params, opt_state, ema, pool, p


def events_from(p: dict, step: int) -> list[Event]:
    """Host side: the plan's masks as events named by pool (``attn`` / ``ffn``, the sites of
    the expert dashboard's rows)."""
    return pools.events_from(p, step)
