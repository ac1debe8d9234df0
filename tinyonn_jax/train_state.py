"""One train state and one update for every model family.

``train_step(state, batch) = apply_update(state, family.gradients(...))``: the family supplies
the gradients (already combined over its losses, shaped like the parameters), whether its
losses are finite, its metrics and its extras after the step; ``apply_update`` applies both
optax chains (``optax.partition`` by parameter group), skips a non-finite update
(``guarded_update``), counts the skip, keeps the family's extras of a skipped step unchanged,
and maintains the EMA of the parameters (``train.ema_decay``), which the trainer evaluates with.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax import optim


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: optax.OptState
    skipped: jax.Array  # int32 scalar: updates skipped because something was non-finite
    ema: Any = None  # EMA of params (train.ema_decay > 0), else None (no leaves to checkpoint)
    extras: Any = None  # the family's own state (SPL: accuracy EMA; DynONN: expert pool)


class StepOutput(NamedTuple):
    """What a family's ``gradients`` returns for one batch."""

    grads: Any  # params-shaped: the sum over the family's losses, as the optimizer takes it
    losses_finite: jax.Array  # bool scalar: every loss of the step is finite
    metrics: dict  # flat dict of the family's metrics
    extras: Any = None  # the family's extras after this step (kept only if the update is applied)


def init_ema(params: Any, decay: float) -> Any | None:
    """A copy of ``params`` (its own buffers, so the state can be donated), or None when off."""
    if not decay:
        return None
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def update_ema(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def eval_params(state: TrainState) -> Any:
    """The parameters to evaluate: the EMA when the state keeps one, else the live parameters."""
    return state.params if state.ema is None else state.ema


def init_state(params: Any, extras: Any, optimizer: optax.GradientTransformation,
               ema_decay: float) -> TrainState:
    """Step 0: fresh optimizer state, no skips, the EMA starting at ``params``."""
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      skipped=jnp.int32(0), ema=init_ema(params, ema_decay), extras=extras)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf (typed PRNG keys included)."""
    def pick(n, o):
        if jnp.issubdtype(o.dtype, jax.dtypes.prng_key):
            data = jnp.where(ok, jax.random.key_data(n), jax.random.key_data(o))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(o))
        return jnp.where(ok, n, o)

    return jax.tree.map(pick, new, old)


def apply_update(state: TrainState, out: StepOutput, optimizer: optax.GradientTransformation,
                 ema_decay: float) -> tuple[TrainState, dict]:
    """One guarded optax update from ``out``; returns the new state and the step's metrics.

    A non-finite loss, gradient, new parameter or new optimizer state keeps the parameters,
    optimizer state, EMA and family extras as they were and counts a skip.
    """
    params, opt_state, ok = optim.guarded_update(optimizer, out.grads, state.opt_state,
                                                 state.params, out.losses_finite)
    ema = state.ema
    if ema is not None:  # a skipped update leaves params, hence the average, unchanged
        ema = keep_if(ok, update_ema(ema, params, ema_decay), ema)
    extras = state.extras if out.extras is None else keep_if(ok, out.extras, state.extras)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     skipped=state.skipped + (~ok).astype(jnp.int32), ema=ema, extras=extras)
    metrics = dict(out.metrics)
    metrics["train/skipped"] = new.skipped
    metrics["train/update_ok"] = ok.astype(jnp.float32)
    metrics.update(optim.learning_rates(opt_state))
    return new, metrics


def train_step(state: TrainState, batch: dict, *, family, cfg,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """Pure: the family's forward and backward passes, then ``apply_update``."""
    out = family.gradients(state.params, state.extras, batch, cfg)
    return apply_update(state, out, optimizer, cfg.train.ema_decay)


def make_train_step(family, cfg, optimizer: optax.GradientTransformation, *,
                    in_shardings=None, out_shardings=None, donate: bool = True):
    """``jax.jit`` of ``train_step`` with the state donated (and shardings when given)."""
    fn = functools.partial(train_step, family=family, cfg=cfg, optimizer=optimizer)
    kwargs = {}
    if in_shardings is not None:
        kwargs.update(in_shardings=in_shardings, out_shardings=out_shardings)
    return jax.jit(fn, donate_argnums=(0,) if donate else (), **kwargs)
