"""TrainState and the pure ``train_step(state, batch) -> (state, metrics)``.

One step = one forward with zero probes on every expert call site, one backward (``jax.vjp``)
giving the main gradient and every site's output cotangent, the closed-form SARS statistics, the
meta loss on the routing parameters, and one partitioned optax update (main chain on ``main``,
meta chain on ``meta``). A non-finite loss, gradient, new parameter or new optimizer state
skips the update (``optim.guarded_update``) and is counted.

Dense baselines (``model.attn_kind="mha"`` / ``model.ffn_kind="swiglu"``) have fewer call sites
or none; SARS covers the sites that exist (``ModelConfig.routed_sites``), off without any. Options
of TRM: deep supervision (``train.deep_supervision``) and an EMA of the parameters
(``train.ema_decay``), kept in the state for evaluation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax import ema as ema_lib
from tinyonn_jax import loss as task_loss
from tinyonn_jax import optim
from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.sars import engine
from tinyonn_jax.nn.variables import META, param_labels

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: optax.OptState
    skipped: jax.Array  # int32 scalar: updates skipped because of a non-finite loss/gradient
    ema: Any = None  # EMA of params (train.ema_decay > 0), else None (no leaves to checkpoint)


def init_state(cfg: Config, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    params = tr.init_params(key, cfg.model)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      skipped=jnp.int32(0), ema=ema_lib.init_ema(params, cfg.train.ema_decay))


def _stop_group(params: dict, labels: dict, group: str) -> dict:
    return jax.tree.map(lambda x, lab: jax.lax.stop_gradient(x) if lab == group else x,
                        params, labels)


def main_objective(params: dict, probes: dict | None, batch: Batch, cfg: Config):
    """CE + w_act * ACT loss. Returns (loss, (logits, aux, parts)).

    The CE is the final step's, or with ``train.deep_supervision`` the weighted mean of every
    refinement step's; ``parts['ce']`` is always the final step's (comparable across runs).
    """
    logits, aux = tr.forward(params, batch["inputs"], cfg.model, positions=batch["positions"],
                             segment_ids=batch["segment_ids"], probes=probes)
    ce = task_loss.cross_entropy(logits, batch["targets"], batch["weights"])
    act = task_loss.act_loss(aux["halt_logits"], aux["logits"], batch["targets"],
                             batch["weights"])
    parts = {"ce": ce, "act": act}
    task = ce
    if cfg.train.deep_supervision:
        task = task_loss.deep_supervision_loss(aux["logits"], batch["targets"], batch["weights"],
                                               cfg.train.deep_supervision)
        parts["deep_ce"] = task
    return task + cfg.sars.w_act * act, (logits, aux, parts)


class Gradients(NamedTuple):
    """Everything one forward and its backward passes produce."""

    loss: jax.Array  # main objective (CE [+ deep supervision] + w_act * ACT)
    g_main: dict  # params-shaped gradient of the main objective
    g_meta: dict  # params-shaped gradient of w_meta * meta loss (routing leaves only)
    logits: jax.Array  # (B, T, V) final refinement step
    aux: dict  # forward residuals (see transformer.forward)
    parts: dict  # loss components
    sars_metrics: dict  # scalar SARS summaries ({} when SARS is off)
    g_probes: dict | None  # dL/dA of every expert call site, (S, ...) per site, and the
    # SARS statistics of the sinks (recursion.FFN_STATS / ATTN_STATS) when the probes have them
    meta_loss: jax.Array


def compute_gradients(params: dict, batch: Batch, cfg: Config) -> Gradients:
    """Main and meta gradients (each a full params-shaped tree) plus everything to log.

    With ``sars.isolate`` the main loss reaches only ``main`` params and the meta loss only
    ``meta`` params; otherwise the main loss also trains routing params (the original DynTRM).
    """
    labels = param_labels(params)

    def isolate_main(p):  # stop_gradient inside the differentiated function
        return _stop_group(p, labels, META) if cfg.sars.isolate else p

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


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def _masked_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    w = jnp.broadcast_to(w, x.shape)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def step_metrics(cfg: Config, batch: Batch, logits, aux, parts, sars_metrics, meta_loss, loss,
                 g_main, g_meta) -> dict:
    """Flat dict of scalars (and per-expert usage vectors under 'experts/')."""
    w = batch["weights"]
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    probs = jax.nn.softmax(logits, -1)
    tau = _masked_mean(-jnp.sum(probs * jnp.log(probs + 1e-30), -1), w)
    m = {
        "train/loss": loss, "train/main_loss": parts["ce"], "train/act_loss": parts["act"],
        "train/token_acc": _masked_mean(task_loss.token_correct(logits, batch["targets"]), w),
        "train/exact_acc": jnp.mean(task_loss.row_exact(logits, batch["targets"], w)),
        "train/tau": tau, "train/meta_loss": meta_loss,
        "train/grad_norm_main": _global_norm(g_main), "train/grad_norm_meta": _global_norm(g_meta),
        "train/tokens": jnp.sum(valid),
    }
    q = aux["halt_logits"]
    halt = jax.nn.sigmoid(q[..., 0] - q[..., 1]) > cfg.model.halt_threshold  # (S,B)
    s = halt.shape[0]
    first = jnp.where(jnp.any(halt, 0), jnp.argmax(halt, 0) + 1, s)
    m["act/halt_steps"] = jnp.mean(first.astype(jnp.float32))
    if "deep_ce" in parts:
        m["train/deep_ce"] = parts["deep_ce"]
    present = cfg.model.routed_sites  # dense sublayers have no routing to report
    pools = {"q": cfg.model.num_attn_experts, "k": cfg.model.num_attn_experts,
             "v": cfg.model.num_attn_experts, "ffn": cfg.model.num_ffn_experts}
    sites = {site: aux[f"k_{site}"] for site in present}
    for site, k in sites.items():
        vw = valid.reshape(1, *valid.shape, *([1] * (k.ndim - 3)))
        avg_k = _masked_mean(k.astype(jnp.float32), vw)
        m[f"route/avg_k/{site}"] = avg_k
        m[f"route/active_frac/{site}"] = avg_k / pools[site]
        if f"overflow_{site}" in aux:  # sparse dispatch: active pairs dropped for capacity
            m[f"route/overflow/{site}"] = jnp.sum(aux[f"overflow_{site}"]).astype(jnp.float32)
    vt = valid.reshape(1, *valid.shape, 1, 1)
    if "q" in present:
        m["experts/usage_attn"] = jnp.mean(jnp.stack(
            [jnp.sum(aux[f"mask_{c}"] * vt, axis=(0, 1, 2, 3)) for c in "qkv"]),
            0) / jnp.maximum(jnp.sum(valid) * s * cfg.model.num_heads, 1.0)
    if "ffn" in present:
        m["experts/usage_ffn"] = jnp.sum(aux["mask_ffn"] * valid[None, ..., None],
                                         axis=(0, 1, 2)) / jnp.maximum(jnp.sum(valid) * s, 1.0)
    m.update(sars_metrics)
    surprise_s = sars_metrics.get("sars/C_mean", jnp.float32(0.0))
    m["sars/surprise"] = surprise_s
    sc = cfg.sars
    m["sars/pi_score"] = jnp.exp(-sc.pi_alpha * ((1 - sc.pi_gamma) * parts["ce"] / (tau + 1e-9)
                                                 + sc.pi_gamma * surprise_s))
    return m


def train_step(state: TrainState, batch: Batch, *, cfg: Config,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """Pure: forward, both backward passes, both updates. Skips non-finite updates."""
    loss, g_main, g_meta, logits, aux, parts, sars_metrics, _, meta_loss = compute_gradients(
        state.params, batch, cfg)
    grads = jax.tree.map(jnp.add, g_main, g_meta)
    params, opt_state, ok = optim.guarded_update(optimizer, grads, state.opt_state, state.params,
                                                 jnp.isfinite(loss) & jnp.isfinite(meta_loss))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    ema = state.ema
    if ema is not None:  # a skipped update leaves params, hence the average, unchanged
        ema = jax.tree.map(keep, ema_lib.update_ema(ema, params, cfg.train.ema_decay), ema)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        ema=ema,
    )
    metrics = step_metrics(cfg, batch, logits, aux, parts, sars_metrics, meta_loss, loss, g_main,
                           g_meta)
    metrics["train/skipped"] = new_state.skipped
    metrics["train/update_ok"] = ok.astype(jnp.float32)
    metrics.update(optim.learning_rates(opt_state))
    return new_state, metrics


def make_train_step(cfg: Config, optimizer: optax.GradientTransformation, *,
                    in_shardings=None, out_shardings=None, donate: bool = True):
    """``jax.jit`` of ``train_step`` with the state donated (and shardings when given)."""
    fn = lambda state, batch: train_step(state, batch, cfg=cfg, optimizer=optimizer)  # noqa: E731
    kwargs = {}
    if in_shardings is not None:
        kwargs.update(in_shardings=in_shardings, out_shardings=out_shardings)
    return jax.jit(fn, donate_argnums=(0,) if donate else (), **kwargs)
