"""The DynTRM family's step: gradients of the main and meta losses, and the family's metrics.

One step = one forward with zero probes on every expert call site, one backward (``jax.vjp``)
giving the main gradient and every site's output cotangent, the closed-form SARS statistics and
the meta loss on the routing parameters (``sars.engine``). ``gradients`` returns their sum and
the metrics; ``train_state.apply_update`` applies it (main chain on ``main``, meta chain on
``meta``; a non-finite loss, gradient or update is skipped and counted).

Dense baselines (``model.attn_kind="mha"`` / ``model.ffn_kind="swiglu"``) have fewer call sites
or none; SARS covers the sites that exist (``ModelConfig.routed_sites``), off without any. TRM's
deep supervision is ``train.deep_supervision``.

The family's extra train state is the expert pool (``lifecycle.PoolState``, or None when every
expert stays live): its live masks enter the forward, this step's routing records enter it only
when the update is applied, and ``maintain`` applies ``lifecycle.lifecycle_update`` every
``model.lifecycle_period`` steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax import metrics
from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import halting, lifecycle, modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.residuals import ATTN, QKV, Aux, Probes
from tinyonn_jax.families.dyntrm.sars import engine
from tinyonn_jax.family import usage_rows
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import META
from tinyonn_jax.train_state import StepOutput, TrainState

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)




def main_objective(params: dict, probes: Probes | None, batch: Batch, cfg: Config,
                   live: dict | None = None):
    """CE + w_act * ACT loss. Returns (loss, (logits, aux, parts)). ``live``: the pools' live
    masks (``transformer.forward``).

    The CE is the final step's, or with ``train.deep_supervision`` the weighted mean of every
    refinement step's; ``parts['ce']`` is always the final step's (comparable across runs).
    """
    logits, aux = tr.forward(params, batch["inputs"], cfg.model, positions=batch["positions"],
                             segment_ids=batch["segment_ids"], probes=probes, live=live)
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


def compute_gradients(params: dict, batch: Batch, cfg: Config,
                      live: dict | None = None) -> Gradients:
    """Main and meta gradients (each a full params-shaped tree) plus everything to log.

    With ``sars.isolate`` the main loss reaches only ``main`` params and the meta loss only
    ``meta`` params; otherwise the main loss also trains routing params (the original DynTRM).
    ``live`` {pool: (P,) bool} (None: every expert live): dead experts are routed no token
    (so they get no gradient) and are absent from the meta loss.
    """
    labels = modules.param_labels(cfg.model)

    def isolate_main(p):  # stop_gradient inside the differentiated function
        return variables.stop_group(p, labels, META) if cfg.sars.isolate else p

    b, t = batch["inputs"].shape
    if not cfg.sars.enabled or not cfg.model.routed_sites:
        (loss, (logits, aux, parts)), g_main = jax.value_and_grad(
            lambda p: main_objective(isolate_main(p), None, batch, cfg, live),
            has_aux=True)(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return Gradients(loss, g_main, zeros, logits, aux, parts, {}, None, jnp.float32(0.0))

    probes = tr.zero_probes(cfg.model, b, t)
    loss, vjp, (logits, aux, parts) = jax.vjp(
        lambda p, pr: main_objective(isolate_main(p), pr, batch, cfg, live), params, probes,
        has_aux=True)
    g_main, g_probes = vjp(jnp.ones_like(loss))
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    site_live = None if live is None else {
        s: lifecycle.site_live(live, s) for s in cfg.model.routed_sites}
    res = engine.sars_pass(params, aux, g_probes, valid, cfg.model, cfg.sars.importance,
                           cfg.sars.meta_loss, site_live)
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
    # The depth model.halting would give each row at inference (every step runs in training).
    q = aux.steps.halt_logits  # (S,B,2)
    if cfg.model.halting == "uncertainty":
        tau = jax.vmap(halting.row_entropy, in_axes=(0, None))(aux.steps.logits, valid)
        halt = tau < cfg.model.halt_tau  # (S,B)
    else:
        halt = jax.nn.sigmoid(q[..., 0] - q[..., 1]) > cfg.model.halt_threshold
        halt = halt & (cfg.model.halting == "learned")
    s = halt.shape[0]
    first = jnp.where(jnp.any(halt, 0), jnp.argmax(halt, 0) + 1, s)
    m["act/halt_steps"] = jnp.mean(first.astype(jnp.float32))
    if "deep_ce" in parts:
        m["train/deep_ce"] = parts["deep_ce"]
    present = cfg.model.routed_sites  # dense sublayers have no routing to report
    pools = {**dict.fromkeys((*QKV, ATTN), cfg.model.num_attn_experts),
             "ffn": cfg.model.num_ffn_experts}
    sites = {site: aux.steps.site(site) for site in present}
    for site, r in sites.items():
        vw = valid.reshape(1, *valid.shape, *([1] * (r.k.ndim - 3)))
        avg_k = metrics.masked_mean(r.k.astype(jnp.float32), vw)
        m[f"route/avg_k/{site}"] = avg_k
        m[f"route/active_frac/{site}"] = avg_k / pools[site]
        if r.overflow is not None:  # sparse dispatch: active pairs dropped for capacity
            m[f"route/overflow/{site}"] = jnp.sum(r.overflow).astype(jnp.float32)
    vt = valid.reshape(1, *valid.shape, 1, 1)
    if ATTN in present:  # latent heads: share of (valid token, step) pairs using each head
        m["experts/usage_attn"] = jnp.sum(aux.steps.attn.mask * valid[None, ..., None],
                                          axis=(0, 1, 2)) / jnp.maximum(jnp.sum(valid) * s, 1.0)
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


def pool_metrics(cfg: ModelConfig, pool: lifecycle.PoolState | None) -> dict:
    """Live experts: ``experts/num_experts[/<pool>]``, ``train/num_experts`` (over pools) and
    the live rows ``experts/live/<pool>`` (P,) of the expert dashboard."""
    m, total = {}, jnp.int32(0)
    for p in lifecycle.pools_of(cfg):
        live = (jnp.ones((lifecycle.pool_size(cfg, p),), bool) if pool is None
                else pool.live[p])
        m[f"experts/num_experts/{p}"] = jnp.sum(live, dtype=jnp.int32)
        m[f"experts/live/{p}"] = live.astype(jnp.float32)
        total = total + m[f"experts/num_experts/{p}"]
    if m:
        m["experts/num_experts"] = m["train/num_experts"] = total
    return m


def contract_metrics(m: dict, cfg: ModelConfig) -> dict:
    """The seed-002 names the dashboards read, from this family's own metrics:
    ``train/gating_loss`` (the SARS meta loss), ``train/avg_k`` (mean active experts per token
    over the routed sites), ``train/gating_acc``, ``train/surprise``, ``train/pi_score``.
    ``train/tau`` and ``train/num_experts`` are emitted where they are computed."""
    out = {"train/gating_loss": m["train/meta_loss"], "train/surprise": m["sars/surprise"],
           "train/pi_score": m["sars/pi_score"]}
    ks = [m[f"route/avg_k/{s}"] for s in cfg.routed_sites]
    if ks:
        out["train/avg_k"] = jnp.mean(jnp.stack(ks))
    if "sars/gating_acc" in m:  # SARS on: the per-token costs exist
        out["train/gating_acc"] = m["sars/gating_acc"]
    return out


def gradients(params: dict, extras: lifecycle.PoolState | None, batch: Batch,
              cfg: Config) -> StepOutput:
    """The family's role in the train step: summed main + meta gradient, finiteness, metrics,
    and the expert pool (if any) with this step's routing records."""
    g = compute_gradients(params, batch, cfg, None if extras is None else extras.live)
    m = step_metrics(cfg, batch, g.logits, g.aux, g.parts, g.sars_metrics, g.meta_loss, g.loss,
                     g.g_main, g.g_meta)
    m.update(pool_metrics(cfg.model, extras))
    m.update(contract_metrics(m, cfg.model))
    if extras is not None:
        valid = (batch["segment_ids"] > 0).astype(jnp.float32)
        extras = lifecycle.record(extras, lifecycle.step_records(g.aux, valid, cfg.model))
    return StepOutput(grads=jax.tree.map(jnp.add, g.g_main, g.g_meta),
                      losses_finite=jnp.isfinite(g.loss) & jnp.isfinite(g.meta_loss), metrics=m,
                      extras=extras)


