"""Gate training of the DynMoE family (seeds 002-004): surprise, the two gate losses, PI and
lambda(PI).

Surprise (per token t and expert e, seed 002 "the main-loss gradient at each expert's output"),
``cfg.surprise``:

* ``weight_grad`` (default): the derivative of the main loss along expert e's own output,
  ``S_te = |dL/dw_te|``, with w_te the routing weight. With per-token mixing (DynMoE, and
  DynSMHA ``weight_mix``) that is ``|sum_sites <dL/dA_t, Y_te>|`` (Y_te the unweighted output of
  expert e in every place it acts: q, k, v, o or W1, W2); for DynSMHA ``head_outputs``, where w_te
  only weights head e's output at t, it is ``|<dL/dout_t, o_te Wo_e>|``.
* ``output_grad``: the gradient norm at the expert's output. Mixed forms:
  ``||dL/d(w_te Y_te)|| = w_te ||dL/dA_t||`` (the reference's ``S_te = ||dL/dout_t|| w_te``),
  proportional to the routing weight for *every* expert, so its argmin over routed experts is
  merely the smallest weight (and over all experts an unrouted one: the original's bug). DynSMHA
  ``head_outputs``: ``S_te = ||dL/do_te||`` with o_te head e's attention output at t (before its
  Wo_e, the per-head output of multi-head attention) = ``w_te ||Wo_e dL/dout_t||``, which differs
  between heads through Wo_e.

All come exactly from the cotangents of zero probes on the routing weights / sub-layer outputs /
head outputs (``model.zero_probes``). S is expressed per token (gradient of the token-summed
loss) so its scale does not depend on the batch size.

Gate objective, ``cfg.gating_loss``:

* ``pi_adaptive`` (seed 003, the default): ``lambda L_balance + (1 - lambda) L_smk`` with
  ``lambda = 1 - sigmoid(sensitivity (PI - threshold))`` held constant and PI the predictive
  integrity of the main loss and the mean routed surprise (``metrics.pi_score``). L_smk only
  looks at routed experts.
* ``surprise_min`` (seed 002 SurpriseMinLoss): ``w_ce CE(q, argmin_routed S) + w_kl KL(p || q)``
  with q = softmax of the routing logits (gate margins) over the *live* experts and
  p = softmax(-S) over the *routed* experts (the KL direction of the reference's
  ``F.kl_div(log q, log p, log_target=True)``). The argmin is over routed experts only (the
  original's argmin picked unrouted experts, whose S was 0); dead slots have probability 0.

Both add ``w_sdl SDL + w_sparsity mean(a)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.model import SITES, per_group, per_pass
from tinyonn_jax.families.dynonn.residuals import Aux, Probes
from tinyonn_jax.metrics import masked_mean
from tinyonn_jax.nn import gamoe

_GATE_LEAVES = ("proto_sim", "gates", "gate_log_scale")


def token_surprise(g_probes: Probes, aux: Aux, site: str, mode: str, n_tokens: jax.Array,
                   smha_mode: str) -> jax.Array:
    """S (P,B,T,E) of one site from probe cotangents, in per-token units (x ``n_tokens``).

    ``mode`` is ``cfg.surprise``, ``smha_mode`` ``cfg.smha_mode`` (it decides what the output of
    an attention expert is).
    """
    if mode == "weight_grad":
        s = jnp.abs(g_probes.weight(site))
    elif mode == "output_grad" and site == "attn" and smha_mode == "head_outputs":
        if g_probes.head_attn is None:
            raise ValueError("output_grad surprise of head_outputs needs the head probes "
                             "(model.zero_probes)")
        s = jnp.sqrt(jnp.sum(jnp.square(g_probes.head_attn.astype(jnp.float32)), axis=-1))
    elif mode == "output_grad":
        g = g_probes.output(site)
        s = aux.site(site).z * jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))[..., None]
    else:
        raise ValueError(f"unknown surprise mode {mode!r}")
    return s * n_tokens


def load_balance(f: jax.Array, imp: jax.Array, live: jax.Array) -> jax.Array:
    """``0.5 (E sum f^2 / (sum f)^2 + E sum I^2 / (sum I)^2)`` over live experts (E = #live).

    f, imp, live (E,): routed-token counts, summed soft importances, live mask. 1 when balanced,
    E when one expert takes everything.
    """
    lv = live.astype(jnp.float32)
    e = jnp.sum(lv)

    def term(x):
        x = x * lv
        return e * jnp.sum(jnp.square(x)) / jnp.maximum(jnp.square(jnp.sum(x)), 1e-12)

    return 0.5 * (term(f) + term(imp))


def sdl_loss(proto_sim: jax.Array, live: jax.Array) -> jax.Array:
    """Upstream diversity + simplicity: ``||(S^T S - I) * m m^T||_F + mean_live ||sim_e||``.

    proto_sim (D, E), live (E,). S has unit columns, m is the live mask.
    """
    lv = live.astype(jnp.float32)
    s = gamoe.normalize(proto_sim, axis=0)
    off = (s.T @ s - jnp.eye(s.shape[1])) * (lv[:, None] * lv[None, :])
    div = jnp.sqrt(jnp.sum(jnp.square(off)) + 1e-12)  # eps: orthogonal init makes it ~0
    simple = jnp.sum(jnp.linalg.norm(proto_sim, axis=0) * lv) / jnp.maximum(jnp.sum(lv), 1.0)
    return div + simple


def _informative(mask: jax.Array, s: jax.Array, valid: jax.Array) -> jax.Array:
    """Valid tokens where some routed expert has S > 0 (S is 0 for tokens the loss ignores)."""
    return valid * jnp.any(mask & (s > 0), axis=-1)



def smk_loss(margin: jax.Array, mask: jax.Array, s: jax.Array, valid: jax.Array) -> jax.Array:
    """SurpriseMin loss: ``sum_e p_te S_te / max_routed S_t`` with p the softmax of the gate
    margins over the *routed* experts only; mean over informative tokens.

    margin, mask, s (..., E); valid (...). Unrouted experts never enter (the original let their
    S = 0 win). S is normalised per token so the loss is scale free, and held constant.
    """
    s = jax.lax.stop_gradient(s)
    s_max = jnp.max(jnp.where(mask, s, 0.0), axis=-1, keepdims=True)
    s_hat = jnp.where(mask, s / jnp.maximum(s_max, 1e-30), 0.0)
    p = jax.nn.softmax(jnp.where(mask, margin, -1e30), axis=-1)
    per_tok = jnp.sum(jnp.where(mask, p, 0.0) * s_hat, axis=-1)
    return masked_mean(per_tok, _informative(mask, s, valid))


def surprise_min_loss(margin: jax.Array, mask: jax.Array, live: jax.Array, s: jax.Array,
                      valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Seed-002 SurpriseMinLoss parts (CE, KL), each a mean over informative tokens.

    margin, mask, s (..., E); live (E,) or broadcastable; valid (...). Per token:
    q = softmax over live experts of the margins (the routing logits), target = the routed
    expert of least S, ``CE = -log q_target`` and ``KL = sum_routed p (log p - log q)`` with
    p = softmax(-S) over the routed experts. S is held constant.
    """
    s = jax.lax.stop_gradient(s)
    neg = jnp.float32(-1e30)  # finite: a masked entry must not make 0 * inf in the backward
    logq = jax.nn.log_softmax(jnp.where(live, margin, neg), axis=-1)
    target = jnp.argmin(jnp.where(mask, s, jnp.inf), axis=-1)
    ce = -jnp.take_along_axis(logq, target[..., None], axis=-1)[..., 0]
    logp = jax.nn.log_softmax(jnp.where(mask, -s, neg), axis=-1)
    kl = jnp.sum(jnp.where(mask, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)
    inf = _informative(mask, s, valid)
    return (masked_mean(jnp.where(inf > 0, ce, 0.0), inf),
            masked_mean(jnp.where(inf > 0, kl, 0.0), inf))


def gating_acc(margin: jax.Array, mask: jax.Array, s: jax.Array, valid: jax.Array) -> jax.Array:
    """Share of informative tokens whose preferred routed expert (largest gate margin) is the
    routed expert of least surprise. margin, mask, s (..., E); valid (...)."""
    pick = jnp.argmax(jnp.where(mask, margin, -jnp.inf), axis=-1)
    best = jnp.argmin(jnp.where(mask, s, jnp.inf), axis=-1)
    return masked_mean((pick == best).astype(jnp.float32), _informative(mask, s, valid))



def lambda_of_pi(pi: jax.Array, threshold: float, sensitivity: float) -> jax.Array:
    """``1 - sigmoid(sensitivity (PI - threshold))``: near 1 (balance) when PI is low."""
    return 1.0 - jax.nn.sigmoid(sensitivity * (pi - threshold))


def routed_mean(s: jax.Array, mask: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of S over routed (valid token, expert) pairs. s, mask (..., E); valid (...)."""
    w = mask * valid[..., None]
    return jnp.sum(s * w) / jnp.maximum(jnp.sum(w), 1.0)


def expert_surprise(s: jax.Array, mask: jax.Array, valid: jax.Array,
                    cfg: DynOnnConfig) -> tuple[jax.Array, jax.Array]:
    """Per group and expert: mean S over routed valid tokens (G,E) and routed counts (G,E).

    s, mask (P,B,T,E); valid (B,T).
    """
    w = mask * valid[None, ..., None]
    tot = per_group(jnp.sum(s * w, axis=(1, 2)), cfg)
    cnt = per_group(jnp.sum(w, axis=(1, 2)), cfg)
    return tot / jnp.maximum(cnt, 1.0), cnt


def fuse_mask(expert_s: jax.Array, counts: jax.Array, sigma: float) -> jax.Array:
    """"Bad" experts (G,E): routed experts whose surprise exceeds mean + sigma * std of the
    routed experts of the same gate."""
    used = counts > 0
    n = jnp.maximum(jnp.sum(used, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(used, expert_s, 0.0), axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.where(used, jnp.square(expert_s - mean), 0.0), axis=-1, keepdims=True) / n
    return used & (expert_s > mean + sigma * jnp.sqrt(var))


def _site_terms(gp: dict, u: jax.Array, mask: jax.Array, homeless: jax.Array, live: jax.Array,
                s: jax.Array, valid: jax.Array):
    """One pass of one site. gp: gate leaves; u (B,T,D); mask, s (B,T,E); live (E,)."""
    cos = gamoe.cosine(gp, u)
    scores = gamoe.gate_scores(gp, cos, live)
    margin = gamoe.margin_logits(gp, cos)
    thr = mask & ~homeless[..., None]
    r = jax.nn.relu(scores)
    a = jnp.where(thr, 1.0 + (r - jax.lax.stop_gradient(r)), 0.0)  # STE count, as the forward
    v = valid[..., None]
    f = jnp.sum(a * v, axis=(0, 1))
    imp = jnp.sum(jax.nn.sigmoid(cos * gamoe.logit_scale(gp)) * live * v, axis=(0, 1))
    n_live = jnp.maximum(jnp.sum(live), 1)
    sparsity = masked_mean(jnp.sum(a, axis=-1) / n_live, valid)
    smk = smk_loss(margin, mask, s, valid)
    ce, kl = surprise_min_loss(margin, mask, live, s, valid)
    n_inf = jnp.sum(_informative(mask, s, valid))
    hits = gating_acc(jax.lax.stop_gradient(margin), mask, s, valid) * n_inf
    return f, imp, sparsity, smk, ce, kl, hits, n_inf


def gating_objective(params: dict, aux: Aux, surprise: dict, valid: jax.Array, live: dict,
                     lam: jax.Array, cfg: DynOnnConfig) -> tuple[jax.Array, dict]:
    """The gate loss of every site and pass, recomputed from the stored (constant) gate inputs,
    so its gradient reaches only the gate parameters. valid (B,T); surprise {site: (P,B,T,E)}.
    ``cfg.gating_loss`` picks the loss; every part is reported either way (mean over sites):
    loss_balance, loss_smk, loss_ce, loss_kl, sdl, sparsity, gating_acc."""
    totals = {k: 0.0 for k in ("loss_balance", "loss_smk", "loss_ce", "loss_kl", "sdl",
                               "sparsity", "gating_acc")}
    loss = 0.0
    for site in SITES:  # two gate kinds, not experts
        leaves = {k: params["layers"][site][k] for k in _GATE_LEAVES}
        res = aux.site(site)
        terms = jax.vmap(_site_terms, in_axes=(0, 0, 0, 0, 0, 0, None))
        f, imp, sparsity, smk, ce, kl, hits, n_inf = terms(
            per_pass(leaves, cfg), jax.lax.stop_gradient(res.u), res.mask, res.homeless,
            per_pass(live[site], cfg), surprise[site], valid)
        bal = jnp.mean(jax.vmap(load_balance)(per_group(f, cfg), per_group(imp, cfg),
                                              live[site]))
        sdl = jnp.mean(jax.vmap(sdl_loss)(leaves["proto_sim"], live[site]))
        parts = {"loss_balance": bal, "loss_smk": jnp.mean(smk), "loss_ce": jnp.mean(ce),
                 "loss_kl": jnp.mean(kl), "sdl": sdl, "sparsity": jnp.mean(sparsity),
                 "gating_acc": jnp.sum(hits) / jnp.maximum(jnp.sum(n_inf), 1.0)}
        if cfg.gating_loss == "surprise_min":
            main = cfg.w_ce * parts["loss_ce"] + cfg.w_kl * parts["loss_kl"]
        else:
            main = lam * bal + (1.0 - lam) * parts["loss_smk"]
        loss = loss + main + cfg.w_sdl * sdl + cfg.w_sparsity * parts["sparsity"]
        totals = {k: totals[k] + parts[k] / len(SITES) for k in totals}
    return loss / len(SITES), totals
