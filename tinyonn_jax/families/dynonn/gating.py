"""Gate training of the DynMoE family (seeds 002-004): surprise, SMK, balance, PI and lambda(PI).

Surprise (per token t and expert e, seed 002 "the main-loss gradient at each expert's output").
With per-token mixing, the literal ``||dL/d(w_te Y_te)|| = w_te ||dL/dA_t||`` (the reference's
``S_te = ||dL/dout_t|| w_te``) is proportional to the routing weight for *every* expert, so its
argmin over routed experts is merely the smallest weight (and over all experts, an unrouted one:
the original's bug). The default is therefore the derivative of the main loss along expert e's
own output, ``S_te = |dL/dw_te| = |sum_sites <dL/dA_t, Y_te>|`` (Y_te the unweighted output of
expert e in every place it acts: q, k, v, o or W1, W2). Both come exactly from the cotangents of
zero probes on the routing weights / sub-layer outputs (``model.zero_probes``). S is expressed per
token (gradient of the token-summed loss) so its scale does not depend on the batch size.

Gate objective (seed 003): ``lambda * L_balance + (1 - lambda) * L_smk (+ w_sdl SDL + w_sparsity
mean(a))`` with ``lambda = 1 - sigmoid(sensitivity (PI - threshold))`` held constant, and
``PI = exp(-alpha ((1 - gamma) L / tau + gamma S_mean))``. L_smk only looks at routed experts.
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


def token_surprise(g_probes: Probes, aux: Aux, site: str, mode: str,
                   n_tokens: jax.Array) -> jax.Array:
    """S (P,B,T,E) of one site from probe cotangents, in per-token units (x ``n_tokens``)."""
    if mode == "weight_grad":
        s = jnp.abs(g_probes.weight(site))
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
    n_inf = jnp.sum(_informative(mask, s, valid))
    hits = gating_acc(jax.lax.stop_gradient(margin), mask, s, valid) * n_inf
    return f, imp, sparsity, smk, hits, n_inf


def gating_objective(params: dict, aux: Aux, surprise: dict, valid: jax.Array, live: dict,
                     lam: jax.Array, cfg: DynOnnConfig) -> tuple[jax.Array, dict]:
    """The gate loss of every site and pass, recomputed from the stored (constant) gate inputs,
    so its gradient reaches only the gate parameters. valid (B,T); surprise {site: (P,B,T,E)}.
    Returns (loss, parts) with parts loss_balance, loss_smk, sdl, sparsity, gating_acc."""
    totals = {k: 0.0 for k in ("loss_balance", "loss_smk", "sdl", "sparsity", "gating_acc")}
    loss = 0.0
    for site in SITES:  # two gate kinds, not experts
        leaves = {k: params["layers"][site][k] for k in _GATE_LEAVES}
        res = aux.site(site)
        terms = jax.vmap(_site_terms, in_axes=(0, 0, 0, 0, 0, 0, None))
        f, imp, sparsity, smk, hits, n_inf = terms(
            per_pass(leaves, cfg), jax.lax.stop_gradient(res.u), res.mask, res.homeless,
            per_pass(live[site], cfg), surprise[site], valid)
        bal = jnp.mean(jax.vmap(load_balance)(per_group(f, cfg), per_group(imp, cfg),
                                              live[site]))
        sdl = jnp.mean(jax.vmap(sdl_loss)(leaves["proto_sim"], live[site]))
        parts = {"loss_balance": bal, "loss_smk": jnp.mean(smk), "sdl": sdl,
                 "sparsity": jnp.mean(sparsity),
                 "gating_acc": jnp.sum(hits) / jnp.maximum(jnp.sum(n_inf), 1.0)}
        loss = loss + (lam * bal + (1.0 - lam) * parts["loss_smk"] + cfg.w_sdl * sdl
                       + cfg.w_sparsity * parts["sparsity"])
        totals = {k: totals[k] + parts[k] / len(SITES) for k in totals}
    return loss / len(SITES), totals
