"""Config section of the SPL family (seed 001): ``SplConfig``."""

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

ACTIVATIONS = ("linear", "silu")
MASK_MODES = ("hard", "ste")
RECURSIONS = ("stacked", "dyntrm")
ROUTING_FORMS = ("cos_minus_gate",)
PROTECTION_RULES = ("seed", "original", "none")
ATTN_KINDS = ("q", "k", "v", "o")
FFN_KINDS = ("ffn1", "ffn2")


@dataclass(frozen=True, kw_only=True)
class SplConfig:
    """The SPL model family (seed 001) and its M-SAPS meta-learning."""

    vocab_size: int = 18
    hidden: int = 256
    num_layers: int = 8  # distinct layers when recursion == "stacked"
    recursion: str = "stacked"
    steps: int = 8  # refinement steps of the shared block when recursion == "dyntrm"
    use_moie: bool = True
    moie_mult: int = 2  # MoIE: hidden -> moie_mult*hidden -> hidden
    mask_mode: str = "ste"
    activation: str = "linear"  # seed 001: out = (x mu^T + b) * mask; "silu" is the final form
    routing_form: str = "cos_minus_gate"
    rope: str = "rope1d"
    rope_base: float = 10000.0
    init_std: float = 0.02  # embedding and prototypes; mu uses fan-in scaling, gates start at 0
    ln_eps: float = 1e-5
    final_norm: bool = True
    prc: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 on gpu/tpu, float32 on cpu
    attention: str = "auto"  # nn.attention.attend implementation; auto: per platform
    # M-SAPS (tinyonn_jax.families.spl.msaps)
    isolate: bool = True  # main loss -> main params only (routing params get only meta losses)
    w_proto: float = 1.0
    w_gate: float = 1.0
    l2_coef: float = 1e-4  # lambda = l2_coef * mean Frobenius norm of the mu and proto matrices
    ema_decay: float = 0.98  # EMA of main_acc (token accuracy): sets the protection temperature
    # Protection of the proto gradient, proto_weight.grad[j] *= 1 - p_j (msaps.protection):
    #   "seed": p_j = exp(-r_j / T), r_j in [0, 1) the global mid-rank of -||g_j|| (0 = best),
    #           T = min_temperature + (max_temperature - min_temperature) * EMA_acc: better
    #           accuracy -> looser (about T ln 2 of the neurons above p = 1/2), worse -> only the
    #           very best; the best neuron always has p = 1.
    #   "original": p = softmax(-||g|| / max(1 - EMA_acc, min_temperature)) over all neurons
    #           (the PyTorch code; p_j <= ~1/N, stricter as accuracy grows).
    #   "none": p = 0.
    protection: str = "seed"
    min_temperature: float = 0.01
    max_temperature: float = 0.5
    pi_alpha: float = 1.0  # metric only: train/pi_score = metrics.pi_score(L, tau, S, alpha, gamma)
    pi_gamma: float = 0.5

    def __post_init__(self) -> None:
        s = "model"
        check_field_types(s, self)
        positive_int(s, self, "vocab_size", "hidden", "num_layers", "steps", "moie_mult")
        choice(s, self, "recursion", RECURSIONS)
        choice(s, self, "mask_mode", MASK_MODES)
        choice(s, self, "activation", ACTIVATIONS)
        choice(s, self, "routing_form", ROUTING_FORMS)
        check_rope(s, self, self.hidden, "hidden (the single head's width)")
        check(0.0 < self.init_std < 1.0, s, "init_std", self.init_std, "must be in (0, 1)")
        check(0.0 < self.ln_eps < 1.0, s, "ln_eps", self.ln_eps, "must be in (0, 1)")
        choice(s, self, "compute_dtype", DTYPES)
        choice(s, self, "attention", ATTENTION_IMPLEMENTATIONS)
        non_negative(s, self, "w_proto", "w_gate", "l2_coef")
        check(0.0 <= self.ema_decay < 1.0, s, "ema_decay", self.ema_decay, "must be in [0, 1)")
        choice(s, self, "protection", PROTECTION_RULES)
        check(0.0 < self.min_temperature <= 1.0, s, "min_temperature", self.min_temperature,
               "must be in (0, 1]")
        check(self.min_temperature <= self.max_temperature <= 10.0, s, "max_temperature",
              self.max_temperature, f"must be in [min_temperature={self.min_temperature}, 10]")
        non_negative(s, self, "pi_alpha")
        check(0.0 <= self.pi_gamma <= 1.0, s, "pi_gamma", self.pi_gamma, "must be in [0, 1]")

    @property
    def kinds(self) -> tuple[str, ...]:
        """SPL module kinds of one block, in forward order."""
        return ATTN_KINDS + (FFN_KINDS if self.use_moie else ())

    def dims(self, kind: str) -> tuple[int, int]:
        """(d_in, d_out) of an SPL module kind."""
        d, f = self.hidden, self.moie_mult * self.hidden
        return {"ffn1": (d, f), "ffn2": (f, d)}.get(kind, (d, d))

    @property
    def num_sites(self) -> int:
        """L_eff: block applications per forward (layers, or refinement steps)."""
        return self.num_layers if self.recursion == "stacked" else self.steps

    @property
    def num_param_layers(self) -> int:
        """L_p: leading axis of the block parameters (1 when the block is shared)."""
        return self.num_layers if self.recursion == "stacked" else 1

    @property
    def num_prc(self) -> int:
        """Leading axis of the PRC transforms: one per layer after the first, or one shared."""
        if not self.prc or self.num_sites == 1:
            return 0
        return self.num_sites - 1 if self.recursion == "stacked" else 1
