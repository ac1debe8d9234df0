"""Task augmentation: the dihedral group D8, colour permutations and demonstration shuffling.

A ``View`` bundles one of each. ``View.apply(task)`` gives the augmented task that is serialised
for training or prompting; ``View.invert_grid(pred)`` maps a grid predicted in the augmented
frame back to the original frame, which is what test-time voting needs.

Transform ids (grid ``g`` of shape (H, W))::

    0 identity        1 rot90 (counter-clockwise)   2 rot180          3 rot270
    4 flip vertical   (rows reversed, upside down)  5 flip horizontal (columns reversed)
    6 transpose       (main diagonal)               7 anti-transpose  (anti-diagonal)

Colour permutations and D8 act on different things (values vs positions), so they commute and
the order in which a view applies them does not matter.

The original pipeline swapped one pair of non-zero colours present in the task; here a view
draws a full random permutation of colours 1-9 (0, usually the background, stays fixed unless
``keep_zero=False``), which includes that swap as a special case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyonn_jax.data.tasks import NUM_COLORS, Task

TRANSFORM_NAMES = (
    "identity",
    "rot90",
    "rot180",
    "rot270",
    "flip_vertical",
    "flip_horizontal",
    "transpose",
    "anti_transpose",
)
NUM_TRANSFORMS = len(TRANSFORM_NAMES)
# INVERSE[k] undoes transform k: the rotations by +-90 degrees undo each other, the rest are
# involutions.
INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
# Transforms that swap height and width (and so change the serialised length).
SWAPS_AXES = (False, True, False, True, False, False, True, True)

_TRANSFORMS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda g: g,
    lambda g: np.rot90(g, 1),
    lambda g: np.rot90(g, 2),
    lambda g: np.rot90(g, 3),
    np.flipud,
    np.fliplr,
    lambda g: g.T,
    lambda g: np.rot90(g, 2).T,
)

IDENTITY_PERM = tuple(range(NUM_COLORS))


def apply_transform(grid: np.ndarray, k: int) -> np.ndarray:
    """Apply dihedral transform ``k`` (0-7) to an (H, W) grid; returns a new contiguous array."""
    if not 0 <= k < NUM_TRANSFORMS:
        raise ValueError(f"transform id must be in 0..7, got {k}")
    return np.ascontiguousarray(_TRANSFORMS[k](np.asarray(grid)))


def invert_transform(grid: np.ndarray, k: int) -> np.ndarray:
    """Undo dihedral transform ``k``: ``invert_transform(apply_transform(g, k), k) == g``."""
    return apply_transform(grid, INVERSE[k])


def random_color_perm(rng: np.random.Generator, *, keep_zero: bool = True) -> tuple[int, ...]:
    """A colour permutation ``perm`` (new colour of ``c`` is ``perm[c]``) as a 10-tuple."""
    if keep_zero:
        return (0, *(1 + rng.permutation(NUM_COLORS - 1)).tolist())
    return tuple(rng.permutation(NUM_COLORS).tolist())


def invert_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The inverse colour permutation."""
    return tuple(np.argsort(np.asarray(perm)).tolist())


@dataclass(frozen=True)
class View:
    """One augmentation: a D8 transform, a colour permutation and an order of the train pairs.

    ``pair_order=None`` keeps the demonstrations in their original order; otherwise it must be a
    permutation of ``range(len(task.train))`` (pair ``i`` of the view is original pair
    ``pair_order[i]``). Test pairs are never reordered.
    """

    transform: int = 0
    color_perm: tuple[int, ...] = IDENTITY_PERM
    pair_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.transform < NUM_TRANSFORMS:
            raise ValueError(f"View.transform must be in 0..7, got {self.transform}")
        if sorted(self.color_perm) != list(IDENTITY_PERM):
            raise ValueError(f"View.color_perm must permute 0..9, got {self.color_perm}")

    @property
    def is_identity(self) -> bool:
        """True when the view changes nothing (transform, colours and pair order)."""
        return (
            self.transform == 0
            and self.color_perm == IDENTITY_PERM
            and (
                self.pair_order is None
                or tuple(self.pair_order) == tuple(range(len(self.pair_order)))
            )
        )

    def apply_grid(self, grid: np.ndarray) -> np.ndarray:
        """Map an original-frame (H, W) grid into this view's frame."""
        lut = np.asarray(self.color_perm, dtype=np.int8)
        return apply_transform(lut[np.asarray(grid)], self.transform)

    def invert_grid(self, grid: np.ndarray) -> np.ndarray:
        """Map a grid in this view's frame (e.g. a prediction) back to the original frame."""
        inv = np.asarray(invert_perm(self.color_perm), dtype=np.int8)
        return invert_transform(inv[np.asarray(grid)], self.transform)

    def apply(self, task: Task) -> Task:
        """The augmented task (same id and source; unknown test outputs stay ``None``)."""
        order = range(len(task.train)) if self.pair_order is None else self.pair_order
        if sorted(order) != list(range(len(task.train))):
            raise ValueError(
                f"View.pair_order {self.pair_order} is not a permutation of the "
                f"{len(task.train)} train pairs of task {task.task_id!r}"
            )

        def pair(p: tuple[np.ndarray, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
            inp, out = p
            return (_ro(self.apply_grid(inp)), None if out is None else _ro(self.apply_grid(out)))

        return dataclasses.replace(
            task,
            train=tuple(pair(task.train[i]) for i in order),
            test=tuple(pair(p) for p in task.test),
        )

    def to_dict(self) -> dict:
        """JSON-serialisable form (for logs and evaluation reports)."""
        return {
            "transform": TRANSFORM_NAMES[self.transform],
            "color_perm": list(self.color_perm),
            "pair_order": None if self.pair_order is None else list(self.pair_order),
        }


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # keep augmented tasks as immutable as loaded ones
    return a


def sample_views(
    task: Task,
    n: int,
    rng: np.random.Generator,
    *,
    permute_colors: bool = True,
    keep_zero: bool = True,
    shuffle_pairs: bool = True,
    include_identity: bool = False,
) -> list[View]:
    """Draw ``n`` views of ``task``, deterministic given the state of ``rng``.

    Transforms are drawn without replacement (a random subset of D8 when ``n <= 8``; for larger
    ``n`` every transform is used before any repeats). With ``include_identity`` the first view
    is the plain identity (original transform, colours and pair order), which test-time voting
    uses as its anchor.
    """
    if n < 0:
        raise ValueError(f"number of views must be >= 0, got {n}")
    transforms: list[int] = [0] if include_identity else []
    if include_identity:  # the identity view takes transform 0; the rest of D8 comes next
        transforms += (1 + rng.permutation(NUM_TRANSFORMS - 1)).tolist()
    while len(transforms) < n:
        transforms += rng.permutation(NUM_TRANSFORMS).tolist()
    views = []
    for i in range(n):
        if include_identity and i == 0:
            views.append(View())
            continue
        perm = random_color_perm(rng, keep_zero=keep_zero) if permute_colors else IDENTITY_PERM
        order = tuple(rng.permutation(len(task.train)).tolist()) if shuffle_pairs else None
        views.append(View(transforms[i], perm, order))
    return views
