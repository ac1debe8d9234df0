"""The DynTRM family (seed 000): DynTRM with DynSIHA+ attention, DynMoE experts and SARS."""

from __future__ import annotations

import jax

from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import modules, step, transformer
from tinyonn_jax.family import FamilyBase
from tinyonn_jax.train_state import StepOutput


class DynTrmFamily(FamilyBase):
    name = "dyntrm"

    def init(self, key: jax.Array, cfg: Config) -> tuple[dict, None]:
        return modules.init_params(key, cfg.model), None

    def param_labels(self, cfg: Config) -> dict:
        return modules.param_labels(cfg.model)

    def expert_axes(self, cfg: Config) -> dict:
        return modules.expert_axes(cfg.model)

    def num_experts(self, cfg: Config) -> int:
        """Routed experts: the attention library and the FFN pool (a dense twin has none)."""
        sites = cfg.model.routed_sites
        return (cfg.model.num_attn_experts if "q" in sites else 0) + (
            cfg.model.num_ffn_experts if "ffn" in sites else 0)

    def gradients(self, params: dict, extras: None, batch: dict, cfg: Config) -> StepOutput:
        return step.gradients(params, extras, batch, cfg)

    def logits(self, params: dict, extras: None, tokens: jax.Array, cfg: Config, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        return transformer.forward(params, tokens, cfg.model, positions=positions,
                                   segment_ids=segment_ids)[0]


DYNTRM = DynTrmFamily()
