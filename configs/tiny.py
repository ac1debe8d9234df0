"""The CPU demo: a small DynTRM on the easiest real ARC-AGI-1 training tasks (a few minutes)."""

from tinyonn_jax.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    SarsConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        # model.max_len bounds generation only (RoPE: no parameters depend on it): a prompt of
        # up to 2048 - 932 tokens next to the 932-token answer budget of tinyonn-eval.
        # rope2d: rotary (grid, row, column) positions; on bench/learning.py's 20 tasks they
        # beat 1D positions in test token accuracy and well-formed answers (README).
        # Expert lifecycle (seeds 003, 004): half of each pool is live at the start; every 25
        # steps an expert routed nothing in the last 25 steps is removed and a free slot goes
        # to the tokens no expert took (logs/lifecycle.jsonl, the expert dashboard).
        model=ModelConfig(hidden=64, num_heads=4, num_attn_experts=16, num_ffn_experts=8,
                          ffn_mult=2, max_refinement_steps=4, rope="rope2d", max_len=2048,
                          lifecycle_period=25, lifecycle_window=25, init_attn_experts=8,
                          init_ffn_experts=4),
        sars=SarsConfig(),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, clip_value=1.0,
                              kwargs=(("weight_decay", 0.01),)),
        meta_optim=OptimizerConfig(name="adamw", learning_rate=1e-3,
                                   kwargs=(("weight_decay", 0.01),)),
        data=DataConfig(source="arc1", split="train", max_len=512, batch_size=4, min_bucket=128,
                        max_tasks=16, views_per_task=4),
        train=TrainConfig(num_steps=150, log_every=5, plot_every=50, ckpt_every=50,
                          eval_every=50, eval_tasks=4),
    )
