"""The 1f2b1o train step of the DynONN family (seed 003): one forward, two backward passes, one
optimizer update, plus periodic expert-pool maintenance.

1. forward with zero probes on every gate's routing weights and sub-layer outputs;
2. main backward (``jax.vjp``): the main CE gradient of the computation (``main``) parameters
   and the probe cotangents, from which the per-expert surprise S follows exactly. Gate
   parameters are held constant here, but the main loss still reaches earlier computation
   parameters through the routing weights' dependence on the gate inputs (as in the original,
   whose main backward ran through the whole graph);
3. gate backward: ``lambda(PI) L_balance + (1 - lambda(PI)) L_smk (+ SDL)`` reaching only the
   gate (``meta``) parameters, recomputed from the stored gate inputs;
4. one partitioned optax update of the summed gradients (optionally with the main gradient of
   "bad" experts fused to zero). A non-finite loss or gradient skips the update and is counted.

``maintain`` applies ``tinyonn_jax.families.dynonn.lifecycle`` every ``lifecycle_period`` steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax.config import OptimizerConfig
from tinyonn_jax.families.dynonn import gating, lifecycle
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.model import EXPERT_WEIGHTS, SITES
from tinyonn_jax.nn.variables import MAIN, META, param_labels, select
from tinyonn_jax.optim import build_chain, guarded_update, learning_rates

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)


class MoeTrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: optax.OptState
    skipped: jax.Array  # int32: updates skipped because of a non-finite loss or gradient
    pool: lifecycle.PoolState


def build_moe_optimizer(params: dict, main: OptimizerConfig,
                        meta: OptimizerConfig) -> optax.GradientTransformation:
    """``main`` chain on the computation params, ``meta`` chain on the gates (optax.partition)."""
    return optax.partition({MAIN: build_chain(main), META: build_chain(meta)},
                           param_labels(params))


def init_moe_state(cfg: DynOnnConfig, optimizer: optax.GradientTransformation,
                   key: jax.Array) -> MoeTrainState:
    """Fresh parameters, optimizer state and expert pool."""
    k_params, k_pool = jax.random.split(key)
    params = dynonn.init_params(k_params, cfg)
    return MoeTrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                         skipped=jnp.int32(0), pool=lifecycle.init_pool(cfg, k_pool))


def _stop_meta(params: dict) -> dict:
    labels = param_labels(params)
    return jax.tree.map(lambda x, lab: jax.lax.stop_gradient(x) if lab == META else x,
                        params, labels)


def _masked_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    w = jnp.broadcast_to(w, x.shape)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def compute_moe_gradients(params: dict, live: dict, batch: Batch, cfg: DynOnnConfig):
    """Main and gate gradients (params-shaped) and everything the metrics need.

    Returns (g_main, g_gate, out) with out: loss, gating_loss, parts, logits, aux, surprise
    {site: (P,B,T,E)}, pi, lam, tau, s_mean.
    """
    b, t = batch["inputs"].shape

    def objective(p, probes):
        logits, aux = dynonn.moe_forward(_stop_meta(p), batch["inputs"], cfg,
                                       positions=batch["positions"],
                                       segment_ids=batch["segment_ids"], probes=probes,
                                       live=live)
        return task_loss.cross_entropy(logits, batch["targets"], batch["weights"]), (logits, aux)

    loss, vjp, (logits, aux) = jax.vjp(objective, params, dynonn.zero_probes(cfg, b, t),
                                       has_aux=True)
    g_main, g_probes = vjp(jnp.ones_like(loss))
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    surprise = {s: gating.token_surprise(g_probes, aux, s, cfg.surprise, n_tok) for s in SITES}
    s_mean = jnp.mean(jnp.stack([gating.routed_mean(surprise[s], aux[s]["mask"], valid[None])
                                 for s in SITES]))
    probs = jax.nn.softmax(logits, -1)
    tau = _masked_mean(-jnp.sum(probs * jnp.log(probs + 1e-30), -1), batch["weights"])
    pi = jax.lax.stop_gradient(gating.pi_score(loss, tau, s_mean, cfg.pi_alpha, cfg.pi_gamma))
    lam = gating.lambda_of_pi(pi, cfg.pi_threshold, cfg.pi_sensitivity)
    (gl, parts), g_gate = jax.value_and_grad(gating.gating_objective, has_aux=True)(
        params, aux, surprise, valid, live, lam, cfg)
    labels = param_labels(params)
    g_gate = select(g_gate, labels, META)
    fused = jnp.int32(0)
    if cfg.fuse:
        bad = {}
        for s in SITES:
            es, cnt = gating.expert_surprise(surprise[s], aux[s]["mask"], valid, cfg)
            bad[s] = gating.fuse_mask(es, cnt, cfg.fuse_sigma)
        g_main = lifecycle.map_expert_slices(g_main, bad, lambda s, n, x: jnp.zeros_like(x),
                                             names=EXPERT_WEIGHTS)
        fused = sum(jnp.sum(m, dtype=jnp.int32) for m in bad.values())
    out = dict(loss=loss, gating_loss=gl, parts=parts, logits=logits, aux=aux,
               surprise=surprise, pi=pi, lam=lam, tau=tau, s_mean=s_mean, fused=fused)
    return select(g_main, labels, MAIN), g_gate, out


def moe_metrics(cfg: DynOnnConfig, batch: Batch, out: dict, pool: lifecycle.PoolState) -> dict:
    """Flat metrics dict of scalars, plus for the expert dashboard ``experts/usage_<site>`` (E,)
    (routed share of tokens, mean over layers), ``experts/usage_by_layer/<site>`` and
    ``experts/live/<site>`` (G, E); ``expert_rows`` splits the latter per gate on the host."""
    w = batch["weights"]
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    parts, aux = out["parts"], out["aux"]
    m = {
        "train/main_loss": out["loss"],
        "train/token_acc": _masked_mean(task_loss.token_correct(out["logits"],
                                                                batch["targets"]), w),
        "train/exact_acc": jnp.mean(task_loss.row_exact(out["logits"], batch["targets"], w)),
        "train/gating_loss": out["gating_loss"], "train/tau": out["tau"],
        "gate/loss_balance": parts["loss_balance"], "gate/loss_smk": parts["loss_smk"],
        "gate/sdl": parts["sdl"], "gate/sparsity": parts["sparsity"],
        "gate/lambda": out["lam"], "gate/gating_acc": parts["gating_acc"],
        "sars/pi_score": out["pi"], "sars/surprise": out["s_mean"],
        "sars/fused_experts": out["fused"], "train/tokens": jnp.sum(valid),
        "experts/num_experts": lifecycle.num_live(pool),
    }
    passes_per_group = 1 if cfg.structure == "stack" else cfg.num_layers
    for s in SITES:
        r = aux[s]
        m[f"route/avg_k/{s}"] = _masked_mean(r["k"].astype(jnp.float32), valid[None])
        m[f"route/homeless/{s}"] = _masked_mean(r["homeless"].astype(jnp.float32), valid[None])
        m[f"experts/num_experts/{s}"] = jnp.sum(pool.live[s], dtype=jnp.int32)
        counts = dynonn.per_group(jnp.sum(r["mask"] * valid[None, ..., None], axis=(1, 2)), cfg)
        usage = counts / jnp.maximum(jnp.sum(valid) * passes_per_group, 1.0)  # (G, E)
        m[f"experts/usage_{s}"] = jnp.mean(usage, axis=0)
        m[f"experts/usage_by_layer/{s}"] = usage
        m[f"experts/live/{s}"] = pool.live[s].astype(jnp.float32)
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


def moe_train_step(state: MoeTrainState, batch: Batch, *, cfg: DynOnnConfig,
                   optimizer: optax.GradientTransformation) -> tuple[MoeTrainState, dict]:
    """Pure 1f2b1o step. Routing records enter the pool only when the update is applied."""
    g_main, g_gate, out = compute_moe_gradients(state.params, state.pool.live, batch, cfg)
    grads = jax.tree.map(jnp.add, g_main, g_gate)
    params, opt_state, ok = guarded_update(
        optimizer, grads, state.opt_state, state.params,
        jnp.isfinite(out["loss"]) & jnp.isfinite(out["gating_loss"]))
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    pool = lifecycle.record(state.pool, lifecycle.step_records(out["aux"], valid, cfg))
    new_state = MoeTrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        pool=_keep_pool(ok, pool, state.pool))
    metrics = moe_metrics(cfg, batch, out, new_state.pool)
    metrics["train/grad_norm_main"] = optax.tree.norm(g_main)
    metrics["train/grad_norm_gate"] = optax.tree.norm(g_gate)
    metrics["train/skipped"] = new_state.skipped
    metrics["train/update_ok"] = ok.astype(jnp.float32)
    metrics.update(learning_rates(opt_state))
    return new_state, metrics


def _keep_pool(ok: jax.Array, new: lifecycle.PoolState,
               old: lifecycle.PoolState) -> lifecycle.PoolState:
    # The PRNG key is not touched by a step (and typed keys do not go through jnp.where).
    strip = lambda p: p._replace(key=jnp.int32(0))  # noqa: E731
    kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), strip(new), strip(old))
    return kept._replace(key=old.key)


def make_moe_train_step(cfg: DynOnnConfig, optimizer: optax.GradientTransformation, *,
                        donate: bool = True):
    """``jax.jit`` of ``moe_train_step`` with the state donated."""
    fn = functools.partial(moe_train_step, cfg=cfg, optimizer=optimizer)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0, 1, 2))
def _lifecycle_jit(params, opt_state, pool, cfg):
    return lifecycle.lifecycle_update(params, opt_state, pool, cfg)


def maintenance_due(cfg: DynOnnConfig, step: int) -> bool:
    """Whether ``maintain`` acts at ``step`` (every ``lifecycle_period`` steps, never at 0)."""
    return cfg.lifecycle_period > 0 and step > 0 and step % cfg.lifecycle_period == 0


def maintain(state: MoeTrainState, cfg: DynOnnConfig, step: int, *,
             force: bool = False) -> tuple[MoeTrainState, list[lifecycle.Event]]:
    """Host side: run the expert-pool maintenance when due (or ``force``); returns the new
    state (the old one is donated) and the events [(step, kind, expert_id, site)]."""
    if not (force or maintenance_due(cfg, step)):
        return state, []
    params, opt_state, pool, p = _lifecycle_jit(state.params, state.opt_state, state.pool, cfg)
    state = state._replace(params=params, opt_state=opt_state, pool=pool)
    return state, lifecycle.events_from(p, step)


def moe_logits(params: dict, pool: lifecycle.PoolState, tokens: jax.Array, cfg: DynOnnConfig, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Evaluation forward: live experts of the pool, evaluation-time fallback. -> (B,T,V)."""
    return dynonn.moe_forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                            live=pool.live, training=False)[0]
