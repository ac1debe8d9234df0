"""Scoring ARC predictions: exact match, augmentation voting, pass@2 and report aggregation.

Voting: each augmented view of a test input yields one prediction, already mapped back to the
original frame, with the mean log-probability of its generated tokens (``None`` when the
generation did not decode to a grid). Distinct grids are ranked by number of votes, then by the
mean of their views' mean log-probs, then by first appearance (so ranking is deterministic).
The top two candidates are submitted; a test pair counts as solved if either matches exactly
(pass@2, the ARC Prize rule). A task's score is the fraction of its test pairs solved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

Prediction = tuple[np.ndarray | None, float]  # (grid in original frame or None, mean log-prob)


def exact_match(pred: np.ndarray | None, truth: np.ndarray) -> bool:
    """True when ``pred`` has the shape and every value of ``truth`` (``None`` never matches)."""
    if pred is None:
        return False
    p, t = np.asarray(pred), np.asarray(truth)
    return p.shape == t.shape and bool(np.array_equal(p, t))


@dataclass(frozen=True)
class Candidate:
    """One distinct predicted grid with its votes and the mean of its views' mean log-probs."""

    grid: np.ndarray
    votes: int
    mean_logprob: float


def _key(grid: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    g = np.asarray(grid, dtype=np.int8)
    return g.shape, g.tobytes()


def vote(predictions: Sequence[Prediction], top_k: int = 2) -> list[Candidate]:
    """Rank the distinct grids of ``predictions`` and return the best ``top_k``.

    Order: more votes first, then higher mean log-prob, then earlier first appearance.
    ``None`` predictions (malformed generations) cast no vote.
    """
    groups: dict[tuple, list] = {}  # key -> [grid, logprobs, first index]
    for i, (grid, logprob) in enumerate(predictions):
        if grid is None:
            continue
        k = _key(grid)
        if k not in groups:
            groups[k] = [np.asarray(grid, dtype=np.int8), [], i]
        groups[k][1].append(float(logprob))
    ranked = sorted(groups.values(), key=lambda g: (-len(g[1]), -float(np.mean(g[1])), g[2]))
    return [Candidate(g, len(lp), float(np.mean(lp))) for g, lp, _ in ranked[:top_k]]


def pass_at_2(candidates: Sequence[Candidate | np.ndarray], truth: np.ndarray) -> bool:
    """True when one of the first two candidates (``Candidate`` or plain grids) matches."""
    grids = [c.grid if isinstance(c, Candidate) else c for c in candidates[:2]]
    return any(exact_match(g, truth) for g in grids)


@dataclass
class TestReport:
    """Outcome of one test pair of one task (JSON-serialisable via ``to_dict``)."""

    __test__ = False  # not a pytest test class despite its name

    task_id: str
    test_index: int
    n_views: int
    n_malformed: int
    top_votes: list[int]
    top_shapes: list[list[int]]
    pass2: bool
    top1: bool

    def to_dict(self) -> dict:
        """JSON-serialisable dict of the report."""
        return asdict(self)


def score_test(
    task_id: str, test_index: int, predictions: Sequence[Prediction], truth: np.ndarray
) -> TestReport:
    """Vote over the views' predictions for one test pair and score them against ``truth``."""
    cands = vote(predictions, top_k=2)
    return TestReport(
        task_id=task_id,
        test_index=test_index,
        n_views=len(predictions),
        n_malformed=sum(g is None for g, _ in predictions),
        top_votes=[c.votes for c in cands],
        top_shapes=[list(c.grid.shape) for c in cands],
        pass2=pass_at_2(cands, truth),
        top1=bool(cands) and exact_match(cands[0].grid, truth),
    )


@dataclass
class Aggregate:
    """Accuracy over a set of test reports.

    ``task_score`` is the official ARC measure (mean over tasks of the fraction of their test
    pairs solved with pass@2); ``task_solved`` counts a task only when all its pairs are solved;
    ``pair_pass2``/``pair_top1`` are per test pair; ``malformed_rate`` is the fraction of views
    whose generation did not decode to a grid.
    """

    n_tasks: int = 0
    n_pairs: int = 0
    task_score: float = 0.0
    task_solved: float = 0.0
    pair_pass2: float = 0.0
    pair_top1: float = 0.0
    malformed_rate: float = 0.0
    solved_task_ids: list[str] = field(default_factory=list)

    def table(self) -> dict[str, float]:
        """The headline numbers as a flat ``{name: value}`` dict (for logging)."""
        return {
            "eval/task_score": self.task_score,
            "eval/task_solved": self.task_solved,
            "eval/pair_pass2": self.pair_pass2,
            "eval/pair_top1": self.pair_top1,
            "eval/malformed_rate": self.malformed_rate,
        }

    def to_json(self) -> str:
        """The whole aggregate as a JSON string."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def aggregate(reports: Sequence[TestReport]) -> Aggregate:
    """Combine per-test-pair reports into per-task and per-pair accuracies."""
    if not reports:
        return Aggregate()
    by_task: dict[str, list[TestReport]] = {}
    for r in reports:
        by_task.setdefault(r.task_id, []).append(r)
    fractions = {t: float(np.mean([r.pass2 for r in rs])) for t, rs in by_task.items()}
    views = sum(r.n_views for r in reports)
    return Aggregate(
        n_tasks=len(by_task),
        n_pairs=len(reports),
        task_score=float(np.mean(list(fractions.values()))),
        task_solved=float(np.mean([f == 1.0 for f in fractions.values()])),
        pair_pass2=float(np.mean([r.pass2 for r in reports])),
        pair_top1=float(np.mean([r.top1 for r in reports])),
        malformed_rate=sum(r.n_malformed for r in reports) / views if views else 0.0,
        solved_task_ids=sorted(t for t, f in fractions.items() if f == 1.0),
    )
