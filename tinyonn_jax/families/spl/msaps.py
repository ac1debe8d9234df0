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
Protection: ``softmax(-||g_j|| / T)`` over all neurons of the model,
``T = max(1 - EMA_acc, T_min)``; the proto_weight gradient is multiplied by ``1 - protection``
(as in the seed; the PRC transforms serve every neuron of a stream and stay unprotected).
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
    _, act_vjp = jax.vjp(lambda p: activate(p, activation), res.pre)
    dpre = act_vjp(cotangent * res.mask)[0]
    return {"mu_weight": jnp.einsum("lbtn,lbti->lni", dpre, res.x),
            "mu_bias": jnp.sum(dpre, axis=(1, 2))}


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


def protection(gates: dict[str, jax.Array], ema_acc: jax.Array,
               min_temperature: float) -> tuple[dict[str, jax.Array], jax.Array]:
    """Protection probabilities (L_p, N) per kind: one softmax of -||g_j|| / T over all neurons."""
    norms = {k: row_norms(jax.lax.stop_gradient(g)) for k, g in gates.items()}
    temp = jnp.maximum(1.0 - ema_acc, min_temperature)
    flat = jax.nn.softmax(-jnp.concatenate([n.ravel() for n in norms.values()]) / temp)
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
    prot, temp = protection({k: params["layers"][k]["gate_param"] for k in kinds}, ema_acc,
                            cfg.min_temperature)
    info = {
        "proto_loss": l_proto, "gate_loss": l_gate, "l2_loss": l2, "l2_lambda": lam,
        "temperature": temp, "protection": prot, "mu_surprise": mu_s, "proto_surprise": proto_s,
        "rate": rate, "active": active, "good": good, "bad": bad,
        "gate_error": jax.tree.map(jnp.abs, gate_errors(params)),
    }
    return g_meta, select(g_l2, labels, MAIN), info
