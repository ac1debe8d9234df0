"""Seed 001: SparseProtoLinear (SPL), Prototype Residual Connection, MoIE and Dimension-DynSIHA.

One SPL layer (in -> N) holds three decoupled states per output neuron j:
  * ``mu_weight`` / ``mu_bias`` (the computation, group ``main``),
  * ``proto_weight`` p_j (the perceiver / proposer, group ``meta``),
  * ``gate_param`` g_j (the cost estimator / builder, group ``meta``).
Routing (seed 001, "Proposer-Builder"): ``raw_j = relu(cos(x, p_j) - x . g_j)``, mask = 1[raw > 0]
and ``out = act(x mu^T + b) * mask``. The mask is either hard (no gradient into raw) or a
straight-through estimator (forward hard, backward identity into raw).

Prototype Residual Connection (PRC): per module kind (q, k, v, o, ffn1, ffn2) an independent
residual stream over the prototypes, ``P_eff^l = P^l + LN_l(P_eff^{l-1} W_l^T)``. Seed 001 puts PRC
in the prototype pathway (the "encoder"), so its parameters ``prc_*`` belong to the ``meta`` group
and are trained by the M-SAPS prototype loss, which is a function of ``P_eff`` (the original put
them in the computation group behind a hard mask, where they never received a gradient).

The parameters are owned by the NNX modules of ``modules.py`` (their types give the groups); the
functions here take their pure-dict form (``variables.pure_params``).

The model: embedding -> L pre-norm blocks (Dimension-DynSIHA: one causal head whose q, k, v, o
are SPL layers; MoIE: SPL d -> m*d -> d) -> final LN -> LM head. ``recursion="stacked"`` scans
over L distinct layers; ``"dyntrm"`` scans one shared block over ``steps`` refinement steps, PRC
then running across steps with one shared transform. Either way a "site" is one application of a
block (a layer or a step); per-site statistics are stacked on a leading axis L_eff. The forward's
residuals are the typed tuples of ``residuals.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax import backend
from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.residuals import Aux, KindStats, SplResidual
from tinyonn_jax.nn.attention import attend, rope
from tinyonn_jax.nn.context import Context, make_context
from tinyonn_jax.nn.norm import layer_norm

# ----------------------------------------------------------------------------- SPL layer


@jax.custom_jvp
def _ste_mask(raw: jax.Array) -> jax.Array:
    return (raw > 0).astype(raw.dtype)


@_ste_mask.defjvp
def _ste_mask_jvp(primals, tangents):
    # Straight-through: forward 1[raw > 0] exactly, backward the identity into raw.
    (raw,), (t,) = primals, tangents
    return _ste_mask(raw), t


def _unit(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True) + eps)


def spl_route(x: jax.Array, proto: jax.Array, gate: jax.Array) -> jax.Array:
    """raw = relu(cos(x, p_j) - x . g_j): x (..., in), proto/gate (N, in) -> (..., N) float32.

    Computed in float32 at ``Precision.HIGHEST`` whatever x's dtype, so the routing decision
    ``raw > 0`` does not depend on the compute dtype or the platform's matmul rounding.
    """
    hi = jax.lax.Precision.HIGHEST
    x = x.astype(jnp.float32)
    cos = jnp.einsum("...i,ni->...n", _unit(x), _unit(proto.astype(jnp.float32)), precision=hi)
    return jax.nn.relu(cos - jnp.einsum("...i,ni->...n", x, gate.astype(jnp.float32),
                                        precision=hi))


def spl_mask(raw: jax.Array, mode: str) -> jax.Array:
    """1[raw > 0] as float; ``hard`` blocks the gradient, ``ste`` passes it unchanged to raw."""
    if mode == "hard":
        return jax.lax.stop_gradient((raw > 0).astype(raw.dtype))
    if mode == "ste":
        return _ste_mask(raw)
    raise ValueError(f"unknown SPL mask mode {mode!r}")


def activate(pre: jax.Array, activation: str) -> jax.Array:
    """The SPL output nonlinearity applied before the mask."""
    if activation == "linear":
        return pre
    if activation == "silu":
        return jax.nn.silu(pre)
    raise ValueError(f"unknown SPL activation {activation!r}")


def spl_apply(params: dict, x: jax.Array, mode: str, *, activation: str = "linear",
              proto: jax.Array | None = None,
              probe: jax.Array | None = None) -> tuple[jax.Array, SplResidual]:
    """SPL forward: x (..., in) -> out (..., N) = act(x mu^T + b) * mask (+ zero probe).

    ``proto`` overrides ``params['proto_weight']`` (the PRC effective prototype). A zero ``probe``
    added to the masked output makes dL/dM available from the same backward pass. Residuals
    (``SplResidual``): x, pre (x mu^T + b), raw (routing logits after ReLU), mask.
    """
    p = params["proto_weight"] if proto is None else proto
    raw = spl_route(x, p, params["gate_param"])
    mask = spl_mask(raw, mode)
    dt = x.dtype  # the compute dtype; the routing (raw, mask) is float32
    pre = (jnp.einsum("...i,ni->...n", x, params["mu_weight"].astype(dt))
           + params["mu_bias"].astype(dt))
    out = activate(pre, activation) * mask.astype(dt)
    if probe is not None:
        out = out + probe.astype(dt)
    return out, SplResidual(x=x, pre=pre, raw=raw, mask=mask)


# ----------------------------------------------------------------------------- PRC


def prc_transform(prc: dict, p_prev: jax.Array, eps: float) -> jax.Array:
    """LN(P_prev W^T) for one transform: prc leaves without the leading axis, p_prev (N, in)."""
    y = p_prev @ prc["prc_weight"].T
    return layer_norm({"scale": prc["prc_scale"], "bias": prc["prc_bias"]}, y, eps)


def effective_prototypes(params: dict, cfg: SplConfig) -> dict[str, jax.Array]:
    """P_eff per module kind, (L_eff, N, in), differentiable in proto_weight and prc_*."""
    n_sites, stacked = cfg.num_sites, cfg.recursion == "stacked"
    out = {}
    for kind in cfg.kinds:  # distinct module kinds, each with its own residual stream
        proto = params["layers"][kind]["proto_weight"]  # (L_p, N, in)
        if cfg.num_prc == 0:
            shape = (n_sites,) + proto.shape[1:]
            out[kind] = proto if stacked else jnp.broadcast_to(proto[0], shape)
            continue
        prc = params["prc"][kind]
        if stacked:
            xs = (proto[1:], prc)
        else:  # one shared prototype and one shared transform, repeated over the steps
            rep = lambda a: jnp.broadcast_to(a[0], (n_sites - 1,) + a.shape[1:])  # noqa: E731
            xs = (rep(proto), jax.tree.map(rep, prc))

        def body(prev, xs_l):
            p_l, prc_l = xs_l
            new = p_l + prc_transform(prc_l, prev, cfg.ln_eps)
            return new, new

        _, rest = jax.lax.scan(body, proto[0], xs)
        out[kind] = jnp.concatenate([proto[:1], rest], axis=0)
    return out


# ----------------------------------------------------------------------------- model


def spl_probe_shapes(cfg: SplConfig, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the zero probes on every masked SPL output: (L_eff, B, T, N) per kind."""
    return {k: (cfg.num_sites, batch, length, cfg.dims(k)[1]) for k in cfg.kinds}


