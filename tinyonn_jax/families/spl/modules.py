"""Flax NNX modules of the SPL family (seed 001): they own the parameters and the model's structure.

``SplModel(cfg, key)`` holds the embedding ``embed`` (V, D), the block parameters ``layers`` (an
``SplBlock``, every leaf stacked over L_p parameter layers), the PRC transforms ``prc`` (one
``Prc`` per module kind, when ``cfg.num_prc``), the optional ``final_ln`` and the LM head
``lm_head`` (D, V). Groups come from the parameter types: ``mu_weight``, ``mu_bias``, embedding,
norms and LM head are ``MainParam``; ``proto_weight``, ``gate_param`` and every PRC leaf (seed
001 puts PRC in the prototype pathway) are ``MetaParam``. The per-neuron leaves of an SPL layer
declare their neuron axis N (axis 1, after L_p) as the expert axis.

The numeric core is pure: ``spl_forward``, M-SAPS and the train step take
``variables.pure_params(model)``; ``init_spl_params(key, cfg)`` is exactly that dict for a fresh
model, and ``param_labels(cfg)`` / ``expert_axes(cfg)`` give trees of the same structure, read
from the types and declared expert axes of a shape-only model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.model import spl_forward
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.norm import LayerNorm

_NEURON_AXIS = 1  # N of the stacked SPL leaves (L_p, N, ...): one neuron is one expert


class StackedLayerNorm(nnx.Module):
    """L LayerNorms: ``scale`` (L, D) = 1 and ``bias`` (L, D) = 0; applied by ``layer_norm``."""

    def __init__(self, num: int, dim: int):
        self.scale = variables.main(jnp.ones((num, dim), jnp.float32))
        self.bias = variables.main(jnp.zeros((num, dim), jnp.float32))


def _init_spl(key: jax.Array, d_in: int, d_out: int, init_std: float) -> dict[str, jax.Array]:
    """One SPL layer's arrays: mu_weight (N, in) fan-in scaled, mu_bias (N,) = 0, proto_weight
    (N, in) with std ``init_std``, gate_param (N, in) = 0 (cost 0: routing starts as cos > 0,
    about half of the neurons on)."""
    k_mu, k_p = jax.random.split(key)
    return {
        "mu_weight": jax.random.normal(k_mu, (d_out, d_in)) / np.sqrt(d_in),
        "mu_bias": jnp.zeros((d_out,), jnp.float32),
        "proto_weight": init_std * jax.random.normal(k_p, (d_out, d_in)),
        "gate_param": jnp.zeros((d_out, d_in), jnp.float32),
    }


class SplLayer(nnx.Module):
    """One SPL layer in -> N over L parameter layers (one per key of ``keys`` (L,)).

    ``mu_weight`` (L, N, in) and ``mu_bias`` (L, N) are ``main``; ``proto_weight`` (L, N, in) and
    ``gate_param`` (L, N, in) are ``meta``; all four declare N as their expert axis.
    """

    def __init__(self, keys: jax.Array, d_in: int, d_out: int, *, init_std: float = 0.02):
        p = jax.vmap(lambda k: _init_spl(k, d_in, d_out, init_std))(keys)
        self.mu_weight = variables.main(p["mu_weight"], expert_axis=_NEURON_AXIS)
        self.mu_bias = variables.main(p["mu_bias"], expert_axis=_NEURON_AXIS)
        self.proto_weight = variables.meta(p["proto_weight"], expert_axis=_NEURON_AXIS)
        self.gate_param = variables.meta(p["gate_param"], expert_axis=_NEURON_AXIS)


class Prc(nnx.Module):
    """n PRC transforms of one module kind, all ``meta``: ``prc_weight`` (n, in, in) fan-in
    scaled, LN ``prc_scale`` (n, in) = ``init_std`` and ``prc_bias`` (n, in) = 0.

    The LN scale starts at ``init_std`` so the residual term has the prototypes' own row scale
    instead of swamping them (an LN output row has norm sqrt(in)).
    """

    def __init__(self, key: jax.Array, n: int, d_in: int, *, init_std: float = 0.02):
        self.prc_weight = variables.meta(jax.random.normal(key, (n, d_in, d_in)) / np.sqrt(d_in))
        self.prc_scale = variables.meta(jnp.full((n, d_in), init_std, jnp.float32))
        self.prc_bias = variables.meta(jnp.zeros((n, d_in), jnp.float32))


class SplBlock(nnx.Module):
    """The block parameters over L_p parameter layers (one per key of ``keys`` (L_p,)):
    ``ln1`` and, with MoIE, ``ln2`` (``StackedLayerNorm``), and one ``SplLayer`` per module
    kind (attributes ``q``, ``k``, ``v``, ``o`` and, with MoIE, ``ffn1``, ``ffn2``)."""

    def __init__(self, cfg: SplConfig, keys: jax.Array):
        n = keys.shape[0]
        kind_keys = jax.vmap(lambda k: jax.random.split(k, len(cfg.kinds)))(keys)  # (L_p, kinds)
        self.ln1 = StackedLayerNorm(n, cfg.hidden)
        if cfg.use_moie:
            self.ln2 = StackedLayerNorm(n, cfg.hidden)
        for i, kind in enumerate(cfg.kinds):  # a handful of module kinds, named as in the tree
            setattr(self, kind, SplLayer(kind_keys[:, i], *cfg.dims(kind), init_std=cfg.init_std))


class SplModel(nnx.Module):
    """The whole model: ``embed`` (V, D), ``layers``, ``prc`` (kind -> ``Prc``, when
    ``cfg.num_prc``), ``final_ln`` (when ``cfg.final_norm``) and ``lm_head`` (D, V).

    Calling it runs ``spl_forward`` on its ``pure_params``: tokens (B, T) -> logits (B, T, V).
    """

    def __init__(self, cfg: SplConfig, key: jax.Array):
        self.cfg = cfg
        k_emb, k_layers, k_prc, k_head = jax.random.split(key, 4)
        self.embed = variables.main(
            cfg.init_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden)))
        self.layers = SplBlock(cfg, jax.random.split(k_layers, cfg.num_param_layers))
        self.lm_head = variables.main(
            jax.random.normal(k_head, (cfg.hidden, cfg.vocab_size)) / np.sqrt(cfg.hidden))
        if cfg.num_prc:
            ks = jax.random.split(k_prc, len(cfg.kinds))
            self.prc = nnx.Dict({
                kind: Prc(kk, cfg.num_prc, cfg.dims(kind)[0], init_std=cfg.init_std)
                for kind, kk in zip(cfg.kinds, ks, strict=True)})
        if cfg.final_norm:
            self.final_ln = LayerNorm(cfg.hidden)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens (B, T) -> logits (B, T, V) float32 (no routing statistics)."""
        return spl_forward(variables.pure_params(self), tokens, self.cfg, positions=positions,
                           segment_ids=segment_ids, with_stats=False)[0]


def init_spl_params(key: jax.Array, cfg: SplConfig) -> dict:
    """The parameters of a fresh ``SplModel(cfg, key)`` as a nested dict of float32 arrays."""
    return variables.pure_params(SplModel(cfg, key))


@functools.cache
def abstract_model(cfg: SplConfig) -> SplModel:
    """``SplModel(cfg)`` with shapes only (nothing allocated), for types and metadata."""
    return variables.abstract(lambda: SplModel(cfg, jax.random.key(0)))


@functools.cache
def param_labels(cfg: SplConfig) -> dict:
    """``'main'`` / ``'meta'`` per parameter leaf, from the parameter types."""
    return variables.labels(abstract_model(cfg))


@functools.cache
def expert_axes(cfg: SplConfig) -> dict:
    """The declared expert axis per parameter leaf (-1: none); N on the SPL layers' leaves."""
    return variables.expert_axes(abstract_model(cfg))
