"""The DynTRM family's step: gradients of the main and meta losses, and the family's metrics.

One step = one forward with zero probes on every expert call site, one backward (``jax.vjp``)
giving the main gradient and every site's output cotangent, the closed-form SARS statistics and
the meta loss on the routing parameters (``sars.engine``). ``gradients`` returns their sum and
the metrics; ``train_state.apply_update`` applies it (main chain on ``main``, meta chain on
``meta``; a non-finite loss, gradient or update is skipped and counted).

Dense baselines (``model.attn_kind="mha"`` / ``model.ffn_kind="swiglu"``) have fewer call sites
or none; SARS covers the sites that exist (``ModelConfig.routed_sites``), off without any. TRM's
deep supervision is ``train.deep_supervision``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax import metrics
from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.residuals import QKV, Aux, Probes
from tinyonn_jax.families.dyntrm.sars import engine
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import META
from tinyonn_jax.train_state import StepOutput

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)




def main_objective(params: dict, probes: Probes | None, batch: Batch, cfg: Config):
    """CE + w_act * ACT loss. Returns (loss, (logits, aux, parts)).

    The CE is the final step's, or with ``train.deep_supervision`` the weighted mean of every
    refinement step's; ``parts['ce']`` is always the final step's (comparable across runs).
    """
    logits, aux = tr.forward(params, batch["inputs"], cfg.model, positions=batch["positions"],
                             segment_ids=batch["segment_ids"], probes=probes)
    ce = task_loss.cross_entropy(logits, batch["targets"], batch["weights"])
    act = task_loss.act_loss(aux.steps.halt_logits, aux.steps.logits, batch["targets"],
                             batch["weights"])
    parts = {"ce": ce, "act": act}
    task = ce
    if cfg.train.deep_supervision:
        task = task_loss.deep_supervision_loss(aux.steps.logits, batch["targets"],
                                               batch["weights"], cfg.train.deep_supervision)
        parts["deep_ce"] = task
    return task + cfg.sars.w_act * act, (logits, aux, parts)


class Gradients(NamedTuple):
    """Everything one forward and its backward passes produce."""

    loss: jax.Array  # main objective (CE [+ deep supervision] + w_act * ACT)
    g_main: dict  # params-shaped gradient of the main objective
    g_meta: dict  # params-shaped gradient of w_meta * meta loss (routing leaves only)
    logits: jax.Array  # (B, T, V) final refinement step
    aux: Aux  # forward residuals (see transformer.forward)
    parts: dict  # loss components
    sars_metrics: dict  # scalar SARS summaries ({} when SARS is off)
    g_probes: Probes | None  # dL/dA of every expert call site, (S, ...) per site, and the
    # SARS statistics of the sinks (ffn_stats / attn_stats) when the probes have them
    meta_loss: jax.Array


def compute_gradients(params: dict, batch: Batch, cfg: Config) -> Gradients:
    """Main and meta gradients (each a full params-shaped tree) plus everything to log.

    With ``sars.isolate`` the main loss reaches only ``main`` params and the meta loss only
    ``meta`` params; otherwise the main loss also trains routing params (the original DynTRM).
    """
    labels = modules.param_labels(cfg.model)

    def isolate_main(p):  # stop_gradient inside the differentiated function
        return variables.stop_group(p, labels, META) if cfg.sars.isolate else p

    b, t = batch["inputs"].shape
    if not cfg.sars.enabled or not cfg.model.routed_sites:
        (loss, (logits, aux, parts)), g_main = jax.value_and_grad(
            lambda p: main_objective(isolate_main(p), None, batch, cfg), has_aux=True)(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return Gradients(loss, g_main, zeros, logits, aux, parts, {}, None, jnp.float32(0.0))

    probes = tr.zero_probes(cfg.model, b, t)
    loss, vjp, (logits, aux, parts) = jax.vjp(
        lambda p, pr: main_objective(isolate_main(p), pr, batch, cfg), params, probes,
        has_aux=True)
    g_main, g_probes = vjp(jnp.ones_like(loss))
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    res = engine.sars_pass(params, aux, g_probes, valid, cfg.model, cfg.sars.importance,
                           cfg.sars.meta_loss)
    g_meta = jax.tree.map(lambda g: cfg.sars.w_meta * g, res.g_meta)
    return Gradients(loss, g_main, g_meta, logits, aux, parts, res.metrics, g_probes,
                     res.meta_loss)



def step_metrics(cfg: Config, batch: Batch, logits, aux, parts, sars_metrics, meta_loss, loss,
                 g_main, g_meta) -> dict:
    """Flat dict of scalars (and per-expert usage vectors under 'experts/')."""
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    m = {
        "train/loss": loss, "train/main_loss": parts["ce"], "train/act_loss": parts["act"],
        "train/meta_loss": meta_loss, "train/grad_norm_main": optax.tree.norm(g_main),
        "train/grad_norm_meta": optax.tree.norm(g_meta), **metrics.task_metrics(logits, batch),
    }
    q = aux.steps.halt_logits
    halt = jax.nn.sigmoid(q[..., 0] - q[..., 1]) > cfg.model.halt_threshold  # (S,B)
    s = halt.shape[0]
    first = jnp.where(jnp.any(halt, 0), jnp.argmax(halt, 0) + 1, s)
    m["act/halt_steps"] = jnp.mean(first.astype(jnp.float32))
    if "deep_ce" in parts:
        m["train/deep_ce"] = parts["deep_ce"]
    present = cfg.model.routed_sites  # dense sublayers have no routing to report
    pools = {"q": cfg.model.num_attn_experts, "k": cfg.model.num_attn_experts,
             "v": cfg.model.num_attn_experts, "ffn": cfg.model.num_ffn_experts}
    sites = {site: aux.steps.site(site) for site in present}
    for site, r in sites.items():
        vw = valid.reshape(1, *valid.shape, *([1] * (r.k.ndim - 3)))
        avg_k = metrics.masked_mean(r.k.astype(jnp.float32), vw)
        m[f"route/avg_k/{site}"] = avg_k
        m[f"route/active_frac/{site}"] = avg_k / pools[site]
        if r.overflow is not None:  # sparse dispatch: active pairs dropped for capacity
            m[f"route/overflow/{site}"] = jnp.sum(r.overflow).astype(jnp.float32)
    vt = valid.reshape(1, *valid.shape, 1, 1)
    if "q" in present:
        m["experts/usage_attn"] = jnp.mean(jnp.stack(
            [jnp.sum(aux.steps.site(c).mask * vt, axis=(0, 1, 2, 3)) for c in QKV]),
            0) / jnp.maximum(jnp.sum(valid) * s * cfg.model.num_heads, 1.0)
    if "ffn" in present:
        m["experts/usage_ffn"] = jnp.sum(aux.steps.ffn.mask * valid[None, ..., None],
                                         axis=(0, 1, 2)) / jnp.maximum(jnp.sum(valid) * s, 1.0)
    m.update(sars_metrics)
    surprise_s = sars_metrics.get("sars/C_mean", jnp.float32(0.0))
    m["sars/surprise"] = surprise_s
    m["sars/pi_score"] = metrics.pi_score(parts["ce"], m["train/tau"], surprise_s,
                                          cfg.sars.pi_alpha, cfg.sars.pi_gamma)
    return m


def gradients(params: dict, extras: None, batch: Batch, cfg: Config) -> StepOutput:
    """The family's role in the train step: summed main + meta gradient, finiteness, metrics."""
    g = compute_gradients(params, batch, cfg)
    m = step_metrics(cfg, batch, g.logits, g.aux, g.parts, g.sars_metrics, g.meta_loss, g.loss,
                     g.g_main, g.g_meta)
    return StepOutput(grads=jax.tree.map(jnp.add, g.g_main, g.g_meta),
                      losses_finite=jnp.isfinite(g.loss) & jnp.isfinite(g.meta_loss), metrics=m)