def spl_zero_probes(cfg: SplConfig, batch: int, length: int) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s, jnp.float32) for k, s in spl_probe_shapes(cfg, batch, length).items()}


def _summarize(res: SplResidual, valid: jax.Array) -> KindStats:
    """Per-site M-SAPS inputs of one module: activation count (N), anchor (N, in), mean input."""
    x = jax.lax.stop_gradient(res.x)
    m = jax.lax.stop_gradient(res.mask) * valid[..., None]
    count = jnp.sum(m, axis=(0, 1))
    anchor = jnp.einsum("btn,bti->ni", m, x) / jnp.maximum(count, 1.0)[:, None]
    x_mean = jnp.einsum("bt,bti->i", valid, x) / jnp.maximum(jnp.sum(valid), 1.0)
    return KindStats(count=count, anchor=anchor, x_mean=x_mean)


def spl_block(lp: dict, x: jax.Array, protos: dict, probes: dict | None, ctx: Context,
              cfg: SplConfig, with_stats: bool = True) -> tuple[jax.Array, dict, dict]:
    """One pre-norm block on x (B,T,D): Dimension-DynSIHA then MoIE.

    Returns (x, per-kind ``KindStats`` (empty with ``with_stats=False``), per-kind full
    ``SplResidual`` (empty unless probes are given)).
    """
    summ, full = {}, {}

    def spl(kind, inp):  # a handful of distinct module kinds, not a loop over neurons
        out, res = spl_apply(lp[kind], inp, cfg.mask_mode, activation=cfg.activation,
                             proto=protos[kind], probe=None if probes is None else probes[kind])
        if with_stats:
            summ[kind] = _summarize(res, ctx.valid)
        if probes is not None:
            full[kind] = res
        return out

    h = layer_norm(lp["ln1"], x, cfg.ln_eps)
    q, k, v = (spl(c, h)[:, :, None] for c in ("q", "k", "v"))  # one head of width D
    if cfg.rope != "none":
        q, k = rope(q, ctx.positions, cfg.rope_base), rope(k, ctx.positions, cfg.rope_base)
    x = x + spl("o", attend(q, k, v, ctx.segment_ids, implementation=cfg.attention)[:, :, 0])
    if cfg.use_moie:
        f = spl("ffn1", layer_norm(lp["ln2"], x, cfg.ln_eps))
        if cfg.activation == "linear":  # seed-001 MoIE: sbl1 -> ReLU -> sbl2
            f = jax.nn.relu(f)
        x = x + spl("ffn2", f)
    return x, summ, full


