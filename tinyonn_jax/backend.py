"""The platform the computation runs on, and the defaults that depend on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")


def platform(name: str | None = None) -> str:
    """``cpu``, ``gpu`` or ``tpu``: ``name`` (a JAX backend or export platform such as ``cuda``,
    ``rocm``) or, without it, JAX's default backend."""
    name = (name or jax.default_backend()).lower()
    if name in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if name == "tpu" else "cpu"


def compute_dtype(name: str, platform_name: str | None = None):
    """The activation dtype a model config's ``compute_dtype`` names: ``float32``,
    ``bfloat16``, or ``auto`` = bfloat16 on gpu/tpu and float32 on cpu.

    ``auto`` is resolved for ``platform_name`` (see ``platform``; default: JAX's default
    backend when the model is traced). Parameters and routing stay float32 whatever this is.
    Lowering for another platform than the host's (``jax.export`` for cuda from a CPU host)
    resolves ``auto`` on the host: name the dtype explicitly there.
    """
    if name == "auto":
        return jnp.float32 if platform(platform_name) == "cpu" else jnp.bfloat16
    if name == "bfloat16":
        return jnp.bfloat16
    if name == "float32":
        return jnp.float32
    raise ValueError(f"unknown compute dtype {name!r}; expected auto, float32 or bfloat16")
