"""Parameter types: the two groups (``main``, ``meta``) and the declared expert axis.

Every parameter of every family is made as a ``MainParam`` (computation: embedding, norms, expert
banks, projections, LM head, halting head) or a ``MetaParam`` (routing: prototypes, gates,
thresholds, the prototype pathway). A leaf's group is its type, never its name, so renaming a
leaf cannot move it to the other optimizer. A parameter stacked over experts declares which of
its axes is the expert axis where it is made (``expert_axis``); the sharding rules read that
declaration (``partition_specs``), never the shapes.

The jitted functions take the parameters as the pure-dict form of a module's state
(``pure_params``: ``nnx.to_pure_dict(nnx.state(module, nnx.Param))``); ``labels`` and
``expert_axes`` give trees of the same structure, computed from the types and metadata.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MAIN, META = "main", "meta"
EXPERT = "expert"  # mesh axis name of the expert axis (parallel.EXPERT)


class MainParam(nnx.Param):
    """A computation parameter, trained by the main loss (the ``main`` optimizer chain)."""


class MetaParam(nnx.Param):
    """A routing parameter (prototype, gate, threshold), trained by the meta losses."""


GROUP_OF: dict[type, str] = {MainParam: MAIN, MetaParam: META}


def _make(cls: type, value: Any, expert_axis: int | None) -> nnx.Param:
    value = jnp.asarray(value, jnp.float32)
    if expert_axis is None:
        return cls(value)
    if not -value.ndim <= expert_axis < value.ndim:
        raise ValueError(f"expert_axis={expert_axis} outside a {value.ndim}-D parameter")
    axes = [None] * value.ndim
    axes[expert_axis] = EXPERT
    # Declared, not applied: the mesh is chosen later (parallel.state_shardings).
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def main(value: Any, *, expert_axis: int | None = None) -> MainParam:
    """A float32 ``MainParam``; ``expert_axis`` declares the axis that stacks experts."""
    return _make(MainParam, value, expert_axis)


def meta(value: Any, *, expert_axis: int | None = None) -> MetaParam:
    """A float32 ``MetaParam``; ``expert_axis`` declares the axis that stacks experts."""
    return _make(MetaParam, value, expert_axis)


def pure_params(module: nnx.Module) -> dict:
    """The module's parameters as a nested dict of arrays (the tree jitted functions take)."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _map_params(module: nnx.Module, fn) -> dict:
    state = nnx.state(module, nnx.Param)
    flat = [(path, fn(var)) for path, var in nnx.to_flat_state(state)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat)) if flat else {}


def _group(var: nnx.Variable) -> str:
    for cls, group in GROUP_OF.items():
        if isinstance(var, cls):
            return group
    raise TypeError(f"parameter of type {type(var).__name__} has no group: make it with "
                    "nn.variables.main or nn.variables.meta")


def labels(module: nnx.Module) -> dict:
    """A tree of ``'main'`` / ``'meta'`` strings shaped like ``pure_params(module)``."""
    return _map_params(module, _group)


def expert_axes(module: nnx.Module) -> dict:
    """A tree shaped like ``pure_params(module)``: the declared expert axis of each leaf, or -1."""
    def axis(var: nnx.Variable) -> int:
        spec = var.get_metadata().get("out_sharding")
        return spec.index(EXPERT) if spec and EXPERT in spec else -1

    return _map_params(module, axis)


def abstract(build) -> nnx.Module:
    """``build()`` (a module constructor) run on shapes only: nothing is allocated."""
    return nnx.eval_shape(build)


def select(tree, label_tree, group: str):
    """Zero every leaf outside ``group`` (keeps structure, for gradient isolation)."""
    return jax.tree.map(lambda x, lab: x if lab == group else jnp.zeros_like(x), tree, label_tree)


def stop_group(tree, label_tree, group: str):
    """``stop_gradient`` on every leaf of ``group``."""
    return jax.tree.map(lambda x, lab: jax.lax.stop_gradient(x) if lab == group else x,
                        tree, label_tree)
