"""Flax NNX modules of the DynONN family (seeds 002-004): they own the parameters and the model's
structure.

``DynOnnModel(cfg, key)`` holds the embedding ``embed`` (V, D), the layer stack ``layers`` (a
``DynOnnLayer`` whose every leaf is stacked on a leading group axis G, built by
``stack_layers``), the final ``final_ln`` and the LM head ``lm_head`` (D, V). A layer has the
LayerNorms ``ln1``, ``ln2`` and two gated expert banks over E = ``max_experts`` slots: ``attn``
(``DynSmha``: wq, wk, wv (E, D, Hw), wo (E, Hw, D)) and ``ffn`` (``DynMoe``: w1 (E, D, F), w2
(E, F, D)), each a ``GamoeGate`` (proto_sim (D, E), gates (E,), gate_log_scale ()) plus its bank.

Groups come from the parameter types: the gate leaves are ``MetaParam``; expert weights,
embedding, norms and LM head are ``MainParam``. Every leaf stacked over experts declares its
expert axis where it is made; in the stacked tree that is axis 1 (E) of wq, wk, wv, wo, w1, w2
and gates, and axis 2 of proto_sim (G, D, E).

The numeric core is pure: ``model.forward``, the gating losses, the lifecycle and the train
step take ``variables.pure_params(model)``; ``init_params(key, cfg)`` is exactly that dict for a
fresh model, and ``param_labels(cfg)`` / ``expert_axes(cfg)`` give trees of the same structure,
read from the types and declared expert axes of a shape-only model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dynonn.model import forward
from tinyonn_jax.nn import gamoe, variables
from tinyonn_jax.nn.norm import LayerNorm


def _normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)


def _orthogonal(key: jax.Array, n: int, dim: int, cols: int) -> jax.Array:
    """n independent (dim, cols) matrices with orthonormal columns (rows if cols > dim)."""
    a = jax.random.normal(key, (n, max(dim, cols), min(dim, cols)), jnp.float32)
    q, r = jnp.linalg.qr(a)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]  # uniform (Haar)
    return q if dim >= cols else jnp.swapaxes(q, -1, -2)


class GamoeGate(nnx.Module):
    """A GAMoE gate over E expert slots (``tinyonn_jax.nn.gamoe``), all ``meta``: prototypes
    ``proto_sim`` (D, E) (expert axis 1), thresholds ``gates`` (E,) = 0 (expert axis 0) and the
    logit scale ``gate_log_scale`` () = log(1 / init_t)."""

    def __init__(self, proto_sim: jax.Array, init_t: float):
        p = gamoe.gate_params(proto_sim, init_t)
        self.proto_sim = variables.meta(p["proto_sim"], expert_axis=1)
        self.gates = variables.meta(p["gates"], expert_axis=0)
        self.gate_log_scale = variables.meta(p["gate_log_scale"])


class DynSmha(GamoeGate):
    """DynSMHA: the gate's leaves plus the attention experts ``wq``, ``wk``, ``wv`` (E, D, Hw)
    and ``wo`` (E, Hw, D), all ``main`` with expert axis 0 (the same leaves serve both
    ``smha_mode``s: one head expert's projections, or the banks mixed per token). A subclass,
    not a member, keeps the gate's leaves next to the bank's (one flat dict per site)."""

    def __init__(self, proto_sim: jax.Array, init_t: float, *, wq: jax.Array, wk: jax.Array,
                 wv: jax.Array, wo: jax.Array):
        super().__init__(proto_sim, init_t)
        self.wq = variables.main(wq, expert_axis=0)
        self.wk = variables.main(wk, expert_axis=0)
        self.wv = variables.main(wv, expert_axis=0)
        self.wo = variables.main(wo, expert_axis=0)


class DynMoe(GamoeGate):
    """DynMoE: the gate's leaves plus the FFN experts ``w1`` (E, D, F) and ``w2`` (E, F, D),
    ``main`` with expert axis 0."""

    def __init__(self, proto_sim: jax.Array, init_t: float, *, w1: jax.Array, w2: jax.Array):
        super().__init__(proto_sim, init_t)
        self.w1 = variables.main(w1, expert_axis=0)
        self.w2 = variables.main(w2, expert_axis=0)


class DynOnnLayer(nnx.Module):
    """One layer: ``ln1``, ``attn`` (``DynSmha``), ``ln2``, ``ffn`` (``DynMoe``).

    All six banks come from one normal draw (scaled by 1/sqrt(fan_in)) and both prototype
    matrices from one batched QR, which keeps the traced graph (and the compile of every
    re-initialisation) small.
    """

    def __init__(self, cfg: DynOnnConfig, key: jax.Array):
        k_w, k_p = jax.random.split(key)
        e, d, hw, f = cfg.max_experts, cfg.hidden, cfg.attn_width, cfg.ffn_hidden
        shapes = {"wq": ((e, d, hw), d), "wk": ((e, d, hw), d), "wv": ((e, d, hw), d),
                  "wo": ((e, hw, d), hw), "w1": ((e, d, f), d), "w2": ((e, f, d), f)}
        sizes = [int(np.prod(sh)) for sh, _ in shapes.values()]
        flat = jax.random.normal(k_w, (sum(sizes),), jnp.float32)
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        banks = {name: part.reshape(sh) / np.sqrt(fan_in)
                 for (name, (sh, fan_in)), part in zip(shapes.items(), parts, strict=True)}
        protos = _orthogonal(k_p, 2, d, e)
        self.ln1 = LayerNorm(d)
        self.attn = DynSmha(protos[0], cfg.gate_init_t, wq=banks["wq"], wk=banks["wk"],
                            wv=banks["wv"], wo=banks["wo"])
        self.ln2 = LayerNorm(d)
        self.ffn = DynMoe(protos[1], cfg.gate_init_t, w1=banks["w1"], w2=banks["w2"])


def stack_layers(cfg: DynOnnConfig, key: jax.Array) -> DynOnnLayer:
    """The layer stack: G = ``cfg.groups`` ``DynOnnLayer``s (one per key of ``split(key, G)``)
    as one module whose every leaf has a leading group axis G.

    ``nnx.vmap`` inserts G in front of each declared expert axis, so a layer's declaration
    (e.g. wq (E, D, Hw) axis 0) names the same axis of the stacked leaf (G, E, D, Hw) axis 1.
    """
    make = nnx.vmap(lambda k: DynOnnLayer(cfg, k),
                    transform_metadata={nnx.PARTITION_NAME: None})
    return make(jax.random.split(key, cfg.groups))


class DynOnnModel(nnx.Module):
    """The whole model: ``embed`` (V, D), ``layers`` (``stack_layers``), ``final_ln`` and
    ``lm_head`` (D, V).

    Calling it runs the evaluation forward (``model.forward`` with ``training=False``) on its
    ``pure_params``: tokens (B, T) -> logits (B, T, V) float32.
    """

    def __init__(self, cfg: DynOnnConfig, key: jax.Array):
        self.cfg = cfg
        k_emb, k_layers, k_head = jax.random.split(key, 3)
        self.embed = variables.main(
            cfg.init_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden)))
        self.layers = stack_layers(cfg, k_layers)
        self.final_ln = LayerNorm(cfg.hidden)
        self.lm_head = variables.main(_normal(k_head, (cfg.hidden, cfg.vocab_size), cfg.hidden))

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, live: dict | None = None) -> jax.Array:
        """tokens (B, T) -> logits (B, T, V); ``live`` {site: (G, E) bool} defaults to
        ``model.init_live(cfg)``. Homeless tokens take the evaluation-time fallback."""
        return forward(variables.pure_params(self), tokens, self.cfg, positions=positions,
                       segment_ids=segment_ids, live=live, training=False)[0]


def init_params(key: jax.Array, cfg: DynOnnConfig) -> dict:
    """The parameters of a fresh ``DynOnnModel(cfg, key)`` as a nested dict of float32 arrays."""
    return variables.pure_params(DynOnnModel(cfg, key))


def init_layers(key: jax.Array, cfg: DynOnnConfig) -> dict:
    """Fresh ``stack_layers(cfg, key)`` parameters (params['layers'] layout): the source of
    re-initialised experts."""
    return variables.pure_params(stack_layers(cfg, key))


@functools.cache
def abstract_model(cfg: DynOnnConfig) -> DynOnnModel:
    """``DynOnnModel(cfg)`` with shapes only (nothing allocated), for types and metadata."""
    return variables.abstract(lambda: DynOnnModel(cfg, jax.random.key(0)))


@functools.cache
def param_labels(cfg: DynOnnConfig) -> dict:
    """``'main'`` / ``'meta'`` per parameter leaf, from the parameter types (shared: read only)."""
    return variables.labels(abstract_model(cfg))


@functools.cache
def expert_axes(cfg: DynOnnConfig) -> dict:
    """The declared expert axis per parameter leaf, -1 where none (shared: read only)."""
    return variables.expert_axes(abstract_model(cfg))
