"""Training step of the SPL model family (seed 001): main loss on ``main``, M-SAPS on ``meta``.

One step = one forward + backward of the main loss (gradient isolation: routing parameters are
stop-gradient'ed inside the differentiated function, so the main loss trains only ``main``
leaves; the straight-through mask still passes gradient *upstream* into the hidden states), then
the M-SAPS losses (prototype, gate, adaptive L2) on their own parameters, the protection of the
proto gradient, and one partitioned optax update. ``prc_*`` leaves are ``meta`` (prototype
pathway, trained by the prototype loss through P_eff). A non-finite loss or gradient skips the
update and is counted; the EMA of token accuracy (protection temperature) lives in the state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tinyonn_jax import loss as task_loss
from tinyonn_jax.config import OptimizerConfig
from tinyonn_jax.families.spl import msaps as ms
from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.model import init_spl_params, spl_forward, spl_param_labels
from tinyonn_jax.nn.variables import MAIN, META
from tinyonn_jax.optim import build_chain, guarded_update, learning_rates

Batch = dict  # inputs, targets, weights, segment_ids, positions: all (B, T)


class SplTrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: optax.OptState
    skipped: jax.Array  # int32 scalar: updates skipped because of a non-finite loss/gradient
    ema_acc: jax.Array  # float32 scalar: EMA of the training token accuracy


def build_spl_optimizer(optim: OptimizerConfig | None = None,
                        meta_optim: OptimizerConfig | None = None) -> optax.GradientTransformation:
    """``optim`` chain on ``main`` leaves, ``meta_optim`` chain on ``meta`` leaves (incl. prc_*)."""
    chains = {MAIN: build_chain(optim or OptimizerConfig()),
              META: build_chain(meta_optim or OptimizerConfig())}
    return optax.partition(chains, spl_param_labels)


def init_spl_state(cfg: SplConfig, key: jax.Array,
                   optimizer: optax.GradientTransformation | None = None) -> SplTrainState:
    """Fresh parameters and optimizer state (default optimizer: ``build_spl_optimizer()``)."""
    params = init_spl_params(key, cfg)
    optimizer = optimizer or build_spl_optimizer()
    return SplTrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                         skipped=jnp.int32(0), ema_acc=jnp.float32(0.0))


def _masked_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    w = jnp.broadcast_to(w, x.shape)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def spl_gradients(params: dict, batch: Batch, ema_acc: jax.Array, cfg: SplConfig,
                  probes: dict | None = None):
    """(g_main, g_meta, protection, out): g_main = main loss (+ L2 on mu), g_meta = M-SAPS.

    out holds the main loss ``ce``, its gradient ``g_ce``, logits, aux and the M-SAPS ``info``.
    With zero ``probes`` (``spl.spl_zero_probes``) it also holds ``g_probes`` = dL/dM of every
    masked SPL output and aux holds the residuals (per-site, per-token analysis).
    """
    labels = spl_param_labels(params)

    def objective(p, pr):
        if cfg.isolate:
            p = jax.tree.map(lambda x, lab: jax.lax.stop_gradient(x) if lab == META else x,
                             p, labels)
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
    w = batch["weights"]
    probs = jax.nn.softmax(logits, -1)
    m = {
        "train/loss": out["ce"] + info["l2_loss"], "train/main_loss": out["ce"],
        "train/token_acc": _masked_mean(task_loss.token_correct(logits, batch["targets"]), w),
        "train/exact_acc": jnp.mean(task_loss.row_exact(logits, batch["targets"], w)),
        "train/tau": _masked_mean(-jnp.sum(probs * jnp.log(probs + 1e-30), -1), w),
        "train/meta_loss": cfg.w_proto * info["proto_loss"] + cfg.w_gate * info["gate_loss"],
        "train/proto_loss": info["proto_loss"], "train/gate_loss": info["gate_loss"],
        "train/l2_loss": info["l2_loss"], "train/l2_lambda": info["l2_lambda"],
        "train/grad_norm_main": optax.tree.norm(g_main),
        "train/grad_norm_meta": optax.tree.norm(g_meta), "train/tokens": aux["tokens"],
        "spl/temperature": info["temperature"],
    }
    tokens = jnp.maximum(aux["tokens"], 1.0)
    site_rates, n_all, n_good, n_bad, n_active, err, protos, prot_max = [], 0, 0, 0, 0, [], [], []
    for k in cfg.kinds:  # module kinds
        count = aux["stats"][k]["count"]  # (L_eff, N)
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


def spl_train_step(state: SplTrainState, batch: Batch, *, cfg: SplConfig,
                   optimizer: optax.GradientTransformation) -> tuple[SplTrainState, dict]:
    """Pure: forward, main backward, M-SAPS, protection, one update. Skips non-finite updates."""
    g_main, g_meta, prot, out = spl_gradients(state.params, batch, state.ema_acc, cfg)
    grads = ms.scale_proto_grads(jax.tree.map(jnp.add, g_main, g_meta), prot)
    info = out["info"]
    params, opt_state, ok = guarded_update(
        optimizer, grads, state.opt_state, state.params,
        jnp.isfinite(out["ce"]) & jnp.isfinite(info["proto_loss"])
        & jnp.isfinite(info["gate_loss"]))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    metrics = spl_metrics(cfg, batch, state.params, out, g_main, g_meta)
    ema = cfg.ema_decay * state.ema_acc + (1.0 - cfg.ema_decay) * metrics["train/token_acc"]
    new_state = SplTrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        ema_acc=keep(ema, state.ema_acc),
    )
    metrics["train/skipped"] = new_state.skipped
    metrics["train/update_ok"] = ok.astype(jnp.float32)
    metrics["train/ema_acc"] = new_state.ema_acc
    metrics.update(learning_rates(opt_state))
    return new_state, metrics


def make_spl_train_step(cfg: SplConfig, optimizer: optax.GradientTransformation, *,
                        donate: bool = True):
    """``jax.jit`` of ``spl_train_step`` with the state donated."""
    fn = lambda state, batch: spl_train_step(state, batch, cfg=cfg, optimizer=optimizer)  # noqa: E731
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
