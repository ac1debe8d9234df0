"""Config sections of the DynTRM family: the model (``ModelConfig``) and SARS (``SarsConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyonn_jax.fields import (
    DTYPES,
    check,
    check_field_types,
    check_rope,
    choice,
    non_negative,
    positive_int,
)
from tinyonn_jax.nn.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

ROUTING_MODES = ("capr", "topk", "dense")
REMAT_POLICIES = ("none", "full", "save_dots")
IMPORTANCE_MODES = ("attribution", "output_grad")
META_LOSSES = ("entropy_plus", "entropy_minus", "entropy_plain", "dyntrm_original")
DISPATCH_MODES = ("auto", "dense", "scan", "sparse")
ATTN_KINDS = ("dynsiha", "mha")  # mha: the dense baseline of dense.py
FFN_KINDS = ("dynmoe", "swiglu")  # swiglu: the dense baseline of dense.py
# DynSIHA+ layouts: latent_heads = seed 000 section 2.1 (latent_heads.py), qkv_routers = the
# original code's per-head q/k/v routers over a shared ExpertMLP library (dynsiha.py).
ATTN_LAYOUTS = ("latent_heads", "qkv_routers")
HALTING_RULES = ("learned", "uncertainty", "none")  # inference early exit (halting.py)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of DynTRM with DynSIHA+ attention and DynMoE feed-forward experts."""

    vocab_size: int = 18
    hidden: int = 512
    num_heads: int = 8
    # DynSIHA+ layout. latent_heads (seed 000 section 2.1, the default): one router
    # proto_attn (P, D), gate_attn (P,) picks latent attention heads per token, each a full
    # attention head (Wq, Wk, Wv (D, Dh), Wo (Dh, D)); the output is sum_p z_p head_p(x).
    # qkv_routers (the original code): every physical head's q, k, v composed by three routers
    # (P, Dh) over a shared library of latent-head MLPs; the PyTorch interop uses it.
    attn_layout: str = "latent_heads"
    num_attn_experts: int = 64  # P latent attention heads (either layout), width hidden/heads
    attn_expert_hidden: int = 0  # qkv_routers: hidden width of a latent head's MLP; 0 = Dh
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
    # Inference halting rule (families/dyntrm/halting.py); training always runs every step.
    # learned: the ACT head, halt_threshold; uncertainty: a row stops after the first step whose
    # mean output entropy over its valid tokens is below halt_tau (seed 000 section 4);
    # none: always max_refinement_steps.
    halting: str = "learned"
    halt_tau: float = 0.1  # entropy threshold of the uncertainty rule, nats (ln 18 = 2.89)
    # Expert evaluation. dense: every expert on every token, one batched einsum (accelerators);
    # scan: the same sums one expert at a time (CPU); sparse: only active (token, expert)
    # pairs, grouped by expert with a fixed capacity; auto: scan on CPU, dense elsewhere.
    attn_dispatch: str = "auto"
    ffn_dispatch: str = "auto"
    capacity_frac: float = 0.25  # sparse dispatch: an expert takes at most this share of tokens
    # Sparse latent-head library: slots per expert as a share of (token, head) rows; its one
    # dispatch serves the union of the q, k and v active sets. 0 = capacity_frac.
    attn_capacity_frac: float = 0.0
    compute_dtype: str = "auto"  # auto: bfloat16 on gpu/tpu, float32 on cpu
    attention: str = "auto"  # nn.attention.attend implementation; auto: per platform
    max_len: int = 4096
    # Dense baselines (issue 10): the same recursion with unrouted sublayers.
    attn_kind: str = "dynsiha"  # dynsiha | mha (q, k, v, o projections (D, D))
    ffn_kind: str = "dynmoe"  # dynmoe | swiglu (one dense SwiGLU FFN)
    swiglu_hidden: int = 0  # SwiGLU width; 0 = 2/3 of ffn_hidden (one expert's parameters)
    # Expert lifecycle (seeds 003, 004; lifecycle.py) of the pools "attn" (the latent-head
    # library, num_attn_experts slots) and "ffn" (num_ffn_experts slots): every
    # lifecycle_period steps (0 = never) a live expert routed no token in the last
    # lifecycle_window steps is removed (seed 004) or, with regenerate, re-initialised in place
    # (seed 003), and the first free slot becomes a new expert whose prototype is the mean
    # direction of the tokens no expert took ("homeless") since the last maintenance.
    lifecycle_period: int = 0
    lifecycle_window: int = 100
    regenerate: bool = False
    init_attn_experts: int = 0  # live latent heads at the start (the first slots); 0 = all
    init_ffn_experts: int = 0  # live FFN experts at the start (the first slots); 0 = all

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
        check_rope(s, self, self.head_dim, "head width")
        check(0.0 < self.ln_eps < 1.0, s, "ln_eps", self.ln_eps, "must be in (0, 1)")
        check(0.0 < self.init_std < 1.0, s, "init_std", self.init_std, "must be in (0, 1)")
        choice(s, self, "remat", REMAT_POLICIES)
        check(0.0 <= self.halt_threshold, s, "halt_threshold", self.halt_threshold,
               "must be >= 0 (values > 1 disable early exit)")
        choice(s, self, "halting", HALTING_RULES)
        check(self.halt_tau > 0.0, s, "halt_tau", self.halt_tau, "must be > 0 (nats)")
        choice(s, self, "attn_dispatch", DISPATCH_MODES)
        choice(s, self, "ffn_dispatch", DISPATCH_MODES)
        check(0.0 < self.capacity_frac <= 1.0, s, "capacity_frac", self.capacity_frac,
               "must be in (0, 1]")
        check(isinstance(self.attn_capacity_frac, (int, float))
               and 0.0 <= self.attn_capacity_frac <= 1.0, s, "attn_capacity_frac",
               self.attn_capacity_frac, "must be in [0, 1] (0 = capacity_frac)")
        choice(s, self, "compute_dtype", DTYPES)
        choice(s, self, "attention", ATTENTION_IMPLEMENTATIONS)
        choice(s, self, "attn_kind", ATTN_KINDS)
        choice(s, self, "attn_layout", ATTN_LAYOUTS)
        if self.latent_heads:  # its heads are evaluated densely: nothing to dispatch sparsely
            check(self.attn_dispatch != "sparse", s, "attn_dispatch", self.attn_dispatch,
                   "sparse dispatch needs attn_layout='qkv_routers' (latent heads are dense)")
        choice(s, self, "ffn_kind", FFN_KINDS)
        check(isinstance(self.swiglu_hidden, int) and not isinstance(self.swiglu_hidden, bool)
               and self.swiglu_hidden >= 0, s, "swiglu_hidden", self.swiglu_hidden,
               "must be an integer >= 0 (0 = auto)")
        check(self.lifecycle_period >= 0, s, "lifecycle_period", self.lifecycle_period,
               "must be an integer >= 0 (0 = no lifecycle)")
        positive_int(s, self, "lifecycle_window")
        for name, pool, routing, top_k in (
                ("init_attn_experts", "num_attn_experts", self.attn_routing, "attn_top_k"),
                ("init_ffn_experts", "num_ffn_experts", self.ffn_routing, "ffn_top_k")):
            n, size = getattr(self, name), getattr(self, pool)
            check(0 <= n <= size, s, name, n, f"must be in [0, {pool}={size}] (0 = all)")
            if routing == "topk":  # top-k picks among live experts only
                check((n or size) >= getattr(self, top_k), s, name, n,
                       f"must be >= {top_k}={getattr(self, top_k)} with top-k routing")

    @property
    def routed_sites(self) -> tuple[str, ...]:
        """Expert call sites that exist: attn (latent heads) or q, k, v (qkv_routers), and ffn
        (DynMoE)."""
        sites = () if self.attn_kind != "dynsiha" else (
            ("attn",) if self.latent_heads else ("q", "k", "v"))
        if self.use_ffn and self.ffn_kind == "dynmoe":
            sites += ("ffn",)
        return sites

    @property
    def latent_heads(self) -> bool:
        """DynSIHA+ in the seed's latent-head layout (``attn_layout="latent_heads"``)."""
        return self.attn_kind == "dynsiha" and self.attn_layout == "latent_heads"

    @property
    def attn_capacity(self) -> float:
        """Sparse capacity share of the latent-head library (default: the FFN's)."""
        return self.attn_capacity_frac or self.capacity_frac

    @property
    def initial_live(self) -> dict[str, int]:
        """Live experts per pool at the start (``init_*_experts``, 0 meaning the whole pool)."""
        return {"attn": self.init_attn_experts or self.num_attn_experts,
                "ffn": self.init_ffn_experts or self.num_ffn_experts}

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
    pi_alpha: float = 1.0  # PI = metrics.pi_score(L, tau, S; alpha, gamma) (metrics.PI_FORMULA)
    pi_gamma: float = 0.5

    def __post_init__(self) -> None:
        s = "sars"
        check_field_types(s, self)
        choice(s, self, "importance", IMPORTANCE_MODES)
        choice(s, self, "meta_loss", META_LOSSES)
        non_negative(s, self, "w_meta", "w_act", "pi_alpha")
        check(0.0 <= self.pi_gamma <= 1.0, s, "pi_gamma", self.pi_gamma, "must be in [0, 1]")
