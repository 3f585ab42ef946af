"""Derivative-free minimisation over [0, 1]^d for the site twin's camera fit
(``models.estimate.twin``): the camera is not differentiable (JPEG, clipping) and its
objective is flat in places and kinked in others. Pure numpy; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

# A scan walks each side of a parameter outward and stops once the distance has risen this
# many times in a row: past the side's minimum (the statistics move monotonically with each
# camera parameter). Most parameters do not matter at a site and rise at once: Emotion6
# night 2's fit went from 413 to 257 evaluations with the same camera (docs/benchmarks.md,
# "The twin's seconds in a check").
RISES_TO_STOP = 2


def walk(f: Callable[[np.ndarray], float], u: np.ndarray, j: int, side: Sequence[float],
         start: float) -> Iterator[tuple[np.ndarray, float]]:
    """``u`` with coordinate ``j`` set to each value of ``side`` in turn (outward), and ``f``
    there, until ``f`` has risen :data:`RISES_TO_STOP` times in a row (from ``start``, ``f``
    where the walk begins)."""
    last, rises = start, 0
    for g in side:
        v = np.array(u, np.float64)
        v[j] = g
        fv = f(v)
        yield v, fv
        rises = rises + 1 if fv > last + 1e-12 else 0
        last = fv
        if rises >= RISES_TO_STOP:
            return


def coordinate_search(f: Callable[[np.ndarray], float], u0: np.ndarray, f0: float,
                      coords: Sequence[int], sweeps: int, points: int,
                      width: float = 1.0) -> tuple[np.ndarray, float]:
    """Minimise ``f`` over [0, 1]^d along ``coords`` one at a time: each pass tries ``points``
    values of every coordinate in a window of ``width`` around the current best (3x narrower
    each pass) and keeps any improvement. Derivative-free and robust to the camera's flat
    regions and kinks, where Powell and Nelder-Mead wandered into degenerate corners."""
    u, best = np.array(u0, np.float64), float(f0)
    for _ in range(sweeps):
        for j in coords:
            lo, hi = max(0.0, u[j] - width / 2), min(1.0, u[j] + width / 2)
            grid = np.linspace(lo, hi, points)
            at = float(u[j])
            # each side outward from the current value, until past its minimum
            for side in (sorted((g for g in grid if g < at - 1e-9), reverse=True),
                         sorted(g for g in grid if g > at + 1e-9)):
                for v, fv in walk(f, u, j, side, best):
                    if fv < best - 1e-9:
                        u, best = v, fv
        width /= 3.0
    return u, best


def scan_points(neutral: float, points: int) -> list[float]:
    """Values a still-neutral parameter is tried at (in [0, 1] units): on each side of
    ``neutral`` that has room, geometrically closer to it -- the whole way to the edge, half,
    a quarter, ... (``points - 2`` per side, at least 2). Evenly spaced points missed small
    real changes: a night camera's sensor noise after the photos were downscaled to the grid
    (sigma ~0.016) lies below the first even step of the noise range (0.025), and the fit
    stopped at "darker" with a residual of 9 (bench/results/estimate*.md)."""
    return sorted(g for side in scan_sides(neutral, points) for g in side)


def scan_sides(neutral: float, points: int) -> list[list[float]]:
    """:func:`scan_points` per side of ``neutral``, nearest first."""
    k = max(2, points - 2)
    out = []
    for edge in (0.0, 1.0):
        span = edge - neutral
        if abs(span) > 1e-9:
            out.append([neutral + span / 2**i for i in range(k)][::-1])
    return out


def stepwise_search(f: Callable[[np.ndarray], float], neutral: np.ndarray, points: int,
                    sweeps: int, price: float, max_changes: int) -> tuple[np.ndarray, float]:
    """Forward selection of the camera's changes: scan every still-neutral parameter over its
    whole range (``points`` values) with the others where they are, move the one that lowers
    ``f`` most if it buys more than ``price``, re-tune the moved ones together (narrowing
    coordinate passes), and repeat, at most ``max_changes`` times. A real site is a few
    changes (dark and noisy; blurred and compressed): the fit names them, the rest stay
    neutral instead of drifting to explain sampling noise. A greedy coordinate search over all
    twelve parameters at once got lost on JPEG sites (every parameter moved, d 14)."""
    u, best = np.array(neutral, np.float64), float(f(neutral))
    moved: list[int] = []
    while len(moved) < max_changes:
        cand, cand_f, cand_j = None, best, -1
        for j in range(len(u)):
            if j in moved:
                continue
            for side in scan_sides(float(neutral[j]), points):  # outward from neutral
                for v, fv in walk(f, u, j, side, best):
                    if fv < cand_f:
                        cand, cand_f, cand_j = v, fv, j
        if cand is None or cand_f > best - price:
            break
        moved.append(cand_j)
        u, best = coordinate_search(f, cand, cand_f, moved, sweeps, points,
                                    width=2.0 / (points - 1))
    return u, best


__all__ = ["RISES_TO_STOP", "coordinate_search", "scan_points", "scan_sides", "stepwise_search",
           "walk"]
