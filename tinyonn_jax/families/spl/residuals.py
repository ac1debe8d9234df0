"""Typed residuals of the SPL forward pass.

One SPL layer application (``model.spl_apply``) yields a ``SplResidual``: its input, the
pre-activation, the routing logits and the mask. ``model.spl_block`` reduces it over the valid
tokens to the M-SAPS inputs ``KindStats`` of its module kind, and keeps the full residual only when
zero probes are given. ``lax.scan`` over the sites stacks both (every array gains a leading L_eff
axis) and ``model.spl_forward`` returns them, keyed by module kind (``SplConfig.kinds``: q, k, v,
o and, with MoIE, ffn1, ffn2) like the parameters, inside ``Aux``.

Absent parts are None: the statistics of a forward with ``with_stats=False``, the full residuals
of one without probes. A None field is an empty subtree, so these tuples pass through
``lax.scan``, ``jax.checkpoint``, ``jax.vjp`` and ``jax.jit`` like the arrays they hold.

Shape letters: L_eff sites (layers, or refinement steps of a shared block), B batch, T tokens,
N neurons (outputs) of a module, I its inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from tinyonn_jax.nn.context import Context


class SplResidual(NamedTuple):
    """Residuals of one SPL layer on x (..., I); stacked over sites: (L_eff,B,T,...)."""

    x: jax.Array  # (..., I) input
    pre: jax.Array  # (..., N) x mu^T + b, before the activation
    raw: jax.Array  # (..., N) routing logits relu(cos(x, p_j) - x . g_j)
    mask: jax.Array  # (..., N) 1[raw > 0] as float, the mask the forward applied


class KindStats(NamedTuple):
    """M-SAPS inputs of one module kind over the valid tokens, per site (constants: no gradient
    flows through them)."""

    count: jax.Array  # (L_eff,N) activations of every neuron
    anchor: jax.Array  # (L_eff,N,I) mean input of the tokens that activated each neuron (0 if none)
    x_mean: jax.Array  # (L_eff,I) mean input over all valid tokens


class Aux(NamedTuple):
    """Everything ``model.spl_forward`` returns besides the logits."""

    stats: dict[str, KindStats] | None  # kind -> statistics; None with ``with_stats=False``
    protos: dict[str, jax.Array]  # kind -> (L_eff,N,I) effective prototypes P_eff (after PRC)
    tokens: jax.Array  # () float32 number of valid tokens
    context: Context  # (B,T) positions and segment ids of the batch
    residuals: dict[str, SplResidual] | None = None  # kind -> (L_eff,B,T,...); with probes only
