"""Configuration: frozen keyword-only dataclasses, validated on construction.

Every section rejects bad values with a ``ValueError`` that names the offending field, so a
typo in a config file or on the command line fails before anything is traced by JAX.
``Config.replace_path("model.hidden", 64)`` and ``apply_overrides`` give the ``--set`` syntax of
the training program; a ``--set`` value is parsed by the declared type of its field
(``parse_field_value``), so ``model.use_ffn=false`` is the bool ``False`` and
``optim.learning_rate=abc`` is an error naming the field. Every field is type-checked on
construction (``check_field_types``): bools are bools, integers are integers, floats are finite.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from tinyonn_jax.errors import ConfigError

MODEL_FAMILIES = ("dyntrm", "spl", "dynmoe")
ROUTING_MODES = ("capr", "topk", "dense")
ROPE_MODES = ("none", "rope1d")
REMAT_POLICIES = ("none", "full", "save_dots")
IMPORTANCE_MODES = ("attribution", "output_grad")
META_LOSSES = ("entropy_plus", "entropy_minus", "entropy_plain", "dyntrm_original")
DISPATCH_MODES = ("auto", "dense", "scan", "sparse")
DTYPES = ("float32", "bfloat16")
ATTN_KINDS = ("dynsiha", "mha")  # mha: the dense baseline of model/dense.py
FFN_KINDS = ("dynmoe", "swiglu")  # swiglu: the dense baseline of model/dense.py


def _check(cond: bool, section: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config {section}.{name}={value!r}: {why}")


BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_error(section: str, name: str, value: Any, typ: Any) -> ConfigError | None:
    """Why ``value`` is not of the declared type ``typ`` (None when it is)."""
    if typ is Any:
        return None
    if typ is bool:
        ok, what = isinstance(value, bool), "a bool (true/false)"
    elif typ is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif typ is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        what = "a finite number"
    elif typ is str:
        ok, what = isinstance(value, str), "a string"
    elif typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, tuple):
            return ConfigError(f"config {section}.{name}={value!r}: must be a tuple")
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        for i, v in enumerate(value):
            sub = inner if inner is not None else (args[i] if i < len(args) else Any)
            err = _type_error(section, f"{name}[{i}]", v, sub)
            if err is not None:
                return err
        return None
    else:  # nested dataclasses and other declared types: checked by their own classes
        return None
    return None if ok else ConfigError(f"config {section}.{name}={value!r}: must be {what}")


def check_field_types(section: str, obj: Any) -> None:
    """Raise ``ConfigError`` naming the first field whose value does not have its declared type.

    bool fields take only bools, int fields only integers (not bools), float fields any finite
    int or float (never inf or NaN), str fields strings, tuple fields tuples of their element type.
    """
    types = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        err = _type_error(section, f.name, getattr(obj, f.name), types[f.name])
        if err is not None:
            raise err


def parse_field_value(path: str, typ: Any, text: str) -> Any:
    """Parse the ``--set`` text of the field ``path`` by its declared type ``typ``.

    bool: true/false, 1/0, yes/no, on/off in any case; int: an integer literal; float: a finite
    number; str: the text (surrounding quotes removed); tuple: a Python literal (``(1, 0.5)``,
    ``1,0.5``, ``()``, a dict for keyword tuples); anything else: a Python literal, else the text.
    """
    text = text.strip()

    def bad(accepted: str) -> ConfigError:
        return ConfigError(f"config {path}={text!r}: expected {accepted}")

    if typ is bool:
        word = text.lower()
        if word not in BOOL_WORDS:
            raise bad("a bool: true/false, 1/0, yes/no or on/off (any case)")
        return BOOL_WORDS[word]
    if typ is int:
        try:
            return int(text.replace("_", ""), 10)
        except ValueError:
            raise bad("an integer, e.g. 3") from None
    if typ is float:
        try:
            value = float(text)
        except ValueError:
            raise bad("a number, e.g. 3e-4") from None
        if not math.isfinite(value):
            raise bad("a finite number (not inf or nan)")
        return value
    if typ is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    try:
        value = ast.literal_eval(text) if text else ()
    except (ValueError, SyntaxError):
        if typing.get_origin(typ) is tuple:
            raise bad("a tuple literal, e.g. (1.0, 0.5) or ()") from None
        return text
    if typing.get_origin(typ) is tuple:
        if isinstance(value, dict):
            return tuple(sorted(value.items()))
        if isinstance(value, list):
            return tuple(value)
        if not isinstance(value, tuple):
            return (value,)
    return value


def _positive_int(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, section, n, v,
               "must be a positive integer")


def _non_negative(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, section, n, v,
               "must be a non-negative number")


def _choice(section: str, obj: Any, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    _check(v in choices, section, name, v, f"must be one of {choices}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of DynTRM with DynSIHA+ attention and DynMoE feed-forward experts."""

    family: str = "dyntrm"  # dyntrm (this section) | spl (section spl) | dynmoe (section moe)
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
        _choice(s, self, "family", MODEL_FAMILIES)
        _positive_int(s, self, "vocab_size", "hidden", "num_heads", "num_attn_experts",
                      "num_ffn_experts", "ffn_mult", "max_refinement_steps", "attn_top_k",
                      "ffn_top_k", "max_len")
        _check(self.hidden % self.num_heads == 0, s, "num_heads", self.num_heads,
               f"must divide hidden={self.hidden}")
        _check(isinstance(self.attn_expert_hidden, int) and self.attn_expert_hidden >= 0, s,
               "attn_expert_hidden", self.attn_expert_hidden, "must be an integer >= 0")
        _choice(s, self, "attn_routing", ROUTING_MODES)
        _choice(s, self, "ffn_routing", ROUTING_MODES)
        if self.attn_routing == "topk":
            _check(self.attn_top_k <= self.num_attn_experts, s, "attn_top_k", self.attn_top_k,
                   f"must be <= num_attn_experts={self.num_attn_experts}")
        if self.ffn_routing == "topk":
            _check(self.ffn_top_k <= self.num_ffn_experts, s, "ffn_top_k", self.ffn_top_k,
                   f"must be <= num_ffn_experts={self.num_ffn_experts}")
        _choice(s, self, "rope", ROPE_MODES)
        if self.rope == "rope1d":
            _check(self.head_dim % 2 == 0, s, "rope", self.rope,
                   f"1D RoPE needs an even head width, got {self.head_dim}")
        _check(self.rope_base > 1.0, s, "rope_base", self.rope_base, "must be > 1")
        _check(0.0 < self.ln_eps < 1.0, s, "ln_eps", self.ln_eps, "must be in (0, 1)")
        _check(0.0 < self.init_std < 1.0, s, "init_std", self.init_std, "must be in (0, 1)")
        _choice(s, self, "remat", REMAT_POLICIES)
        _check(0.0 <= self.halt_threshold, s, "halt_threshold", self.halt_threshold,
               "must be >= 0 (values > 1 disable early exit)")
        _choice(s, self, "attn_dispatch", DISPATCH_MODES)
        _choice(s, self, "ffn_dispatch", DISPATCH_MODES)
        _check(0.0 < self.capacity_frac <= 1.0, s, "capacity_frac", self.capacity_frac,
               "must be in (0, 1]")
        _check(isinstance(self.attn_capacity_frac, (int, float))
               and 0.0 <= self.attn_capacity_frac <= 1.0, s, "attn_capacity_frac",
               self.attn_capacity_frac, "must be in [0, 1] (0 = capacity_frac)")
        _choice(s, self, "compute_dtype", DTYPES)
        _choice(s, self, "attn_kind", ATTN_KINDS)
        _choice(s, self, "ffn_kind", FFN_KINDS)
        _check(isinstance(self.swiglu_hidden, int) and not isinstance(self.swiglu_hidden, bool)
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
    meta_loss: str = "entropy_plus"
    w_meta: float = 1.0
    w_act: float = 0.01
    isolate: bool = True  # main loss -> main params only; meta loss -> meta params only
    pi_alpha: float = 1.0  # PI = exp(-alpha * ((1 - gamma) * L / tau + gamma * S)), seed 003
    pi_gamma: float = 0.5

    def __post_init__(self) -> None:
        s = "sars"
        check_field_types(s, self)
        _choice(s, self, "importance", IMPORTANCE_MODES)
        _choice(s, self, "meta_loss", META_LOSSES)
        _non_negative(s, self, "w_meta", "w_act", "pi_alpha")
        _check(0.0 <= self.pi_gamma <= 1.0, s, "pi_gamma", self.pi_gamma, "must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """One optax chain: any ``optax.<name>(learning_rate, **kwargs)`` plus clipping and schedule."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    kwargs: tuple[tuple[str, Any], ...] = (("weight_decay", 0.01),)
    clip_value: float = 0.0  # element-wise clipping (the original's clip_grad_value); 0 = off
    clip_norm: float = 0.0  # global-norm clipping; 0 = off
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    decay_steps: int = 0

    def __post_init__(self) -> None:
        s = "optim"
        if isinstance(self.kwargs, dict):  # accept a dict from config files, store hashably
            object.__setattr__(self, "kwargs", tuple(sorted(self.kwargs.items())))
        check_field_types(s, self)
        _check(isinstance(self.name, str) and self.name.isidentifier(), s, "name", self.name,
               "must name an optax optimizer, e.g. 'adamw' or 'lion'")
        _check(self.learning_rate > 0, s, "learning_rate", self.learning_rate, "must be > 0")
        _non_negative(s, self, "clip_value", "clip_norm", "warmup_steps", "decay_steps")
        _check(self.schedule in ("constant", "cosine"), s, "schedule", self.schedule,
               "must be 'constant' or 'cosine'")
        if self.schedule == "cosine":
            _check(self.decay_steps > 0, s, "decay_steps", self.decay_steps,
                   "must be > 0 for the cosine schedule")
        for i, pair in enumerate(self.kwargs):
            _check(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str), s,
                   f"kwargs[{i}]", pair, "must be a (name, value) pair")
            if isinstance(pair[1], float):
                _check(math.isfinite(pair[1]), s, f"kwargs.{pair[0]}", pair[1], "must be finite")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tasks come from and how they become static-shape batches."""

    source: str = "arc1"  # arc1 | arc2 | a directory of task JSON files
    split: str = "train"
    max_len: int = 4096
    batch_size: int = 1
    min_bucket: int = 64
    max_tasks: int = 0  # 0 = all
    augment: bool = True
    views_per_task: int = 4
    curriculum_warmup: float = 0.1  # fraction of (easiest) tasks in the warm-up stage
    curriculum_steps: int = 0  # train steps spent on the warm-up stage; 0 = no curriculum
    seed: int = 42

    def __post_init__(self) -> None:
        s = "data"
        check_field_types(s, self)
        _positive_int(s, self, "max_len", "batch_size", "min_bucket", "views_per_task")
        _check(self.split in ("train", "eval"), s, "split", self.split,
               "must be 'train' or 'eval'")
        _check(isinstance(self.max_tasks, int) and self.max_tasks >= 0, s, "max_tasks",
               self.max_tasks, "must be an integer >= 0")
        _check(isinstance(self.curriculum_steps, int) and self.curriculum_steps >= 0, s,
               "curriculum_steps", self.curriculum_steps, "must be an integer >= 0")
        _check(0.0 <= self.curriculum_warmup <= 1.0, s, "curriculum_warmup",
               self.curriculum_warmup, "must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop."""

    num_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    plot_every: int = 50
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0 = no periodic evaluation
    eval_tasks: int = 8  # held-out tasks (the easiest of the other split) for evaluation
    mesh_data: int = -1  # -1 = all devices not used by the expert axis
    mesh_expert: int = 1
    # TRM-style options (issue 10), off by default.
    deep_supervision: tuple[float, ...] = ()  # CE weight per refinement step; () = final only
    ema_decay: float = 0.0  # EMA of the parameters, used for evaluation; 0 = off
    # Consecutive skipped updates (non-finite loss, gradients or new state): a warning after
    # warn_after_skips of them, the run stops after stop_after_skips.
    warn_after_skips: int = 10
    stop_after_skips: int = 100

    def __post_init__(self) -> None:
        s = "train"
        if isinstance(self.deep_supervision, list):  # JSON / --set give lists, store hashably
            object.__setattr__(self, "deep_supervision", tuple(self.deep_supervision))
        check_field_types(s, self)
        _positive_int(s, self, "num_steps", "log_every", "plot_every", "ckpt_every",
                      "keep_checkpoints", "mesh_expert", "warn_after_skips", "stop_after_skips")
        for name in ("eval_every", "eval_tasks"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, s, name, v, "must be an integer >= 0")
        _check(self.mesh_data == -1 or self.mesh_data > 0, s, "mesh_data", self.mesh_data,
               "must be -1 (auto) or a positive integer")
        ds = self.deep_supervision
        _check(isinstance(ds, tuple) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
            for w in ds) and (not ds or sum(ds) > 0), s, "deep_supervision", ds,
            "must be () or a tuple of finite weights >= 0 with a positive sum, one per "
            "refinement step")
        _check(isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0, s,
               "ema_decay", self.ema_decay, "must be in [0, 1) (0 = no EMA)")


