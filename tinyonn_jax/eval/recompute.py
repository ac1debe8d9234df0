"""Greedy generation by recomputing the whole forward for every new token, for any family.

``eval.generate`` decodes DynTRM with a KV cache because it knows DynTRM's block; a family that
only exposes ``family.logits(params, extras, tokens, cfg, positions=, segment_ids=)`` is decoded
here from that alone. The prompt and the tokens generated so far sit in one fixed-size buffer
(B, Tp + N - 1) laid out as ``generate``'s cache: prompts left-padded to Tp, a row's n-th new
token at slot ``Tp + n - 1``, RoPE position ``slot - pad``. Every new token reruns the forward on
the whole buffer and reads the logits of the newest slot. The left padding and the slots not
written yet are segment 0 and the written slots segment 1, so under the causal,
segment-local attention neither reaches a real token: the result is the forward of each row's
sequence so far. N forwards of the full buffer per call, so this is for the families without a
cache; static shapes, one compile per (B, Tp, N, logits function).

Same greedy rule, stop tokens and output as ``generate`` (``generate.greedy_loop``);
``Generation.steps`` is None (no adaptive depth).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from tinyonn_jax.config import Config
from tinyonn_jax.data.tokenizer import PAD
from tinyonn_jax.eval.generate import Generation, greedy_loop

# (state, tokens (B,L), positions (B,L), segment_ids (B,L)) -> logits (B,L,V)
LogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class FamilyLogits:
    """``family.logits`` as a ``LogitsFn`` of the state ``(params, extras)``.

    Frozen and compared by value (the family object and the config), so it is a static argument
    of ``generate_by_recompute`` that compiles once per config, not once per call.
    """

    family: Any  # a ``family.FamilyBase``
    cfg: Config

    def __call__(self, state, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
        params, extras = state
        return self.family.logits(params, extras, tokens, self.cfg, positions=positions,
                                  segment_ids=segment_ids)


def generate_by_recompute(logits_fn: LogitsFn, state, tokens: jax.Array, lengths: jax.Array, *,
                          max_new_tokens: int, stop_hopeless: bool = False) -> Generation:
    """Greedy decoding of left-padded prompts tokens (B, Tp) with true lengths (B,).

    ``logits_fn(state, tokens, positions, segment_ids) -> (B, L, V)`` is a hashable causal
    model (``FamilyLogits``); ``state`` its parameters (any pytree). ``stop_hopeless``: a row
    also stops once its answer can no longer be a grid (``greedy_loop``). Returns a ``Generation``
    with tokens (B, max_new_tokens) and ``steps=None``. Raises ``ValueError`` when
    ``max_new_tokens < 1`` or ``lengths`` is not (B,).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tuple(jnp.shape(lengths)) != tuple(jnp.shape(tokens))[:1]:
        raise ValueError(f"lengths must have shape (B,) like tokens {jnp.shape(tokens)}, got "
                         f"{jnp.shape(lengths)}")
    return _generate_by_recompute(logits_fn, state, tokens, lengths,
                                  max_new_tokens=max_new_tokens, stop_hopeless=stop_hopeless)


@functools.partial(jax.jit, static_argnames=("logits_fn", "max_new_tokens", "stop_hopeless"))
def _generate_by_recompute(logits_fn: LogitsFn, state, tokens: jax.Array, lengths: jax.Array,
                           *, max_new_tokens: int, stop_hopeless: bool) -> Generation:
    """The jitted body of ``generate_by_recompute``."""
    b, tp = tokens.shape
    pad = tp - lengths.astype(jnp.int32)  # (B,)
    # The last generated token is never fed back, hence - 1.
    length = tp + max_new_tokens - 1
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    positions = jnp.maximum(slots - pad[:, None], 0)
    buf = jnp.full((b, length), PAD, jnp.int32).at[:, :tp].set(tokens.astype(jnp.int32))

    def logits_at(buf, last):
        """Logits (B, V) of slot ``last``, the newest written one."""
        segment = ((slots >= pad[:, None]) & (slots <= last)).astype(jnp.int32)
        logits = logits_fn(state, buf, positions, segment)  # (B, L, V)
        return jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)

    def step(buf, prev, i):
        buf = jax.lax.dynamic_update_index_in_dim(buf, prev, tp + i - 1, axis=1)
        return logits_at(buf, tp + i - 1), buf

    out, n, mean_logprob = greedy_loop(logits_at(buf, tp - 1), buf, step, max_new_tokens,
                                       stop_hopeless)
    return Generation(tokens=out, num_generated=n, mean_logprob=mean_logprob)
