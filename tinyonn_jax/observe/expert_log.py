"""``ExpertLog``: per-expert routing statistics and lifecycle events over a run, the data of
the expert dashboard (``observe.expert_dashboard``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

EVENT_KINDS = ("add", "regenerate", "remove")


@dataclass(frozen=True)
class LifecycleEvent:
    """An expert of ``site`` was added, regenerated or removed at ``step``."""

    step: int
    kind: str
    expert_id: int
    site: str


class ExpertLog:
    """Per-expert routing statistics over training, for the expert dashboard.

    Every ``record`` call stores, per site (e.g. ``"attn"``, ``"ffn"``), the activation rate of
    each expert (fraction of routed tokens that chose it) and optionally the live mask (experts
    are stacked in a fixed bank of P slots; dead slots are masked). Lifetime means are exact
    running sums that restart when an expert is added or regenerated; the per-step matrix keeps
    at most ``max_records`` rows per site by dropping every other row when full, so a long run
    stays covered end to end at a coarser step resolution.
    """

    def __init__(self, max_records: int = 1000) -> None:
        self.max_records = max(2, max_records)
        self.events: list[LifecycleEvent] = []
        self._steps: dict[str, list[int]] = {}
        self._rates: dict[str, list[np.ndarray]] = {}
        self._live: dict[str, list[np.ndarray]] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._count: dict[str, np.ndarray] = {}

    @property
    def sites(self) -> list[str]:
        """Site names in the order they were first recorded."""
        return list(self._steps)

    def record(self, step: int, values: Mapping[str, Any], *,
               live: Mapping[str, Any] | None = None, tokens: float | None = None) -> None:
        """Add one step. ``values[site]`` (P,) are activation rates, or counts if ``tokens``
        (the number of routed tokens) is given. ``live[site]`` (P,) bool defaults to the
        site's previous mask, or all experts live."""
        for site, v in values.items():
            rates = np.array(v, dtype=np.float64).reshape(-1)  # a copy: the caller may reuse v
            if tokens is not None:
                rates = rates / max(float(tokens), 1.0)
            prev = self._live.get(site)
            if live is not None and site in live:
                mask = np.array(live[site], dtype=bool).reshape(-1)
            elif prev:
                mask = _fit(prev[-1], rates.size, fill=True)
            else:
                mask = np.ones(rates.size, dtype=bool)
            if mask.size != rates.size:
                raise ValueError(f"ExpertLog site {site!r}: live mask has {mask.size} experts, "
                                 f"values have {rates.size}")
            self._steps.setdefault(site, []).append(int(step))
            self._rates.setdefault(site, []).append(rates)
            self._live.setdefault(site, []).append(mask)
            total = _fit(self._sum.get(site, np.zeros(0)), rates.size, fill=0.0)
            count = _fit(self._count.get(site, np.zeros(0)), rates.size, fill=0.0)
            self._sum[site] = total + np.where(mask, rates, 0.0)
            self._count[site] = count + mask
            if len(self._steps[site]) > self.max_records:
                for store in (self._steps, self._rates, self._live):
                    store[site] = store[site][::2]

    def event(self, step: int, kind: str, expert_id: int, *, site: str = "ffn") -> None:
        """Note a lifecycle event; ``add``/``regenerate`` restart the expert's lifetime mean."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"ExpertLog event kind {kind!r}: must be one of {EVENT_KINDS}")
        self.events.append(LifecycleEvent(int(step), kind, int(expert_id), site))
        if kind != "remove" and site in self._sum and expert_id < self._sum[site].size:
            self._sum[site][expert_id] = 0.0
            self._count[site][expert_id] = 0.0

    def matrix(self, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return steps (S,), rates (S, P) and live (S, P); P is the largest bank recorded."""
        width = max(r.size for r in self._rates[site])
        rates = np.stack([_fit(r, width, fill=np.nan) for r in self._rates[site]])
        live = np.stack([_fit(m, width, fill=False) for m in self._live[site]])
        return np.asarray(self._steps[site]), rates, live

    def lifetime_rates(self, site: str) -> np.ndarray:
        """Mean activation rate (P,) of each expert over its current lifetime (NaN if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._sum[site] / self._count[site]


def _fit(a: np.ndarray, size: int, *, fill: Any) -> np.ndarray:
    if a.size >= size:
        return a[:size].copy()
    return np.concatenate([a, np.full(size - a.size, fill, dtype=np.result_type(a, fill))])
