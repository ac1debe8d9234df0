"""Optimizers: one optax chain per parameter group, each built from an ``OptimizerConfig``.

Any optax optimizer that takes ``learning_rate`` works by name (``adamw``, ``lion``, ``sgd``...);
its other arguments come from ``kwargs``. Clipping and the learning-rate schedule are config too.
The learning rate is an injected hyperparameter (``optax.inject_hyperparams``): the optimizer
state holds the rate of its latest update, ``learning_rates`` reads it for logging, and a user
may change it in a restored state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.nn.variables import MAIN, META


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
        raise ConfigError(f"config optim.name={oc.name!r}: optax has no optimizer of that name")
    kwargs = dict(oc.kwargs)
    try:
        # Only the learning rate is injected; the other arguments stay what the factory expects.
        opt = optax.inject_hyperparams(factory, static_args=tuple(kwargs))(
            learning_rate=learning_rate(oc), **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config optim: optax.{oc.name} rejected its arguments "
                          f"{sorted(kwargs)}: {e}") from None
    parts = []
    if oc.clip_value:
        parts.append(optax.clip(oc.clip_value))
    if oc.clip_norm:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    return optax.chain(*parts, opt)


def build_optimizer(cfg: Config, labels) -> optax.GradientTransformation:
    """The ``optim`` chain on ``main`` leaves and the ``meta_optim`` chain on ``meta`` leaves.

    ``labels`` is the family's tree of group names (``Family.param_labels``), shaped like the
    parameters.
    """
    return optax.partition({MAIN: build_chain(cfg.optim), META: build_chain(cfg.meta_optim)},
                           labels)


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def learning_rates(opt_state) -> dict[str, jax.Array]:
    """``optim/lr/<group>`` -> the learning rate of the latest update, per parameter group.

    Reads every ``InjectHyperparamsState`` in ``opt_state``; a state of ``optax.partition`` names
    each group by its label (``main``, ``meta``), a single chain is ``optim/lr``.
    """
    is_inject = lambda x: isinstance(x, _INJECT_STATES)  # noqa: E731
    found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_inject)[0]
    out = {}
    for path, node in found:
        if not is_inject(node) or "learning_rate" not in node.hyperparams:
            continue
        groups = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = "optim/lr" + "".join(f"/{g}" for g in groups)
        out[name] = node.hyperparams["learning_rate"]
    return out


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is free of inf and NaN."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def guarded_update(optimizer: optax.GradientTransformation, grads, opt_state, params,
                   losses_finite: jax.Array):
    """One optax update, applied only if nothing in it is non-finite.

    Returns ``(params, opt_state, ok)``: the updated parameters and optimizer state when the
    losses (``losses_finite``), the gradients, the new parameters and the new optimizer state
    are all finite, else the given ones unchanged; ``ok`` says which. A finite loss with an
    overflowing update (a huge learning rate) is caught by the check of the new state.
    """
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = (losses_finite & all_finite(grads) & all_finite(new_params) & all_finite(new_opt))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state), ok)
