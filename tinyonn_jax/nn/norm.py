"""LayerNorm as a pure function of a {'scale', 'bias'} dict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tinyonn_jax.nn import variables


def init_layer_norm(dim: int) -> dict:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def layer_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """Normalise over the last axis in float32, return in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm parameters ``scale`` (D,) = 1 and ``bias`` (D,) = 0; applied by ``layer_norm``."""

    def __init__(self, dim: int):
        init = init_layer_norm(dim)
        self.scale = variables.main(init["scale"])
        self.bias = variables.main(init["bias"])
