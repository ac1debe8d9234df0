"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes, ``data`` and ``expert``. Batch rows are split over both (``ROWS``), so
every device computes attention, routing and experts for its own B / (data * expert) rows and
nothing is computed twice. Parameters are replicated except the expert-stacked ones, which are
split over ``expert`` on the axis they declare where they are made (``nn.variables``); optimizer
states and the EMA follow their parameters. An expert bank is thus stored in ``expert`` pieces
and gathered where it is used (ZeRO-3-like sharded storage, not expert parallelism: tokens are
not sent to the devices that hold their experts). ``mesh_expert`` trades memory for those
gathers; for models of this size data parallelism (``mesh_expert=1``) is the default.
``jax.jit`` with these in/out shardings is what pjit used to be.

Several processes (hosts): ``maybe_initialize_distributed`` starts ``jax.distributed`` when a
multi-process launcher is detected (``launcher_detected``, ``train.distributed``). The mesh
then spans every process's devices and ``data.batch_size`` is the global batch: each process
builds only ``local_rows`` of it, the rows its own devices hold, and ``shard_batch`` joins the
processes' rows into one global array. Only process 0 (``is_primary``) writes files.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax.config import TrainConfig
from tinyonn_jax.errors import ConfigError, UserError
from tinyonn_jax.nn.variables import EXPERT

DATA = "data"
ROWS = (DATA, EXPERT)  # the mesh axes that batch rows are split over


