"""The SPL family's step (seed 001): main loss on ``main``, M-SAPS on ``meta``.

One step = one forward + backward of the main loss (gradient isolation: routing parameters are
stop-gradient'ed inside the differentiated function, so the main loss trains only ``main``
leaves; the straight-through mask still passes gradient *upstream* into the hidden states), then
the M-SAPS losses (prototype, gate, adaptive L2) on their own parameters and the protection of
the proto gradient (``gradients``); ``train_state.apply_update`` applies the sum. The PRC
parameters are ``meta`` (prototype pathway, trained by the prototype loss through P_eff). The
family's extra state is the EMA of main_acc (token accuracy), which sets the protection
temperature.

The step differentiates zero probes on every masked SPL output too, so the metrics see per-token
quantities: the per-token mu surprise ``S_tj = |dL/dpre_tj| ||x_t||`` (``msaps.token_mu_surprise``,
in per-token units: times the number of weighted tokens, so it does not shrink with the batch)
and, from it, the seed-002 names ``train/surprise``, ``train/gating_acc`` and ``train/pi_score``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax import metrics
from tinyonn_jax.config import Config
from tinyonn_jax.families.spl import msaps as ms
from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.model import spl_forward, spl_zero_probes
from tinyonn_jax.families.spl.modules import param_labels
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import META
from tinyonn_jax.train_state import StepOutput

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)



def spl_gradients(params: dict, batch: Batch, ema_acc: jax.Array, cfg: SplConfig,
                  probes: dict | None = None):
    """(g_main, g_meta, protection, out): g_main = main loss (+ L2 on mu), g_meta = M-SAPS.

    out holds the main loss ``ce``, its gradient ``g_ce``, logits, aux (``residuals.Aux``) and
    the M-SAPS ``info``. With zero ``probes`` (``model.spl_zero_probes``) it also holds
    ``g_probes`` = dL/dM of every masked SPL output and ``aux.residuals`` is filled (per-site,
    per-token analysis).
    """
    labels = param_labels(cfg)

    def objective(p, pr):
        if cfg.isolate:
            p = variables.stop_group(p, labels, META)
        logits, aux = spl_forward(p, batch["inputs"], cfg, positions=batch["positions"],
                                  segment_ids=batch["segment_ids"], probes=pr)
        return task_loss.cross_entropy(logits, batch["targets"], batch["weights"]), (logits, aux)

    (ce, (logits, aux)), (g_ce, g_probes) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(params, probes)
    g_meta, g_l2_main, info = ms.msaps(params, g_ce, aux, ema_acc, cfg)
    g_main = jax.tree.map(jnp.add, g_ce, g_l2_main)
    out = {"ce": ce, "g_ce": g_ce, "logits": logits, "aux": aux, "info": info}
    if probes is not None:
        out["g_probes"] = g_probes
    return g_main, g_meta, info["protection"], out


def routing_metrics(cfg: SplConfig, batch: Batch, out: dict) -> dict:
    """Per-token routing metrics from the probe cotangents ``out['g_probes']`` and the residuals.

    ``train/surprise``: mean per-token mu surprise S (per-token units) over active (valid token,
    neuron) pairs of every kind and site. ``train/gating_acc``: share of (kind, site, token)
    triples, among valid tokens with some active neuron of S > 0, whose highest routing score
    ``raw`` among the active neurons belongs to the active neuron of least S.
    """
    aux, g_probes = out["aux"], out["g_probes"]
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)  # (B,T)
    n_tok = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    s_sum = s_cnt = hits = informative = 0.0
    for k in cfg.kinds:  # module kinds
        res = aux.residuals[k]  # (L_eff,B,T,...)
        s = ms.token_mu_surprise(res, g_probes[k], cfg.activation) * n_tok  # (L_eff,B,T,N)
        on = res.mask > 0
        w = on * valid[None, ..., None]
        s_sum += jnp.sum(s * w)
        s_cnt += jnp.sum(w)
        pick = jnp.argmax(jnp.where(on, res.raw, -jnp.inf), axis=-1)
        best = jnp.argmin(jnp.where(on, s, jnp.inf), axis=-1)
        judged = valid[None] * jnp.any(on & (s > 0), axis=-1)  # (L_eff,B,T)
        hits += jnp.sum((pick == best) * judged)
        informative += jnp.sum(judged)
    return {"train/surprise": s_sum / jnp.maximum(s_cnt, 1.0),
            "train/gating_acc": hits / jnp.maximum(informative, 1.0)}


def spl_metrics(cfg: SplConfig, batch: Batch, params: dict, out: dict, g_main: dict,
                g_meta: dict) -> dict:
    """Flat dict of scalars plus per-neuron usage vectors ``experts/usage_<kind>`` (N,).

    Besides the SPL names (``spl/*``) it emits the seed-002 names: ``train/main_acc`` (=
    ``train/token_acc``), ``train/gating_loss`` (the M-SAPS meta loss, proto + gate),
    ``train/avg_k`` (active neurons per valid token, mean over kinds and sites; per kind
    ``route/avg_k/<kind>``), ``train/surprise`` and ``train/gating_acc`` (``routing_metrics``,
    needs ``out['g_probes']``), ``train/pi_score`` (``metrics.pi_score`` of the main loss, tau
    and train/surprise) and ``train/num_experts``: the whole neuron pool over kinds and
    parameter layers (seed 002: the number of experts the model has; SPL has no lifecycle, so it
    is constant, = ``SplFamily.num_experts``). The neurons that fired on some valid token of the
    batch are ``spl/active_neurons``. There is no sparsity loss in SPL and none is reported.
    """
    logits, aux, info = out["logits"], out["aux"], out["info"]
    meta_loss = cfg.w_proto * info["proto_loss"] + cfg.w_gate * info["gate_loss"]
    m = {
        **metrics.task_metrics(logits, batch),
        "train/loss": out["ce"] + info["l2_loss"], "train/main_loss": out["ce"],
        "train/meta_loss": meta_loss, "train/gating_loss": meta_loss,
        "train/proto_loss": info["proto_loss"], "train/gate_loss": info["gate_loss"],
        "train/l2_loss": info["l2_loss"], "train/l2_lambda": info["l2_lambda"],
        "train/grad_norm_main": optax.tree.norm(g_main),
        "train/grad_norm_meta": optax.tree.norm(g_meta),
        "spl/temperature": info["temperature"],
    }
    tokens = jnp.maximum(aux.tokens, 1.0)
    site_rates, n_all, n_good, n_bad, n_active, err, protos = [], 0, 0, 0, 0, [], []
    for k in cfg.kinds:  # module kinds
        count = aux.stats[k].count  # (L_eff, N)
        n = count.shape[-1]
        site_rates.append(jnp.sum(count, -1) / (tokens * n))
        m[f"spl/activation_rate/{k}"] = jnp.mean(site_rates[-1])
        m[f"route/avg_k/{k}"] = jnp.mean(jnp.sum(count, -1)) / tokens
        m[f"experts/usage_{k}"] = jnp.mean(count, 0) / tokens
        m[f"spl/mu_surprise/{k}"] = jnp.mean(info["mu_surprise"][k])
        m[f"spl/proto_surprise/{k}"] = jnp.mean(info["proto_surprise"][k])
        n_all += info["good"][k].size
        n_good += jnp.sum(info["good"][k])
        n_bad += jnp.sum(info["bad"][k])
        n_active += jnp.sum(info["active"][k])
        err.append(jnp.mean(info["gate_error"][k]))
        protos.append(jnp.mean(ms.row_norms(params["layers"][k]["proto_weight"])))
    per_site = jnp.mean(jnp.stack(site_rates), 0)  # (L_eff,) averaged over module kinds
    m["spl/activation_rate"] = jnp.mean(per_site)
    for i in range(cfg.num_sites):  # a handful of scalars for the logger, outside any jit loop
        m[f"spl/activation_rate/site{i}"] = per_site[i]
    m["spl/good_share"] = n_good / n_all
    m["spl/bad_share"] = n_bad / n_all
    m["spl/active_share"] = n_active / n_all
    m["spl/gate_regression_error"] = jnp.mean(jnp.stack(err))
    m["spl/proto_norm"] = jnp.mean(jnp.stack(protos))
    prot = jnp.concatenate([info["protection"][k].ravel() for k in cfg.kinds])  # all neurons
    m["spl/protection_max"] = jnp.max(prot)
    m["spl/protection_mean"] = jnp.mean(prot)
    m["spl/protection_min"] = jnp.min(prot)
    m["spl/protection_share"] = jnp.mean((prot > 0.5).astype(jnp.float32))
    m["spl/surprise"] = jnp.mean(jnp.stack([m[f"spl/mu_surprise/{k}"] for k in cfg.kinds]))
    m["train/avg_k"] = jnp.mean(jnp.stack([m[f"route/avg_k/{k}"] for k in cfg.kinds]))
    m["train/num_experts"] = jnp.int32(n_all)
    m["spl/active_neurons"] = n_active.astype(jnp.int32)
    m.update(routing_metrics(cfg, batch, out))
    m["train/pi_score"] = metrics.pi_score(out["ce"], m["train/tau"], m["train/surprise"],
                                           cfg.pi_alpha, cfg.pi_gamma)
    return m


def gradients(params: dict, ema_acc: jax.Array, batch: Batch, cfg: Config) -> StepOutput:
    """The family's role in the train step: the protected sum of the main and M-SAPS gradients,
    finiteness, metrics, and the accuracy EMA after this step (``model.ema_decay``)."""
    sc = cfg.model
    probes = spl_zero_probes(sc, *batch["inputs"].shape)  # per-token metrics (routing_metrics)
    g_main, g_meta, prot, out = spl_gradients(params, batch, ema_acc, sc, probes)
    total = jax.tree.map(jnp.add, g_main, g_meta)
    grads = ms.scale_proto_grads(total, prot)
    info = out["info"]
    m = spl_metrics(sc, batch, params, out, g_main, g_meta)
    m["train/ema_acc"] = ema_acc  # the EMA that set this step's protection temperature
    m["spl/proto_grad_kept"] = ms.proto_grad_kept(total, prot)
    return StepOutput(
        grads=grads,
        losses_finite=(jnp.isfinite(out["ce"]) & jnp.isfinite(info["proto_loss"])
                       & jnp.isfinite(info["gate_loss"])),
        metrics=m,
        extras=sc.ema_decay * ema_acc + (1.0 - sc.ema_decay) * m["train/main_acc"])
