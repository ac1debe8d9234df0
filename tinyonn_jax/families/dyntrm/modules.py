"""Flax NNX modules of the DynTRM family: they own the parameters and the model's structure.

``DynTRM(cfg, key)`` holds the embedding, the one shared ``Block`` (DynSIHA+ as ``LatentHeads``
or ``DynSiha`` by ``attn_layout``, or dense attention; DynMoE or SwiGLU feed-forward), the ACT
``Halting`` head, the optional final norm and the LM head. Routing parameters (prototypes,
gates) are ``MetaParam``; everything else is ``MainParam``; the expert banks, the latent heads
and the per-expert routing tensors declare their expert axis.

The numeric core is pure: ``variables.pure_params(model)`` (the pure-dict form of
``nnx.split(model)``'s parameter state) is what ``transformer.forward``, the train step and
generation take. ``init_params(key, cfg)`` is exactly that dict for a fresh model;
``param_labels(cfg)`` and ``expert_axes(cfg)`` give trees of the same structure, read from the
parameter types and their declared expert axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinyonn_jax import validate
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.families.dyntrm.dynsiha import QKV
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.experts import ExpertBank
from tinyonn_jax.nn.norm import LayerNorm


class LatentHeads(nnx.Module):
    """DynSIHA+ of seed 000 section 2.1 (``latent_heads.py``): router ``proto_attn`` (P, D),
    ``gate_attn`` (P,); latent heads ``wq``, ``wk``, ``wv`` (P, D, Dh) and ``wo`` (P, Dh, D)."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        kp, kq, kk, kv, ko = jax.random.split(key, 5)
        p, dh, d = cfg.num_attn_experts, cfg.head_dim, cfg.hidden
        self.proto_attn = variables.meta(cfg.init_std * jax.random.normal(kp, (p, d)),
                                         expert_axis=0)
        self.gate_attn = variables.meta(jnp.zeros((p,), jnp.float32), expert_axis=0)
        # std 1/sqrt(fan_in), the scale of the expert banks and the dense projections
        for name, k, shape in (("wq", kq, (p, d, dh)), ("wk", kk, (p, d, dh)),
                               ("wv", kv, (p, d, dh)), ("wo", ko, (p, dh, d))):
            setattr(self, name, variables.main(
                jax.random.normal(k, shape) / jnp.sqrt(jnp.float32(shape[1])), expert_axis=0))


class DynSiha(nnx.Module):
    """DynSIHA+: latent-head ``library`` (P, Dh, F) / (P, F, Dh), per q/k/v prototypes
    ``proto_c`` (P, Dh) and gates ``gate_c`` (P,), output projection ``o_proj`` (D, D)."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        keys = jax.random.split(key, 5)
        p, dh, d = cfg.num_attn_experts, cfg.head_dim, cfg.hidden
        self.library = ExpertBank(keys[0], p, dh, cfg.attn_mlp_hidden, dh)
        for i, c in enumerate(QKV):
            setattr(self, f"proto_{c}", variables.meta(
                cfg.init_std * jax.random.normal(keys[1 + i], (p, dh)), expert_axis=0))
            setattr(self, f"gate_{c}", variables.meta(jnp.zeros((p,), jnp.float32),
                                                      expert_axis=0))
        self.o_proj = variables.main(jax.random.normal(keys[4], (d, d)) / jnp.sqrt(d))


def _linear(key: jax.Array, d_in: int, d_out: int) -> variables.MainParam:
    """(d_in, d_out) normal with std 1/sqrt(d_in): the scale of the expert banks and o_proj."""
    return variables.main(jax.random.normal(key, (d_in, d_out), jnp.float32)
                          / jnp.sqrt(jnp.float32(d_in)))


class DenseAttention(nnx.Module):
    """The dense baseline: ``wq``, ``wk``, ``wv``, ``o_proj``, each (D, D)."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        kq, kk, kv, ko = jax.random.split(key, 4)
        d = cfg.hidden
        self.wq, self.wk, self.wv = _linear(kq, d, d), _linear(kk, d, d), _linear(kv, d, d)
        self.o_proj = _linear(ko, d, d)


