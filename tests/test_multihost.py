"""Several processes: launcher detection, each process's rows of the global batch, resume with
another process count, and a real two-process CPU run against a single-process one."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from tinyonn_jax import parallel
from tinyonn_jax.config import Config, DataConfig, TrainConfig
from tinyonn_jax.data.batching import BatchStream
from tinyonn_jax.data.curriculum import order_by_difficulty
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.errors import ConfigError, UserError
from tinyonn_jax.trainer import DataFeed

ROOT = Path(__file__).resolve().parents[1]
# Skipping over-long sequences is expected with the small max_len of these streams.
pytestmark = pytest.mark.filterwarnings("ignore:BatchStream epoch")
KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, launcher", [
    ({}, None),
    ({"HOME": "/root", "PATH": "/bin"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "jax"),
    ({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, "jax"),
    ({"JAX_NUM_PROCESSES": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "8"}, "openmpi"),
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}, "mpi"),  # Open MPI 5 (PMIx)
    ({"PMI_SIZE": "4", "PMI_RANK": "0"}, "mpi"),
    ({"PMI_SIZE": "1"}, None),
    (SLURM, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # batch script
    ({"SLURM_JOB_ID": "7", "SLURM_NPROCS": "4"}, None),  # no srun step: one process
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "0"}, "cloud_tpu"),
    ({"TPU_PROCESS_ADDRESSES": "t-0:8476,t-1:8476"}, "cloud_tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "t-0"}, "cloud_tpu"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "JOB_COMPLETION_INDEX": "0"}, "kubernetes"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),  # a plain pod
])
def test_launcher_detected(environ, launcher):
    assert parallel.launcher_detected(environ) == launcher


@pytest.fixture
def fake_initialize(monkeypatch):
    """Record the calls of jax.distributed.initialize instead of starting it."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_distributed_modes(fake_initialize):
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert parallel.maybe_initialize_distributed("off", SLURM) is None
    assert parallel.maybe_initialize_distributed("auto", {}) is None
    assert fake_initialize == []
    assert parallel.maybe_initialize_distributed("auto", SLURM) == "slurm"
    assert parallel.maybe_initialize_distributed("on", {}) == "default"
    assert parallel.maybe_initialize_distributed("auto", env) == "jax"
    assert fake_initialize == [{}, {}, {"coordinator_address": "h:1", "num_processes": 2,
                                        "process_id": 1}]
    with pytest.raises(ConfigError, match="train.distributed"):
        parallel.maybe_initialize_distributed("yes", {})
    with pytest.raises(ConfigError, match="train.distributed"):
        Config().replace_path("train.distributed", "always")


