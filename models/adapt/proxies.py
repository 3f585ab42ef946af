"""Labelled proxies of a site for the re-adaptation portfolio (``models.adapt.portfolio``).

* ``twin`` (default, :func:`twin_proxies`): the held-out training-domain images through the
  camera fitted to the site (``models.estimate.twin``, the site twin): several draws of its
  sensor noise, each split differently into the half a member adapts on and the half it is
  scored on (cross-fitting). One condition, the site's own.
* ``bank`` (:func:`build_proxies`): the held-out images under the bank shifts
  (``models.sim.shifts``) nearest the site, first by image statistics, then by the champion's
  bottleneck features: several neighbouring conditions, none of them the site's.

Pure numpy/torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.adapt.base import cached_outputs
from models.adapt.portfolio import SiteSet
from models.network import EmotionNet


# --- proxies -----------------------------------------------------------------------------------
def stat_features(stats: np.ndarray) -> np.ndarray:
    """(n, len(STAT_SCALE)) quality statistics -> the descriptors' units (log where the scale
    says so)."""
    from models.estimate.describe import STAT_SCALE

    cols = []
    for i, name in enumerate(STAT_SCALE):
        v = np.asarray(stats[:, i], np.float64)
        cols.append(np.log(np.maximum(v, 1e-4)) if STAT_SCALE[name] == "log" else v)
    return np.stack(cols, 1)


def proxy_distances(ref_stats: np.ndarray, site_stats: np.ndarray,
                    shifted_stats: Sequence[np.ndarray]) -> np.ndarray:
    """Distance between the site's mean image statistics and each shifted reference set's, in
    units of the clean reference's per-image spread (floored: a grey training domain has no
    colour spread)."""
    from models.estimate.describe import STAT_SCALE, STAT_SD_FLOOR

    ref = stat_features(ref_stats)
    sd = ref.std(0)
    floor = np.array([STAT_SD_FLOOR[n] if STAT_SCALE[n] == "lin" else 0.05 for n in STAT_SCALE])
    sd = np.maximum(sd, floor)
    mu_site = stat_features(site_stats).mean(0)
    return np.array([float(np.linalg.norm((stat_features(s).mean(0) - mu_site) / sd))
                     for s in shifted_stats])


def choose_proxies(distances: np.ndarray, k: int) -> list[int]:
    """The ``k`` nearest bank entries (ascending distance)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [int(i) for i in np.argsort(np.asarray(distances), kind="stable")[:k]]


def feature_distance(z_site: np.ndarray, z_proxy: np.ndarray) -> float:
    """MK-MMD^2 between the champion's bottleneck features of the site and of a proxy (the
    kernel adaptation aligns with, models.adapt.discrepancy.mk_mmd2)."""
    from models.adapt.discrepancy import mk_mmd2

    return float(mk_mmd2(torch.as_tensor(np.asarray(z_site), dtype=torch.float32),
                         torch.as_tensor(np.asarray(z_proxy), dtype=torch.float32)))


