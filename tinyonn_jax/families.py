"""Model families the training program can run, behind one small interface.

A family bundles how to build the optimizer and the initial train state, the pure train step,
the teacher-forced forward used for evaluation, the expert-pool sizes (for sharding and
dashboards), how to read per-expert rows for the expert dashboard, and an optional host-side
maintenance hook (the DynMoE expert lifecycle).

  dyntrm  DynTRM with DynSIHA+ / DynMoE and SARS (sections model, sars)      step.py
  spl     SparseProtoLinear, MoIE, Dimension-DynSIHA with M-SAPS (section spl) spl_step.py
  dynmoe  DynSMHA + GAMoE-gated DynMoE, 1f2b1o PI-adaptive gating (section moe) moe_step.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from tinyonn_jax import moe_step, optim, spl_step
from tinyonn_jax import step as dyntrm_step
from tinyonn_jax.config import Config
from tinyonn_jax.model import smha, spl, transformer


class Family(NamedTuple):
    name: str
    init_params: Callable[[jax.Array, Config], Any]
    build_optimizer: Callable[[Config, Any], optax.GradientTransformation]
    init_state: Callable[[Config, optax.GradientTransformation, jax.Array], Any]
    train_step: Callable[..., tuple[Any, dict]]  # (state, batch, *, cfg: Config, optimizer)
    logits: Callable[..., jax.Array]  # (state, params, tokens, cfg, *, positions, segment_ids)
    expert_pools: Callable[[Config], dict[str, int]]  # site -> pool size
    maintain: Callable[..., tuple[Any, list]] | None = None  # (state, cfg, step) -> (state, ev)
    expert_rows: Callable[[dict], tuple[dict, dict | None]] | None = None


def usage_rows(vectors: dict) -> tuple[dict, None]:
    """Default: every 1-D ``experts/usage_<site>`` metric is one dashboard row per site."""
    return {k.removeprefix("experts/usage_"): np.asarray(v) for k, v in vectors.items()
            if k.startswith("experts/usage_") and np.ndim(v) == 1}, None


def _dyntrm_logits(state, params, tokens, cfg: Config, *, positions=None, segment_ids=None):
    return transformer.forward(params, tokens, cfg.model, positions=positions,
                               segment_ids=segment_ids)[0]


def _dyntrm_pools(cfg: Config) -> dict[str, int]:
    """Routed expert pools only (a dense twin has none)."""
    sites = cfg.model.routed_sites
    pools = {"attn": cfg.model.num_attn_experts} if "q" in sites else {}
    if "ffn" in sites:
        pools["ffn"] = cfg.model.num_ffn_experts
    return pools


DYNTRM = Family(
    name="dyntrm",
    init_params=lambda key, cfg: transformer.init_params(key, cfg.model),
    build_optimizer=optim.build_optimizer,
    init_state=dyntrm_step.init_state,
    train_step=dyntrm_step.train_step,
    logits=_dyntrm_logits,
    expert_pools=_dyntrm_pools,
)

SPL = Family(
    name="spl",
    init_params=lambda key, cfg: spl.init_spl_params(key, cfg.spl),
    build_optimizer=lambda cfg, params: spl_step.build_spl_optimizer(cfg.optim, cfg.meta_optim),
    init_state=lambda cfg, opt, key: spl_step.init_spl_state(cfg.spl, key, opt),
    train_step=lambda state, batch, *, cfg, optimizer: spl_step.spl_train_step(
        state, batch, cfg=cfg.spl, optimizer=optimizer),
    logits=lambda state, params, tokens, cfg, *, positions=None, segment_ids=None:
        spl.spl_forward(params, tokens, cfg.spl, positions=positions, segment_ids=segment_ids,
                        with_stats=False)[0],
    expert_pools=lambda cfg: {},  # one expert = one output neuron: nothing to shard by pool
)


def _moe_maintain(state, cfg: Config, step: int):
    state, events = moe_step.maintain(state, cfg.moe, step)
    return state, [(e.step, e.kind, e.expert_id, e.site) for e in events]


DYNMOE = Family(
    name="dynmoe",
    init_params=lambda key, cfg: smha.init_params(key, cfg.moe),
    build_optimizer=lambda cfg, params: moe_step.build_moe_optimizer(params, cfg.optim,
                                                                     cfg.meta_optim),
    init_state=lambda cfg, opt, key: moe_step.init_moe_state(cfg.moe, opt, key),
    train_step=lambda state, batch, *, cfg, optimizer: moe_step.moe_train_step(
        state, batch, cfg=cfg.moe, optimizer=optimizer),
    logits=lambda state, params, tokens, cfg, *, positions=None, segment_ids=None:
        moe_step.moe_logits(params, state.pool, tokens, cfg.moe, positions=positions,
                            segment_ids=segment_ids),
    expert_pools=lambda cfg: {"experts": cfg.moe.max_experts},
    maintain=_moe_maintain,
    expert_rows=moe_step.expert_rows,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DYNTRM, SPL, DYNMOE)}


def get_family(cfg: Config) -> Family:
    name = cfg.model.family
    if name not in FAMILIES:
        raise ValueError(f"config model.family={name!r}: must be one of {sorted(FAMILIES)}")
    return FAMILIES[name]
