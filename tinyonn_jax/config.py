"""Configuration: frozen keyword-only dataclasses, validated on construction.

``Config.family`` names the model family (``dyntrm``, ``spl``, ``dynonn``) and ``Config.model``
is that family's own config section (``families/<family>/config.py``). ``sars`` configures the
DynTRM family's meta-learning; ``optim`` / ``meta_optim``, ``data`` and ``train`` are shared.
Every section rejects bad values with a ``ConfigError`` naming the field
(``tinyonn_jax.fields``). ``Config.replace_path("model.hidden", 64)`` and ``apply_overrides``
give the ``--set`` syntax of the training program.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dynonn.config import DynOnnConfig
from tinyonn_jax.families.dyntrm.config import ModelConfig, SarsConfig
from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.fields import (
    check,
    check_field_types,
    choice,
    field_types,
    non_negative,
    parse_field_value,
    positive_int,
)

MODEL_SECTIONS: dict[str, type] = {"dyntrm": ModelConfig, "spl": SplConfig,
                                   "dynonn": DynOnnConfig}
MODEL_FAMILIES = tuple(MODEL_SECTIONS)
DISTRIBUTED_MODES = ("auto", "on", "off")


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
        check(isinstance(self.name, str) and self.name.isidentifier(), s, "name", self.name,
               "must name an optax optimizer, e.g. 'adamw' or 'lion'")
        check(self.learning_rate > 0, s, "learning_rate", self.learning_rate, "must be > 0")
        non_negative(s, self, "clip_value", "clip_norm", "warmup_steps", "decay_steps")
        check(self.schedule in ("constant", "cosine"), s, "schedule", self.schedule,
               "must be 'constant' or 'cosine'")
        if self.schedule == "cosine":
            check(self.decay_steps > 0, s, "decay_steps", self.decay_steps,
                   "must be > 0 for the cosine schedule")
        for i, pair in enumerate(self.kwargs):
            check(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str), s,
                   f"kwargs[{i}]", pair, "must be a (name, value) pair")
            if isinstance(pair[1], float):
                check(math.isfinite(pair[1]), s, f"kwargs.{pair[0]}", pair[1], "must be finite")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tasks come from and how they become static-shape batches."""

    source: str = "arc1"  # arc1 | arc2 | a directory of task JSON files
    split: str = "train"
    max_len: int = 4096
    batch_size: int = 1
    min_bucket: int = 64
    max_tasks: int = 0  # 0 = all
    # The TRM protocol: "" (off) or the split other than ``split`` ("eval" for "train") of the
    # same ``source``. Its tasks (the easiest max_tasks) add their demonstration pairs only, as
    # leave-one-out pseudo-tasks (data.tasks.leave_one_out), to the training tasks; their test
    # outputs are in no training sequence and are what the held-out evaluation scores.
    demonstrations_from: str = ""
    augment: bool = True
    views_per_task: int = 4
    curriculum_warmup: float = 0.1  # fraction of (easiest) tasks in the warm-up stage
    curriculum_steps: int = 0  # train steps spent on the warm-up stage; 0 = no curriculum
    seed: int = 42

    def __post_init__(self) -> None:
        s = "data"
        check_field_types(s, self)
        positive_int(s, self, "max_len", "batch_size", "min_bucket", "views_per_task")
        check(self.split in ("train", "eval"), s, "split", self.split,
               "must be 'train' or 'eval'")
        other = "eval" if self.split == "train" else "train"
        check(self.demonstrations_from in ("", other), s, "demonstrations_from",
               self.demonstrations_from, f"must be '' (off) or {other!r}, the split other than "
               f"data.split={self.split!r}")
        check(isinstance(self.max_tasks, int) and self.max_tasks >= 0, s, "max_tasks",
               self.max_tasks, "must be an integer >= 0")
        check(isinstance(self.curriculum_steps, int) and self.curriculum_steps >= 0, s,
               "curriculum_steps", self.curriculum_steps, "must be an integer >= 0")
        check(0.0 <= self.curriculum_warmup <= 1.0, s, "curriculum_warmup",
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
    # jax.distributed start-up: auto (when a multi-process launcher is detected) | on | off
    distributed: str = "auto"
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
        positive_int(s, self, "num_steps", "log_every", "plot_every", "ckpt_every",
                      "keep_checkpoints", "mesh_expert", "warn_after_skips", "stop_after_skips")
        for name in ("eval_every", "eval_tasks"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, s, name, v, "must be an integer >= 0")
        check(self.mesh_data == -1 or self.mesh_data > 0, s, "mesh_data", self.mesh_data,
               "must be -1 (auto) or a positive integer")
        choice(s, self, "distributed", DISTRIBUTED_MODES)
        ds = self.deep_supervision
        check(isinstance(ds, tuple) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
            for w in ds) and (not ds or sum(ds) > 0), s, "deep_supervision", ds,
            "must be () or a tuple of finite weights >= 0 with a positive sum, one per "
            "refinement step")
        check(isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0, s,
               "ema_decay", self.ema_decay, "must be in [0, 1) (0 = no EMA)")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment: the model family, its model section, and the shared sections."""

    family: str = "dyntrm"  # dyntrm | spl | dynonn: what ``model`` configures
    model: Any = None  # the family's section (MODEL_SECTIONS[family]); None = its defaults
    sars: SarsConfig = field(default_factory=SarsConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    meta_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check(self.family in MODEL_SECTIONS, "config", "family", self.family,
              f"must be one of {MODEL_FAMILIES}")
        section = MODEL_SECTIONS[self.family]
        if self.model is None:
            object.__setattr__(self, "model", section())
        check(isinstance(self.model, section), "config", "model", type(self.model).__name__,
              f"family {self.family!r} takes a {section.__name__} model section")

    def replace_path(self, path: str, value: Any) -> Config:
        """Return a copy with ``section.key`` set to ``value`` (validated).

        ``family`` is a path of its own; changing it gives the new family's default model
        section.
        """
        if path == "family":
            check(value in MODEL_SECTIONS, "config", "family", value,
                  f"must be one of {MODEL_FAMILIES}")
            model = self.model if value == self.family else None
            return dataclasses.replace(self, family=value, model=model)
        section, key = self.check_path(path)
        sub = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(sub, **{key: value})})

    def check_path(self, path: str) -> tuple[str, str]:
        """``(section, key)`` of ``section.key``; ``ConfigError`` for an unknown key."""
        section, _, key = path.partition(".")
        names = {f.name for f in dataclasses.fields(self)} - {"family"}
        if section not in names or not key:
            raise ConfigError(f"unknown config key {path!r}; sections are {sorted(names)} "
                              "(and 'family')")
        keys = {f.name for f in dataclasses.fields(getattr(self, section))}
        if key not in keys:
            raise ConfigError(f"unknown config key {path!r}; {section} has {sorted(keys)}")
        return section, key

    def field_type(self, path: str) -> Any:
        """The declared type of the field ``section.key`` (``str`` for ``family``)."""
        if path == "family":
            return str
        section, key = self.check_path(path)
        return field_types(type(getattr(self, section)))[key]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of ``to_dict``."""
        d = dict(d)
        family = d.pop("family", "dyntrm")
        if family not in MODEL_SECTIONS:
            raise ConfigError(f"config family={family!r}: must be one of {MODEL_FAMILIES}")
        kinds = {"model": MODEL_SECTIONS[family], "sars": SarsConfig, "optim": OptimizerConfig,
                 "meta_optim": OptimizerConfig, "data": DataConfig, "train": TrainConfig}
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
        return cls(family=family, **parts)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order, each parsed by its field's declared type."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        path = path.strip()
        cfg = cfg.replace_path(path, parse_field_value(path, cfg.field_type(path), raw))
    return cfg
