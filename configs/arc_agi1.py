"""Full-size DynTRM (design defaults) on ARC-AGI-1 training tasks, for GPU/TPU pods."""

from tinyonn_jax.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # DynSIHA+ in the original qkv_routers layout: with the seed's latent heads, the exact
        # per-token SARS cost of the key projections under RoPE is about hidden/2 times the
        # attention's own work (sars/heads.py).
        # Memory of the train step (bench/memory.py, compiled for the CPU, float32, dense
        # dispatch): one 4096-token row needs 53.6 GB with remat "none" and 7.9 GB with "full"
        # (one refinement step's activations kept; 0.4 GB of it is the train state); 8 rows
        # with "full" 56.8 GB. The global batch of 8 rows is split over the data axis, so a
        # device holds 8 / devices rows: 1 row on 8 chips fits a 16 GB TPU v5e, 2 rows (4
        # chips, about 15 GB) a 32 GB TPU v4, and 1 to 8 rows any 80 GB GPU. compute_dtype
        # "auto" computes in bfloat16 on GPU/TPU (parameters and routing stay float32); its
        # saving is not in these CPU numbers (XLA:CPU computes bfloat16 work in float32).
        model=ModelConfig(max_len=4096, remat="full", compute_dtype="auto",
                          attn_layout="qkv_routers"),
        optim=OptimizerConfig(name="adamw", learning_rate=1e-3, clip_value=1.0,
                              kwargs=(("weight_decay", 0.01),)),
        data=DataConfig(source="arc1", split="train", max_len=4096, batch_size=8,
                        min_bucket=256, views_per_task=4, curriculum_steps=20000),
        train=TrainConfig(num_steps=200000, log_every=50, plot_every=1000, ckpt_every=2000,
                          eval_every=2000, eval_tasks=32),
    )