def spl_forward(params: dict, tokens: jax.Array, cfg: SplConfig, *,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                probes: dict | None = None, with_stats: bool = True) -> tuple[jax.Array, Aux]:
    """tokens (B,T) -> logits (B,T,V) float32 and ``Aux``.

    aux: ``stats[kind]`` (``KindStats``: count (L_eff,N), anchor (L_eff,N,in), x_mean (L_eff,in))
    over valid tokens (None with ``with_stats=False``, e.g. for evaluation); ``protos[kind]``
    (L_eff,N,in); ``tokens`` (number of valid tokens); ``context``; with ``probes`` {kind:
    (L_eff,B,T,N)}, ``residuals[kind]`` (``SplResidual``: x, pre, raw, mask) stacked over sites,
    else None.
    """
    ctx = make_context(tokens, positions, segment_ids, rope=cfg.rope)
    x = params["embed"][tokens].astype(backend.compute_dtype(cfg.compute_dtype))
    protos = effective_prototypes(params, cfg)
    if cfg.recursion == "stacked":
        layers, shared = params["layers"], None
    else:
        layers, shared = None, jax.tree.map(lambda a: a[0], params["layers"])

    def body(x, xs):
        lp, pr, pb = xs
        x, summ, full = spl_block(shared if lp is None else lp, x, pr, pb, ctx, cfg, with_stats)
        return x, (summ, full)

    x, (stats, residuals) = jax.lax.scan(body, x, (layers, protos, probes))
    h = layer_norm(params["final_ln"], x, cfg.ln_eps) if cfg.final_norm else x
    logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(h.dtype),
                        preferred_element_type=jnp.float32)
    aux = Aux(stats=stats if with_stats else None, protos=protos, tokens=jnp.sum(ctx.valid),
              context=ctx, residuals=None if probes is None else residuals)
    return logits, aux

