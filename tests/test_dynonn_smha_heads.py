"""DynSMHA as seed 002 describes it (smha_mode="head_outputs"): every attention expert is a real
head, the routed heads' outputs are aggregated per token; surprise of that form vs brute force."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax import loss as task_loss
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dynonn import gating, modules
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn.attention import rope
from tinyonn_jax.nn.norm import layer_norm

B, T = 1, 6
CFG = dynonn.DynOnnConfig(hidden=8, num_heads=2, head_dim=2, ffn_hidden=4, num_layers=2,
                          max_experts=4, init_experts=4, w_sdl=0.0, surprise="output_grad")


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def _heads_reference(p: dict, u: jax.Array, w: jax.Array, o_eps: jax.Array, cfg) -> jax.Array:
    """Seed-002 DynSMHA written out: a Python loop over head experts, each its own causal
    multi-head attention from its own Wq_e, Wk_e, Wv_e over every token, its output at t
    weighted by w_te. u (B,T,D), w (B,T,E), o_eps (B,T,E,Hw) added to each head's output."""
    b, t, _ = u.shape
    causal = jnp.tril(jnp.ones((t, t), bool))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = 0.0
    for e in range(cfg.max_experts):
        hd = lambda a: a.reshape(b, t, cfg.num_heads, cfg.head_dim)  # noqa: E731
        q, k, v = (hd(u @ p[n][e]) for n in ("wq", "wk", "wv"))
        q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, -1) + o_eps[:, :, e]
        out = out + w[..., e, None] * (o @ p["wo"][e])
    return out


def test_config_fields_are_validated():
    assert dynonn.DynOnnConfig().smha_mode == "head_outputs"
    with pytest.raises(ConfigError, match="smha_mode"):
        dynonn.DynOnnConfig(smha_mode="heads")


def test_heads_attend_separately_and_their_outputs_are_aggregated():
    """attn_core == the loop over head experts, with routing weights that are 0 for some
    (token, head) pairs (those heads still give keys and values to later tokens); and the
    weight-mixing form is a different function."""
    cfg = CFG
    p = jax.tree.map(lambda a: a[0], modules.init_params(jax.random.key(1), cfg)["layers"])["attn"]
    u = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden))
    w = jax.random.uniform(jax.random.key(3), (B, T, cfg.max_experts))
    w = w * (jax.random.uniform(jax.random.key(4), w.shape) < 0.5)  # unrouted pairs: w = 0
    w = w.at[:, :-1, 3].set(0.0)  # head 3 serves only the last token, reading every value
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32)  # one causal segment per row
    got = dynonn.attn_core(p, u, w, None, pos, seg, cfg)
    want = _heads_reference(p, u, w, jnp.zeros((B, T, cfg.max_experts, cfg.attn_width)), cfg)
    _close(got, want)
    mixed = dynonn.attn_core(p, u, w, None, pos, seg,
                             dataclasses.replace(cfg, smha_mode="weight_mix"))
    assert float(jnp.max(jnp.abs(mixed - want))) > 1e-2


def _reference_forward(params, tokens, cfg, decisions, w_eps, o_eps):
    """The whole model, independent of ``model.forward``: Python loops over layers and head
    experts; w_eps {site: (P,B,T,E)} added to the routing weights, o_eps (P,B,T,E,Hw) to every
    head's attention output."""
    x = params["embed"][tokens]
    live = dynonn.init_live(cfg)
    for layer in range(cfg.num_layers):
        lp = jax.tree.map(lambda a: a[layer], params["layers"])  # noqa: B023
        for site, ln in (("attn", "ln1"), ("ffn", "ln2")):
            u = layer_norm(lp[ln], x, cfg.ln_eps)
            dec = gamoe.Decision(decisions.site(site).mask[layer],
                                 decisions.site(site).homeless[layer])
            g = gamoe.gate(lp[site], u, live[site][layer], fallback=True,
                           weight_mode=cfg.weight_mode, decision=dec)
            w = g.z + w_eps[site][layer]
            p = lp[site]
            if site == "attn":
                y = _heads_reference(p, u, w, o_eps[layer], cfg)
            else:
                per_tok = lambda bank: jnp.einsum("bte,edk->btdk", w, bank)  # noqa: B023, E731
                h = jax.nn.gelu(jnp.einsum("btd,btdk->btk", u, per_tok(p["w1"])))
                y = jnp.einsum("btd,btdk->btk", h, per_tok(p["w2"]))
            x = x + y
    h = layer_norm(params["final_ln"], x, cfg.ln_eps)
    return h @ params["lm_head"]


