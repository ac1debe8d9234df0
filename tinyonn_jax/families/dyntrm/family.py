"""The DynTRM family (seed 000): DynTRM with DynSIHA+ attention, DynMoE experts and SARS."""

from __future__ import annotations

import jax

from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import lifecycle, modules, transformer
from tinyonn_jax.families.dyntrm import step as dyntrm_step
from tinyonn_jax.family import FamilyBase
from tinyonn_jax.train_state import StepOutput, TrainState

Pool = lifecycle.PoolState | None


class DynTrmFamily(FamilyBase):
    """Extras: the expert pool (``lifecycle.PoolState``: live masks, routing records, key) when
    ``lifecycle.keeps_pool`` (a lifecycle runs or a pool starts with free slots), else None."""

    name = "dyntrm"

    def init(self, key: jax.Array, cfg: Config) -> tuple[dict, Pool]:
        # The parameters take the key as they would without a pool: a lifecycle changes no
        # initial parameter.
        pool = (lifecycle.init_pool(cfg.model, jax.random.fold_in(key, 1))
                if lifecycle.keeps_pool(cfg.model) else None)
        return modules.init_params(key, cfg.model), pool

    def param_labels(self, cfg: Config) -> dict:
        return modules.param_labels(cfg.model)

    def expert_axes(self, cfg: Config) -> dict:
        return modules.expert_axes(cfg.model)

    def num_experts(self, cfg: Config) -> int:
        """Routed experts: the attention library and the FFN pool (a dense twin has none)."""
        sites = cfg.model.routed_sites
        return (cfg.model.num_attn_experts if {"q", "attn"} & set(sites) else 0) + (
            cfg.model.num_ffn_experts if "ffn" in sites else 0)

    def gradients(self, params: dict, extras: Pool, batch: dict, cfg: Config) -> StepOutput:
        return dyntrm_step.gradients(params, extras, batch, cfg)

    def logits(self, params: dict, extras: Pool, tokens: jax.Array, cfg: Config, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        return transformer.forward(params, tokens, cfg.model, positions=positions,
                                   segment_ids=segment_ids,
                                   live=None if extras is None else extras.live)[0]

    def maintain(self, state: TrainState, cfg: Config,
                 step: int) -> tuple[TrainState, list[tuple[int, str, int, str]]]:
        state, events = dyntrm_step.maintain(state, cfg.model, step)
        return state, [(e.step, e.kind, e.expert_id, e.site) for e in events]

    def expert_rows(self, metrics: dict) -> tuple[dict, dict | None]:
        return dyntrm_step.expert_rows(metrics)


DYNTRM = DynTrmFamily()