def test_distributed_start_failures_name_the_field(monkeypatch, fake_initialize):
    def fail(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(UserError, match=r"coordinator_address.*train.distributed=on"):
        parallel.maybe_initialize_distributed("on", {})
    monkeypatch.setattr(parallel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"mpi4py.*train.distributed=auto"):
        parallel.maybe_initialize_distributed("auto", {"PMI_SIZE": "4"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k8s = {"KUBERNETES_SERVICE_HOST": "h", "JOB_COMPLETION_INDEX": "0"}
        assert parallel.maybe_initialize_distributed("auto", k8s) is None
    assert any("kubernetes" in str(w.message) for w in caught)


def test_process_rows_split_the_batch():
    assert parallel.process_rows(8, 1, 4) == range(2, 4)
    for n in (1, 2, 4):
        rows = np.concatenate([np.asarray(parallel.process_rows(8, i, n)) for i in range(n)])
        np.testing.assert_array_equal(rows, np.arange(8))
    with pytest.raises(ValueError, match="divide"):
        parallel.process_rows(6, 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        parallel.process_rows(8, 2, 2)
    mesh = parallel.make_mesh(TrainConfig(), jax.devices()[:1])
    np.testing.assert_array_equal(parallel.local_rows(mesh, (8, 16)), np.arange(8))


@functools.cache
def _tasks():
    return order_by_difficulty(load_tasks("arc1", "train"))[:8]


DATA = DataConfig(max_len=256, min_bucket=32, batch_size=4, views_per_task=2)


def _global_batches(n_processes: int, steps: int, start=None):
    """``steps`` global batches assembled from ``n_processes`` streams of their own rows, the
    positions, and the per-process padding waste of the global batches."""
    streams = [BatchStream(_tasks(), DATA, start=start,
                           rows=parallel.process_rows(DATA.batch_size, i, n_processes))
               for i in range(n_processes)]
    batches, positions = [], []
    for _ in range(steps):
        parts = [next(s) for s in streams]
        assert all(p == parts[0][1] for _, p in parts)  # one global position
        rows = np.concatenate([np.asarray(s.rows) for s in streams])
        assert sorted(rows.tolist()) == list(range(DATA.batch_size))  # each row exactly once
        glob = {k: np.concatenate([b[k] for b, _ in parts])[np.argsort(rows)] for k in KEYS}
        batches.append(glob)
        positions.append(parts[0][1])
    return batches, positions, [s.padding_waste for s in streams]


def _assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_union_of_process_rows_is_the_single_process_batch():
    one, pos, waste = _global_batches(1, 9)
    assert pos[-1]["epoch"] >= 2  # crosses epoch boundaries
    single = [b for b, _ in zip(BatchStream(_tasks(), DATA), range(9), strict=False)]
    _assert_same(one, [b for b, _ in single])
    full = np.concatenate([b["segment_ids"] for b in one])
    for n in (2, 4):
        batches, positions, wastes = _global_batches(n, 9)
        _assert_same(batches, one)
        assert positions == pos
        # padding waste is that of the global batches, on every process
        np.testing.assert_allclose(wastes, (full == 0).mean(), rtol=1e-12)
    assert waste[0] == pytest.approx((full == 0).mean())


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2), (2, 1)])
def test_resume_with_another_process_count_continues_the_global_stream(before, after):
    reference, _, _ = _global_batches(1, 10)
    cfg = Config(data=DATA)
    feeds = [DataFeed(_tasks(), cfg, rows=parallel.process_rows(4, i, before),
                      processes=before) for i in range(before)]
    for step in range(4):
        pos = [f.next(step)[1] for f in feeds]
    assert pos[0] == pos[-1] and pos[0]["processes"] == before
    saved = json.loads(json.dumps(pos[0]))  # as the checkpoint stores it
    feeds = [DataFeed(_tasks(), cfg, saved, rows=parallel.process_rows(4, i, after),
                      processes=after) for i in range(after)]
    assert feeds[0].saved_processes == before
    resumed = []
    for step in range(4, 10):
        parts = [f.next(step)[0] for f in feeds]
        resumed.append({k: np.concatenate([p[k] for p in parts]) for k in KEYS})
    _assert_same(resumed, reference[4:])


def test_stream_rows_are_checked():
    with pytest.raises(ValueError, match="rows"):
        BatchStream(_tasks(), DATA, rows=[0, 4])
    with pytest.raises(ValueError, match="rows"):
        BatchStream(_tasks(), DATA, rows=[1, 1])


# One process of a real multi-process CPU run: 2 CPU devices, a (data, expert) = (2, 2) mesh
# over both processes; it gathers the global batches it helped build and trains a small DynTRM
# for two steps on its own rows of each batch.
WORKER = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from tinyonn_jax import parallel
    env = {{"JAX_COORDINATOR_ADDRESS": "localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": sys.argv[1]}}
    assert parallel.maybe_initialize_distributed("auto", env) == "jax"
    from jax.experimental import multihost_utils
    from test_multihost import train_two_steps
    assert jax.process_count() == 2 and jax.device_count() == 4
    out = train_two_steps(mesh_expert=2)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist()
    out["params"] = [gather(x) for x in out["params"]]
    out["batches"] = [{{k: gather(v) for k, v in b.items()}} for b in out["batches"]]
    if jax.process_index() == 0:
        print("RESULT" + json.dumps(out), flush=True)
    jax.distributed.shutdown()
""")


def small_cfg(**over) -> Config:
    """A DynTRM with dense attention and FFN and one refinement step (quick to compile), trained
    with plain SGD on a global batch of 4: Adam's first steps are sign(gradient), which turns
    the rounding of a near-zero gradient summed in another order into a full step."""
    from test_trainer import _micro_cfg

    return _micro_cfg(**{"data.batch_size": 4, "model.attn_kind": "mha",
                         "model.ffn_kind": "swiglu", "model.max_refinement_steps": 1,
                         "sars.enabled": False, "optim.name": "sgd", "optim.kwargs": (),
                         "meta_optim.name": "sgd", "meta_optim.kwargs": (), **over})


def train_two_steps(mesh_expert: int = 1, devices=None) -> dict:
    """Two steps of ``small_cfg`` on the arc1 stream, each process feeding its own rows of every
    global batch.

    Returns the losses, this process's rows, the global batches and the parameters (jax
    arrays)."""
    from tinyonn_jax import trainer

    cfg = small_cfg(**{"train.mesh_expert": mesh_expert})
    mesh = parallel.make_mesh(cfg.train, devices)
    family = trainer.get_family(cfg)
    optimizer = family.build_optimizer(cfg)
    key = jax.random.key(cfg.train.seed)
    _, state_sh = trainer._state_template(family, cfg, optimizer, mesh, key)
    state = jax.jit(lambda k: family.init_state(cfg, optimizer, k), out_shardings=state_sh)(key)
    step_fn = jax.jit(functools.partial(family.train_step, cfg=cfg, optimizer=optimizer),
                      in_shardings=(state_sh, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sh, jax.sharding.NamedSharding(
                          mesh, jax.sharding.PartitionSpec())))
    tasks, _, _ = trainer.select_tasks(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, eval_tasks=0)))
    rows = parallel.local_rows(mesh, (cfg.data.batch_size, cfg.data.max_len))
    stream = BatchStream(tasks, cfg.data, rows=rows)
    losses, batches = [], []
    for _ in range(2):
        batch, _ = next(stream)
        batches.append(parallel.shard_batch(batch, mesh, cfg.data.batch_size))
        state, metrics = step_fn(state, batches[-1])
        losses.append(float(metrics["train/main_loss"]))
    return {"losses": losses, "rows": rows.tolist(), "batches": batches,
            "params": jax.tree.leaves(state.params)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(script: str, extra_env: dict | None = None) -> list[tuple[str, str]]:
    """Run ``script`` as processes 0 and 1 (argv[1]); their (stdout, stderr). Skips when
    jax.distributed cannot connect on localhost."""
    # No persistent compilation cache: executables it returns to several CPU processes crash.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(extra_env or {})
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs) and any(
            "DEADLINE_EXCEEDED" in err or "UNAVAILABLE" in err for _, err in outs):
        pytest.skip("jax.distributed cannot connect on localhost here: " + outs[0][1][-300:])
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_train_like_one():
    script = WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), port=_free_port())
    outs = _run_two_processes(script)
    res = json.loads(outs[0][0].split("RESULT", 1)[1])
    assert res["rows"] == [0, 1]  # process 0 fed the first half of every global batch

    ref = train_two_steps()
    for got, want in zip(res["batches"], ref["batches"], strict=True):
        for k in KEYS:  # the global batch assembled from both processes' rows
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    np.testing.assert_allclose(res["losses"], ref["losses"], rtol=1e-5)
    for a, b in zip(res["params"], ref["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# One process of a two-process ``tinyonn-train`` run: jax.distributed started by the trainer
# itself from the JAX_* variables (train.distributed=auto).
RUN = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_multihost import small_cfg
    from tinyonn_jax import trainer
    cfg = small_cfg(**{{"train.num_steps": 2, "train.ckpt_every": 2, "train.mesh_expert": 2,
                        "train.eval_every": 2, "train.plot_every": 100}})
    trainer.run(cfg, {workdir!r}, quiet=True)
    assert jax.process_count() == 2
""")


