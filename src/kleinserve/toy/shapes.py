"""Which shape a mask shows, and whether it is one clean shape: connected components and angular moments, in
numpy (scipy is no dependency).

`read_shape` takes the mask of one colour's pixels (evaluate.analyse: the foreground pixels best explained by
the analysed colour) and the whole foreground's, and names the shape of the colour's largest connected
component (8-connected):

- a ring has a hole: background pixels enclosed by the component (4-connected, not reaching the image's
  border), at least HOLE_SHARE of its pixels. Pixels of another colour inside it are no hole;
- otherwise the angular moments of the component with what it encloses (`moments`: k = 3, 4, 5) pick the
  triangle (3-fold symmetric), the square (4-fold) or the star (5-fold) by the largest; when none reaches
  MIN_MOMENT it is a circle.

Moments rather than fill ratios or templates: blur rounds a shape's corners and fills a star's notches, which
moves its fill ratio (and the template that fits it best) towards the circle's, but keeps its symmetry, so the
largest moment stays the shape's own while it shrinks. Smallest own moment over the true renders below at
a blur of 0 / 4 / 8 px: triangle 0.54 / 0.45 / 0.31, square 0.28 / 0.20 / 0.15, star 0.56 / 0.41 / 0.065;
a disc's largest 0.016 / 0.019 / 0.025 (MIN_MOMENT between). A ring's hole is 38-48 % of its pixels sharp,
>= 6.3 % at 8 px (HOLE_SHARE below).

A second component of the colour of at least MIN_BLOB of the image's pixels makes the answer None (issue 20:
a second blob is a wrong picture even beside the right shape); smaller ones are stray pixels. One clean shape:
the largest component holds at least CLEAN_SHARE of the foreground, so neither a second blob nor a haze of
other colours may take more than a fifth of what was drawn.

Read-back, every (shape, colour, background, position) of scenes (1,080 renders per side), blurred by a
Gaussian of b px at 256 px (b / 2 at 128 px); the toy's own edges measure as b ~ 2-4 at 128 px and ~ 2 at
256 px (the width of the band between 10 % and 90 % colour against blurred true renders, on `toy eval`'s
recolouring edits):

| blur b (px at 256)       | 0     | 2     | 4     | 6     | 8     | 10   |
|--------------------------|-------|-------|-------|-------|-------|------|
| shape right, 128 px      | 100 % | 100 % | 100 % | 100 % | 100 % | 89 % |
| shape right, 256 px      | 100 % | 100 % | 100 % | 100 % | 100 % | 88 % |
| one clean shape, both    | 100 % | 100 % | 100 % | 100 % | 100 % | 99 % |

At 10 px stars and rings have blurred into discs (their notches and holes fill in): a circle there is no
misreading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOLE_SHARE = 0.05  # enclosed background, as a fraction of the component's pixels, that makes a ring
MIN_MOMENT = 0.05  # the largest of the k = 3, 4, 5 moments below which a shape is a circle
CLEAN_SHARE = 0.8  # of the foreground's pixels, in the colour's largest component: one clean shape
MIN_BLOB = 0.0025  # of the image's pixels: a second component this large is a second blob
_SYMMETRIES = {3: "triangle", 4: "square", 5: "star"}


@dataclass(frozen=True)
class ShapeReading:
    shape: str | None  # scenes.SHAPES name; None: nothing drawn, or a second blob
    clean: bool  # one component of the colour holds >= CLEAN_SHARE of the foreground: "one clean shape"


def label(mask: np.ndarray, diagonal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a boolean (H, W) mask: (labels (H, W) int32, 0 outside the mask and 1..n
    inside, numbered largest first; sizes (n,) in pixels, descending). `diagonal`: 8-connected, else
    4-connected. Works on horizontal runs, so its Python loop is over runs, not pixels."""
    height, width = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # (H, W + 1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; row-major order pairs them with the starts
    parent = list(range(len(starts)))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    reach = int(diagonal)  # 8-connected runs touch when they overlap after widening by one pixel
    previous: list[int] = []  # runs of the row above
    current: list[int] = []
    current_row = -2
    for run, row in enumerate(rows.tolist()):
        if row != current_row:
            previous = current if row == current_row + 1 else []
            current, current_row = [], row
        for above in previous:
            if starts[above] < ends[run] + reach and starts[run] < ends[above] + reach:
                parent[root(above)] = root(run)
        current.append(run)
    roots = np.array([root(run) for run in range(len(starts))], dtype=np.int64)
    lengths = ends - starts
    inverse = np.unique(roots, return_inverse=True)[1]
    sizes = np.bincount(inverse, weights=lengths).astype(np.int64)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels = np.zeros((height, width), dtype=np.int32)
    for run, component in enumerate((rank[inverse] + 1).tolist()):
        labels[rows[run], starts[run] : ends[run]] = component
    return labels, sizes[order]


def _fill(component: np.ndarray) -> np.ndarray:
    """The component with what it encloses: every pixel not 4-connected to the image's border outside it."""
    labels, sizes = label(~component, diagonal=False)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return component | ~np.isin(labels, border)


def moments(component: np.ndarray) -> dict[int, float]:
    """k -> |sum of r^2 exp(-i k theta)| / sum of r^2 over a boolean (H, W) mask's pixels, (r, theta) their
    polar coordinates around its centre of mass, for k = 3, 4, 5: 0 for a disc, towards 1 the more k-fold
    symmetric the outline. The r^2 weight favours the outline, where the symmetry is, over the core."""
    ys, xs = np.nonzero(component)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    theta, weight = np.arctan2(dy, dx), dy**2 + dx**2
    return {k: float(np.abs((weight * np.exp(-1j * k * theta)).sum()) / weight.sum()) for k in _SYMMETRIES}


def read_shape(colour: np.ndarray, drawn: np.ndarray) -> ShapeReading:
    """The shape that a boolean (H, W) mask of one colour's pixels shows, and whether it is one clean shape,
    `drawn` being the mask of every foreground pixel, of any colour (module docstring)."""
    labels, sizes = label(colour)
    largest = int(sizes[0]) if len(sizes) else 0
    clean = bool(largest and largest >= CLEAN_SHARE * drawn.sum())
    if (sizes >= MIN_BLOB * colour.size).sum() != 1:
        return ShapeReading(None, clean)
    component = labels == 1
    outline = _fill(component)
    # Only background makes a hole: a spot of another colour inside a shape is haze, not a ring's hole.
    if (outline & ~drawn).sum() >= HOLE_SHARE * largest:
        return ShapeReading("ring", clean)
    found = moments(outline)
    k = max(found, key=found.__getitem__)
    return ShapeReading(_SYMMETRIES[k] if found[k] >= MIN_MOMENT else "circle", clean)
