"""The twin of a site: the camera (``models.sim.camera``) whose output makes the held-out
labelled images of the training domain look like the site's images.

Both sets are first put on one square ``grid`` (what the model sees, smaller: the fit runs
many times). The distance between two sets is measured in descriptors of the set: the mean and
the spread over its images of each image-quality statistic (``models.quality``; sharpness and
noise on log scales), and -- when an ``embed`` function is given -- the mean of the served
model's own features. Each difference is divided by its standard error between two samples
of the sizes compared, both spread as the site's images are (``gap_scale``). A
distance of about 1 is then what two samples of the same camera differ by; the residual of a
fit says, in the same unit, how much of the site the twin cannot explain:

    d(theta)^2 = mean_k ((D_k(camera_theta(held-out)) - D_k(site)) / se_k)^2

The fit is derivative-free (the camera is not differentiable: JPEG, clipping): forward
selection of the parameters that move away from neutral, each bought at a price in d^2 and
re-tuned by narrowing coordinate passes (``stepwise_search``), on a few held-out images chosen
to stand for all of them (``representative``), with fixed noise draws so the objective is
deterministic.
Pure numpy / SciPy; no I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from models.estimate.search import coordinate_search, stepwise_search
from models.images import ImageLike, rgb_array
from models.quality import image_stats
from models.sim.camera import NAMES, NEUTRAL, CameraParams, apply_camera, noise_shape

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
    # Both sets on grid x grid pixels: the model's own input size. On a smaller grid (96 was
    # tried) down-sampling averages away the sensor noise and JPEG blocks the model feels, and
    # a noise level fitted there means less noise at 224: the night twin under-read the drop
    # by 9 points at 96 px and by 0.5 at 224 (bench/results/twin_estimate.md).
    grid: int = 224
    # The (width, height) of the site camera's photos (models.sim.camera.native_size of their
    # sizes): its noise and JPEG act before the photos are resized to the grid. None: the grid.
    native: tuple[int, int] | None = None
    # Held-out images the search transforms per evaluation: chosen to stand for all of them
    # (:func:`representative`). With 8, 12 or 24 such images the fits named the same cameras at
    # residuals within 0.05 on 7 Emotion6 sites and 2 held-out draws, where 24 random images
    # had named casts the sites did not have and fitted 0.4-1.5 farther; 8 costs a third of 24
    # (docs/benchmarks.md, "The twin's seconds in a check").
    fit_images: int = 8
    names: tuple[str, ...] = NAMES  # the camera parameters fitted (the rest neutral)
    points: int = 7  # values tried per parameter in a scan
    sweeps: int = 3  # refinement passes over the chosen parameters, each 3x narrower
    max_changes: int = 4  # parameters a fit may move away from neutral
    # What moving one more parameter away from neutral must buy, in d^2 (the mean squared
    # standardised difference). Two samples of one camera differ by d ~ 1, and the best of 12
    # one-parameter moves explains part of that noise on its own (a clean site's twin came out
    # "darker x0.79", d 1.24 -> 1.00, d^2 -0.54): a change must explain more than that.
    price: float = 0.6
    # With the model's features (``embed``): passes of a coordinate search over the changed
    # parameters and their look-alikes (:data:`LOOK_ALIKES`) on image statistics plus the
    # model's feature means. Cameras the statistics cannot tell apart can cost the model very
    # different accuracy (a light blur 0.4 points, "low resolution x0.33" 6.7). Off (0) by
    # default: 2 passes changed no fitted condition on the 6 sites measured (seed 1; night 2
    # and blur 1 stayed as far off) and cost up to 20 s more (bench/results/).
    refine_sweeps: int = 0
    feature_weight: float = 1.0  # weight of the feature-mean descriptors (when embed is given)
    # A site's previous camera (its last check's) is kept while it still explains the site to
    # this residual: one evaluation on the held-out images instead of a search. A camera that
    # changed (or a new batch that reads farther than sampling allows) is searched again.
    reuse_residual: float = 1.5
    seed: int = 0
    workers: int = 2  # threads a fit spreads the held-out images over (1: none)


# Parameters that can stand in for each other in the image statistics but not for the model:
# the model-aware refinement tries the look-alikes of every parameter the search moved.
LOOK_ALIKES: dict[str, tuple[str, ...]] = {
    "gain": ("gamma",), "gamma": ("gain",), "blur": ("scale",), "scale": ("blur",),
    "saturation": (), "noise_read": ("noise_shot",), "noise_shot": ("noise_read",),
    "jpeg_quality": ("blur",), "vignette": ("gain",),
    "r_gain": (), "g_gain": (), "b_gain": (),
}


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
    reused: bool = False  # the previous camera still explained the site (no search)

    def describe(self) -> str:
        return self.params.describe()

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "condition": self.describe(),
                "distance": round(self.distance, 4),
                "neutral_distance": round(self.neutral_distance, 4),
                "seconds": round(self.seconds, 2), "evaluations": self.evaluations,
                "reused": self.reused,
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


def stat_row(image: np.ndarray) -> list[float]:
    """One image's statistics of :data:`TWIN_STATS` (log ones as log1p)."""
    s = image_stats(image)
    return [math.log1p(max(s[n], 0.0)) if log else s[n] for n, log, _ in TWIN_STATS]


