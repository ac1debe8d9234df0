"""DynSMHA and DynMoE behind GAMoE gates (seed 002, reference.md section 6): DynONN.

Each layer has two GAMoE gates (``tinyonn_jax.nn.gamoe``): one over attention experts, one
over FFN experts, both over a fixed pool of ``max_experts`` slots of which the live ones are
given by a mask. For token t with routing weights w_t (E,):

    DynSMHA, smha_mode="head_outputs" (seed 002, the default): every expert e is an attention
      head with its own Wq_e, Wk_e, Wv_e (``num_heads`` sub-heads of ``head_dim``) and Wo_e.
      Keys and values of every head exist at every token; head e attends causally and
      out_t = sum_e w_te o_te Wo_e, o_te its attention output at t (0 where w_te = 0).
    DynSMHA, smha_mode="weight_mix" (reference dyn_all_poc): Wq_t = sum_e w_te Wq_e (likewise
      Wk, Wv; Wo), then one causal attention with the mixed projections.
    DynMoE:   W1_t = sum_e w_te W1_e,  W2_t = sum_e w_te W2_e,  out = gelu(u W1_t) W2_t

Mixing is linear, so ``u Wq_t = sum_e w_te (u Wq_e)`` is computed without materialising
per-token weights (dense over the pool; zero weights on unrouted and dead experts). The heads of
``head_outputs`` run as one attention over E * num_heads heads (no loop over experts).

Layers are stacked on a leading group axis G and run with ``lax.scan``: ``structure="stack"``
scans L distinct layers (G = L), ``structure="recursion"`` applies one layer L times (G = 1,
the DynTRM recursion). Each application is a *pass*; per-pass residuals are stacked on axis P = L.
The parameters are the pure-dict form of ``modules.DynOnnModel`` (``modules.init_params``).

Inner/outer rematerialisation (seed 002): LayerNorm and the gates run outside
``jax.checkpoint``; the mixing and attention run inside with the routing weights passed in, so a
recomputation in bfloat16 can never flip a ``> 0`` decision.

Zero probes (``zero_probes``, ``residuals.Probes``) are added to the routing weights (``w_*``),
to the sub-layer outputs (``out_*``) and, for ``head_outputs`` with ``surprise="output_grad"``,
to every head's attention output (``head_attn``); their cotangents give dL/dw_te, dL/d(output)
and dL/do_te for every pass in the same backward pass as the main gradient
(``tinyonn_jax.families.dynonn.gating``). The per-pass residuals are ``residuals.Aux``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.residuals import SITES, Aux, Decisions, Probes, SiteAux
from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn.attention import attend, rope
from tinyonn_jax.nn.norm import layer_norm
from tinyonn_jax.nn.positions import rotary_positions

EXPERT_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2")  # trained by the main loss


def init_live(cfg: DynOnnConfig) -> dict[str, jax.Array]:
    """Live-expert masks {site: (G, E) bool}: the first ``init_experts`` slots."""
    row = jnp.arange(cfg.max_experts) < cfg.init_experts
    return {s: jnp.broadcast_to(row, (cfg.groups, cfg.max_experts)) for s in SITES}


def head_probes_on(cfg: DynOnnConfig) -> bool:
    """Whether the forward probes every head's attention output (the output-grad surprise of
    ``head_outputs``); only then is the (P,B,T,E,Hw) cotangent materialised."""
    return cfg.smha_mode == "head_outputs" and cfg.surprise == "output_grad"


def zero_probes(cfg: DynOnnConfig, batch: int, length: int) -> Probes:
    """Zero probes (P = num_layers passes): w_<site> (P,B,T,E), out_<site> (P,B,T,D), and
    head_attn (P,B,T,E,Hw) when ``head_probes_on(cfg)`` (else None)."""
    p, e, d = cfg.num_layers, cfg.max_experts, cfg.hidden
    w = lambda: jnp.zeros((p, batch, length, e), jnp.float32)  # noqa: E731
    out = lambda: jnp.zeros((p, batch, length, d), jnp.float32)  # noqa: E731
    head = (jnp.zeros((p, batch, length, e, cfg.attn_width), jnp.float32)
            if head_probes_on(cfg) else None)
    return Probes(w_attn=w(), out_attn=out(), w_ffn=w(), out_ffn=out(), head_attn=head)


def per_pass(tree, cfg: DynOnnConfig):
    """A group-stacked (G, ...) tree as a pass-stacked (P, ...) one."""
    if cfg.structure == "stack":
        return tree
    return jax.tree.map(lambda a: jnp.broadcast_to(a[0], (cfg.num_layers, *a.shape[1:])), tree)


def per_group(x: jax.Array, cfg: DynOnnConfig) -> jax.Array:
    """Sum a pass-stacked (P, ...) statistic onto its groups (G, ...)."""
    return x if cfg.structure == "stack" else jnp.sum(x, axis=0, keepdims=True)


def mix(x: jax.Array, w_bank: jax.Array, w: jax.Array) -> jax.Array:
    """``x_t (sum_e w_te W_e)``: x (B,T,Din), W (E,Din,Dout), w (B,T,E) -> (B,T,Dout)."""
    dt = x.dtype
    y = jnp.einsum("btd,edk->btek", x, w_bank.astype(dt))
    return jnp.einsum("btek,bte->btk", y, w.astype(dt))


def head_outputs(p: dict, u: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cfg: DynOnnConfig) -> jax.Array:
    """Every attention expert as a real head: o (B,T,E,Hw), o_te = head e's attention output
    at t from its own q, k, v (``u Wq_e`` etc.) over all tokens. u (B,T,D).

    The E experts' ``num_heads`` sub-heads run as one attention over E * num_heads heads.
    """
    b, t, _ = u.shape
    e, h, dh = cfg.max_experts, cfg.num_heads, cfg.head_dim

    def proj(name):  # (B,T,E*H,Dh)
        y = jnp.einsum("btd,edk->btek", u, p[name].astype(u.dtype))
        return y.reshape(b, t, e * h, dh)

    q, k, v = proj("wq"), proj("wk"), proj("wv")
    if cfg.rope != "none":
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
    o = attend(q, k, v, segment_ids, implementation=cfg.attention)
    return o.reshape(b, t, e, h * dh)


def attn_core(p: dict, u: jax.Array, w: jax.Array, probe_head: jax.Array | None,
              positions: jax.Array, segment_ids: jax.Array, cfg: DynOnnConfig) -> jax.Array:
    """DynSMHA after routing: u (B,T,D), w (B,T,E) -> (B,T,D).

    ``head_outputs``: ``sum_e w_te o_te Wo_e`` (``probe_head`` (B,T,E,Hw), if given, is added
    to o); ``weight_mix``: one attention with per-token mixed projections.
    """
    if cfg.smha_mode == "head_outputs":
        o = head_outputs(p, u, positions, segment_ids, cfg)
        if probe_head is not None:
            o = o + probe_head.astype(o.dtype)
        ow = o * w.astype(o.dtype)[..., None]  # heads a token did not route to contribute 0
        return jnp.einsum("btek,ekd->btd", ow, p["wo"].astype(o.dtype))
    b, t, _ = u.shape
    heads = lambda a: a.reshape(b, t, cfg.num_heads, cfg.head_dim)  # noqa: E731
    q, k, v = (heads(mix(u, p[n], w)) for n in ("wq", "wk", "wv"))
    if cfg.rope != "none":
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
    o = attend(q, k, v, segment_ids, implementation=cfg.attention)
    o = o.reshape(b, t, cfg.attn_width)
    return mix(o, p["wo"], w)


def ffn_core(p: dict, u: jax.Array, w: jax.Array, probe_head: None = None) -> jax.Array:
    """DynMoE after routing: ``gelu(u W1_t) W2_t``, u (B,T,D), w (B,T,E) -> (B,T,D).
    (``probe_head`` keeps the signature of ``attn_core``; FFN experts have no heads.)"""
    return mix(jax.nn.gelu(mix(u, p["w1"], w)), p["w2"], w)


def _maybe_remat(fn, on: bool):
    return jax.checkpoint(fn) if on else fn


def _sublayer(p: dict, ln: dict, x: jax.Array, live: jax.Array, probe_w, probe_out, probe_head,
              decision: gamoe.Decision | None, core, cfg: DynOnnConfig,
              fallback: bool) -> tuple[jax.Array, SiteAux]:
    u = layer_norm(ln, x, cfg.ln_eps)
    g = gamoe.gate(p, u, live, fallback=fallback, weight_mode=cfg.weight_mode,
                   decision=decision)  # outside the checkpoint: decided once
    w = g.z if probe_w is None else g.z + probe_w
    y = core(p, u, w, probe_head)
    if probe_out is not None:
        y = y + probe_out.astype(y.dtype)
    res = SiteAux(u=u, mask=g.mask, z=g.z, k=g.k, homeless=g.homeless)
    return x + y.astype(x.dtype), res


def forward(params: dict, tokens: jax.Array, cfg: DynOnnConfig, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            probes: Probes | None = None, live: dict | None = None,
            decisions: Decisions | None = None, training: bool = True) -> tuple[jax.Array, Aux]:
    """tokens (B,T) -> logits (B,T,V) float32 and the per-pass residuals ``Aux``.

    ``live`` {site: (G,E) bool} defaults to ``init_live(cfg)``; pass the pool state's masks.
    ``probes`` (``zero_probes``) are added to the routing weights, sublayer outputs and heads;
    ``decisions`` (``decisions_of``) replays hard routing decisions. aux.attn and aux.ffn
    (``SiteAux``): u (P,B,T,D), mask and z (P,B,T,E), k and homeless (P,B,T).
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    positions = rotary_positions(cfg.rope, tokens, positions, segment_ids)
    live = init_live(cfg) if live is None else live
    fb = gamoe.fallback_on(cfg.fallback, training)
    attn = _maybe_remat(functools.partial(attn_core, positions=positions,
                                          segment_ids=segment_ids, cfg=cfg),
                        cfg.remat)
    ffn = _maybe_remat(ffn_core, cfg.remat)
    layers = params["layers"]
    shared = cfg.structure == "recursion"

    def body(x, xs):
        lp, lv, pr, dec = xs
        if shared:
            lp, lv = jax.tree.map(lambda a: a[0], (layers, live))
        pr = Probes() if pr is None else pr
        dec = Decisions() if dec is None else dec
        x, ra = _sublayer(lp["attn"], lp["ln1"], x, lv["attn"], pr.w_attn, pr.out_attn,
                          pr.head_attn, dec.attn, attn, cfg, fb)
        x, rf = _sublayer(lp["ffn"], lp["ln2"], x, lv["ffn"], pr.w_ffn, pr.out_ffn, None,
                          dec.ffn, ffn, cfg, fb)
        return x, Aux(attn=ra, ffn=rf)

    xs = (None if shared else layers, None if shared else live, probes, decisions)
    x0 = params["embed"][tokens].astype(cfg.dtype)
    x, aux = jax.lax.scan(body, x0, xs, length=cfg.num_layers)
    h = layer_norm(params["final_ln"], x, cfg.ln_eps)
    logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(h.dtype),
                        preferred_element_type=jnp.float32)
    return logits, aux


def decisions_of(aux: Aux) -> Decisions:
    """The hard decisions of a forward, to replay them (``forward(decisions=...)``)."""
    return Decisions(attn=aux.attn.decision(), ffn=aux.ffn.decision())
