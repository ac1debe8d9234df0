"""Config section of the DynONN family (seeds 002-004): ``DynOnnConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from tinyonn_jax import backend
from tinyonn_jax.fields import (
    DTYPES,
    check,
    check_field_types,
    check_rope,
    choice,
    non_negative,
    positive_int,
)
from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

STRUCTURES = ("stack", "recursion")
SURPRISE_MODES = ("weight_grad", "output_grad")
SMHA_MODES = ("head_outputs", "weight_mix")
GATING_LOSSES = ("pi_adaptive", "surprise_min")


@dataclass(frozen=True, kw_only=True)
class DynOnnConfig:
    """DynONN (DynSMHA + DynMoE with GAMoE gates) and its 1f2b1o training (seed 003)."""

    vocab_size: int = 18
    hidden: int = 256
    num_heads: int = 1  # heads of width head_dim per attention expert (Hw = num_heads * head_dim)
    head_dim: int = 32
    ffn_hidden: int = 32  # hidden width of one FFN expert
    num_layers: int = 3  # stacked layers, or passes of the one shared layer (recursion)
    structure: str = "stack"
    max_experts: int = 32  # fixed pool size per gate
    init_experts: int = 32  # live experts at initialisation (the first slots)
    fallback: str = "always"  # K=0 tokens -> best expert: always | eval (upstream) | never
    weight_mode: str = "uniform"  # uniform (a/K, upstream) | normalized (relu scores / sum)
    gate_init_t: float = 0.1  # initial logit scale 1/t (upstream init_t)
    # head_outputs: every attention expert is a real head whose outputs are aggregated by the
    # routing weights (seed 002); weight_mix: Wq,k,v,o mixed per token, one attention (reference).
    smha_mode: str = "head_outputs"
    rope: str = "rope1d"
    rope_base: float = 10000.0
    ln_eps: float = 1e-5
    init_std: float = 0.02  # embedding
    surprise: str = "weight_grad"  # |dL/dw_te| | output_grad (||dL/d(expert output at t)||)
    # pi_adaptive: lambda(PI) L_balance + (1 - lambda(PI)) L_smk (seed 003);
    # surprise_min: w_ce CE(routing, argmin S) + w_kl KL(softmax(-S) || softmax(routing)) (002).
    gating_loss: str = "pi_adaptive"
    w_ce: float = 1.0
    w_kl: float = 1.0
    pi_alpha: float = 1.0  # PI = metrics.pi_score(L, tau, S; alpha, gamma)
    pi_gamma: float = 0.5
    pi_threshold: float = 0.75  # lambda(PI) = 1 - sigmoid(sensitivity (PI - threshold))
    pi_sensitivity: float = 10.0
    w_sdl: float = 0.01  # prototype diversity + simplicity (upstream SDL)
    w_sparsity: float = 0.0  # mean activation (upstream adds it to l_aux)
    lifecycle_period: int = 1000  # steps between pool maintenances; 0 = never
    lifecycle_window: int = 1000  # steps of routing history that decide "dead"
    regenerate: bool = False  # dead experts: re-initialise (True) or remove (False)
    fuse: bool = False  # zero the main gradient of experts with surprise > mean + k sigma
    fuse_sigma: float = 2.0
    compute_dtype: str = "auto"  # auto: bfloat16 on gpu/tpu, float32 on cpu
    attention: str = "auto"  # nn.attention.attend implementation; auto: per platform
    remat: bool = False

    def __post_init__(self) -> None:
        s = "model"
        check_field_types(s, self)
        positive_int(s, self, "vocab_size", "hidden", "num_heads", "head_dim", "ffn_hidden",
                      "num_layers", "max_experts", "init_experts", "lifecycle_window")
        check(self.init_experts <= self.max_experts, s, "init_experts", self.init_experts,
               f"must be <= max_experts={self.max_experts}")
        choice(s, self, "structure", STRUCTURES)
        choice(s, self, "fallback", gamoe.FALLBACKS)
        choice(s, self, "weight_mode", gamoe.WEIGHT_MODES)
        check_rope(s, self, self.head_dim, "head_dim")
        check(0.0 < self.gate_init_t <= 100.0, s, "gate_init_t", self.gate_init_t,
               "must be in (0, 100]")
        check(0.0 < self.ln_eps < 1.0, s, "ln_eps", self.ln_eps, "must be in (0, 1)")
        check(0.0 < self.init_std < 1.0, s, "init_std", self.init_std, "must be in (0, 1)")
        choice(s, self, "surprise", SURPRISE_MODES)
        choice(s, self, "smha_mode", SMHA_MODES)
        choice(s, self, "gating_loss", GATING_LOSSES)
        non_negative(s, self, "pi_alpha", "pi_sensitivity", "w_sdl", "w_sparsity", "w_ce",
                      "w_kl", "lifecycle_period", "fuse_sigma")
        check(0.0 <= self.pi_gamma <= 1.0, s, "pi_gamma", self.pi_gamma, "must be in [0, 1]")
        check(0.0 <= self.pi_threshold <= 1.0, s, "pi_threshold", self.pi_threshold,
               "must be in [0, 1]")
        check(isinstance(self.lifecycle_period, int), s, "lifecycle_period",
               self.lifecycle_period, "must be an integer")
        choice(s, self, "compute_dtype", DTYPES)
        choice(s, self, "attention", ATTENTION_IMPLEMENTATIONS)

    @property
    def groups(self) -> int:
        """G: distinct parameter sets per site (layers, or 1 for the recursion)."""
        return self.num_layers if self.structure == "stack" else 1

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def dtype(self):
        """The compute dtype on the platform being traced for (``backend.compute_dtype``)."""
        return backend.compute_dtype(self.compute_dtype)