def stat_matrix(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, S) per-image statistics of :data:`TWIN_STATS` (log ones as log1p)."""
    return np.asarray([stat_row(im) for im in images], np.float64)


def descriptors(stats: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
    """The set's descriptor vector: mean and std of each statistic, then the feature mean."""
    parts = [stats.mean(0), stats.std(0)]
    if feats is not None:
        parts.append(np.asarray(feats, np.float64).mean(0))
    return np.concatenate(parts)


def descriptor_names(n_feats: int) -> list[str]:
    names = [f"mean {n}" for n, _, _ in TWIN_STATS] + [f"spread {n}" for n, _, _ in TWIN_STATS]
    return names + [f"feature {i}" for i in range(n_feats)]


def gap_scale(site: tuple[np.ndarray, np.ndarray, np.ndarray], n_site: int, n_twin: int,
              n_feats: int) -> np.ndarray:
    """The standard error of each descriptor's difference between the twin (``n_twin``
    images) and the site (``n_site``), both taken to spread as the site's images do: a mean
    differs by s sqrt(1/n_s + 1/n_t), a std by s sqrt((k - 1)/4 (1/n_s + 1/n_t)) (k: the
    kurtosis). Differences in these units are ~N(0, 1) between two samples of one camera, so
    d ~ 1. The unit is the site's, fixed during the fit: clean training images all read
    blockiness ~1 where JPEG photos vary, and a clean-image unit put a JPEG site's twin 20-250
    units away at the right quality; the twin's own spread (Welch) let the search lower d by
    making the twin vary more (vignetting 0.8 at a night site). Floored
    (:data:`TWIN_STATS`' smallest spreads; 1e-3 for features)."""
    _, sd, kurt = site
    f = math.sqrt(1.0 / n_site + 1.0 / n_twin)
    n_stat = len(TWIN_STATS)
    floor = np.array([f for _, _, f in TWIN_STATS] * 2 + [1e-3] * n_feats)
    scale = np.concatenate([sd[:n_stat] * f, sd[:n_stat] * f * np.sqrt((kurt[:n_stat] - 1) / 4),
                            sd[n_stat:] * f])
    return np.maximum(scale, floor)


