"""Gate training (issue 7, seeds 002/003): surprise vs brute force, SMK, balance, PI, lambda."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax import loss as task_loss
from tinyonn_jax import metrics
from tinyonn_jax.families.dynonn import gating, modules
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn.attention import rope
from tinyonn_jax.nn.norm import layer_norm

B, T = 1, 6
# The reference forward below mixes weights per token: DynSMHA's weight_mix form.
CFG = dynonn.DynOnnConfig(hidden=8, num_heads=2, head_dim=2, ffn_hidden=4, num_layers=2,
                     max_experts=3, init_experts=3, w_sdl=0.0, smha_mode="weight_mix")


def _batch(cfg, seed=0):
    toks = jax.random.randint(jax.random.key(seed + 7), (B, T + 1), 0, cfg.vocab_size)
    w = jnp.ones((B, T)).at[:, 0].set(0.0)
    return toks[:, :-1], toks[:, 1:], w


def _reference_forward(params, tokens, cfg, decisions, w_eps, out_eps):
    """Per-token mixed weight matrices materialised (Wq_t = sum_e w_te Wq_e), a Python loop over
    layers, explicit causal softmax: an independent implementation of the forward."""
    x = params["embed"][tokens]
    causal = jnp.tril(jnp.ones((T, T), bool))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    live = dynonn.init_live(cfg)
    per_tok = lambda w, bank: jnp.einsum("bte,edk->btdk", w, bank)  # noqa: E731
    apply = lambda a, wt: jnp.einsum("btd,btdk->btk", a, wt)  # noqa: E731
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
                hd = lambda a: a.reshape(B, T, cfg.num_heads, cfg.head_dim)  # noqa: E731
                q, k, v = (hd(apply(u, per_tok(w, p[n]))) for n in ("wq", "wk", "wv"))
                q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
                s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
                a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
                o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, T, -1)
                y = apply(o, per_tok(w, p["wo"]))
            else:
                y = apply(jax.nn.gelu(apply(u, per_tok(w, p["w1"]))), per_tok(w, p["w2"]))
            x = x + y + out_eps[site][layer]
    h = layer_norm(params["final_ln"], x, cfg.ln_eps)
    return h @ params["lm_head"]


@pytest.fixture(scope="module")
def probed():
    cfg = CFG
    params = modules.init_params(jax.random.key(0), cfg)
    inputs, targets, w = _batch(cfg)

    def f(pr):
        logits, aux = dynonn.forward(params, inputs, cfg, probes=pr)
        return task_loss.cross_entropy(logits, targets, w), (logits, aux)

    (loss, (logits, aux)), gp = jax.jit(jax.value_and_grad(f, has_aux=True))(
        dynonn.zero_probes(cfg, B, T))
    return dict(cfg=cfg, params=params, inputs=inputs, targets=targets, w=w, loss=loss,
                logits=logits, aux=aux, gp=gp)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_surprise_equals_brute_force(probed):
    cfg, params = probed["cfg"], probed["params"]
    dec = dynonn.decisions_of(probed["aux"])
    zeros = dynonn.zero_probes(cfg, B, T)
    w_eps = {s: zeros.weight(s) for s in dynonn.SITES}
    o_eps = {s: zeros.output(s) for s in dynonn.SITES}

    def ref_loss(we, oe):
        logits = _reference_forward(params, probed["inputs"], cfg, dec, we, oe)
        return task_loss.cross_entropy(logits, probed["targets"], probed["w"]), logits

    (_, logits), (g_w, g_o) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1),
                                                         has_aux=True))(w_eps, o_eps)
    _close(logits, probed["logits"])
    n = jnp.sum(probed["w"])
    for site in dynonn.SITES:
        s_w = gating.token_surprise(probed["gp"], probed["aux"], site, "weight_grad", n,
                                     "weight_mix")
        _close(s_w, jnp.abs(g_w[site]) * n)
        s_o = gating.token_surprise(probed["gp"], probed["aux"], site, "output_grad", n,
                                     "weight_mix")
        z = probed["aux"].site(site).z
        _close(s_o, z * jnp.linalg.norm(g_o[site], axis=-1)[..., None] * n)
        routed = np.asarray(probed["aux"].site(site).mask)
        assert np.mean(np.asarray(s_w)[routed] > 0) > 0.5  # 0 only where the loss ignores it
        # The literal output-gradient surprise is the routing weight times one number per
        # token (degenerate across experts); the default is not.
        ratio = np.asarray(s_o)[routed] / np.asarray(z)[routed]
        tok = np.broadcast_to(np.linalg.norm(np.asarray(g_o[site]), axis=-1)[..., None] * n,
                              z.shape)[routed]
        np.testing.assert_allclose(ratio, tok, rtol=1e-5)


def test_load_balance():
    live = jnp.array([True, True, True, True, False])
    uniform = jnp.array([2.0, 2.0, 2.0, 2.0, 9.0])  # the dead slot is ignored
    one = jnp.array([8.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(gating.load_balance(uniform, uniform, live), 1.0, rtol=1e-6)
    np.testing.assert_allclose(gating.load_balance(one, one, live), 4.0, rtol=1e-6)
    np.testing.assert_allclose(gating.load_balance(one, uniform, live), 2.5, rtol=1e-6)


def test_lambda_moves_from_balance_to_smk_as_pi_rises():
    pis = jnp.linspace(0.0, 1.0, 11)
    lam = np.asarray(gating.lambda_of_pi(pis, 0.75, 10.0))
    assert np.all(np.diff(lam) < 0)
    low = metrics.pi_score(jnp.float32(8.0), jnp.float32(1.0), jnp.float32(2.0), 1.0, 0.5)
    high = metrics.pi_score(jnp.float32(0.01), jnp.float32(1.0), jnp.float32(0.01), 1.0, 0.5)
    np.testing.assert_allclose(low, np.exp(-(8.0 / 1.0 + 0.5 * 2.0)), rtol=1e-6)
    assert float(gating.lambda_of_pi(low, 0.75, 10.0)) > 0.99
    assert float(gating.lambda_of_pi(high, 0.75, 10.0)) < 0.1
    np.testing.assert_allclose(gating.lambda_of_pi(jnp.float32(0.75), 0.75, 10.0), 0.5)


def test_gating_objective_mixes_balance_and_smk_by_lambda(probed):
    cfg, aux = probed["cfg"], probed["aux"]
    n = jnp.sum(probed["w"])
    s = {k: gating.token_surprise(probed["gp"], aux, k, "weight_grad", n, cfg.smha_mode)
         for k in dynonn.SITES}
    valid = jnp.ones((B, T))
    live = dynonn.init_live(cfg)
    objective = jax.jit(gating.gating_objective, static_argnums=6)
    obj = {}
    for lam in (0.0, 0.3, 1.0):
        obj[lam], parts = objective(probed["params"], aux, s, valid, live, jnp.float32(lam), cfg)
    np.testing.assert_allclose(obj[1.0], parts["loss_balance"], rtol=1e-6)
    np.testing.assert_allclose(obj[0.0], parts["loss_smk"], rtol=1e-6)
    np.testing.assert_allclose(obj[0.3], 0.3 * parts["loss_balance"] + 0.7 * parts["loss_smk"],
                               rtol=1e-6)
    # Only gate parameters receive a gradient.
    g = jax.jit(jax.grad(lambda p: objective(p, aux, s, valid, live, jnp.float32(0.5),
                                             cfg)[0]))(probed["params"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        name = str(path[-1].key)
        if not name.startswith(("proto", "gate")):
            assert np.all(np.asarray(leaf) == 0), path
    assert float(jnp.abs(g["layers"]["ffn"]["proto_sim"]).sum()) > 0


def test_smk_and_gating_acc_ignore_unrouted_experts():
    mask = jnp.array([[True, True, False, False]])
    s = jnp.array([[1.0, 3.0, 0.0, 0.0]])  # unrouted experts have S = 0: must not "win"
    margin = jnp.array([[2.0, 1.0, 5.0, 0.0]])
    valid = jnp.ones((1,))
    np.testing.assert_allclose(gating.gating_acc(margin, mask, s, valid), 1.0)
    np.testing.assert_allclose(gating.gating_acc(margin[:, [1, 0, 2, 3]], mask, s, valid), 0.0)
    p = jax.nn.softmax(margin[0, :2])
    np.testing.assert_allclose(gating.smk_loss(margin, mask, s, valid),
                               p[0] * 1 / 3 + p[1] * 1.0, rtol=1e-6)
    # The gradient raises the routed expert of least surprise, never an unrouted one.
    g = jax.grad(gating.smk_loss)(margin, mask, s, valid)
    assert float(g[0, 0]) < 0 < float(g[0, 1]) and np.all(np.asarray(g[0, 2:]) == 0)
    # Tokens whose routed experts all have S = 0 (ignored by the loss) do not count.
    np.testing.assert_allclose(gating.gating_acc(margin, mask, s * 0, valid), 0.0)


def test_fuse_mask_flags_outliers_among_routed_experts():
    es = jnp.array([[1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 10.0, 99.0]])
    counts = jnp.array([[5, 5, 5, 5, 5, 5, 5, 5, 0]])
    bad = np.asarray(gating.fuse_mask(es, counts, 2.0))
    np.testing.assert_array_equal(np.nonzero(bad[0])[0], [7])


def test_sdl_loss():
    proto = jax.nn.initializers.orthogonal()(jax.random.key(0), (8, 4))
    live = jnp.ones((4,), bool)
    np.testing.assert_allclose(gating.sdl_loss(proto, live), 1.0, atol=1e-5)
    dup = proto.at[:, 1].set(proto[:, 0])
    assert float(gating.sdl_loss(dup, live)) > 1.5
    np.testing.assert_allclose(gating.sdl_loss(dup, live.at[1].set(False)), 1.0, atol=1e-5)
