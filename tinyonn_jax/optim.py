"""Optimizers: one optax chain per parameter group, each built from an ``OptimizerConfig``.

Any optax optimizer that takes ``learning_rate`` works by name (``adamw``, ``lion``, ``sgd``...);
its other arguments come from ``kwargs``. Clipping and the learning-rate schedule are config too.
"""

from __future__ import annotations

import optax

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.params import MAIN, META, param_labels


def learning_rate(oc: OptimizerConfig) -> optax.Schedule | float:
    """Constant or cosine decay, with optional linear warm-up from 0."""
    if oc.schedule == "cosine":
        base = optax.cosine_decay_schedule(oc.learning_rate, oc.decay_steps)
    else:
        base = optax.constant_schedule(oc.learning_rate)
    if oc.warmup_steps:
        warm = optax.linear_schedule(0.0, oc.learning_rate, oc.warmup_steps)
        return optax.join_schedules([warm, base], [oc.warmup_steps])
    return base


def build_chain(oc: OptimizerConfig) -> optax.GradientTransformation:
    """clip_value -> clip_by_global_norm -> optax.<name>(schedule, **kwargs)."""
    factory = getattr(optax, oc.name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"config optim.name={oc.name!r}: optax has no optimizer of that name")
    try:
        opt = factory(learning_rate=learning_rate(oc), **dict(oc.kwargs))
    except TypeError as e:
        raise ValueError(f"config optim: optax.{oc.name} rejected its arguments: {e}") from e
    parts = []
    if oc.clip_value:
        parts.append(optax.clip(oc.clip_value))
    if oc.clip_norm:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    return optax.chain(*parts, opt)


def build_optimizer(cfg: Config, params) -> optax.GradientTransformation:
    """The main chain on ``main`` params and the meta chain on ``meta`` params."""
    return optax.partition({MAIN: build_chain(cfg.optim), META: build_chain(cfg.meta_optim)},
                           param_labels(params))
