"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes: ``data`` (batch rows) and ``expert`` (the expert axis that every
expert-stacked parameter declares where it is made, ``nn.variables``). Parameters are replicated
except those, which are split over ``expert``; optimizer states and the EMA follow their
parameters. ``jax.jit`` with these in/out shardings is what pjit used to be.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax.config import TrainConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.nn.variables import EXPERT

DATA = "data"


def maybe_initialize_distributed() -> None:
    """Call ``jax.distributed.initialize()`` when the launcher describes a multi-process job."""
    markers = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    multi = any(os.environ.get(m) for m in markers) or int(os.environ.get("JAX_NUM_PROCESSES",
                                                                          "1")) > 1
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def is_primary() -> bool:
    """Only process 0 writes logs, plots and reports."""
    return jax.process_index() == 0


def make_mesh(cfg: TrainConfig, devices=None) -> Mesh:
    """A (data, expert) mesh over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    expert = cfg.mesh_expert
    data = n // expert if cfg.mesh_data == -1 else cfg.mesh_data
    if data * expert != n or data < 1:
        raise ValueError(f"config train.mesh_data={cfg.mesh_data}, train.mesh_expert={expert}: "
                         f"a {data}x{expert} mesh does not cover the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, expert), (DATA, EXPERT))


def _param_paths(expert_axes) -> dict[tuple[str, ...], int]:
    """{(dict keys of a parameter leaf): its declared expert axis}."""
    flat = jax.tree_util.tree_flatten_with_path(expert_axes)[0]
    return {tuple(str(k.key) for k in path): int(axis) for path, axis in flat}


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(mesh: Mesh, state_shapes, expert_axes):
    """NamedShardings for a whole train state (params, EMA and optimizer state alike).

    ``expert_axes`` is the family's tree of declared expert axes (``Family.expert_axes``), shaped
    like the parameters. A leaf whose dict-key path ends with a parameter's path and has that
    parameter's rank follows it: split over ``expert`` on the declared axis when the mesh has
    an expert axis, replicated otherwise; everything else (counters, family extras) is
    replicated. Raises ``ConfigError`` when the expert axis does not divide a declared size.
    """
    paths = _param_paths(expert_axes)
    n_exp = mesh.shape[EXPERT]
    by_len = sorted({len(p) for p in paths}, reverse=True)

    def spec(path, x):
        keys = _dict_keys(path)
        axis = next((paths[keys[-n:]] for n in by_len if len(keys) >= n and keys[-n:] in paths),
                    -1)
        if n_exp == 1 or axis < 0 or axis >= x.ndim:
            return NamedSharding(mesh, P())
        if x.shape[axis] % n_exp:
            raise ConfigError(f"config train.mesh_expert={n_exp} does not divide the "
                              f"{x.shape[axis]} experts of parameter {'/'.join(keys)}")
        axes = [None] * x.ndim
        axes[axis] = EXPERT
        return NamedSharding(mesh, P(*axes))

    return jax.tree_util.tree_map_with_path(spec, state_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays (B, T) are split over ``data`` rows."""
    return NamedSharding(mesh, P(DATA, None))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host-local numpy batch on the mesh (works single- and multi-process)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
