"""The 1f2b1o step of the DynONN family (seed 003): one forward, two backward passes, one
optimizer update (``train_state.apply_update``), plus periodic expert-pool maintenance.

1. forward with zero probes on every gate's routing weights, sub-layer outputs and (DynSMHA
   ``head_outputs`` with the output-grad surprise) head outputs;
2. main backward (``jax.vjp``): the main CE gradient of the computation (``main``) parameters
   and the probe cotangents, from which the per-expert surprise S follows exactly. Gate
   parameters are held constant here, but the main loss still reaches earlier computation
   parameters through the routing weights' dependence on the gate inputs (as in the original,
   whose main backward ran through the whole graph);
3. gate backward: the gate loss of ``cfg.gating_loss`` (``lambda(PI) L_balance + (1 -
   lambda(PI)) L_smk`` or the seed-002 ``w_ce CE + w_kl KL``, plus SDL and sparsity) reaching
   only the gate (``meta``) parameters, recomputed from the stored gate inputs;
4. one partitioned optax update of the summed gradients (with ``cfg.fuse``, the main gradient
   of "bad" experts fused to zero: ``gating.fuse_mask``). A non-finite loss or gradient skips
   the update and is counted.

The family's extra train state is the expert pool (``lifecycle.PoolState``): this step's routing
records enter it only when the update is applied. ``maintain`` applies
``tinyonn_jax.families.dynonn.lifecycle`` every ``lifecycle_period`` steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax import metrics
from tinyonn_jax.config import Config
from tinyonn_jax.families.dynonn import gating, lifecycle
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.model import EXPERT_WEIGHTS, SITES
from tinyonn_jax.families.dynonn.modules import param_labels
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import MAIN, META, select
from tinyonn_jax.train_state import StepOutput, TrainState

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)



def compute_gradients(params: dict, live: dict, batch: Batch, cfg: DynOnnConfig):
    """Main and gate gradients (params-shaped) and everything the metrics need.

    Returns (g_main, g_gate, out) with out: loss, gating_loss, parts, logits, aux
    (``residuals.Aux``), surprise {site: (P,B,T,E)}, pi, lam, tau, s_mean, fused (the number of
    fused experts) and fused_mask {site: (G,E) bool} (all False unless ``cfg.fuse``).
    """
    b, t = batch["inputs"].shape

    def objective(p, probes):
        p = variables.stop_group(p, param_labels(cfg), META)
        logits, aux = dynonn.forward(p, batch["inputs"], cfg, positions=batch["positions"],
                                     segment_ids=batch["segment_ids"], probes=probes, live=live)
        return task_loss.cross_entropy(logits, batch["targets"], batch["weights"]), (logits, aux)

    loss, vjp, (logits, aux) = jax.vjp(objective, params, dynonn.zero_probes(cfg, b, t),
                                       has_aux=True)
    g_main, g_probes = vjp(jnp.ones_like(loss))
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    surprise = {s: gating.token_surprise(g_probes, aux, s, cfg.surprise, n_tok, cfg.smha_mode)
                for s in SITES}
    s_mean = jnp.mean(jnp.stack([gating.routed_mean(surprise[s], aux.site(s).mask, valid[None])
                                 for s in SITES]))
    tau = metrics.output_entropy(logits, batch["weights"])
    pi = jax.lax.stop_gradient(metrics.pi_score(loss, tau, s_mean, cfg.pi_alpha, cfg.pi_gamma))
    lam = gating.lambda_of_pi(pi, cfg.pi_threshold, cfg.pi_sensitivity)
    (gl, parts), g_gate = jax.value_and_grad(gating.gating_objective, has_aux=True)(
        params, aux, surprise, valid, live, lam, cfg)
    labels = param_labels(cfg)
    g_gate = select(g_gate, labels, META)
    bad = {s: jnp.zeros((cfg.groups, cfg.max_experts), bool) for s in SITES}
    if cfg.fuse:
        for s in SITES:
            es, cnt = gating.expert_surprise(surprise[s], aux.site(s).mask, valid, cfg)
            bad[s] = gating.fuse_mask(es, cnt, cfg.fuse_sigma)
        g_main = lifecycle.map_expert_slices(g_main, bad, lambda s, n, x: jnp.zeros_like(x),
                                             cfg, names=EXPERT_WEIGHTS)
    fused = sum(jnp.sum(m, dtype=jnp.int32) for m in bad.values())
    out = dict(loss=loss, gating_loss=gl, parts=parts, logits=logits, aux=aux,
               surprise=surprise, pi=pi, lam=lam, tau=tau, s_mean=s_mean, fused=fused,
               fused_mask=bad)
    return select(g_main, labels, MAIN), g_gate, out


def step_metrics(cfg: DynOnnConfig, batch: Batch, out: dict, pool: lifecycle.PoolState) -> dict:
    """Flat metrics dict of scalars, plus for the expert dashboard ``experts/usage_<site>`` (E,)
    (routed share of tokens, mean over layers), ``experts/usage_by_layer/<site>``,
    ``experts/live/<site>`` and ``experts/fused/<site>`` (G, E); ``expert_rows`` splits the
    usage and live rows per gate on the host.

    Seed 002's names (``metrics.SEED002_METRICS``): ``train/main_loss``, ``train/main_acc``
    (token accuracy), ``train/gating_loss`` (the gate loss of ``cfg.gating_loss`` that was
    differentiated, per site mean), ``train/sparsity_loss`` (the sparsity term, mean share of
    live experts a token activates, before its weight ``w_sparsity``), ``train/avg_k`` (mean
    routed experts per valid token, over both sites and all passes), ``train/gating_acc``,
    ``train/surprise``, ``train/pi_score``, ``train/tau``, ``train/num_experts`` (live experts
    over all gates) and ``train/lambda`` (lambda(PI); the mixing weight of ``pi_adaptive``,
    reported under ``surprise_min`` too). The ``gate/*``, ``sars/*``, ``route/*`` and
    ``experts/*`` names are kept beside them.
    """
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    parts, aux = out["parts"], out["aux"]
    task = metrics.task_metrics(out["logits"], batch)
    num_live = lifecycle.num_live(pool)
    m = {
        **task,
        "train/main_loss": out["loss"],
        "train/gating_loss": out["gating_loss"], "train/tau": out["tau"],
        "train/sparsity_loss": parts["sparsity"], "train/gating_acc": parts["gating_acc"],
        "train/surprise": out["s_mean"], "train/pi_score": out["pi"],
        "train/num_experts": num_live, "train/lambda": out["lam"],
        "gate/loss_balance": parts["loss_balance"], "gate/loss_smk": parts["loss_smk"],
        "gate/loss_ce": parts["loss_ce"], "gate/loss_kl": parts["loss_kl"],
        "gate/sdl": parts["sdl"], "gate/sparsity": parts["sparsity"],
        "gate/lambda": out["lam"], "gate/gating_acc": parts["gating_acc"],
        "sars/pi_score": out["pi"], "sars/surprise": out["s_mean"],
        "sars/fused_experts": out["fused"],
        "experts/num_experts": num_live,
    }
    passes_per_group = 1 if cfg.structure == "stack" else cfg.num_layers
    k_sum = 0.0
    for s in SITES:
        r = aux.site(s)
        m[f"route/avg_k/{s}"] = metrics.masked_mean(r.k.astype(jnp.float32), valid[None])
        k_sum = k_sum + m[f"route/avg_k/{s}"]
        m[f"route/homeless/{s}"] = metrics.masked_mean(r.homeless.astype(jnp.float32),
                                                       valid[None])
        m[f"experts/num_experts/{s}"] = jnp.sum(pool.live[s], dtype=jnp.int32)
        counts = dynonn.per_group(jnp.sum(r.mask * valid[None, ..., None], axis=(1, 2)), cfg)
        usage = counts / jnp.maximum(jnp.sum(valid) * passes_per_group, 1.0)  # (G, E)
        m[f"experts/usage_{s}"] = jnp.mean(usage, axis=0)
        m[f"experts/usage_by_layer/{s}"] = usage
        m[f"experts/live/{s}"] = pool.live[s].astype(jnp.float32)
        m[f"experts/fused/{s}"] = out["fused_mask"][s].astype(jnp.float32)
    m["train/avg_k"] = k_sum / len(SITES)  # every site sees the same valid tokens and passes
    return m


def expert_rows(metrics: dict) -> tuple[dict, dict]:
    """Host side: per-gate usage and live rows {"<site>_<g>": (E,) numpy} from the metrics,
    named like the lifecycle events (for ``observe.dashboards.ExpertLog.record``)."""
    usage, live = {}, {}
    for s in SITES:
        u = np.asarray(metrics[f"experts/usage_by_layer/{s}"])
        lv = np.asarray(metrics[f"experts/live/{s}"]) > 0
        for g in range(u.shape[0]):
            usage[lifecycle.site_name(s, g)], live[lifecycle.site_name(s, g)] = u[g], lv[g]
    return usage, live


def gradients(params: dict, pool: lifecycle.PoolState, batch: Batch,
              cfg: Config) -> StepOutput:
    """The family's role in the train step: main + gate gradients, finiteness, metrics, and the
    pool with this step's routing records."""
    mc = cfg.model
    g_main, g_gate, out = compute_gradients(params, pool.live, batch, mc)
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    m = step_metrics(mc, batch, out, pool)
    m["train/grad_norm_main"] = optax.tree.norm(g_main)
    m["train/grad_norm_gate"] = optax.tree.norm(g_gate)
    return StepOutput(
        grads=jax.tree.map(jnp.add, g_main, g_gate),
        losses_finite=jnp.isfinite(out["loss"]) & jnp.isfinite(out["gating_loss"]),
        metrics=m,
        extras=lifecycle.record(pool, lifecycle.step_records(out["aux"], valid, mc)))


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0, 1, 2))
def _lifecycle_jit(params, opt_state, pool, cfg):
    return lifecycle.lifecycle_update(params, opt_state, pool, cfg)


def maintenance_due(cfg: DynOnnConfig, step: int) -> bool:
    """Whether ``maintain`` acts at ``step`` (every ``lifecycle_period`` steps, never at 0)."""
    return cfg.lifecycle_period > 0 and step > 0 and step % cfg.lifecycle_period == 0


def maintain(state: TrainState, cfg: DynOnnConfig, step: int, *,
             force: bool = False) -> tuple[TrainState, list[lifecycle.Event]]:
    """Host side: run the expert-pool maintenance when due (or ``force``); returns the new
    state (the old one is donated; its ``extras`` is the pool) and the events."""
    if not (force or maintenance_due(cfg, step)):
        return state, []
    params, opt_state, pool, p = _lifecycle_jit(state.params, state.opt_state, state.extras,
                                                cfg)
    state = state._replace(params=params, opt_state=opt_state, extras=pool)
    return state, lifecycle.events_from(p, step)


def eval_logits(params: dict, pool: lifecycle.PoolState, tokens: jax.Array, cfg: DynOnnConfig,
                *, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None) -> jax.Array:
    """Evaluation forward: live experts of the pool, evaluation-time fallback. -> (B,T,V)."""
    return dynonn.forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                          live=pool.live, training=False)[0]
