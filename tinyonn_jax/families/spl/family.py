"""The SPL family (seed 001): SparseProtoLinear, MoIE and Dimension-DynSIHA with M-SAPS."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.config import Config
from tinyonn_jax.families.spl import modules, step
from tinyonn_jax.families.spl.model import spl_forward
from tinyonn_jax.family import FamilyBase
from tinyonn_jax.train_state import StepOutput


class SplFamily(FamilyBase):
    """Extras: the EMA of the training main_acc (token accuracy, float32 scalar), which sets the
    temperature of the proto-gradient protection."""

    name = "spl"

    def init(self, key: jax.Array, cfg: Config) -> tuple[dict, jax.Array]:
        return modules.init_spl_params(key, cfg.model), jnp.float32(0.0)

    def param_labels(self, cfg: Config) -> dict:
        return modules.param_labels(cfg.model)

    def expert_axes(self, cfg: Config) -> dict:
        return modules.expert_axes(cfg.model)

    def num_experts(self, cfg: Config) -> int:
        """SPL neurons of every module kind and parameter layer (a fixed pool: no lifecycle)."""
        mc = cfg.model
        return mc.num_param_layers * sum(mc.dims(k)[1] for k in mc.kinds)

    def gradients(self, params: dict, extras: jax.Array, batch: dict,
                  cfg: Config) -> StepOutput:
        return step.gradients(params, extras, batch, cfg)

    def logits(self, params: dict, extras: jax.Array, tokens: jax.Array, cfg: Config, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        return spl_forward(params, tokens, cfg.model, positions=positions,
                           segment_ids=segment_ids, with_stats=False)[0]


SPL = SplFamily()
