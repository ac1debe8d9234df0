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
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from tinyonn_jax.config import Config, DynOnnConfig, ModelConfig, SplConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's in-memory compiled programs after every test module. Each CPU executable keeps
    memory mappings; a worker that compiles half the suite would otherwise pass the kernel's
    per-process limit (vm.max_map_count, 65530 by default) and crash inside XLA. The persistent
    compilation cache above still serves later modules that compile the same programs."""
    yield
    jax.clear_caches()


def tiny_model_config(**kw) -> ModelConfig:
    """hidden 16, 2 heads, 4 experts, 2 steps: the brute-force test size."""
    base = dict(vocab_size=18, hidden=16, num_heads=2, num_attn_experts=4, num_ffn_experts=4,
                ffn_mult=2, max_refinement_steps=2, attn_top_k=2, ffn_top_k=2, init_std=0.5)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


# One tiny config per family: a few experts, two layers or steps (the family-wide tests).
TINY_FAMILY_CONFIGS = {
    "dyntrm": Config(family="dyntrm", model=tiny_model_config()),
    "spl": Config(family="spl", model=SplConfig(hidden=16, num_layers=2, moie_mult=2)),
    "dynonn": Config(family="dynonn", model=DynOnnConfig(
        hidden=16, num_heads=2, head_dim=4, ffn_hidden=8, num_layers=2, max_experts=4,
        init_experts=3, lifecycle_window=4, lifecycle_period=3)),
}


def tiny_batch(cfg: Config, b: int = 2, t: int = 8) -> dict:
    """A (b, t) batch of colour tokens, one sequence per row, every slot valid."""
    toks = jax.random.randint(jax.random.key(1), (b, t + 1), 8, cfg.model.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def packed_batch(seed: int = 0) -> dict:
    """(2, 8): row 0 packs two sequences (5 + 3 tokens); row 1 is one sequence with 2 padding
    slots; the first target of each row carries no weight."""
    toks = jax.random.randint(jax.random.key(seed + 11), (2, 9), 0, 18)
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]], jnp.int32)
    w = (seg > 0).astype(jnp.float32).at[:, 0].set(0.0)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=w, segment_ids=seg,
                positions=pos)
