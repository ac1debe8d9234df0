"""Exponential moving average of the parameters, the weights a TRM-style run evaluates with.

``ema_t = decay * ema_{t-1} + (1 - decay) * params_t`` after every applied update, starting from
the initial parameters (``ema_0 = params_0``). It lives in the train state, so it is sharded like
the parameters, checkpointed with them and resumed exactly; ``decay = 0`` keeps no EMA at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def init_ema(params: Any, decay: float) -> Any | None:
    """A copy of ``params`` (its own buffers, so the state can be donated), or None when off."""
    if not decay:
        return None
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def update_ema(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def eval_params(state: Any) -> Any:
    """The parameters to evaluate: the EMA when the state keeps one, else the live parameters.

    Works for any train state with a ``params`` field (families without EMA included).
    """
    ema = getattr(state, "ema", None)
    return state.params if ema is None else ema
