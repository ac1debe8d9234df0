import os
import tempfile

# One persistent XLA compilation cache for the test session and the programs it starts (they
# inherit the environment): the many short training runs of the suite compile the same steps.
# A cached executable is the one the same program compiles to, so results do not change.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "tinyonn-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from tinyonn_jax.runtime import configure_xla_cpu

configure_xla_cpu()  # before any test starts a JAX backend

import jax  # noqa: E402
import pytest  # noqa: E402

from tinyonn_jax.config import ModelConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_model_config(**kw) -> ModelConfig:
    """hidden 16, 2 heads, 4 experts, 2 steps: the brute-force test size."""
    base = dict(vocab_size=18, hidden=16, num_heads=2, num_attn_experts=4, num_ffn_experts=4,
                ffn_mult=2, max_refinement_steps=2, attn_top_k=2, ffn_top_k=2, init_std=0.5)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()
