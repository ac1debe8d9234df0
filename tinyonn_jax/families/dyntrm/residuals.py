"""Typed residuals of the DynTRM forward pass and its zero probes.

One refinement step (``recursion.block_step`` + readout) yields ``StepResiduals``: the expert
inputs u and the routing of every expert call site (``SiteResidual``), the hidden state, logits
and halting logits. ``recursion.refine`` stacks them over the S refinement steps (``lax.scan``:
every array gains a leading S axis) and ``transformer.forward`` returns them with the batch
layout as ``Aux``. ``Probes`` holds the zero probes added to the expert outputs; the backward pass
gives their cotangents in the same structure.

Absent parts are None: the sites of a dense sublayer (``model.attn_kind="mha"``,
``model.ffn_kind="swiglu"``, ``model.use_ffn=False``), the overflow counts of a dense or ``scan``
dispatch, the statistics sinks of evaluations that do not fill them. A None field is an empty
subtree, so these tuples pass through ``lax.scan``, ``jax.checkpoint``, ``jax.vjp`` and
``jax.jit`` like the arrays they hold.

Shape letters: S refinement steps, B batch, T tokens, H heads, Dh head width, D hidden width,
V vocabulary, P experts of a site (the latent heads of the attention library for q, k, v; the
latent attention heads for attn; the FFN experts, E, for ffn).

DynSIHA+ has one of two layouts (``ModelConfig.attn_layout``): ``latent_heads`` has the one call
site ``attn`` (input ``u_latent`` = LN1 x (B,T,D), routing (B,T,P)); ``qkv_routers`` has q, k and
v (shared input ``u_attn`` (B,T,H,Dh), routing (B,T,H,P)). The other layout's fields stay None.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from tinyonn_jax.nn.context import Context

QKV = ("q", "k", "v")  # the call sites of the latent-head library, one per attention input
ATTN = "attn"  # the call site of the latent attention heads (attn_layout="latent_heads")
SITES = (*QKV, ATTN, "ffn")  # every expert call site kind, in this order wherever listed


def _check_site(name: str) -> str:
    if name not in SITES:
        raise ValueError(f"unknown expert call site {name!r}; expected one of {SITES}")
    return name


class SiteResidual(NamedTuple):
    """Routing of one expert call site in one step. Shapes for q, k, v / ffn (each stacked
    residual has a leading S)."""

    z: jax.Array  # (B,T,H,P) / (B,T,E) float32 routing weights, 0 where inactive
    mask: jax.Array  # like z, bool routing decisions (z > 0)
    k: jax.Array  # (B,T,H) / (B,T) int32 number of active experts
    # () int32 active (row, expert) pairs the sparse dispatch dropped for capacity (for q, k, v
    # those of the union dispatch that this site loses); None for dense and scan dispatch.
    overflow: jax.Array | None = None


class StepResiduals(NamedTuple):
    """Residuals of one refinement step; stacked by ``recursion.refine`` to a leading S axis.

    ``recursion.block_step`` fills the expert call sites; ``hidden``, ``logits`` and
    ``halt_logits`` come from the readout after the block (``recursion.refine``).
    """

    u_attn: jax.Array | None = None  # (B,T,H,Dh) input of the latent-head library (qkv_routers)
    q: SiteResidual | None = None  # (B,T,H,P) routing of the q composition
    k: SiteResidual | None = None  # ... of k
    v: SiteResidual | None = None  # ... of v
    u_latent: jax.Array | None = None  # (B,T,D) LN1 x, input of the latent heads (latent_heads)
    attn: SiteResidual | None = None  # (B,T,P) routing over the latent attention heads
    u_ffn: jax.Array | None = None  # (B,T,D) input of the FFN experts; None if dense or no FFN
    ffn: SiteResidual | None = None  # (B,T,E) routing of the FFN experts
    hidden: jax.Array | None = None  # (B,T,D) residual stream after the step (compute dtype)
    logits: jax.Array | None = None  # (B,T,V) float32 readout of the step
    halt_logits: jax.Array | None = None  # (B,2) float32 (q_halt, q_continue)

    def site(self, name: str) -> SiteResidual | None:
        """The routing residual of call site ``name`` (one of ``SITES``); None if it is dense."""
        return getattr(self, _check_site(name))

    def expert_input(self, name: str) -> jax.Array | None:
        """Expert input u of call site ``name``: ``u_ffn`` for ffn, ``u_latent`` for attn, the
        shared ``u_attn`` for q, k and v."""
        name = _check_site(name)
        return {"ffn": self.u_ffn, ATTN: self.u_latent}.get(name, self.u_attn)

    def routed(self) -> dict[str, SiteResidual]:
        """The routing residuals of the sites that exist, by name, in ``SITES`` order."""
        return {name: r for name in SITES if (r := getattr(self, name)) is not None}


class Aux(NamedTuple):
    """Everything ``transformer.forward`` returns besides the final logits."""

    steps: StepResiduals  # every array with a leading S axis (refinement steps)
    context: Context  # (B,T) positions and segment ids of the batch


class Probes(NamedTuple):
    """Zero probes added to the aggregated expert outputs, stacked over S; absent ones None.

    Their cotangents, in the same structure, are dL/dA of every call site and step, and for the
    statistics sinks the SARS statistics their experts' backward pass computed
    (``experts.apply_with_stats``, ``experts.apply_scan_stats_shared``; the last axis holds
    ``expert_vjps.StatChannels``). ``transformer.probe_shapes`` decides which exist.
    """

    q: jax.Array | None = None  # (S,B,T,H,Dh) added to the q composition
    k: jax.Array | None = None  # ... to k
    v: jax.Array | None = None  # ... to v
    attn: jax.Array | None = None  # (S,B,T,D) added to sum_p z_p y_p of the latent heads
    ffn: jax.Array | None = None  # (S,B,T,D) added to the FFN experts' output
    ffn_stats: jax.Array | None = None  # (S,B,T,E,3) statistics sink of the FFN experts
    attn_stats: jax.Array | None = None  # (S,B,T,H,P,3,3) ... of the library: (P, site, channel)

    def site(self, name: str) -> jax.Array | None:
        """The probe (or its cotangent) of call site ``name`` (one of ``SITES``)."""
        return getattr(self, _check_site(name))

    def present(self) -> dict[str, jax.Array]:
        """The probes that exist, by field name."""
        return {name: a for name, a in zip(self._fields, self, strict=True) if a is not None}
