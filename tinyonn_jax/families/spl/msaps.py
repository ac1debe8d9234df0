"""M-SAPS (seed 001): Memory-Surprise-Aware Prototype Shaping for SPL neurons.

Per SPL module kind and parameter layer, every output neuron j gets
  * ``mu_surprise_j = ||dL_main / dmu_weight[j, :]||``: the row norm of the actual gradient of the
    main loss (the main backward pass already computes it, so it is exact and costs nothing; the
    per-site closed form from zero probes, ``site_mu_grads``, gives the same numbers per call site);
  * ``proto_surprise_j = ||dL_proto / dproto_weight[j, :]||`` (includes the paths through PRC).
Classification: with the module's activation rate r (active elements / all elements over valid
tokens), among the neurons that fired at least once in the batch (only those can be judged),
``bad = mu_s >= quantile(mu_s, 1 - r)`` and ``good = mu_s <= quantile(mu_s, r)`` and not bad
(for r > 1/2 the two ranges overlap; bad wins, as in the original, so dense modules are pickier).
Local anchors: ``anchor_j`` = mean of the inputs that activated neuron j.
Prototype loss (seed signs applied to the similarity, which fixes the original's inversion):
``L_proto = mean_{good, bad} sign_j * mu_s_j * cos(P_eff_j, anchor_j)``, sign -1 (good: pulled
toward the anchor) or +1 (bad: pushed away); mu_s and the anchors are constants.
Gate loss: ``mean_j (mean_t x_t . g_j - stop_grad(mu_s_j + proto_s_j))^2``.
Protection (seed 001, "endogenous ranking"): the quality score ``-||g_j||`` of every neuron of the
model is ranked globally and turned into a protection probability p_j by a temperature set by the
EMA of main_acc; the proto_weight gradient row j is multiplied by ``1 - p_j`` (the PRC transforms
serve every neuron of a stream and stay unprotected). ``protection`` documents the rules.
Adaptive L2: ``lambda * sum ||W||^2`` over mu and proto matrices, with the detached
``lambda = l2_coef * stop_grad(mean ||W||_F)``.

Shapes: sites L_eff (layers, or refinement steps of a shared block), parameter layers L_p
(L_eff, or 1 for a shared block), N neurons, I inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.model import activate, effective_prototypes
from tinyonn_jax.families.spl.modules import param_labels
from tinyonn_jax.families.spl.residuals import Aux, SplResidual
from tinyonn_jax.nn.variables import MAIN, META, select


def row_norms(g: jax.Array) -> jax.Array:
    """Per-neuron norms over the last (input) axis: (..., N, I) -> (..., N)."""
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity over the last axis."""
    na = jax.lax.rsqrt(jnp.sum(jnp.square(a), -1) + eps)
    nb = jax.lax.rsqrt(jnp.sum(jnp.square(b), -1) + eps)
    return jnp.sum(a * b, -1) * na * nb


def site_mu_grads(res: SplResidual, cotangent: jax.Array, activation: str) -> dict:
    """Exact per-site mu gradients from a probe cotangent g = dL/dM on the masked output.

    res (one kind of ``Aux.residuals``): x (L,B,T,I), pre and mask (L,B,T,N); cotangent
    (L,B,T,N) -> mu_weight (L,N,I), mu_bias (L,N). Summed over sites this is jax.grad of the
    (shared or stacked) mu leaves.
    """
    _, act_vjp = jax.vjp(lambda p: activate(p, activation), res.pre.astype(jnp.float32))
    dpre = act_vjp((cotangent * res.mask).astype(jnp.float32))[0]
    return {"mu_weight": jnp.einsum("lbtn,lbti->lni", dpre, res.x.astype(jnp.float32)),
            "mu_bias": jnp.sum(dpre, axis=(1, 2))}