class DynMoE(nnx.Module):
    """DynMoE feed-forward: ``bank`` W1 (E, D, F), W2 (E, F, D); ``proto`` (E, D); ``gate`` (E,)."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        k1, k2 = jax.random.split(key)
        e, d = cfg.num_ffn_experts, cfg.hidden
        self.bank = ExpertBank(k1, e, d, cfg.ffn_hidden, d)
        self.proto = variables.meta(cfg.init_std * jax.random.normal(k2, (e, d)), expert_axis=0)
        self.gate = variables.meta(jnp.zeros((e,), jnp.float32), expert_axis=0)


class SwiGlu(nnx.Module):
    """The dense baseline: ``w_gate``, ``w_up`` (D, F) and ``w_down`` (F, D), F = swiglu_width."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        kg, ku, kd = jax.random.split(key, 3)
        d, f = cfg.hidden, cfg.swiglu_width
        self.w_gate, self.w_up, self.w_down = _linear(kg, d, f), _linear(ku, d, f), _linear(kd,
                                                                                           f, d)


class Block(nnx.Module):
    """The shared pre-norm block: ``ln1``, ``attn`` and, with ``use_ffn``, ``ln2``, ``ffn``."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        k_attn, k_ffn = jax.random.split(key)
        self.ln1 = LayerNorm(cfg.hidden)
        attn = DenseAttention if cfg.attn_kind == "mha" else (
            LatentHeads if cfg.latent_heads else DynSiha)
        self.attn = attn(cfg, k_attn)
        if cfg.use_ffn:
            self.ln2 = LayerNorm(cfg.hidden)
            self.ffn = (SwiGlu if cfg.ffn_kind == "swiglu" else DynMoE)(cfg, k_ffn)


class Halting(nnx.Module):
    """ACT head ``w`` (D, 2) = 0, ``b`` = (-5, 0): start by refining for all steps (TRM)."""

    def __init__(self, cfg: ModelConfig):
        self.w = variables.main(jnp.zeros((cfg.hidden, 2), jnp.float32))
        self.b = variables.main(jnp.array([-5.0, 0.0], jnp.float32))


class DynTRM(nnx.Module):
    """The whole model: ``embed`` (V, D), ``block``, ``lm_head`` (D, V), ``halt``, ``final_ln``.

    ``transformer.forward``, the train step and generation run on its ``pure_params``.
    """

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        self.cfg = cfg
        k_emb, k_block, k_head = jax.random.split(key, 3)
        self.embed = variables.main(cfg.init_std * jax.random.normal(k_emb, (cfg.vocab_size,
                                                                             cfg.hidden)))
        self.block = Block(cfg, k_block)
        self.lm_head = variables.main(jax.random.normal(k_head, (cfg.hidden, cfg.vocab_size))
                                      / np.sqrt(cfg.hidden))
        self.halt = Halting(cfg)
        if cfg.final_norm:
            self.final_ln = LayerNorm(cfg.hidden)


def init_params(key: jax.Array, cfg: ModelConfig) -> dict:
    """The parameters of a fresh ``DynTRM(cfg, key)`` as a nested dict of float32 arrays."""
    return variables.pure_params(DynTRM(cfg, key))


@functools.cache
def abstract_model(cfg: ModelConfig) -> DynTRM:
    """``DynTRM(cfg)`` with shapes only (nothing allocated), for types and metadata."""
    return variables.abstract(lambda: DynTRM(cfg, jax.random.key(0)))


def param_labels(cfg: ModelConfig) -> dict:
    """``'main'`` / ``'meta'`` per parameter leaf, from the parameter types."""
    return variables.labels(abstract_model(cfg))


@functools.cache
def param_layout(cfg: ModelConfig) -> validate.ParamLayout:
    """The tree and leaf shapes of ``init_params(key, cfg)`` (for ``validate.check_params``)."""
    return validate.param_layout(variables.pure_params(abstract_model(cfg)))


def expert_axes(cfg: ModelConfig) -> dict:
    """The declared expert axis per parameter leaf (-1: none)."""
    return variables.expert_axes(abstract_model(cfg))
