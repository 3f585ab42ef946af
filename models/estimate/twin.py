"""The twin of a site: the camera (``models.sim.camera``) whose output makes the held-out
labelled images of the training domain look like the site's images.

Both sets are first put on one square ``grid`` (what the model sees, smaller: the fit runs
many times). The distance between two sets is measured in descriptors of the set: the mean and
the spread over its images of each image-quality statistic (``models.quality``; sharpness and
noise on log scales), and -- when an ``embed`` function is given -- the mean of the served
model's own features. Each descriptor is divided by its *resampling spread*: its standard
deviation over random subsets, as large as the site's batch, of the clean held-out images. A
distance of about 1 is then what two samples of the same camera differ by; the residual of a
fit says, in the same unit, how much of the site the twin cannot explain:

    d(theta)^2 = mean_k ((D_k(camera_theta(held-out)) - D_k(site)) / s_k)^2

The fit is derivative-free (the camera is not differentiable: JPEG, clipping): a coordinate
search from the neutral camera and from the best point of a seeded random design (restarts),
on a subsample of the held-out images, with fixed noise draws so the objective is
deterministic.
Pure numpy / SciPy; no I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from models.images import ImageLike, rgb_array
from models.quality import image_stats
from models.sim.camera import NAMES, NEUTRAL, CameraParams, apply_camera

# (statistic, on a log scale?, smallest spread) -- the statistics the camera can move (sizes
# and aspect are fixed by the grid, warmth is covered by the illuminant). The smallest spread
# is a difference too small to matter; it keeps a statistic that never varies in the training
# domain (colour, for greyscale CK+ faces) from making every difference infinite.
TWIN_STATS: tuple[tuple[str, bool, float], ...] = (
    ("brightness", False, 0.005), ("contrast", False, 0.003), ("sharpness", True, 0.05),
    ("colourfulness", False, 0.5), ("illuminant_rg", False, 0.005),
    ("illuminant_bg", False, 0.005), ("blockiness", False, 0.01), ("noise", True, 0.02),
)


@dataclass
class TwinConfig:
    grid: int = 96  # both sets on grid x grid pixels for the fit (the model sees 224)
    fit_images: int = 32  # held-out images the fit transforms per evaluation
    names: tuple[str, ...] = NAMES  # the camera parameters fitted (the rest neutral)
    design: int = 16  # random points of the parameter box; the best seeds a second search
    restarts: int = 2  # coordinate searches: from neutral, then from the best design points
    sweeps: int = 4  # passes over the parameters; from the third on, each narrows 3x
    points: int = 7  # values tried per parameter and pass
    resamples: int = 40  # subsets for the resampling spread
    feature_weight: float = 1.0  # weight of the feature-mean descriptors (when embed is given)
    # Price of moving a parameter away from neutral, per unit of its [0, 1] range, added to
    # d^2: two samples of one camera differ by d ~ 1, and without a price a clean site's twin
    # came out "darker x0.79" (d 1.00 against 1.24 neutral, Emotion6 photos): a change must
    # explain more than sampling noise to be fitted (8: a move of 1/16 of a range must buy
    # what a 2.8-sigma difference in one of the 16 descriptors would).
    penalty: float = 8.0
    seed: int = 0


@dataclass
class TwinFit:
    """A fitted twin: the camera, its residual distance (in resampling spreads), the distance
    of the untouched held-out images (what the fit explained), and the cost."""

    params: CameraParams
    distance: float
    neutral_distance: float
    seconds: float
    evaluations: int
    per_descriptor: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return self.params.describe()

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "condition": self.describe(),
                "distance": round(self.distance, 4),
                "neutral_distance": round(self.neutral_distance, 4),
                "seconds": round(self.seconds, 2), "evaluations": self.evaluations,
                "per_descriptor": {k: round(v, 3) for k, v in self.per_descriptor.items()}}


def on_grid(images: Sequence[ImageLike], grid: int) -> list[np.ndarray]:
    """Every image as a grid x grid RGB uint8 array (bilinear, as the model's resize)."""
    out = []
    for im in images:
        a = rgb_array(im)
        if a.shape[:2] != (grid, grid):
            a = np.asarray(Image.fromarray(a, "RGB").resize((grid, grid), Image.BILINEAR))
        out.append(a)
    return out


def stat_matrix(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, S) per-image statistics of :data:`TWIN_STATS` (log ones as log1p)."""
    rows = []
    for im in images:
        s = image_stats(im)
        rows.append([math.log1p(max(s[n], 0.0)) if log else s[n] for n, log, _ in TWIN_STATS])
    return np.asarray(rows, np.float64)


def descriptors(stats: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
    """The set's descriptor vector: mean and std of each statistic, then the feature mean."""
    parts = [stats.mean(0), stats.std(0)]
    if feats is not None:
        parts.append(np.asarray(feats, np.float64).mean(0))
    return np.concatenate(parts)


def descriptor_names(n_feats: int) -> list[str]:
    names = [f"mean {n}" for n, _, _ in TWIN_STATS] + [f"spread {n}" for n, _, _ in TWIN_STATS]
    return names + [f"feature {i}" for i in range(n_feats)]


def resampling_spread(stats: np.ndarray, feats: np.ndarray | None, n: int, resamples: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Std of each descriptor over ``resamples`` random subsets of ``n`` clean images: the
    unit in which twin and site are compared (floored, so no descriptor divides by ~0)."""
    n = max(2, n)
    draws = []
    for _ in range(resamples):
        idx = rng.choice(len(stats), size=n, replace=True)  # a new sample of the camera
        draws.append(descriptors(stats[idx], None if feats is None else feats[idx]))
    # the twin's side is a sample too (all the held-out images): var = s^2/n + s^2/N
    sd = np.asarray(draws).std(0) * math.sqrt(1.0 + n / len(stats))
    floor = np.array([f for _, _, f in TWIN_STATS] * 2)
    if feats is not None:
        floor = np.concatenate([floor, np.full(sd.shape[0] - floor.shape[0], 1e-3)])
    return np.maximum(sd, floor)


class TwinObjective:
    """d(u) for u in [0, 1]^len(names): the camera on the fit subsample (fixed noise seed),
    its descriptors, the scaled distance to the site's."""

    def __init__(self, held_out: Sequence[np.ndarray], target: np.ndarray, scale: np.ndarray,
                 names: Sequence[str], embed: Callable[[list[np.ndarray]], np.ndarray] | None,
                 weights: np.ndarray, seed: int, penalty: float = 0.0) -> None:
        self.held_out, self.target, self.scale = list(held_out), target, scale
        self.names, self.embed, self.weights, self.seed = tuple(names), embed, weights, seed
        self.penalty = penalty
        self.neutral = CameraParams().to_vector()[[NAMES.index(n) for n in self.names]]
        self.evaluations = 0

    def transform(self, p: CameraParams) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)  # the same noise draws for every candidate
        return [apply_camera(im, p, rng) for im in self.held_out]

    def residuals(self, p: CameraParams) -> np.ndarray:
        imgs = self.transform(p)
        feats = self.embed(imgs) if self.embed is not None else None
        return (descriptors(stat_matrix(imgs), feats) - self.target) / self.scale

    def distance_of(self, p: CameraParams) -> float:
        self.evaluations += 1
        r = self.residuals(p)
        return float(np.sqrt(np.sum(self.weights * r ** 2) / np.sum(self.weights)))

    def __call__(self, u: np.ndarray) -> float:
        """The search's objective: d^2 plus the price of every parameter's move."""
        u = np.clip(u, 0, 1)
        d = self.distance_of(CameraParams.from_vector(u, self.names))
        return d * d + self.penalty * float(np.abs(u - self.neutral).sum())


def coordinate_search(f: Callable[[np.ndarray], float], u0: np.ndarray, f0: float,
                      sweeps: int, points: int) -> tuple[np.ndarray, float]:
    """Minimise ``f`` over [0, 1]^d one coordinate at a time: each pass tries ``points``
    values of every coordinate (the whole range first, then a window 3x narrower around the
    best each pass) and keeps any improvement. Derivative-free and robust to the camera's
    flat regions and kinks, where Powell and Nelder-Mead wandered into degenerate corners
    (all dark, all noise) on photos."""
    u, best = np.array(u0, np.float64), float(f0)
    width = 1.0
    for sweep in range(sweeps):
        for j in range(len(u)):
            lo, hi = max(0.0, u[j] - width / 2), min(1.0, u[j] + width / 2)
            for g in np.linspace(lo, hi, points):
                if abs(g - u[j]) < 1e-9:
                    continue
                v = u.copy()
                v[j] = g
                fv = f(v)
                if fv < best - 1e-9:
                    u, best = v, fv
        if sweep >= 1:  # two passes over the whole range (parameters interact: noise hides
            width /= 3.0  # darkness until it is fitted), then 3x narrower each pass
    return u, best


def fit_twin(held_out: Sequence[ImageLike], site: Sequence[ImageLike],
             config: TwinConfig | None = None,
             embed: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> TwinFit:
    """The camera that makes ``held_out`` (labelled training-domain images never used to pick
    the model's epoch) look like ``site``. ``embed`` (optional): grid images -> (N, D) features
    of the served model, whose mean joins the descriptors."""
    cfg = config or TwinConfig()
    if len(held_out) < 4 or len(site) < 2:
        raise ValueError(f"need >= 4 held-out and >= 2 site images, got {len(held_out)} and "
                         f"{len(site)}")
    unknown = [n for n in cfg.names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown camera parameter(s) {unknown}; known: {', '.join(NAMES)}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    ref = on_grid(held_out, cfg.grid)
    site_g = on_grid(site, cfg.grid)
    ref_stats = stat_matrix(ref)
    ref_feats = embed(ref) if embed is not None else None
    site_feats = embed(site_g) if embed is not None else None
    target = descriptors(stat_matrix(site_g), site_feats)
    scale = resampling_spread(ref_stats, ref_feats, len(site_g), cfg.resamples, rng)
    n_stat = 2 * len(TWIN_STATS)
    weights = np.ones_like(target)
    if site_feats is not None:  # the features together weigh feature_weight x one statistic's
        weights[n_stat:] = cfg.feature_weight * n_stat / max(1, len(target) - n_stat)
    fit_idx = rng.choice(len(ref), size=min(cfg.fit_images, len(ref)), replace=False)
    obj = TwinObjective([ref[i] for i in sorted(fit_idx)], target, scale, cfg.names, embed,
                        weights, cfg.seed + 1, cfg.penalty)
    d = len(cfg.names)
    neutral_u = CameraParams().to_vector()[[NAMES.index(n) for n in cfg.names]]
    starts = [(obj(neutral_u), neutral_u)]
    design = rng.random((cfg.design, d))
    starts += sorted(((obj(u), u) for u in design), key=lambda t: t[0])[:max(0, cfg.restarts - 1)]
    best_d, best_u = math.inf, neutral_u
    for d0, u0 in starts:
        u, du = coordinate_search(obj, u0, d0, cfg.sweeps, cfg.points)
        if du < best_d:
            best_d, best_u = du, u
    params = CameraParams.from_vector(best_u, cfg.names)
    # the final residual on every held-out image (not only the fit subsample)
    full = TwinObjective(ref, target, scale, cfg.names, embed, weights, cfg.seed + 2)
    r = full.residuals(params)
    dist = float(np.sqrt(np.sum(weights * r ** 2) / np.sum(weights)))
    neutral_d = full.distance_of(CameraParams())
    per = dict(zip(descriptor_names(len(target) - n_stat)[:n_stat], np.abs(r[:n_stat]).tolist(),
                   strict=True))
    return TwinFit(params, dist, neutral_d, time.perf_counter() - t0, obj.evaluations, per)




# --- the estimate ------------------------------------------------------------------------------
@dataclass
class TwinAccuracy:
    """A model's accuracy on the twin: the point estimate and a two-sided interval from the
    bootstrap over images and degradation draws, widened by the fit's residual."""

    accuracy: float
    low: float
    high: float
    draws: int
    n: int
    widened_by: float  # the residual's factor on the interval's half-width (1: none)


def twin_accuracy(predict: Callable[[list[np.ndarray]], np.ndarray],
                  held_out: Sequence[ImageLike], labels: Sequence[int] | np.ndarray,
                  fit: TwinFit, grid: int, draws: int = 3, boot: int = 400,
                  level: float = 0.90, seed: int = 0) -> TwinAccuracy:
    """Accuracy of ``predict`` (grid images -> (N,) predicted classes) on the labelled
    ``held_out`` images through the fitted camera, ``draws`` noise draws per image. The
    interval is the bootstrap's (images resampled, each with its own draws' mean correctness),
    its half-width multiplied by ``max(1, residual)``: a twin that explains the site only to
    a distance d > 1 is trusted d times less."""
    y = np.asarray(labels)
    if len(y) != len(held_out) or len(y) < 2:
        raise ValueError(f"need one label per held-out image (>= 2), got {len(y)} for "
                         f"{len(held_out)}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    base = on_grid(held_out, grid)
    right = np.zeros((draws, len(y)))
    for k in range(draws):
        imgs = [apply_camera(im, fit.params, rng) for im in base]
        right[k] = np.asarray(predict(imgs)) == y
    per_image = right.mean(0)  # (N,) each image's correctness over the draws
    acc = float(per_image.mean())
    idx = rng.integers(0, len(y), size=(boot, len(y)))
    stats = per_image[idx].mean(1)
    lo_q, hi_q = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    widen = max(1.0, float(fit.distance))
    low = max(0.0, acc - widen * (acc - float(lo_q)))
    high = min(1.0, acc + widen * (float(hi_q) - acc))
    return TwinAccuracy(acc, low, high, draws, len(y), widen)


__all__ = ["NEUTRAL", "TWIN_STATS", "TwinAccuracy", "TwinConfig", "TwinFit", "TwinObjective",
           "descriptors", "twin_accuracy",
           "coordinate_search", "fit_twin", "on_grid", "resampling_spread", "stat_matrix"]
