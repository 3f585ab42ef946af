"""The ``twin`` accuracy estimator: a model version measured on the site's twin.

``models.estimate.twin`` fits the camera that makes the held-out labelled training-domain images
look like a site; here the version being checked is run on those images untouched and through
the fitted camera, and the difference is the estimated drop (paired image by image), with
bootstrap intervals widened by how far the twin is from the site: in the image statistics (the
fit's residual) and in what the model itself sees (:func:`feature_distance`). A twin too far
from its site in either is not verifiable: the site is not a camera condition of the training
domain (a change of content). Pure numpy; the model comes in as a ``predict`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from models.estimate.base import Estimate
from models.estimate.twin import TwinConfig, TwinFit, fit_twin, on_grid
from models.sim.camera import CameraParams, apply_camera_seeded


def feature_distance(twin: np.ndarray, site: np.ndarray, k: int = 8) -> float:
    """How far the model's own features of the twin are from the site's, in the same unit as
    the fit's residual: the mean of each of the ``k`` leading principal directions of the
    site's features (with the twin's), standardised by the site's spread and both sample
    sizes, as a root mean square. About 1 between two samples of one camera; a camera the
    image statistics cannot tell from the site's but the model can (or a change of content)
    reads far."""
    t, s = np.asarray(twin, np.float64), np.asarray(site, np.float64)
    if len(t) < 2 or len(s) < 2:
        return float("nan")
    mu = s.mean(0)
    _, _, vt = np.linalg.svd(np.vstack([t, s]) - mu, full_matrices=False)
    basis = vt[:min(k, vt.shape[0])].T
    pt, ps = (t - mu) @ basis, (s - mu) @ basis
    se = np.maximum(ps.std(0), 1e-9) * math.sqrt(1.0 / len(t) + 1.0 / len(s))
    return float(np.sqrt(np.mean(((pt.mean(0) - ps.mean(0)) / se) ** 2)))


def _classes_and_features(out: object) -> tuple[np.ndarray, np.ndarray | None]:
    """``predict``'s output: classes, or (classes, features)."""
    if isinstance(out, tuple):
        return np.asarray(out[0]), np.asarray(out[1])
    return np.asarray(out), None


# A twin farther than this from its site (in standard errors) does not explain it: the site is
# not a camera condition of the training domain (a change of content: faces -> photos), and its
# estimate is not verifiable. Two samples of one camera are ~1 apart; a fitted camera site
# 0.7-1.6 (bench/results/twin_estimate.md).
MAX_RESIDUAL = 3.0
# The same for the model's own features (feature_distance): camera conditions 0.8-6.1 (blur 1,
# fitted as low resolution, the farthest), faces -> photos 40.5 (bench/results/twin_estimate.md).
MAX_FEATURE_DISTANCE = 12.0
# How far the twin of a site that IS the training camera reads (other photos, the same camera):
# residual and feature distance 1.4-1.8 on the clean site and re-encoded photos (bench.estimate
# protocol, seed 0, 240 vs 240 photos). Intervals are widened by the distance beyond it:
# widening by the raw distance (1.6-1.8 there) turned every harmless site "unknown".
NULL_DISTANCE = 1.75
# Cameras a memo (estimate_images' ``memo``) keeps the passes of: one per site of a worker.
MEMO_ENTRIES = 128


