"""Model families the training program can run, behind one small interface.

A family bundles how to build the optimizer and the initial train state, the pure train step,
the teacher-forced forward used for evaluation, the expert-pool sizes (for sharding and
dashboards), how to read per-expert rows for the expert dashboard, and an optional host-side
maintenance hook (the DynMoE expert lifecycle).

  dyntrm  DynTRM with DynSIHA+ / DynMoE and SARS (sections model, sars)      step.py
  spl     SparseProtoLinear, MoIE, Dimension-DynSIHA with M-SAPS (section spl) spl_step.py
  dynmoe  DynSMHA + GAMoE-gated DynMoE, 1f2b1o PI-adaptive gating (section moe) dynonn_step.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from tinyonn_jax import optim
from tinyonn_jax.config import Config
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn import step as dynonn_step
from tinyonn_jax.families.dyntrm import step as dyntrm_step
from tinyonn_jax.families.dyntrm import transformer
from tinyonn_jax.families.spl import model as spl
from tinyonn_jax.families.spl import step as spl_step


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
    init_params=lambda key, cfg: spl.init_spl_params(key, cfg.model),
    build_optimizer=lambda cfg, params: spl_step.build_spl_optimizer(cfg.optim, cfg.meta_optim),
    init_state=lambda cfg, opt, key: spl_step.init_spl_state(cfg.model, key, opt),
    train_step=lambda state, batch, *, cfg, optimizer: spl_step.spl_train_step(
        state, batch, cfg=cfg.model, optimizer=optimizer),
    logits=lambda state, params, tokens, cfg, *, positions=None, segment_ids=None:
        spl.spl_forward(params, tokens, cfg.model, positions=positions, segment_ids=segment_ids,
                        with_stats=False)[0],
    expert_pools=lambda cfg: {},  # one expert = one output neuron: nothing to shard by pool
)


def _moe_maintain(state, cfg: Config, step: int):
    state, events = dynonn_step.maintain(state, cfg.model, step)
    return state, [(e.step, e.kind, e.expert_id, e.site) for e in events]


DYNONN = Family(
    name="dynonn",
    init_params=lambda key, cfg: dynonn.init_params(key, cfg.model),
    build_optimizer=lambda cfg, params: dynonn_step.build_moe_optimizer(params, cfg.optim,
                                                                     cfg.meta_optim),
    init_state=lambda cfg, opt, key: dynonn_step.init_moe_state(cfg.model, opt, key),
    train_step=lambda state, batch, *, cfg, optimizer: dynonn_step.moe_train_step(
        state, batch, cfg=cfg.model, optimizer=optimizer),
    logits=lambda state, params, tokens, cfg, *, positions=None, segment_ids=None:
        dynonn_step.moe_logits(params, state.pool, tokens, cfg.model, positions=positions,
                            segment_ids=segment_ids),
    expert_pools=lambda cfg: {"experts": cfg.model.max_experts},
    maintain=_moe_maintain,
    expert_rows=dynonn_step.expert_rows,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DYNTRM, SPL, DYNONN)}


def get_family(cfg: Config) -> Family:
    return FAMILIES[cfg.family]