def token_mu_surprise(res: SplResidual, cotangent: jax.Array, activation: str) -> jax.Array:
    """Per-token mu surprise (L,B,T,N): the norm of token t's share of ``dL / dmu_weight[j, :]``.

    That share is the rank-1 row ``dpre_tj x_t``, so its norm is ``|dpre_tj| ||x_t||`` with
    dpre = dL/d(x mu^T + b) (0 where the neuron is masked off). Summing the rows (not the norms)
    over tokens and sites gives ``mu_surprise``. res: x (L,B,T,I), pre/mask (L,B,T,N);
    cotangent = dL/dM (L,B,T,N).
    """
    _, act_vjp = jax.vjp(lambda p: activate(p, activation), res.pre.astype(jnp.float32))
    dpre = act_vjp((cotangent * res.mask).astype(jnp.float32))[0]
    x = res.x.astype(jnp.float32)
    return jnp.abs(dpre) * jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))[..., None]


def to_param_layers(a: jax.Array, num_param_layers: int) -> jax.Array:
    """Reduce a per-site array (L_eff, ...) to per-parameter-layer (L_p, ...) by summation."""
    if a.shape[0] == num_param_layers:
        return a
    return jnp.sum(a, axis=0, keepdims=True)


def masked_quantile(values: jax.Array, mask: jax.Array, q: jax.Array) -> jax.Array:
    """Linear-interpolation quantile (numpy's default) of the masked entries of the last axis.

    values/mask (..., N), q (...) -> (...); 0 where no entry is masked in.
    """
    n = jnp.sum(mask, axis=-1)
    srt = jnp.sort(jnp.where(mask, values, jnp.inf), axis=-1)
    last = jnp.maximum(n - 1, 0)
    pos = q * last
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, last)
    v_lo = jnp.take_along_axis(srt, lo[..., None], axis=-1)[..., 0]
    v_hi = jnp.take_along_axis(srt, hi[..., None], axis=-1)[..., 0]
    return jnp.where(n > 0, v_lo + (pos - lo) * (v_hi - v_lo), 0.0)


