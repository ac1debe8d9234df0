"""Checkpointer: bitwise round trip, shardings, retention, and survival of a killed writer."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinyonn_jax
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config


class TrainState(NamedTuple):
    params: dict
    opt_state: Any
    step: jax.Array
    key: jax.Array  # typed PRNG key
    raw_key: jax.Array  # legacy uint32 key


def _make_state(seed: int = 0) -> TrainState:
    k = jax.random.key(seed)
    params = {
        "embed": jax.random.normal(k, (5, 8)),
        "blocks": [{"w": jax.random.normal(jax.random.fold_in(k, 1), (8, 8), jnp.bfloat16)},
                   {"b": jnp.arange(8, dtype=jnp.int32)}],
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu, nu, count
    return TrainState(params, opt_state, jnp.int32(7), jax.random.key(seed + 1),
                      jax.random.PRNGKey(seed + 2))


def _bits(x: jax.Array) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _assert_bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    state = _make_state()
    cfg = Config().replace_path("model.hidden", 64)
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() is None
        assert ck.save(3, state, {"epoch": 1, "index": 37}, cfg.to_dict())
        restored, position, config = ck.restore(_make_state(seed=99))
    assert isinstance(restored, TrainState)
    _assert_bitwise_equal(restored, state)
    assert position == {"epoch": 1, "index": 37}
    assert Config.from_dict(config) == cfg


def test_restore_takes_template_sharding(tmp_path: Path) -> None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"x": jax.device_put(jnp.arange(8.0 * jax.device_count()), sharded)}
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, {}, {})
        template = {"x": jax.ShapeDtypeStruct(state["x"].shape, state["x"].dtype,
                                              sharding=sharded)}
        restored, _, _ = ck.restore(template)
    assert restored["x"].sharding == sharded
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(state["x"]))


def test_keeps_last_n_and_restores_older_step(tmp_path: Path) -> None:
    state = {"w": jnp.zeros(4)}
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, {"w": state["w"] + step}, {"index": step}, {"step": step}, wait=False)
        ck.wait_until_finished()
        assert ck.all_steps() == [3, 4]
        restored, position, config = ck.restore(state, step=3)
        assert float(restored["w"][0]) == 3.0 and position == {"index": 3}
        assert config == {"step": 3}
        with pytest.raises(FileNotFoundError, match="step 1"):
            ck.restore(state, step=1)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["3", "4"]
    # A fresh Checkpointer (a resumed run) sees the same steps on disk.
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        assert ck.latest_step() == 4
        assert not ck.save(4, state, {}, {})  # an existing step is never overwritten


def test_async_save_survives_donation(tmp_path: Path) -> None:
    state = _make_state()
    expected = jax.tree.map(lambda x: x.copy(), state)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, {}, {}, wait=False)
        for leaf in jax.tree.leaves(state):  # what donate_argnums does to the buffers
            leaf.delete()
        restored, _, _ = ck.restore(expected)
    _assert_bitwise_equal(restored, expected)


def test_disabled_is_a_no_op(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path / "ck", enabled=False)
    assert not ck.save(1, {"w": jnp.ones(2)}, {}, {})
    assert ck.latest_step() is None and not (tmp_path / "ck").exists()
    ck.close()


_CHILD = """
import sys, time
import jax.numpy as jnp, numpy as np
from tinyonn_jax.checkpoint import Checkpointer

def state(seed):  # 50 x 4 MB of incompressible data
    rng = np.random.default_rng(seed)
    return {f"w{i:02d}": jnp.asarray(np.frombuffer(rng.bytes(4 << 20), np.uint32))
            for i in range(50)}

ck = Checkpointer(sys.argv[1], keep=3)
ck.save(1, state(1), {"epoch": 0, "index": 1}, {"run": "kill"}, wait=True)
big = state(2)
ck.save(2, big, {"epoch": 0, "index": 2}, {"run": "kill"}, wait=False)
print("SAVING", ck.latest_step(), flush=True)
time.sleep(120)
"""


def _child_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"w{i:02d}": np.frombuffer(rng.bytes(4 << 20), np.uint32) for i in range(50)}


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"child never printed {prefix!r}; exit code {proc.poll()}")


def test_killed_writer_never_replaces_last_good_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    repo = Path(tinyonn_jax.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = _wait_for_line(proc, "SAVING", timeout=60)
        # The 200 MB write of step 2 runs in the background; kill as soon as it is on disk.
        deadline = time.monotonic() + 10
        while not list(directory.glob("2.orbax-checkpoint-tmp*")):
            assert time.monotonic() < deadline, "temporary directory of step 2 never appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert line.split() == ["SAVING", "1"], "latest_step() counted the in-flight step"
    assert not (directory / "2").exists(), "step 2 finished before the kill; test inconclusive"
    assert list(directory.glob("2.orbax-checkpoint-tmp*"))

    template = {k: jnp.zeros(v.shape, v.dtype) for k, v in _child_state(0).items()}
    with Checkpointer(directory, keep=3) as ck:
        assert ck.latest_step() == 1
        restored, position, config = ck.restore(template)
        assert position == {"epoch": 0, "index": 1} and config == {"run": "kill"}
        expected = _child_state(1)
        for k in expected:
            np.testing.assert_array_equal(np.asarray(restored[k]), expected[k])
        # The resumed run can write step 2 again, and the partial one is gone.
        assert ck.save(2, restored, {"epoch": 0, "index": 2}, {"run": "kill"})
        assert ck.all_steps() == [1, 2]
    assert not list(directory.glob("*orbax-checkpoint-tmp*"))


def test_dyntrm_expert_pool_survives_save_and_restore(tmp_path: Path) -> None:
    """The DynTRM lifecycle's pool (train-state extras: live masks, routing window, homeless
    sums, typed PRNG key) comes back bitwise, with the template the trainer restores with."""
    from tinyonn_jax.families.dyntrm import lifecycle
    from tinyonn_jax.families.dyntrm.family import DYNTRM

    cfg = (Config().replace_path("model.hidden", 16).replace_path("model.num_heads", 2)
           .replace_path("model.num_attn_experts", 4).replace_path("model.num_ffn_experts", 4)
           .replace_path("model.lifecycle_period", 2)
           .replace_path("model.init_ffn_experts", 3))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    pool = state.extras
    assert isinstance(pool, lifecycle.PoolState)
    pool = pool._replace(  # a pool that is not the initial one
        live={**pool.live, "ffn": pool.live["ffn"].at[1].set(False)},
        history={p: h + jnp.arange(h.size, dtype=h.dtype).reshape(h.shape)
                 for p, h in pool.history.items()},
        homeless_sum={p: s + 0.5 for p, s in pool.homeless_sum.items()},
        homeless_count={p: c + 3.0 for p, c in pool.homeless_count.items()},
        cursor=pool.cursor + 5, key=jax.random.split(pool.key)[0])
    state = state._replace(extras=pool)
    template = jax.eval_shape(lambda k: DYNTRM.init_state(cfg, opt, k), jax.random.key(1))
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(4, state, {"index": 4}, cfg.to_dict())
        restored, _, _ = ck.restore(template)
    _assert_bitwise_equal(restored.extras, state.extras)
    _assert_bitwise_equal(restored, state)