# Environment variables of the launchers ``jax.distributed.initialize()`` bootstraps itself
# (jax/_src/clusters): Open MPI's mpirun, Slurm's srun, Cloud TPU (GKE and multislice), and
# Kubernetes indexed Jobs / JobSets; MPICH-style PMI launches only through mpi4py.
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def _count(environ: Mapping[str, str], *names: str) -> int:
    """The first of ``names`` that ``environ`` holds as an integer, else 0."""
    for name in names:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def launcher_detected(environ: Mapping[str, str]) -> str | None:
    """The multi-process launcher ``environ`` describes, or None for a single-process run.

    ``jax``: ``JAX_COORDINATOR_ADDRESS`` is set, or ``JAX_NUM_PROCESSES`` > 1 (with
    ``JAX_PROCESS_ID``); ``openmpi``: ``mpirun`` of Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1;
    ``slurm``: an ``srun`` step (the variables JAX reads) with ``SLURM_NTASKS`` > 1;
    ``mpi``: another MPI launch (``OMPI_COMM_WORLD_SIZE`` without Open MPI's URI, or MPICH /
    Intel MPI ``PMI_SIZE``) of more than one process; ``cloud_tpu``: more than one TPU host in
    ``TPU_PROCESS_ADDRESSES`` / ``TPU_WORKER_HOSTNAMES``, or a multislice job
    (``MEGASCALE_COORDINATOR_ADDRESS``); ``kubernetes``: a pod of an indexed Job or JobSet
    (``KUBERNETES_SERVICE_HOST`` and ``JOB_COMPLETION_INDEX``; its size is in the Job, not in
    the environment). A Slurm batch script outside ``srun`` is one process: not detected.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS") or _count(environ, "JAX_NUM_PROCESSES") > 1:
        return "jax"
    if _OMPI_URI in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if all(v in environ for v in _SLURM_VARS) and _count(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if _count(environ, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE") > 1:
        return "mpi"
    hosts = next((environ[v] for v in _TPU_HOSTS if v in environ), "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1 \
            or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "cloud_tpu"
    if environ.get("KUBERNETES_SERVICE_HOST") and "JOB_COMPLETION_INDEX" in environ:
        return "kubernetes"
    return None


def initialize_kwargs(launcher: str | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """Arguments of ``jax.distributed.initialize`` for ``launcher``: none where JAX reads the
    launcher's environment itself; for ``jax`` the coordinator, process count and id of
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (JAX itself reads
    only the first, and only from ``os.environ``); mpi4py's detection for ``mpi``."""
    if launcher == "mpi":
        return {"cluster_detection_method": "mpi4py"}
    if launcher != "jax":
        return {}
    kwargs = {}
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = environ["JAX_COORDINATOR_ADDRESS"]
    if "JAX_NUM_PROCESSES" in environ:
        kwargs["num_processes"] = _count(environ, "JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" in environ:
        kwargs["process_id"] = _count(environ, "JAX_PROCESS_ID")
    return kwargs


def maybe_initialize_distributed(mode: str = "auto",
                                 environ: Mapping[str, str] | None = None) -> str | None:
    """Start ``jax.distributed`` as ``train.distributed`` asks, before JAX's backends start.

    ``auto``: when ``launcher_detected(environ)`` names a launcher; ``on``: always (a launcher
    JAX detects without environment variables, e.g. the metadata of a GCE TPU VM, or plain
    ``jax.distributed.initialize()``); ``off``: never. Returns the launcher's name (``"default"``
    for ``on`` without one, ``"initialized"`` when JAX was started before), or None for a
    single-process run. A failed start is a ``UserError`` naming ``train.distributed``.
    """
    environ = os.environ if environ is None else environ
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"config train.distributed={mode!r}: must be one of "
                          "('auto', 'on', 'off')")
    if jax.distributed.is_initialized():
        return "initialized"
    launcher = launcher_detected(environ)
    if mode == "off" or (mode == "auto" and launcher is None):
        return None
    kwargs = initialize_kwargs(launcher, environ)
    needs = {"mpi": "mpi4py", "kubernetes": "kubernetes"}.get(launcher)
    if needs and importlib.util.find_spec(needs) is None:
        why = f"JAX bootstraps a {launcher} launch only with the {needs} package installed"
        if mode == "auto" and launcher == "kubernetes":
            warnings.warn(f"{why}; running as a single process (train.distributed=auto)",
                          stacklevel=2)
            return None
        raise UserError(f"jax.distributed cannot start: {why} (pip install {needs}), or set "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                        f"(train.distributed={mode})")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 -- any failure to start is reported with the field
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"jax.distributed.initialize() failed for the {launcher or 'default'} "
                        f"launcher: {type(e).__name__}: {first}; --distributed off runs one "
                        f"process (train.distributed={mode})") from e
    return launcher or "default"


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
        raise ConfigError(f"config train.mesh_data={cfg.mesh_data}, train.mesh_expert={expert}: "
                          f"a {data}x{expert} mesh does not cover the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, expert), (DATA, EXPERT))


def row_shards(mesh: Mesh) -> int:
    """Pieces a batch is split into: data x expert devices."""
    return mesh.shape[DATA] * mesh.shape[EXPERT]


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
    """Batch arrays (B, T): rows split over ``data`` x ``expert`` (B / row_shards per device)."""
    return NamedSharding(mesh, P(ROWS, None))


def process_rows(batch_size: int, process_index: int, num_processes: int) -> range:
    """Rows of a global batch that process ``process_index`` of ``num_processes`` feeds when the
    rows are split into equal contiguous blocks in process order (the layout of
    ``batch_sharding`` on a mesh built from ``jax.devices()``, whose devices come process by
    process)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not in [0, {num_processes})")
    if batch_size % num_processes:
        raise ValueError(f"a global batch of {batch_size} rows does not divide over "
                         f"{num_processes} processes")
    per = batch_size // num_processes
    return range(process_index * per, (process_index + 1) * per)


def device_rows(sharding: jax.sharding.Sharding, batch_shape: tuple[int, ...],
                devices) -> np.ndarray:
    """Ascending global row indices that ``devices`` hold of a ``batch_shape`` array under
    ``sharding``, each once (rows replicated on several of them included once)."""
    shape = tuple(int(n) for n in batch_shape)
    index = sharding.devices_indices_map(shape)
    rows = set()
    for d in devices:
        rows.update(range(*index[d][0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def local_rows(mesh: Mesh, batch_shape: tuple[int, ...]) -> np.ndarray:
    """The rows of a global ``batch_shape`` batch this process builds: those its addressable
    devices hold under ``batch_sharding(mesh)``, ascending, which is the order in which
    ``jax.make_array_from_process_local_data`` reads a process's local rows."""
    sharding = batch_sharding(mesh)
    return device_rows(sharding, batch_shape, sharding.addressable_devices)


def shard_batch(batch: dict, mesh: Mesh, global_rows: int | None = None) -> dict:
    """Place a numpy batch of (B, T) arrays on the mesh under ``batch_sharding(mesh)``.

    ``batch`` holds either a whole global batch (``global_rows`` None; each process keeps its
    own rows of it) or, with ``global_rows=B``, only this process's rows
    ``local_rows(mesh, (B, T))`` in that order (what ``BatchStream(rows=...)`` builds). Several
    processes assemble the global array with ``jax.make_array_from_process_local_data``.
    """
    sharding = batch_sharding(mesh)
    out, mine = {}, None
    for k, v in batch.items():
        v = np.asarray(v)
        shape = (v.shape[0] if global_rows is None else int(global_rows), *v.shape[1:])
        if jax.process_count() == 1:
            if v.shape != shape:
                raise ValueError(f"batch[{k!r}] holds {v.shape[0]} rows of a {shape[0]}-row "
                                 "global batch, but this single process feeds every row")
            out[k] = jax.device_put(v, sharding)
            continue
        if global_rows is None:
            mine = local_rows(mesh, shape) if mine is None else mine
            v = v[mine]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