def stratified_subsample(labels: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``m`` of ``labels``, each class kept in proportion (at least one
    image of every class when m allows)."""
    labels = np.asarray(labels)
    if m >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * m / len(labels))).astype(int)
    while quota.sum() > m:  # more classes than m: drop from the largest quotas
        quota[np.argmax(quota)] -= 1
    rest = m - quota.sum()  # rounding: the remainder to the largest fractional parts
    frac = counts * m / len(labels) - np.floor(counts * m / len(labels))
    for c in np.argsort(-frac, kind="stable")[:rest]:
        quota[c] += 1
    out = [rng.choice(np.flatnonzero(labels == c), min(q, n), replace=False)
           for c, q, n in zip(classes, quota, counts, strict=True)]
    return np.sort(np.concatenate(out))


@dataclass
class ProxyConfig:
    """How the proxies are chosen: ``specs`` bank shifts (models.sim.shifts.bank_specs, two thirds
    mostly mild) ranked by image statistics on ``match_images`` held-out images; the
    ``shortlist`` nearest ranked again by the champion's feature distance to the site on
    ``feature_images``; the ``k`` nearest become proxies, each on the held-out images (at most
    ``max_images`` of them, a class-stratified sample: a larger training domain does not make
    every member slower)."""

    k: int = 4
    source: str = "twin"  # "twin" (twin_proxies) or "bank" (build_proxies)
    max_images: int = 240
    specs: int = 120
    match_images: int = 8
    shortlist: int = 10
    feature_images: int = 48
    seed: int = 0
    workers: int = 2  # threads the twin's camera spreads the held-out images over


def build_proxies(model: EmotionNet, prep: Any, ref_grids: np.ndarray, labels: np.ndarray,
                  site_grids: np.ndarray, site_h: torch.Tensor, precision: str,
                  config: ProxyConfig | None = None) -> tuple[list[SiteSet], list[dict[str, Any]]]:
    """Labelled proxies of the site (module docstring): held-out training-domain images
    (uint8 grids, labels) under the bank shifts nearest the site, first by image statistics,
    then by the champion's features. Returns the sets and what they are (shift, distances)."""
    from PIL import Image

    from models.adapt.bn import frozen_outputs
    from models.estimate.fit import stats_matrix
    from models.sim.shifts import apply_spec, bank_specs, spec_text

    cfg = config or ProxyConfig()
    if len(ref_grids) != len(labels) or len(ref_grids) < 2:
        raise ValueError(f"need >= 2 labelled held-out images, got {len(ref_grids)} images and "
                         f"{len(labels)} labels")
    specs = bank_specs(cfg.specs * 2 // 3, cfg.specs - cfg.specs * 2 // 3)
    rng = np.random.default_rng(cfg.seed)
    if len(ref_grids) > cfg.max_images:
        keep = stratified_subsample(np.asarray(labels), cfg.max_images, rng)
        ref_grids, labels = ref_grids[keep], np.asarray(labels)[keep]
    n = len(ref_grids)
    sub = np.sort(rng.choice(n, min(cfg.match_images, n), replace=False))
    def shift(i: int, j: int) -> np.ndarray:
        """Held-out image i under bank shift j, back on the model's pixel grid as a site image
        of that resolution would be (a rescale changes the size)."""
        a = apply_spec(ref_grids[i], specs[j], np.random.default_rng([j, int(i)]))
        return a if a.shape == ref_grids[i].shape else prep.to_array(Image.fromarray(a))

    shifted = [stats_matrix([shift(i, j) for i in sub]) for j in range(len(specs))]
    d_stats = proxy_distances(stats_matrix(list(ref_grids)), stats_matrix(list(site_grids)), shifted)
    short = choose_proxies(d_stats, min(cfg.shortlist, len(specs)))
    z_site = cached_outputs(model, site_h)[0]
    fsub = np.sort(rng.choice(n, min(cfg.feature_images, n), replace=False))

    def shifted_h(j: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        g = np.stack([shift(int(i), j) for i in idx])
        x = prep.normalize(g)
        return frozen_outputs(model, x, None, precision), x

    d_feat = {j: feature_distance(z_site, cached_outputs(model, shifted_h(j, fsub)[0])[0])
              for j in short}
    chosen = sorted(short, key=lambda j: d_feat[j])[:cfg.k]
    out, info = [], []
    for j in chosen:
        h, x = shifted_h(j, np.arange(n))
        out.append(SiteSet(h=h, images=x, labels=np.asarray(labels), name=f"shift {j}"))
        info.append({"shift": spec_text(specs[j]), "stats_distance": round(float(d_stats[j]), 3),
                     "feature_mmd2": round(d_feat[j], 5), "n": n})
    return out, info



def twin_proxies(model: EmotionNet, prep: Any, ref_grids: np.ndarray, labels: np.ndarray,
                 site_grids: np.ndarray, precision: str, config: ProxyConfig | None = None,
                 previous: Any = None, previous_residual: float = 0.0,
                 native: tuple[int, int] | None = None,
                 ) -> tuple[list[SiteSet], list[dict[str, Any]], Any]:
    """Labelled proxies of the site from its twin (module docstring): the camera fitted to the
    site's images (``previous``: the site's last camera, kept while it still explains them)
    applied to the held-out images (at most ``max_images``, class-stratified), ``k`` proxies:
    one draw of the camera's sensor noise each (a camera without noise is drawn once and
    shared). ``native``: the size of the site camera's photos (``models.sim.camera.native_size``).
    Returns the sets, what they are, and the ``TwinFit``."""
    from models.adapt.bn import frozen_outputs
    from models.estimate.twin import TwinConfig, fit_twin
    from models.sim.camera import apply_camera_seeded

    cfg = config or ProxyConfig()
    if len(ref_grids) != len(labels) or len(ref_grids) < 4:
        raise ValueError(f"need >= 4 labelled held-out images, got {len(ref_grids)} images and "
                         f"{len(labels)} labels")
    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(labels)
    if len(ref_grids) > cfg.max_images:
        keep = stratified_subsample(labels, cfg.max_images, rng)
        ref_grids, labels = ref_grids[keep], labels[keep]
    fit = fit_twin(list(ref_grids), list(site_grids),
                   TwinConfig(grid=prep.img_size, seed=cfg.seed, native=native),
                   previous=previous, previous_residual=previous_residual)
    p = fit.params
    noisy = p.noise_shot > 0 or p.noise_read > 0
    out, info, shared = [], [], None
    for j in range(cfg.k):
        if shared is None or noisy:
            g = np.stack(apply_camera_seeded(list(ref_grids), p, [cfg.seed, j], native,
                                             cfg.workers))
            x = prep.normalize(g)
            shared = (frozen_outputs(model, x, None, precision), x)
        out.append(SiteSet(h=shared[0], images=shared[1], labels=labels, name=f"twin {j}"))
        info.append({"shift": f"twin: {fit.describe()}", "draw": j, "residual":
                     round(float(fit.distance), 3), "n": len(labels)})
    return out, info, fit


__all__ = ["ProxyConfig", "build_proxies", "twin_proxies", "choose_proxies", "feature_distance", "proxy_distances",
           "stat_features", "stratified_subsample"]