def test_two_process_run_writes_once_and_resumes_on_one_process(tmp_path, capsys):
    from tinyonn_jax import trainer

    two, one = tmp_path / "two", tmp_path / "one"
    script = RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), workdir=str(two))
    outs = _run_two_processes(script, {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
                                       "JAX_NUM_PROCESSES": "2"})
    assert "jax.distributed (jax): process 0 of 2 (4 devices, 2 on this" in outs[0][1]
    assert "jax.distributed" not in outs[1][1]  # only process 0 speaks
    records = [json.loads(x) for x in (two / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by process 0
    assert "eval/token_acc" in records[-1]  # held-out batches split over both processes
    assert json.loads((two / "config.json").read_text())["train"]["mesh_expert"] == 2

    # The same global stream on one process: two steps, then the 2-process checkpoint resumed.
    cfg = small_cfg(**{"train.eval_every": 0, "train.plot_every": 100})
    ref = trainer.run(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, num_steps=4, ckpt_every=4)), one, quiet=True)
    _, position, _ = trainer.restore_train_state(two)
    assert position["processes"] == 2 and position["index"] + position["epoch"] > 0
    out = trainer.run(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, num_steps=4, ckpt_every=4)), two, resume=True, quiet=True)
    assert "written by 2 process(es); 1 continue its global data stream" in \
        capsys.readouterr().err
    np.testing.assert_allclose(out["train/main_loss"], ref["train/main_loss"], rtol=1e-5)
    got, want = (trainer.restore_train_state(d)[0] for d in (two, one))
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
