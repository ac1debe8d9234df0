"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes: ``data`` (batch rows) and ``expert`` (the leading expert axis of stacked
banks). Parameters are replicated except expert banks and per-expert routing tensors, which are
split over ``expert`` when the pool size divides evenly; optimizer states follow their
parameters. ``jax.jit`` with these in/out shardings is what pjit used to be.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax.config import TrainConfig

DATA, EXPERT = "data", "expert"


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


def _expert_spec(shape: tuple[int, ...], pools: set[int], n_expert: int) -> P:
    if n_expert > 1 and len(shape) >= 1 and shape[0] in pools and shape[0] % n_expert == 0:
        return P(EXPERT, *([None] * (len(shape) - 1)))
    return P()


def state_shardings(mesh: Mesh, state_shapes, expert_pools: tuple[int, ...]):
    """NamedShardings for a whole train state (params and optimizer state alike).

    A leaf whose leading dimension is an expert-pool size and that has at least 2 dimensions
    (banks (P, Din, F), prototypes (P, d)) or is a gate vector (P,) of a pool is split over the
    expert axis; everything else is replicated.
    """
    pools, n_exp = set(expert_pools), mesh.shape[EXPERT]

    def spec(x):
        return NamedSharding(mesh, _expert_spec(tuple(x.shape), pools, n_exp))

    return jax.tree.map(spec, state_shapes)


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