@dataclass
class TwinEstimator:
    """The ``twin`` estimator (``models.catalog.ESTIMATORS``): fits the camera to the site's
    images, then measures the model version on its labelled twin. Unlike the bank estimators it
    learns nothing at training time (only the held-out images are kept with the version) and
    works for any version, source or adapted: ``predict`` is the version being checked."""

    name: ClassVar[str] = "twin"
    needs_images: ClassVar[bool] = True  # estimate_images(), not estimate(batch)
    config: TwinConfig = field(default_factory=TwinConfig)
    draws: int = 2  # noise draws per held-out image (cameras without sensor noise: 1)
    level: float = 0.90
    max_residual: float = MAX_RESIDUAL
    max_feature_distance: float = MAX_FEATURE_DISTANCE
    null_distance: float = NULL_DISTANCE
    boot: int = 400

    def _through(self, images: list[np.ndarray], p: CameraParams,
                 seed: list[int]) -> list[np.ndarray]:
        """``images`` through the camera ``p``, each with its own noise draw (seeded by
        ``seed`` and its index), spread over ``config.workers`` threads."""
        return apply_camera_seeded(images, p, seed, self.config.native, self.config.workers)

    def estimate_images(self, predict: Callable[[list[np.ndarray]], np.ndarray],
                        held_out: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray,
                        site: Sequence[np.ndarray], fit: TwinFit | None = None,
                        seed: int = 0, previous: CameraParams | None = None,
                        previous_residual: float = 0.0,
                        site_features: np.ndarray | None = None,
                        memo: MutableMapping[Any, Any] | None = None,
                        ) -> tuple[Estimate, TwinFit]:
        """(estimate, fit) of the site's accuracy. ``held_out`` and ``site``: images on the
        model's grid (``config.grid``); ``predict``: grid images -> (N,) classes, or (classes,
        (N, D) features). ``fit``: a fit of this site to use as it is; ``previous``: the site's
        last camera, kept when it still explains the site (the camera does not depend on the
        version). ``site_features``: the version's features of the site's images; with
        features from ``predict`` the twin record gets ``feature_distance``
        (:func:`feature_distance`, twin under the camera against the site).

        accuracy: mean correctness on the twin over ``draws`` draws; source_accuracy: the same
        images untouched; drop = source - accuracy, paired image by image. Intervals: the
        bootstrap over held-out images (each with its draws' mean), half-widths multiplied by
        max(1, max(residual, feature distance) / ``null_distance``).

        ``memo``: a mapping kept by the caller for this version and these held-out images
        (the warm worker's): the untouched pass and the pass under a camera already measured
        (a site whose camera is kept) are taken from it instead of run again; the result is
        the same either way (the camera's draws and the bootstrap have their own seeds)."""
        y = np.asarray(labels)
        if len(y) != len(held_out) or len(y) < 2:
            raise ValueError(f"need one label per held-out image (>= 2), got {len(y)} for "
                             f"{len(held_out)}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if fit is None:
            def embed(images: list[np.ndarray]) -> np.ndarray | None:
                return _classes_and_features(predict(images))[1]

            with_feats = site_features is not None
            fit = fit_twin(held_out, site, self.config, embed=embed if with_feats else None,
                           previous=previous, previous_residual=previous_residual,
                           site_features=site_features)
        memo = {} if memo is None else memo
        base = on_grid(held_out, self.config.grid)
        if ("clean",) not in memo:
            memo[("clean",)] = _classes_and_features(predict(base))
        cls0, feats = memo[("clean",)]
        right0 = (cls0 == y).astype(np.float64)
        p = fit.params
        # only sensor noise is random: any other camera is the same on every draw
        draws = self.draws if (p.noise_shot > 0 or p.noise_read > 0) else 1
        if p.is_neutral:
            right = right0[None]
        else:
            key = ("twin", tuple(sorted(p.to_dict().items())), self.config.native, draws, seed)
            if key not in memo:
                if len(memo) > MEMO_ENTRIES:
                    memo.clear()
                    memo[("clean",)] = (cls0, feats)
                rows, twin_feats = [], None
                for k in range(draws):
                    cls, f = _classes_and_features(predict(self._through(base, p, [seed, 1, k])))
                    rows.append(cls == y)
                    if k == 0:  # the twin's features: the first draw's
                        twin_feats = f
                memo[key] = (np.stack(rows).astype(np.float64), twin_feats)
            right, feats = memo[key]
        rng = np.random.default_rng([seed, 2])  # the bootstrap's
        per_image = right.mean(0)
        acc, ref = float(per_image.mean()), float(right0.mean())
        idx = rng.integers(0, len(y), size=(self.boot, len(y)))
        a_b, d_b = per_image[idx].mean(1), (right0 - per_image)[idx].mean(1)
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        f_dist = (feature_distance(feats, site_features)
                  if feats is not None and site_features is not None else None)
        # trusted less the farther the twin is from the site, in the image statistics or in
        # what the model itself sees (a twin the model tells from the site: blur 1 fitted as
        # "low resolution", feature distance 3.5, drop read 6 points too harmful), beyond
        # how far a twin of the training camera itself reads (NULL_DISTANCE)
        far = max(float(fit.distance), f_dist if f_dist is not None and np.isfinite(f_dist)
                  else 0.0)
        widen = max(1.0, far / self.null_distance)

        def interval(x: float, boot: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
            b_lo, b_hi = np.quantile(boot, q)
            return (max(lo, x - widen * (x - float(b_lo))), min(hi, x + widen * (float(b_hi) - x)))

        low, high = interval(acc, a_b, 0.0, 1.0)
        d_low, d_high = interval(ref - acc, d_b, -1.0, 1.0)
        far_feats = f_dist is not None and not f_dist <= self.max_feature_distance
        verifiable = fit.distance <= self.max_residual and not far_feats
        if verifiable:
            reason = f"twin: {fit.describe()} (residual {fit.distance:.2f})"
        elif fit.distance > self.max_residual:
            reason = (f"the twin explains the site only to a residual of {fit.distance:.1f} "
                      f"(limit {self.max_residual:g}): not a camera condition of the training "
                      f"domain (a change of content?); the drop cannot be bounded")
        else:
            reason = (f"the model sees the twin {f_dist:.1f} standard errors from the site "
                      f"(limit {self.max_feature_distance:g}): not a camera condition of the "
                      f"training domain (a change of content?); the drop cannot be bounded")
        est = Estimate(accuracy=acc, low=low, high=high, source_accuracy=ref, drop=ref - acc,
                       drop_low=d_low, drop_high=d_high, method=self.name,
                       verifiable=bool(verifiable), reason=reason, n=len(site),
                       twin={**fit.to_dict(), "grid": self.config.grid,
                             "native": None if self.config.native is None
                             else list(self.config.native),
                             "feature_distance": None if f_dist is None else round(f_dist, 3),
                             "widen": round(widen, 3)})
        return est, fit


__all__ = ["MAX_FEATURE_DISTANCE", "MAX_RESIDUAL", "NULL_DISTANCE", "TwinEstimator", "feature_distance"]
