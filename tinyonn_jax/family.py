"""The ``Family`` protocol: what a model family supplies to the one training program.

A family implements one method per role, each with one signature:

  init(key, cfg) -> (params, extras)         fresh parameters (a module's ``pure_params``) and
                                              the family's extra train-state (or None)
  param_labels(cfg) -> tree of 'main'/'meta'  from the parameter types (``nn.variables``)
  expert_axes(cfg) -> tree of int             the declared expert axis per leaf (-1: none)
  gradients(params, extras, batch, cfg) -> StepOutput
  logits(params, extras, tokens, cfg, *, positions, segment_ids) -> (B, T, V)
  num_experts(cfg) -> int                     experts in the pools (dashboards; default 0)
  maintain(state, cfg, step) -> (state, events)       host side, between steps (default: none)
  expert_rows(metrics) -> (usage, live)               rows of the expert dashboard

and inherits everything else from ``FamilyBase``: the optimizer (both optax chains, partitioned
by ``param_labels``), the initial ``TrainState``, the train step (``train_state.train_step``).
``cfg`` is always the whole ``Config``; ``cfg.model`` is the family's own section.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from tinyonn_jax import optim, train_state
from tinyonn_jax.config import Config
from tinyonn_jax.train_state import StepOutput, TrainState


def usage_rows(vectors: dict) -> tuple[dict, None]:
    """Every 1-D ``experts/usage_<site>`` metric is one dashboard row per site."""
    return {k.removeprefix("experts/usage_"): np.asarray(v) for k, v in vectors.items()
            if k.startswith("experts/usage_") and np.ndim(v) == 1}, None


class FamilyBase:
    """Defaults and the shared roles; a family overrides ``init``, ``param_labels``,
    ``expert_axes``, ``gradients``, ``logits`` and, when it has them, ``maintain`` and
    ``expert_rows``."""

    name: str = ""

    def init(self, key: jax.Array, cfg: Config) -> tuple[dict, Any]:
        raise NotImplementedError

    def param_labels(self, cfg: Config) -> dict:
        raise NotImplementedError

    def expert_axes(self, cfg: Config) -> dict:
        raise NotImplementedError

    def gradients(self, params: dict, extras: Any, batch: dict, cfg: Config) -> StepOutput:
        raise NotImplementedError

    def logits(self, params: dict, extras: Any, tokens: jax.Array, cfg: Config, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError

    def num_experts(self, cfg: Config) -> int:
        """Experts in the model's pools, for the dashboards (0: the family has none)."""
        return 0

    def maintain(self, state: TrainState, cfg: Config,
                 step: int) -> tuple[TrainState, list[tuple[int, str, int, str]]]:
        """Host-side maintenance after ``step``: (state, events (step, kind, expert, site))."""
        return state, []

    def expert_rows(self, metrics: dict) -> tuple[dict, dict | None]:
        """Host side: dashboard rows {site: (P,) usage} and live masks (or None)."""
        return usage_rows(metrics)

    # Shared roles: the same for every family.
    def init_params(self, key: jax.Array, cfg: Config) -> dict:
        return self.init(key, cfg)[0]

    def build_optimizer(self, cfg: Config) -> optax.GradientTransformation:
        """``optim`` chain on the ``main`` parameters, ``meta_optim`` on the ``meta`` ones."""
        return optim.build_optimizer(cfg, self.param_labels(cfg))

    def init_state(self, cfg: Config, optimizer: optax.GradientTransformation,
                   key: jax.Array) -> TrainState:
        params, extras = self.init(key, cfg)
        return train_state.init_state(params, extras, optimizer, cfg.train.ema_decay)

    def train_step(self, state: TrainState, batch: dict, *, cfg: Config,
                   optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
        return train_state.train_step(state, batch, family=self, cfg=cfg, optimizer=optimizer)

    def make_train_step(self, cfg: Config, optimizer: optax.GradientTransformation, *,
                        donate: bool = True, in_shardings=None, out_shardings=None):
        return train_state.make_train_step(self, cfg, optimizer, donate=donate,
                                           in_shardings=in_shardings,
                                           out_shardings=out_shardings)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
