"""Model families the training program can run, behind one small interface.

A family bundles how to build the optimizer and the initial train state, the pure train step,
the teacher-forced forward used for evaluation, the expert-pool sizes (for sharding and
dashboards) and an optional host-side maintenance hook (expert lifecycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from tinyonn_jax import optim
from tinyonn_jax import step as dyntrm_step
from tinyonn_jax.config import Config
from tinyonn_jax.model import transformer


class Family(NamedTuple):
    name: str
    init_params: Callable[[jax.Array, Config], Any]
    build_optimizer: Callable[[Config, Any], optax.GradientTransformation]
    init_state: Callable[[Config, optax.GradientTransformation, jax.Array], Any]
    train_step: Callable[..., tuple[Any, dict]]  # (state, batch, *, cfg, optimizer)
    logits: Callable[..., jax.Array]  # (params, tokens, cfg, *, positions, segment_ids)
    expert_pools: Callable[[Config], dict[str, int]]  # site -> pool size
    maintain: Callable[..., tuple[Any, list]] | None = None  # (state, cfg, step) -> (state, ev)


def _dyntrm_logits(params, tokens, cfg: Config, *, positions=None, segment_ids=None):
    return transformer.forward(params, tokens, cfg.model, positions=positions,
                               segment_ids=segment_ids)[0]


def _dyntrm_pools(cfg: Config) -> dict[str, int]:
    pools = {"attn": cfg.model.num_attn_experts}
    if cfg.model.use_ffn:
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

FAMILIES: dict[str, Family] = {"dyntrm": DYNTRM}


def get_family(cfg: Config) -> Family:
    name = cfg.model.family
    if name not in FAMILIES:
        raise ValueError(f"config model.family={name!r}: must be one of {sorted(FAMILIES)}")
    return FAMILIES[name]
