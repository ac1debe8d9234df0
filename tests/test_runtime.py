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
