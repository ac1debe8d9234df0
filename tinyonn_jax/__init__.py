"""Tiny-ONN in JAX.

The DynTRM family's entry points are exported here and loaded on first use, so
``import tinyonn_jax`` stays light:

  ``init_params(key, model_cfg) -> params``        a fresh ``DynTRM`` as a nested dict
  ``forward(params, tokens, model_cfg) -> (logits, aux)``   the pure forward, tokens (B,T)
  ``DynTRM(model_cfg, key)``                        the Flax NNX module owning the parameters

Both accept what ``tinyonn_jax.interop.import_state_dict(path, ...)`` returns as
``(cfg, params)`` (``model_cfg`` = ``cfg.model``).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "init_params": "tinyonn_jax.families.dyntrm.modules",
    "DynTRM": "tinyonn_jax.families.dyntrm.modules",
    "forward": "tinyonn_jax.families.dyntrm.transformer",
    "forward_adaptive": "tinyonn_jax.families.dyntrm.transformer",
    "Config": "tinyonn_jax.config",
    "ModelConfig": "tinyonn_jax.families.dyntrm.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tinyonn_jax' has no attribute {name!r}")