def set_moments(stats: np.ndarray, feats: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """(descriptors, per-column std, per-column kurtosis) of one set: what :func:`gap_scale`
    and the distance need."""
    x = stats if feats is None else np.hstack([stats, np.asarray(feats, np.float64)])
    sd = x.std(0)
    kurt = np.maximum((((x - x.mean(0)) / np.maximum(sd, 1e-12)) ** 4).mean(0), 1.0)
    return descriptors(stats, feats), sd, kurt


def weighted_rms(r: np.ndarray, weights: np.ndarray) -> float:
    """The distance of standardised residuals ``r``: their weighted root mean square."""
    return float(np.sqrt(np.sum(weights * r ** 2) / np.sum(weights)))


class TwinObjective:
    """d(u) for u in [0, 1]^len(names): the camera on the fit subsample (fixed noise draws),
    its descriptors, their difference from the site's in standard errors (:func:`gap_scale`).

    Each image has its own noise draw, the same for every camera tried (common random
    numbers: the objective is deterministic and smooth in the noise level); on a subsample
    (<= :data:`KEEP_DRAWS` images) the draws are made once and kept -- drawing them was a
    third of a fit's time. ``pool``: an executor the images are spread over (numpy and
    Pillow release the GIL: ~2x on 2 cores)."""

    KEEP_DRAWS = 64

    def __init__(self, held_out: Sequence[np.ndarray], site: tuple, scale: np.ndarray,
                 names: Sequence[str], embed: Callable[[list[np.ndarray]], np.ndarray] | None,
                 weights: np.ndarray, seed: int,
                 native: tuple[int, int] | None = None, pool: Executor | None = None) -> None:
        self.held_out, self.target, self.scale = list(held_out), site[0], scale
        self.native, self.pool = native, pool
        self.names, self.embed, self.weights, self.seed = tuple(names), embed, weights, seed
        self.evaluations = 0
        self._normals: dict[int, np.ndarray] = {}
        self._seen: dict[bytes, float] = {}

    def _normal(self, i: int) -> np.ndarray:
        z = self._normals.get(i)
        if z is None:
            z = np.random.default_rng([self.seed, i]).standard_normal(
                noise_shape(self.held_out[i].shape, self.native), dtype=np.float32)
            if len(self.held_out) <= self.KEEP_DRAWS:
                self._normals[i] = z
        return z

    def _map(self, fn: Callable[[int], Any]) -> list[Any]:
        idx = range(len(self.held_out))
        return list(self.pool.map(fn, idx)) if self.pool is not None else [fn(i) for i in idx]

    def _camera(self, p: CameraParams, i: int) -> np.ndarray:
        noisy = p.noise_shot > 0 or p.noise_read > 0
        return apply_camera(self.held_out[i], p, None, self.native,
                            self._normal(i) if noisy else None)

    def transform(self, p: CameraParams) -> list[np.ndarray]:
        return self._map(lambda i: self._camera(p, i))

    def residuals(self, p: CameraParams) -> np.ndarray:
        if self.embed is None:
            stats = np.asarray(self._map(lambda i: stat_row(self._camera(p, i))), np.float64)
            return (descriptors(stats, None) - self.target) / self.scale
        imgs = self.transform(p)
        return (descriptors(stat_matrix(imgs), self.embed(imgs)) - self.target) / self.scale

    def distance_of(self, p: CameraParams) -> float:
        self.evaluations += 1
        return weighted_rms(self.residuals(p), self.weights)

    def __call__(self, u: np.ndarray) -> float:
        """The search's objective: d^2 of the camera at u (the parameters scaled to [0, 1]);
        a camera tried before is not evaluated again (the searches revisit points)."""
        u = np.clip(np.asarray(u, np.float64), 0, 1)
        key = np.round(u, 9).tobytes()
        if key not in self._seen:
            d = self.distance_of(CameraParams.from_vector(u, self.names))
            self._seen[key] = d * d
        return self._seen[key]


def representative(stats: np.ndarray, k: int, rng: np.random.Generator,
                   tries: int = 2000) -> np.ndarray:
    """Indices of ``k`` of the rows of ``stats`` (images' statistics) whose descriptors (mean
    and spread of each column) are nearest the whole set's, in units of the column's spread:
    the best of ``tries`` random draws, then single swaps while they help. The fit's search
    runs on these ``k`` images: a random few differ from the whole set by chance (warmer,
    sharper), and the search explained that difference with camera changes the site did not
    have (a green cast at a greyscale site), where the final residual on every image then
    read far."""
    n = len(stats)
    if k >= n:
        return np.arange(n)
    sd = np.maximum(stats.std(0), 1e-9)
    z = (stats - stats.mean(0)) / sd  # whole set: mean 0, spread 1 per column

    def gap(idx: np.ndarray) -> float:
        s = z[idx]
        return float(np.sum(s.mean(0) ** 2) + np.sum((s.std(0) - 1.0) ** 2))

    draws = np.argsort(rng.random((tries, n)), axis=1)[:, :k]
    best = draws[int(np.argmin([gap(d) for d in draws]))].copy()
    g = gap(best)
    for _ in range(3):
        improved = False
        for pos in range(k):
            for j in rng.permutation(n)[:60]:
                if j in best:
                    continue
                cand = best.copy()
                cand[pos] = j
                gc = gap(cand)
                if gc < g - 1e-12:
                    best, g, improved = cand, gc, True
        if not improved:
            break
    return np.sort(best)


def previous_camera(record: Mapping[str, Any] | None, grid: int,
                    native: tuple[int, int] | None = None) -> tuple[CameraParams | None, float]:
    """The camera and residual of a site's last twin record (``Estimate.twin``), for
    :func:`fit_twin`'s ``previous``; (None, 0) when there is none, or it was fitted on another
    grid or for photos of another size, or by another camera model."""
    rec = record or {}
    if not rec.get("params") or rec.get("grid") != grid or rec.get("native") != (
            None if native is None else list(native)):
        return None, 0.0
    try:
        return CameraParams(**rec["params"]), float(rec.get("distance") or 0.0)
    except (TypeError, ValueError):  # a record of another camera model: search afresh
        return None, 0.0


def fit_twin(held_out: Sequence[ImageLike], site: Sequence[ImageLike],
             config: TwinConfig | None = None,
             embed: Callable[[list[np.ndarray]], np.ndarray] | None = None,
             previous: CameraParams | None = None, previous_residual: float = 0.0,
             site_features: np.ndarray | None = None) -> TwinFit:
    """The camera that makes ``held_out`` (labelled training-domain images never used to pick
    the model's epoch) look like ``site``. ``embed`` (optional): grid images -> (N, D) features
    of the served model: after the search on image statistics, the changed parameters and
    their look-alikes are refined on statistics plus the features' means (``site_features``:
    the site's, when already computed). ``previous``: the site's camera from its last fit,
    kept (``reused``) while its residual is within ``reuse_residual`` or 1.25x its last
    residual (``previous_residual``), whichever is larger. The residual is always the image
    statistics' (the unit the verifiability limit is calibrated in)."""
    cfg = config or TwinConfig()
    if len(held_out) < 4 or len(site) < 2:
        raise ValueError(f"need >= 4 held-out and >= 2 site images, got {len(held_out)} and "
                         f"{len(site)}")
    unknown = [n for n in cfg.names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown camera parameter(s) {unknown}; known: {', '.join(NAMES)}")
    pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
    try:
        return _fit_twin(held_out, site, cfg, embed, previous, previous_residual,
                         site_features, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def _fit_twin(held_out: Sequence[ImageLike], site: Sequence[ImageLike], cfg: TwinConfig,
              embed: Callable[[list[np.ndarray]], np.ndarray] | None,
              previous: CameraParams | None, previous_residual: float,
              site_features: np.ndarray | None, pool: Executor | None) -> TwinFit:
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    ref = on_grid(held_out, cfg.grid)
    site_g = on_grid(site, cfg.grid)
    site_stats = stat_matrix(site_g)
    site_m = set_moments(site_stats, None)
    n_stat = 2 * len(TWIN_STATS)
    weights = np.ones_like(site_m[0])
    scale = gap_scale(site_m, len(site_g), len(ref), 0)
    full = TwinObjective(ref, site_m, scale, cfg.names, None, weights, cfg.seed + 2,
                         native=cfg.native, pool=pool)

    def finished(params: CameraParams, r: np.ndarray, evaluations: int,
                 reused: bool = False, neutral_r: np.ndarray | None = None) -> TwinFit:
        """The fit's record from its residuals ``r`` on every held-out image (and the
        untouched images', ``neutral_r``, when known)."""
        neutral_d = (weighted_rms(r, weights) if params.is_neutral
                     else weighted_rms(neutral_r, weights) if neutral_r is not None
                     else full.distance_of(CameraParams()))
        per = dict(zip(descriptor_names(0), np.abs(r[:n_stat]).tolist(), strict=True))
        return TwinFit(params, weighted_rms(r, weights), neutral_d, time.perf_counter() - t0,
                       evaluations, per, reused=reused)

    if previous is not None:
        r = full.residuals(previous)
        if weighted_rms(r, weights) <= max(cfg.reuse_residual, 1.25 * previous_residual):
            return finished(previous, r, 1, reused=True)
    ref_stats = stat_matrix(ref)
    fit_idx = representative(ref_stats, min(cfg.fit_images, len(ref)), rng)
    subsample = [ref[i] for i in fit_idx]
    obj = TwinObjective(subsample, site_m, scale, cfg.names, None, weights, cfg.seed + 1,
                        native=cfg.native, pool=pool)
    neutral_u = CameraParams().to_vector()[[NAMES.index(n) for n in cfg.names]]
    best_u, _ = stepwise_search(obj, neutral_u, cfg.points, cfg.sweeps, cfg.price,
                                cfg.max_changes)
    evaluations = obj.evaluations
    if embed is not None and cfg.refine_sweeps > 0:
        best_u, n_eval = _refine_with_features(best_u, neutral_u, subsample, site_g, site_stats,
                                               site_features, len(ref), embed, cfg, pool)
        evaluations += n_eval
    params = CameraParams.from_vector(best_u, cfg.names)
    # the final residual on every held-out image (not only the fit subsample)
    return finished(params, full.residuals(params), evaluations,
                    neutral_r=(descriptors(ref_stats, None) - site_m[0]) / scale)


def _refine_with_features(u: np.ndarray, neutral_u: np.ndarray, subsample: list[np.ndarray],
                          site_g: list[np.ndarray], site_stats: np.ndarray,
                          site_features: np.ndarray | None, n_twin: int,
                          embed: Callable[[list[np.ndarray]], np.ndarray], cfg: TwinConfig,
                          pool: Executor | None = None) -> tuple[np.ndarray, int]:
    """The search's camera refined on image statistics plus the model's feature means (the
    features together weigh ``feature_weight`` x the statistics): narrowing coordinate passes
    over the changed parameters and their look-alikes. (u, evaluations)."""
    names = list(cfg.names)
    moved = [names[j] for j in range(len(u)) if abs(u[j] - neutral_u[j]) > 1e-9]
    coords = sorted({names.index(n) for m in moved for n in (m, *LOOK_ALIKES.get(m, ()))
                     if n in names})
    if not coords:
        return u, 0
    feats = np.asarray(site_features if site_features is not None else embed(site_g))
    site_m = set_moments(site_stats, feats)
    n_stat = 2 * len(TWIN_STATS)
    weights = np.ones_like(site_m[0])
    weights[n_stat:] = cfg.feature_weight * n_stat / max(1, len(weights) - n_stat)
    scale = gap_scale(site_m, len(site_g), n_twin, len(weights) - n_stat)
    obj = TwinObjective(subsample, site_m, scale, cfg.names, embed, weights, cfg.seed + 1,
                        native=cfg.native, pool=pool)
    u, _ = coordinate_search(obj, u, obj(u), coords, cfg.refine_sweeps, 5, width=0.4)
    return u, obj.evaluations


# --- the estimate ------------------------------------------------------------------------------
__all__ = ["LOOK_ALIKES", "NEUTRAL", "TWIN_STATS", "TwinConfig", "TwinFit", "TwinObjective",
           "coordinate_search", "descriptor_names", "descriptors", "fit_twin", "gap_scale",
           "on_grid", "previous_camera", "representative", "set_moments", "stat_matrix",
           "stat_row", "stepwise_search", "weighted_rms"]