def _spl_config(**kw):
    from tinyonn_jax.model.spl import SplConfig  # the family's own module; imported lazily

    return SplConfig(**kw)


def _moe_config(**kw):
    from tinyonn_jax.model.smha import MoeConfig

    return MoeConfig(**kw)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment. ``spl`` and ``moe`` configure the families of the same names
    (``model.family``); their classes live beside their models (``model/spl.py``,
    ``model/smha.py``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sars: SarsConfig = field(default_factory=SarsConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    meta_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spl: Any = field(default_factory=_spl_config)
    moe: Any = field(default_factory=_moe_config)

    def replace_path(self, path: str, value: Any) -> Config:
        """Return a copy with ``section.key`` set to ``value`` (validated)."""
        section, key = self.check_path(path)
        sub = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(sub, **{key: value})})

    def check_path(self, path: str) -> tuple[str, str]:
        """``(section, key)`` of ``section.key``; ``ConfigError`` for an unknown key."""
        section, _, key = path.partition(".")
        names = {f.name for f in dataclasses.fields(self)}
        if section not in names or not key:
            raise ConfigError(f"unknown config key {path!r}; sections are {sorted(names)}")
        keys = {f.name for f in dataclasses.fields(getattr(self, section))}
        if key not in keys:
            raise ConfigError(f"unknown config key {path!r}; {section} has {sorted(keys)}")
        return section, key

    def field_type(self, path: str) -> Any:
        """The declared type of the field ``section.key``."""
        section, key = self.check_path(path)
        return _field_types(type(getattr(self, section)))[key]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        kinds = {"model": ModelConfig, "sars": SarsConfig, "optim": OptimizerConfig,
                 "meta_optim": OptimizerConfig, "data": DataConfig, "train": TrainConfig,
                 "spl": _spl_config, "moe": _moe_config}
        unknown = set(d) - set(kinds)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}")
        parts = {}
        for k, v in d.items():
            v = dict(v)
            if "kwargs" in v and isinstance(v["kwargs"], (list, tuple)):
                v["kwargs"] = tuple(tuple(p) for p in v["kwargs"])
            try:
                parts[k] = kinds[k](**v)
            except TypeError as e:  # unknown or missing keyword of a section
                raise ConfigError(f"config section {k}: {e}") from None
        return cls(**parts)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order, each parsed by its field's declared type."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        path = path.strip()
        cfg = cfg.replace_path(path, parse_field_value(path, cfg.field_type(path), raw))
    return cfg
