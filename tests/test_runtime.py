"""CPU XLA flags: added once, never over a user's choice, switched off on request, accepted by
the installed jaxlib (a fresh process runs a jitted op with them)."""

import os
import subprocess
import sys

import pytest

from tinyonn_jax import runtime


def test_flags_appended_to_user_flags():
    out = runtime.tuned_xla_flags("--xla_force_host_platform_device_count=8", True)
    assert out.split() == ["--xla_force_host_platform_device_count=8", *runtime.CPU_FLAGS]
    assert runtime.tuned_xla_flags("", True) == " ".join(runtime.CPU_FLAGS)


def test_user_choice_and_unsupported_jaxlib_left_alone():
    mine = f"--{runtime.YNN_FLAG}=dot,eltwise"
    assert runtime.tuned_xla_flags(mine, True) == mine
    assert runtime.tuned_xla_flags("--foo=1", False) == "--foo=1"


def test_opt_out_and_too_late():
    env = {runtime.OPT_OUT: "0"}
    assert runtime.configure_xla_cpu(env) is False and "XLA_FLAGS" not in env
    # This test process already runs JAX: the flags cannot take effect any more.
    import jax

    jax.numpy.zeros(1).block_until_ready()
    env = {}
    if runtime.flag_supported():
        with pytest.warns(RuntimeWarning, match="after JAX started"):
            assert runtime.configure_xla_cpu(env) is False
    assert "XLA_FLAGS" not in env


def test_fresh_process_runs_with_the_flags():
    code = ("import os; from tinyonn_jax.runtime import configure_xla_cpu, YNN_FLAG\n"
            "ok = configure_xla_cpu()\n"
            "import jax, jax.numpy as jnp\n"
            "x = jax.jit(lambda a: jnp.sum(jnp.tanh(a) @ a))(jnp.ones((64, 64)))\n"
            "print(ok, YNN_FLAG in os.environ.get('XLA_FLAGS', ''), float(x))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    supported = runtime.flag_supported()
    assert out[:2] == [str(supported), str(supported)]
    assert float(out[2]) == pytest.approx(64 * 64 * 64 * 0.7615941559557649, rel=1e-5)


def test_deterministic_flag_appended_once_and_user_value_kept():
    flag = f"--{runtime.GPU_DETERMINISTIC_FLAG}=true"
    assert runtime.deterministic_gpu_flags("") == flag
    assert runtime.deterministic_gpu_flags(" --foo=1 ").split() == ["--foo=1", flag]
    mine = f"--{runtime.GPU_DETERMINISTIC_FLAG}=false --foo=1"
    assert runtime.deterministic_gpu_flags(mine) == mine
    assert runtime.deterministic_gpu_flags(runtime.deterministic_gpu_flags("")) == flag


def test_deterministic_off_by_default_and_too_late_in_this_process():
    env = {}
    assert runtime.configure_deterministic(environ=env) is False and env == {}
    env = {runtime.DETERMINISTIC_ENV: "0"}
    assert runtime.configure_deterministic(environ=env) is False and "XLA_FLAGS" not in env
    import jax

    jax.numpy.zeros(1).block_until_ready()
    assert runtime.backends_started()
    env = {runtime.DETERMINISTIC_ENV: "1"}
    with pytest.warns(RuntimeWarning, match="after JAX started"):
        assert runtime.configure_deterministic(environ=env) is False
    assert "XLA_FLAGS" not in env


def _fresh_env(**extra) -> dict:
    drop = ("XLA_FLAGS", runtime.DETERMINISTIC_ENV, runtime.COMPILE_CACHE_ENV)
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env.update(extra)
    return env


def test_fresh_process_sets_deterministic_flag_before_jax_starts():
    code = ("import os, jax, jax.numpy as jnp\n"
            "from tinyonn_jax import runtime\n"
            "before = runtime.backends_started()\n"
            "ok = runtime.configure_deterministic()\n"
            "x = jax.jit(lambda a: jnp.zeros(4).at[a].add(1.0))(jnp.array([0, 1, 1]))\n"
            "print(before, ok, runtime.backends_started(), os.environ['XLA_FLAGS'], "
            "x.tolist() == [1.0, 2.0, 0.0, 0.0])\n")
    env = _fresh_env(**{runtime.DETERMINISTIC_ENV: "1", runtime.OPT_OUT: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True", "True", f"--{runtime.GPU_DETERMINISTIC_FLAG}=true", "True"]


CACHED_RUN = """
import jax, jax.numpy as jnp
from tinyonn_jax import runtime
path = runtime.configure_compile_cache()
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
x = jax.jit(lambda a: jnp.sin(a) @ a.T)(jnp.ones((8, 8)))
print(path, len(hits), float(x.sum()), jax.config.jax_persistent_cache_min_compile_time_secs)
"""


def test_compile_cache_written_then_hit(tmp_path):
    cache = tmp_path / "cache"
    env = _fresh_env(**{runtime.COMPILE_CACHE_ENV: str(cache),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    runs = [subprocess.run([sys.executable, "-c", CACHED_RUN], env=env, capture_output=True,
                           text=True, timeout=120, check=True).stdout.split() for _ in range(2)]
    assert [r[0] for r in runs] == [str(cache)] * 2
    assert int(runs[0][1]) == 0 and int(runs[1][1]) >= 1  # compiled and written, then loaded
    assert runs[0][2] == runs[1][2]
    assert runs[0][3] == "0.0"  # the threshold the user set is kept
    assert any(p.is_file() for p in cache.iterdir())


def test_compile_cache_directory_and_thresholds(tmp_path):
    import jax

    assert runtime.configure_compile_cache(None, environ={}) is None
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    try:
        env = {runtime.COMPILE_CACHE_ENV: str(tmp_path / "env")}
        assert runtime.configure_compile_cache(str(tmp_path / "flag"), environ=env) == str(
            tmp_path / "flag")  # the argument before the environment variable
        assert runtime.configure_compile_cache(None, environ=env) == str(tmp_path / "env")
        assert (tmp_path / "env").is_dir()
        assert [getattr(jax.config, n) for n in names] == [
            str(tmp_path / "env"), runtime.CACHE_MIN_COMPILE_TIME_S,
            runtime.CACHE_MIN_ENTRY_SIZE_BYTES]
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)


def test_cli_flags_reach_the_runtime_settings(monkeypatch, tmp_path):
    import train.evaluate
    import train.main

    seen = []
    for module in (train.main, train.evaluate):
        monkeypatch.setattr(module, "configure_compile_cache", lambda d: seen.append(("cache", d)))
    monkeypatch.setattr(train.main, "configure_deterministic",
                        lambda on: seen.append(("deterministic", on)))
    cache = str(tmp_path / "cache")
    missing = str(tmp_path / "missing.py")
    assert train.main.main(["--config", missing, "--workdir", str(tmp_path / "w")]) == 2
    assert train.main.main(["--config", missing, "--workdir", str(tmp_path / "w"),
                            "--deterministic", "--compile-cache", cache]) == 2
    with pytest.raises(SystemExit) as stop:
        train.evaluate.main(["--workdir", str(tmp_path / "none"), "--compile-cache", cache])
    assert stop.value.code == 2
    assert seen == [("deterministic", None), ("cache", None), ("deterministic", True),
                    ("cache", cache), ("cache", cache)]
