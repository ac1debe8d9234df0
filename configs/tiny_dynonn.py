"""The DynONN family (DynSMHA + GAMoE-gated DynMoE, 1f2b1o PI-adaptive gating, a live expert
pool; seeds 002-004) on the easiest ARC-AGI-1 tasks: a CPU demo of the expert lifecycle."""

from tinyonn_jax.config import Config, DataConfig, OptimizerConfig, TrainConfig
from tinyonn_jax.families.dynonn.config import DynOnnConfig


def get_config() -> Config:
    return Config(
        family="dynonn",
        # One head of 32 per attention expert (seed 002 / dyn_all_poc): under the default
        # smha_mode="head_outputs" every expert attends over the sequence, so the attention
        # cost grows with max_experts * num_heads.
        model=DynOnnConfig(hidden=64, num_heads=1, head_dim=32, ffn_hidden=32, num_layers=2,
                           max_experts=16, init_experts=12, lifecycle_period=20,
                           lifecycle_window=20, regenerate=False),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, kwargs=(("weight_decay", 0.01),)),
        meta_optim=OptimizerConfig(name="adamw", learning_rate=1e-3,
                                   kwargs=(("weight_decay", 0.01),)),
        data=DataConfig(source="arc1", split="train", max_len=512, batch_size=4, min_bucket=128,
                        max_tasks=16, views_per_task=4),
        train=TrainConfig(num_steps=150, log_every=5, plot_every=50, ckpt_every=50,
                          eval_every=50, eval_tasks=4),
    )