def classify(mu_s: jax.Array, active: jax.Array,
             rate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """good, bad (L_p, N) bool from mu_s (L_p, N), active (L_p, N), activation rate (L_p,)."""
    q_lo = masked_quantile(mu_s, active, rate)[..., None]
    q_hi = masked_quantile(mu_s, active, 1.0 - rate)[..., None]
    bad = active & (mu_s >= q_hi)
    good = active & (mu_s <= q_lo) & ~bad
    return good, bad


def activity(count: jax.Array, tokens: jax.Array,
             num_param_layers: int) -> tuple[jax.Array, jax.Array]:
    """Activation rate (L_p,) and active neurons (L_p, N) from per-site counts (L_eff, N)."""
    per_layer = to_param_layers(count, num_param_layers)
    sites = count.shape[0] // num_param_layers
    rate = jnp.sum(per_layer, -1) / jnp.maximum(tokens * count.shape[-1] * sites, 1.0)
    return rate, per_layer > 0


def proto_loss(protos: jax.Array, anchors: jax.Array, site_active: jax.Array,
               signs: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over judged (site, neuron) pairs of sign * weight * cos(P_eff, anchor).

    protos/anchors (L_eff, N, I), site_active (L_eff, N) bool, signs/weights (L_p, N).
    """
    coef = jnp.broadcast_to(signs * weights, site_active.shape)
    sel = site_active & (jnp.broadcast_to(signs, site_active.shape) != 0)
    terms = jnp.where(sel, coef * cosine(protos, anchors), 0.0)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(sel), 1)


def gate_predictions(gates: jax.Array, x_mean: jax.Array) -> jax.Array:
    """mean_t x_t . g_j per site (= x_mean . g_j): gates (L_p,N,I), x_mean (L_eff,I) -> (L_eff,N)"""
    g = jnp.broadcast_to(gates, (x_mean.shape[0],) + gates.shape[1:])
    return jnp.einsum("li,lni->ln", x_mean, g)


def mid_rank(v: jax.Array) -> jax.Array:
    """Rank fraction r in [0, 1) of every entry of v (M,) in ascending order: 0 for the unique
    smallest, i / M for the i-th of distinct values; tied entries share their mean rank."""
    srt = jnp.sort(v)
    below = jnp.searchsorted(srt, v, side="left")  # entries strictly smaller
    upto = jnp.searchsorted(srt, v, side="right")  # entries smaller or equal
    return (below + upto - 1).astype(jnp.float32) / (2.0 * v.shape[0])


def protection_temperature(ema_acc: jax.Array, cfg: SplConfig) -> jax.Array:
    """T of the protection rule: grows with accuracy for ``seed``, shrinks for ``original``."""
    if cfg.protection == "original":
        return jnp.maximum(1.0 - ema_acc, cfg.min_temperature)
    acc = jnp.clip(ema_acc, 0.0, 1.0)
    return cfg.min_temperature + (cfg.max_temperature - cfg.min_temperature) * acc


def protection_probs(norms: jax.Array, temp: jax.Array, rule: str) -> jax.Array:
    """p (M,) in [0, 1] from the gate norms (M,) of all neurons and the temperature T.

    ``seed``: ``p_j = exp(-r_j / T)`` with r_j = ``mid_rank(||g_j||)`` (0 = best quality
    ``-||g_j||``), i.e. the softmax of ``-r / T`` divided by its maximum: the best neuron gets 1,
    about ``T ln 2`` of all neurons get more than 1/2, the mean is about ``T (1 - exp(-1/T))``,
    whatever M. ``original``: ``softmax(-||g|| / T)`` (sums to 1, so p_j <= ~1/M unless one
    neuron dominates). ``none``: 0.
    """
    if rule == "seed":
        return jnp.exp(-mid_rank(norms) / temp)
    if rule == "original":
        return jax.nn.softmax(-norms / temp)
    if rule == "none":
        return jnp.zeros_like(norms)
    raise ValueError(f"unknown protection rule {rule!r}")


def protection(gates: dict[str, jax.Array], ema_acc: jax.Array,
               cfg: SplConfig) -> tuple[dict[str, jax.Array], jax.Array]:
    """(protection probabilities (L_p, N) per kind, temperature) from the gates (L_p, N, I).

    One global ranking over the neurons of every kind and layer (``protection_probs`` with
    ``cfg.protection``), temperature ``protection_temperature(ema_acc)``; no gradient.
    """
    norms = {k: row_norms(jax.lax.stop_gradient(g)) for k, g in gates.items()}
    temp = protection_temperature(jax.lax.stop_gradient(ema_acc), cfg)
    flat = protection_probs(jnp.concatenate([n.ravel() for n in norms.values()]), temp,
                            cfg.protection)
    out, i = {}, 0
    for k, n in norms.items():  # unflatten per module kind
        out[k] = flat[i:i + n.size].reshape(n.shape)
        i += n.size
    return out, temp


def adaptive_l2(layers: dict, kinds: tuple[str, ...], coef: float) -> tuple[jax.Array, jax.Array]:
    """(lambda * sum ||W||^2 over mu and proto matrices, lambda) with lambda detached."""
    mats = [layers[k][n] for k in kinds for n in ("mu_weight", "proto_weight")]
    fro = jnp.concatenate([jnp.sqrt(jnp.sum(jnp.square(w), axis=(-2, -1))) for w in mats])
    lam = coef * jax.lax.stop_gradient(jnp.mean(fro))
    return lam * sum(jnp.sum(jnp.square(w)) for w in mats), lam


def scale_proto_grads(grads: dict, prot: dict[str, jax.Array]) -> dict:
    """grads with every proto_weight row j multiplied by (1 - protection_j)."""
    layers = dict(grads["layers"])
    for k, p in prot.items():
        layers[k] = dict(layers[k])
        layers[k]["proto_weight"] = layers[k]["proto_weight"] * (1.0 - p)[..., None]
    return {**grads, "layers": layers}


def proto_grad_kept(grads: dict, prot: dict[str, jax.Array]) -> jax.Array:
    """``||(1 - p) * g|| / ||g||`` over the proto_weight gradients of all kinds (1 if g = 0):
    the share of the prototype update that protection lets through."""
    g = [grads["layers"][k]["proto_weight"] for k in prot]
    kept = [a * (1.0 - p)[..., None] for a, p in zip(g, prot.values(), strict=True)]
    total = jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in g))
    return jnp.where(total > 0, jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in kept))
                     / jnp.maximum(total, 1e-30), 1.0)


def msaps(params: dict, g_main: dict, aux: Aux, ema_acc: jax.Array,
          cfg: SplConfig) -> tuple[dict, dict, dict]:
    """The meta-learning signals of one step.

    g_main: gradient of the main loss alone (for mu_surprise). aux: from ``spl_forward`` with
    its statistics (``with_stats=True``).
    Returns (g_meta: weighted proto + gate + L2 gradients on ``meta`` leaves, g_l2_main: the L2
    gradient on ``main`` leaves, info: losses and per-kind statistics). Protection is *not*
    applied here: the caller scales the total proto gradient with ``info['protection']``.
    """
    labels = param_labels(cfg)
    lp, kinds = cfg.num_param_layers, cfg.kinds
    st = aux.stats
    mu_s = {k: jax.lax.stop_gradient(row_norms(g_main["layers"][k]["mu_weight"])) for k in kinds}
    rate, active, good, bad, signs, site_active = {}, {}, {}, {}, {}, {}
    for k in kinds:  # module kinds
        rate[k], active[k] = activity(st[k].count, aux.tokens, lp)
        good[k], bad[k] = classify(mu_s[k], active[k], rate[k])
        signs[k] = jnp.where(good[k], -1.0, jnp.where(bad[k], 1.0, 0.0))
        site_active[k] = st[k].count > 0

    def proto_objective(p):
        protos = effective_prototypes(p, cfg)
        return sum(proto_loss(protos[k], st[k].anchor, site_active[k], signs[k], mu_s[k])
                   for k in kinds)

    l_proto, g_proto = jax.value_and_grad(proto_objective)(params)
    proto_s = {k: row_norms(g_proto["layers"][k]["proto_weight"]) for k in kinds}
    target = {k: jax.lax.stop_gradient(mu_s[k] + proto_s[k]) for k in kinds}

    def gate_errors(p):
        return {k: gate_predictions(p["layers"][k]["gate_param"], st[k].x_mean)
                - jnp.broadcast_to(target[k], (cfg.num_sites, target[k].shape[-1]))
                for k in kinds}

    def gate_objective(p):
        return sum(jnp.mean(jnp.square(e)) for e in gate_errors(p).values())

    l_gate, g_gate = jax.value_and_grad(gate_objective)(params)
    (l2, lam), g_l2 = jax.value_and_grad(
        lambda p: adaptive_l2(p["layers"], kinds, cfg.l2_coef), has_aux=True)(params)
    g_meta = jax.tree.map(lambda a, b, c: cfg.w_proto * a + cfg.w_gate * b + c,
                          g_proto, g_gate, select(g_l2, labels, META))
    prot, temp = protection({k: params["layers"][k]["gate_param"] for k in kinds}, ema_acc, cfg)
    info = {
        "proto_loss": l_proto, "gate_loss": l_gate, "l2_loss": l2, "l2_lambda": lam,
        "temperature": temp, "protection": prot, "mu_surprise": mu_s, "proto_surprise": proto_s,
        "rate": rate, "active": active, "good": good, "bad": bad,
        "gate_error": jax.tree.map(jnp.abs, gate_errors(params)),
    }
    return g_meta, select(g_l2, labels, MAIN), info
