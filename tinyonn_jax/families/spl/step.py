"""The SPL family's step (seed 001): main loss on ``main``, M-SAPS on ``meta``.

One step = one forward + backward of the main loss (gradient isolation: routing parameters are
stop-gradient'ed inside the differentiated function, so the main loss trains only ``main``
leaves; the straight-through mask still passes gradient *upstream* into the hidden states), then
the M-SAPS losses (prototype, gate, adaptive L2) on their own parameters and the protection of
the proto gradient (``gradients``); ``train_state.apply_update`` applies the sum. The PRC
parameters are ``meta`` (prototype pathway, trained by the prototype loss through P_eff). The
family's extra state is the EMA of token accuracy (the protection temperature).
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
from tinyonn_jax.families.spl.model import spl_forward
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


def spl_metrics(cfg: SplConfig, batch: Batch, params: dict, out: dict, g_main: dict,
                g_meta: dict) -> dict:
    """Flat dict of scalars plus per-neuron usage vectors ``experts/usage_<kind>`` (N,)."""
    logits, aux, info = out["logits"], out["aux"], out["info"]
    m = {
        **metrics.task_metrics(logits, batch),
        "train/loss": out["ce"] + info["l2_loss"], "train/main_loss": out["ce"],
        "train/meta_loss": cfg.w_proto * info["proto_loss"] + cfg.w_gate * info["gate_loss"],
        "train/proto_loss": info["proto_loss"], "train/gate_loss": info["gate_loss"],
        "train/l2_loss": info["l2_loss"], "train/l2_lambda": info["l2_lambda"],
        "train/grad_norm_main": optax.tree.norm(g_main),
        "train/grad_norm_meta": optax.tree.norm(g_meta),
        "spl/temperature": info["temperature"],
    }
    tokens = jnp.maximum(aux.tokens, 1.0)
    site_rates, n_all, n_good, n_bad, n_active, err, protos, prot_max = [], 0, 0, 0, 0, [], [], []
    for k in cfg.kinds:  # module kinds
        count = aux.stats[k].count  # (L_eff, N)
        n = count.shape[-1]
        site_rates.append(jnp.sum(count, -1) / (tokens * n))
        m[f"spl/activation_rate/{k}"] = jnp.mean(site_rates[-1])
        m[f"experts/usage_{k}"] = jnp.mean(count, 0) / tokens
        m[f"spl/mu_surprise/{k}"] = jnp.mean(info["mu_surprise"][k])
        m[f"spl/proto_surprise/{k}"] = jnp.mean(info["proto_surprise"][k])
        n_all += info["good"][k].size
        n_good += jnp.sum(info["good"][k])
        n_bad += jnp.sum(info["bad"][k])
        n_active += jnp.sum(info["active"][k])
        err.append(jnp.mean(info["gate_error"][k]))
        protos.append(jnp.mean(ms.row_norms(params["layers"][k]["proto_weight"])))
        prot_max.append(jnp.max(info["protection"][k]))
    per_site = jnp.mean(jnp.stack(site_rates), 0)  # (L_eff,) averaged over module kinds
    m["spl/activation_rate"] = jnp.mean(per_site)
    for i in range(cfg.num_sites):  # a handful of scalars for the logger, outside any jit loop
        m[f"spl/activation_rate/site{i}"] = per_site[i]
    m["spl/good_share"] = n_good / n_all
    m["spl/bad_share"] = n_bad / n_all
    m["spl/active_share"] = n_active / n_all
    m["spl/gate_regression_error"] = jnp.mean(jnp.stack(err))
    m["spl/proto_norm"] = jnp.mean(jnp.stack(protos))
    m["spl/protection_max"] = jnp.max(jnp.stack(prot_max))
    m["spl/surprise"] = jnp.mean(jnp.stack([m[f"spl/mu_surprise/{k}"] for k in cfg.kinds]))
    return m


def gradients(params: dict, ema_acc: jax.Array, batch: Batch, cfg: Config) -> StepOutput:
    """The family's role in the train step: the protected sum of the main and M-SAPS gradients,
    finiteness, metrics, and the accuracy EMA after this step (``model.ema_decay``)."""
    sc = cfg.model
    g_main, g_meta, prot, out = spl_gradients(params, batch, ema_acc, sc)
    grads = ms.scale_proto_grads(jax.tree.map(jnp.add, g_main, g_meta), prot)
    info = out["info"]
    m = spl_metrics(sc, batch, params, out, g_main, g_meta)
    m["train/ema_acc"] = ema_acc  # the EMA that set this step's protection temperature
    return StepOutput(
        grads=grads,
        losses_finite=(jnp.isfinite(out["ce"]) & jnp.isfinite(info["proto_loss"])
                       & jnp.isfinite(info["gate_loss"])),
        metrics=m,
        extras=sc.ema_decay * ema_acc + (1.0 - sc.ema_decay) * m["train/token_acc"])