def test_head_surprise_equals_brute_force():
    """Both surprise modes of the head form from the model's probe cotangents equal jax.grad of
    the loop reference: weight_grad |dL/dw_te|, output_grad ||dL/do_te||."""
    cfg = CFG
    params = modules.init_params(jax.random.key(0), cfg)
    toks = jax.random.randint(jax.random.key(7), (B, T + 1), 0, cfg.vocab_size)
    inputs, targets = toks[:, :-1], toks[:, 1:]
    wts = jnp.ones((B, T)).at[:, 0].set(0.0)

    def f(pr):
        logits, aux = dynonn.forward(params, inputs, cfg, probes=pr)
        return task_loss.cross_entropy(logits, targets, wts), (logits, aux)

    probes = dynonn.zero_probes(cfg, B, T)
    assert probes.head_attn.shape == (cfg.num_layers, B, T, cfg.max_experts, cfg.attn_width)
    (_, (logits, aux)), gp = jax.jit(jax.value_and_grad(f, has_aux=True))(probes)
    dec = dynonn.decisions_of(aux)
    w_eps = {s: probes.weight(s) for s in dynonn.SITES}

    def ref_loss(we, oe):
        lg = _reference_forward(params, inputs, cfg, dec, we, oe)
        return task_loss.cross_entropy(lg, targets, wts), lg

    (_, ref_logits), (g_w, g_o) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1),
                                                             has_aux=True))(w_eps,
                                                                            probes.head_attn)
    _close(logits, ref_logits)
    n = jnp.sum(wts)
    s_w = gating.token_surprise(gp, aux, "attn", "weight_grad", n, "head_outputs")
    s_o = gating.token_surprise(gp, aux, "attn", "output_grad", n, "head_outputs")
    _close(s_w, jnp.abs(g_w["attn"]) * n)
    _close(s_o, jnp.linalg.norm(g_o, axis=-1) * n)
    _close(gating.token_surprise(gp, aux, "ffn", "weight_grad", n, "head_outputs"),
           jnp.abs(g_w["ffn"]) * n)
    # Heads a token did not route to: output surprise exactly 0 (their output is not used).
    routed = np.asarray(aux.attn.mask)
    assert routed.mean() < 1 and np.all(np.asarray(s_o)[~routed] == 0)
    # Not the degenerate w_te * ||dL/dout_t|| of the mixed form: among the routed heads of one
    # token, S / w differs (through each head's own Wo_e).
    ratio = np.asarray(s_o) / np.where(routed, np.asarray(aux.attn.z), 1.0)
    multi = (routed.sum(-1) >= 2) & (np.asarray(wts)[None] > 0)
    hi = np.max(np.where(routed, ratio, -np.inf), -1)[multi]
    lo = np.min(np.where(routed, ratio, np.inf), -1)[multi]
    assert multi.any() and np.all(lo > 0) and np.all(hi > 1.01 * lo), (hi, lo)
    with pytest.raises(ValueError, match="head probes"):
        gating.token_surprise(gp._replace(head_attn=None), aux, "attn", "output_grad", n,
                              "head_outputs")


def test_head_probes_only_where_needed():
    """The (P,B,T,E,Hw) head probe exists only for head_outputs with the output-grad
    surprise."""
    for smha, surprise, want in (("head_outputs", "output_grad", True),
                                 ("head_outputs", "weight_grad", False),
                                 ("weight_mix", "output_grad", False)):
        cfg = dataclasses.replace(CFG, smha_mode=smha, surprise=surprise)
        assert (dynonn.zero_probes(cfg, B, T).head_attn is not None) == want
