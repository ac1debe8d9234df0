"""The SPL family (seed 001) on the easiest ARC-AGI-1 tasks: a CPU demo of M-SAPS."""

from tinyonn_jax.config import Config, DataConfig, OptimizerConfig, TrainConfig
from tinyonn_jax.families.spl.config import SplConfig


def get_config() -> Config:
    return Config(
        family="spl",
        model=SplConfig(hidden=64, num_layers=2, recursion="stacked", moie_mult=2),
        # Adam without decoupled decay: M-SAPS has its own adaptive L2 (seed 001).
        optim=OptimizerConfig(name="adam", learning_rate=3e-3, kwargs=()),
        meta_optim=OptimizerConfig(name="adam", learning_rate=5e-4, kwargs=()),
        data=DataConfig(source="arc1", split="train", max_len=512, batch_size=4, min_bucket=128,
                        max_tasks=16, views_per_task=4),
        train=TrainConfig(num_steps=150, log_every=5, plot_every=50, ckpt_every=50,
                          eval_every=50, eval_tasks=4),
    )
