"""DynMoE feed-forward: prototype routing over FFN experts (D -> ffn_mult*D -> D), weighted sum."""

from __future__ import annotations

import jax

from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.nn import experts
from tinyonn_jax.nn.routing import Route, route


def route_ffn(params: dict, u: jax.Array, cfg: ModelConfig,
              live: jax.Array | None = None) -> Route:
    """Route u (B,T,D) over the FFN experts -> Route with z (B,T,E).

    ``live`` (E,) bool, optional: experts outside it are absent (expert lifecycle).
    """
    return route(u, params["proto"], params["gate"], cfg.ffn_routing, cfg.ffn_top_k, live=live)


def ffn_core(params: dict, u: jax.Array, z: jax.Array, probe: jax.Array | None,
             dispatch: str = "dense", capacity_frac: float = 1.0,
             stats_sink: jax.Array | None = None) -> jax.Array:
    """``sum_e z_e E_e(u)`` (+ zero probe): u (B,T,D), z (B,T,E) -> (B,T,D).

    With a zero ``stats_sink`` (B,T,E,3) (``transformer.probe_shapes``; ``scan`` and ``sparse``
    evaluation) the sink's cotangent is the SARS statistics of the FFN experts, taken from their
    backward pass (``experts.apply_with_stats``).
    """
    if stats_sink is not None:
        a = experts.apply_with_stats(params["bank"], u, z, stats_sink, dispatch, capacity_frac)
    else:
        a = experts.apply(params["bank"], u, z, dispatch, capacity_frac)
    return a if probe is None else a + probe.astype(a.dtype)
