"""Config sections of the DynTRM family: the model (``ModelConfig``) and SARS (``SarsConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyonn_jax.fields import (
    DTYPES,
    ROPE_MODES,
    check,
    check_field_types,
    choice,
    non_negative,
    positive_int,
)

ROUTING_MODES = ("capr", "topk", "dense")
REMAT_POLICIES = ("none", "full", "save_dots")
IMPORTANCE_MODES = ("attribution", "output_grad")
META_LOSSES = ("entropy_plus", "entropy_minus", "entropy_plain", "dyntrm_original")
DISPATCH_MODES = ("auto", "dense", "scan", "sparse")
ATTN_KINDS = ("dynsiha", "mha")  # mha: the dense baseline of dense.py
FFN_KINDS = ("dynmoe", "swiglu")  # swiglu: the dense baseline of dense.py


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of DynTRM with DynSIHA+ attention and DynMoE feed-forward experts."""

    vocab_size: int = 18
    hidden: int = 512
    num_heads: int = 8
    num_attn_experts: int = 64  # latent attention heads in the shared library, width hidden/heads
    attn_expert_hidden: int = 0  # hidden width of a latent head's MLP; 0 means hidden/heads
    num_ffn_experts: int = 16
    ffn_mult: int = 4  # FFN expert: hidden -> ffn_mult*hidden -> hidden
    use_ffn: bool = True  # False reproduces the original attention-only block
    max_refinement_steps: int = 8
    attn_routing: str = "capr"
    ffn_routing: str = "capr"
    attn_top_k: int = 8
    ffn_top_k: int = 2
    rope: str = "rope1d"
    rope_base: float = 10000.0
    final_norm: bool = True
    ln_eps: float = 1e-5
    init_std: float = 0.02
    # Rematerialisation of the refinement-step scan body (routing decisions always saved):
    # none | full (keep one step's activations; the full-size configs use it) | save_dots.
    remat: str = "none"
    halt_threshold: float = 0.5  # inference early exit when sigmoid(q_halt - q_continue) > this
    # Expert evaluation. dense: every expert on every token, one batched einsum (accelerators);
    # scan: the same sums one expert at a time (CPU); sparse: only active (token, expert)
    # pairs, grouped by expert with a fixed capacity; auto: scan on CPU, dense elsewhere.
    attn_dispatch: str = "auto"
    ffn_dispatch: str = "auto"
    capacity_frac: float = 0.25  # sparse dispatch: an expert takes at most this share of tokens
    # Sparse latent-head library: slots per expert as a share of (token, head) rows; its one
    # dispatch serves the union of the q, k and v active sets. 0 = capacity_frac.
    attn_capacity_frac: float = 0.0
    compute_dtype: str = "float32"
    max_len: int = 4096
    # Dense baselines (issue 10): the same recursion with unrouted sublayers.
    attn_kind: str = "dynsiha"  # dynsiha | mha (q, k, v, o projections (D, D))
    ffn_kind: str = "dynmoe"  # dynmoe | swiglu (one dense SwiGLU FFN)
    swiglu_hidden: int = 0  # SwiGLU width; 0 = 2/3 of ffn_hidden (one expert's parameters)

    def __post_init__(self) -> None:
        s = "model"
        check_field_types(s, self)
        positive_int(s, self, "vocab_size", "hidden", "num_heads", "num_attn_experts",
                      "num_ffn_experts", "ffn_mult", "max_refinement_steps", "attn_top_k",
                      "ffn_top_k", "max_len")
        check(self.hidden % self.num_heads == 0, s, "num_heads", self.num_heads,
               f"must divide hidden={self.hidden}")
        check(isinstance(self.attn_expert_hidden, int) and self.attn_expert_hidden >= 0, s,
               "attn_expert_hidden", self.attn_expert_hidden, "must be an integer >= 0")
        choice(s, self, "attn_routing", ROUTING_MODES)
        choice(s, self, "ffn_routing", ROUTING_MODES)
        if self.attn_routing == "topk":
            check(self.attn_top_k <= self.num_attn_experts, s, "attn_top_k", self.attn_top_k,
                   f"must be <= num_attn_experts={self.num_attn_experts}")
        if self.ffn_routing == "topk":
            check(self.ffn_top_k <= self.num_ffn_experts, s, "ffn_top_k", self.ffn_top_k,
                   f"must be <= num_ffn_experts={self.num_ffn_experts}")
        choice(s, self, "rope", ROPE_MODES)
        if self.rope == "rope1d":
            check(self.head_dim % 2 == 0, s, "rope", self.rope,
                   f"1D RoPE needs an even head width, got {self.head_dim}")
        check(self.rope_base > 1.0, s, "rope_base", self.rope_base, "must be > 1")
        check(0.0 < self.ln_eps < 1.0, s, "ln_eps", self.ln_eps, "must be in (0, 1)")
        check(0.0 < self.init_std < 1.0, s, "init_std", self.init_std, "must be in (0, 1)")
        choice(s, self, "remat", REMAT_POLICIES)
        check(0.0 <= self.halt_threshold, s, "halt_threshold", self.halt_threshold,
               "must be >= 0 (values > 1 disable early exit)")
        choice(s, self, "attn_dispatch", DISPATCH_MODES)
        choice(s, self, "ffn_dispatch", DISPATCH_MODES)
        check(0.0 < self.capacity_frac <= 1.0, s, "capacity_frac", self.capacity_frac,
               "must be in (0, 1]")
        check(isinstance(self.attn_capacity_frac, (int, float))
               and 0.0 <= self.attn_capacity_frac <= 1.0, s, "attn_capacity_frac",
               self.attn_capacity_frac, "must be in [0, 1] (0 = capacity_frac)")
        choice(s, self, "compute_dtype", DTYPES)
        choice(s, self, "attn_kind", ATTN_KINDS)
        choice(s, self, "ffn_kind", FFN_KINDS)
        check(isinstance(self.swiglu_hidden, int) and not isinstance(self.swiglu_hidden, bool)
               and self.swiglu_hidden >= 0, s, "swiglu_hidden", self.swiglu_hidden,
               "must be an integer >= 0 (0 = auto)")

    @property
    def routed_sites(self) -> tuple[str, ...]:
        """Expert call sites that exist: q, k, v (DynSIHA+) and ffn (DynMoE)."""
        sites = ("q", "k", "v") if self.attn_kind == "dynsiha" else ()
        if self.use_ffn and self.ffn_kind == "dynmoe":
            sites += ("ffn",)
        return sites

    @property
    def attn_capacity(self) -> float:
        """Sparse capacity share of the latent-head library (default: the FFN's)."""
        return self.attn_capacity_frac or self.capacity_frac

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def attn_mlp_hidden(self) -> int:
        return self.attn_expert_hidden or self.head_dim

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_mult * self.hidden

    @property
    def swiglu_width(self) -> int:
        """SwiGLU hidden width: 3 matrices of 2/3 width hold one 2-matrix expert's weights."""
        return self.swiglu_hidden or max(1, (2 * self.ffn_hidden) // 3)


@dataclass(frozen=True, kw_only=True)
class SarsConfig:
    """Surprise-aware routing shaping: goodness, meta loss, gradient isolation."""

    enabled: bool = True
    importance: str = "attribution"
    # entropy_minus: seed 000 (log p(z) = log p(z|x) - log p(x|z)); see sars/losses.py for
    # the direction each variant moves routing mass.
    meta_loss: str = "entropy_minus"
    w_meta: float = 1.0
    w_act: float = 0.01
    isolate: bool = True  # main loss -> main params only; meta loss -> meta params only
    pi_alpha: float = 1.0  # PI = exp(-alpha * ((1 - gamma) * L / tau + gamma * S)), seed 003
    pi_gamma: float = 0.5

    def __post_init__(self) -> None:
        s = "sars"
        check_field_types(s, self)
        choice(s, self, "importance", IMPORTANCE_MODES)
        choice(s, self, "meta_loss", META_LOSSES)
        non_negative(s, self, "w_meta", "w_act", "pi_alpha")
        check(0.0 <= self.pi_gamma <= 1.0, s, "pi_gamma", self.pi_gamma, "must be in [0, 1]")
