"""Typed residuals of the DynONN forward pass, its zero probes and replayable decisions.

Every pass of ``model.forward`` runs two gated sublayers, attn (DynSMHA) and ffn (DynMoE); each
yields a ``SiteAux`` (the gate input u and the routing). ``lax.scan`` stacks them over the P
passes (every array gains a leading P axis) and ``model.forward`` returns them as ``Aux``.
``Probes`` holds the zero probes added to every site's routing weights and sublayer output; the
backward pass gives their cotangents in the same structure. ``Decisions`` holds the hard routing
decisions that ``model.forward(decisions=...)`` replays (``model.decisions_of``).

Absent parts are None (a probe or decision a caller does not give). A None field is an empty
subtree, so these tuples pass through ``lax.scan``, ``jax.checkpoint``, ``jax.vjp`` and
``jax.jit`` like the arrays they hold.

Shape letters: P passes (``num_layers``), B batch, T tokens, D hidden width, E expert slots
(``max_experts``), Hw the width of one attention expert (``num_heads * head_dim``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from tinyonn_jax.nn import gamoe

SITES = ("attn", "ffn")  # the gated sublayers of a pass, in this order wherever they are listed


def _check_site(name: str) -> str:
    if name not in SITES:
        raise ValueError(f"unknown gated site {name!r}; expected one of {SITES}")
    return name


class SiteAux(NamedTuple):
    """Residuals of one gated sublayer, stacked over passes by ``model.forward``: shapes below
    with the leading P (one pass inside the scan has none)."""

    u: jax.Array  # (P,B,T,D) gate input, LayerNorm of the residual stream (compute dtype)
    mask: jax.Array  # (P,B,T,E) bool routed experts (threshold activations or the fallback)
    z: jax.Array  # (P,B,T,E) float32 routing weights, exactly 0 where not routed
    k: jax.Array  # (P,B,T) int32 number of routed experts
    homeless: jax.Array  # (P,B,T) bool: no expert passed its threshold (before any fallback)

    def decision(self) -> gamoe.Decision:
        """The hard part of this routing, to replay it."""
        return gamoe.Decision(mask=self.mask, homeless=self.homeless)


class Aux(NamedTuple):
    """Everything ``model.forward`` returns besides the logits: the residuals of both sites."""

    attn: SiteAux  # DynSMHA gate of every pass
    ffn: SiteAux  # DynMoE gate of every pass

    def site(self, name: str) -> SiteAux:
        """The residuals of site ``name`` (one of ``SITES``)."""
        return getattr(self, _check_site(name))


class Probes(NamedTuple):
    """Zero probes of every site and pass; absent ones None. Their cotangents, in the same
    structure, are dL/dw_te (``w_*``), dL/d(sublayer output) (``out_*``) and dL/do_te for the
    attention output of every head expert (``head_attn``)."""

    w_attn: jax.Array | None = None  # (P,B,T,E) added to the attention routing weights
    out_attn: jax.Array | None = None  # (P,B,T,D) added to the attention sublayer output
    w_ffn: jax.Array | None = None  # (P,B,T,E) added to the FFN routing weights
    out_ffn: jax.Array | None = None  # (P,B,T,D) added to the FFN sublayer output
    # (P,B,T,E,Hw) added to every head's attention output o_te (smha_mode="head_outputs")
    head_attn: jax.Array | None = None

    def weight(self, name: str) -> jax.Array | None:
        """The routing-weight probe (or its cotangent) of site ``name``."""
        return getattr(self, f"w_{_check_site(name)}")

    def output(self, name: str) -> jax.Array | None:
        """The sublayer-output probe (or its cotangent) of site ``name``."""
        return getattr(self, f"out_{_check_site(name)}")


class Decisions(NamedTuple):
    """Hard routing decisions to replay, per site: mask (P,B,T,E) and homeless (P,B,T) bool;
    a site left None decides afresh."""

    attn: gamoe.Decision | None = None
    ffn: gamoe.Decision | None = None

    def site(self, name: str) -> gamoe.Decision | None:
        """The decision of site ``name`` (one of ``SITES``); None if it decides afresh."""
        return getattr(self, _check_site(name))