def expert_rows(metrics: dict) -> tuple[dict, dict | None]:
    """Host side: the expert dashboard's rows {pool: (P,) usage} and live masks {pool: (P,)
    bool} (None without a pool) from the metrics."""
    usage, _ = usage_rows(metrics)
    live = {p: np.asarray(metrics[f"experts/live/{p}"]) > 0 for p in usage
            if f"experts/live/{p}" in metrics}
    return usage, live or None


@functools.partial(jax.jit, static_argnums=(4,), donate_argnums=(0, 1, 2, 3))
def _lifecycle_jit(params, opt_state, ema, pool, cfg):
    return lifecycle.lifecycle_update(params, opt_state, ema, pool, cfg)


def maintenance_due(cfg: ModelConfig, step: int) -> bool:
    """Whether ``maintain`` acts at ``step`` (every ``lifecycle_period`` steps, never at 0)."""
    return cfg.lifecycle_period > 0 and step > 0 and step % cfg.lifecycle_period == 0


def maintain(state: TrainState, cfg: ModelConfig, step: int, *,
             force: bool = False) -> tuple[TrainState, list[lifecycle.Event]]:
    """Host side: run the expert-pool maintenance when due (or ``force``); returns the new
    state (the old one is donated; its ``extras`` is the pool) and the events."""
    if state.extras is None or not (force or maintenance_due(cfg, step)):
        return state, []
    parts = (state.params, state.opt_state, state.ema, state.extras)
    shardings = jax.tree.map(lambda x: x.sharding, parts)
    *parts, p = _lifecycle_jit(*parts, cfg)
    # The train step is compiled for the state's shardings (expert axes split on a mesh):
    # keep them whatever layout the maintenance's compiler chose.
    params, opt_state, ema, pool = jax.device_put(tuple(parts), shardings)
    state = state._replace(params=params, opt_state=opt_state, ema=ema, extras=pool)
    return state, lifecycle.events_from(p, step)

