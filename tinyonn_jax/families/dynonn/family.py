"""The DynONN family (seeds 002-004): DynSMHA + GAMoE-gated DynMoE, 1f2b1o PI-adaptive
gating and a live expert pool."""

from __future__ import annotations

import jax

from tinyonn_jax.config import Config
from tinyonn_jax.families.dynonn import lifecycle, modules
from tinyonn_jax.families.dynonn import step as dynonn_step
from tinyonn_jax.family import FamilyBase
from tinyonn_jax.train_state import StepOutput, TrainState


class DynOnnFamily(FamilyBase):
    """Extras: the expert pool (``lifecycle.PoolState``: live masks, routing history, key)."""

    name = "dynonn"

    def init(self, key: jax.Array, cfg: Config) -> tuple[dict, lifecycle.PoolState]:
        k_params, k_pool = jax.random.split(key)
        return (modules.init_params(k_params, cfg.model),
                lifecycle.init_pool(cfg.model, k_pool))

    def param_labels(self, cfg: Config) -> dict:
        return modules.param_labels(cfg.model)

    def expert_axes(self, cfg: Config) -> dict:
        return modules.expert_axes(cfg.model)

    def num_experts(self, cfg: Config) -> int:
        return cfg.model.max_experts

    def gradients(self, params: dict, extras: lifecycle.PoolState, batch: dict,
                  cfg: Config) -> StepOutput:
        return dynonn_step.gradients(params, extras, batch, cfg)

    def logits(self, params: dict, extras: lifecycle.PoolState, tokens: jax.Array, cfg: Config,
               *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        return dynonn_step.eval_logits(params, extras, tokens, cfg.model, positions=positions,
                                       segment_ids=segment_ids)

    def maintain(self, state: TrainState, cfg: Config,
                 step: int) -> tuple[TrainState, list[tuple[int, str, int, str]]]:
        state, events = dynonn_step.maintain(state, cfg.model, step)
        return state, [(e.step, e.kind, e.expert_id, e.site) for e in events]

    def expert_rows(self, metrics: dict) -> tuple[dict, dict]:
        return dynonn_step.expert_rows(metrics)


DYNONN = DynOnnFamily()
