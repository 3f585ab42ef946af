"""Does a site's drift matter? The accuracy estimate of a check, its impact, and who hears.

    estimate = estimate_accuracy(profile, features)     # models.estimate.base.Estimate
    impact = impact_of(site, estimate)                  # harmful | harmless | unknown
    notify = should_notify(site, decision, impact)       # e-mail + drift event (re-adaptation)

The rule (site option ``drift.alert_on``): "harmful" (default) e-mails and starts a
re-adaptation when the impact is harmful, or unknown while the drift test fired; a harmless
drift is recorded, reported and shown in ``status``, nothing more. "drift": every statistical
drift, whatever its impact (the behaviour before estimates existed).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from emowatch.sites import Site
from models.estimate.base import Estimate, impact, unavailable
from tasks.featurize import FeatureSet

NO_ESTIMATOR = ("this model version has no accuracy estimator (trained before emowatch "
                "estimated accuracy, or with --estimator-specs 0): retrain the source model "
                "to get one")


def estimate_accuracy(profile: Any, fs: FeatureSet, model: Any = None,
                      site_paths: list[str] | None = None,
                      previous_twin: dict[str, Any] | None = None) -> Estimate:
    """The estimate of the window's accuracy (``models.estimate.base.Estimate``, timed in
    ``ms``); an ``unavailable`` record with the reason when there is none. The version's bank
    estimator when it has one; otherwise the site twin (``model``: the version's checkpoint,
    ``site_paths``: the window's images) when the profile keeps the twin's images;
    ``previous_twin``: the site's last twin record, whose camera is kept while it fits."""
    from threadpoolctl import threadpool_limits

    from models.estimate.describe import Batch

    est = profile.accuracy_estimator() if hasattr(profile, "accuracy_estimator") else None
    n = len(fs)
    if est is None:
        if getattr(profile, "twin", None) and model is not None and site_paths:
            return twin_estimate(profile, model, site_paths, previous_twin, fs.z)
        return unavailable(NO_ESTIMATOR, n)
    if n < 2:
        return unavailable(f"{n} images: too few to estimate", n)
    try:
        batch = Batch.from_quality(fs.z, fs.probs, fs.quality)
    except ValueError as e:
        return unavailable(f"cannot describe the images: {e}", n)
    t0 = time.perf_counter()
    with threadpool_limits(1):  # small matrix products: threads only contend
        out = est.estimate(batch)
    return out.with_ms(round(1000 * (time.perf_counter() - t0), 1))


def twin_estimate(profile: Any, model: Any, site_paths: list[str],
                  previous: dict[str, Any] | None = None,
                  site_features: Any = None) -> Estimate:
    """The site twin's estimate (``models.estimate.twin.TwinEstimator``) of ``model`` (a
    checkpoint: the version being checked, source or adapted) on the images at ``site_paths``
    (undecodable ones skipped), timed in ``ms``. ``previous``: the site's last twin record
    (``Estimate.twin``); its camera is kept while it still explains the site.
    ``site_features``: the version's features of the same images (the check's featurization),
    for the twin's ``feature_distance``."""
    import numpy as np

    from models.estimate.twin import TwinConfig, previous_camera
    from models.estimate.twin_estimator import TwinEstimator
    from models.evaluate import extract_features
    from models.images import load_rgb
    from models.sim.camera import native_size

    t0 = time.perf_counter()
    prep = model.preprocessing
    site, sizes = [], []
    for p in site_paths:
        try:
            im = load_rgb(p)
            sizes.append(im.size)
            site.append(prep.to_array(im))
        except Exception:  # noqa: BLE001 -- validated at ingestion; a tampered file is skipped
            continue
    if len(site) < 2:
        return unavailable(f"{len(site)} decodable images: too few to estimate", len(site))
    held, labels = profile.twin_images(prep)
    native = native_size(sizes, prep.img_size)  # the camera's noise and JPEG act at this size

    def predict(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        z, probs = extract_features(model, np.stack(images))
        return np.asarray(probs).argmax(1), np.asarray(z)

    last, last_residual = previous_camera(previous, prep.img_size, native)
    try:
        cfg = TwinConfig(grid=prep.img_size, native=native)
        est, _ = TwinEstimator(cfg).estimate_images(
            predict, held, labels, site, previous=last, previous_residual=last_residual,
            site_features=None if site_features is None or len(site_features) != len(site)
            else np.asarray(site_features), memo=twin_memo(model, held))
    except Exception as e:  # noqa: BLE001 -- the check goes on, saying why it has no estimate
        logging.getLogger(__name__).exception("the site twin failed")
        return unavailable(f"the site twin failed: {type(e).__name__}: {e}", len(site))
    return est.with_ms(round(1000 * (time.perf_counter() - t0), 1))


# id(model) -> (a weak reference to the model: the loaded checkpoint a warm worker keeps, see
# Registry.load_model; held-out digest -> the twin's passes already run, see
# TwinEstimator.estimate_images' memo). A checkpoint is a dataclass (unhashable): by identity.
_TWIN_MEMOS: dict[int, tuple[weakref.ref, dict[str, dict]]] = {}


def twin_memo(model: Any, held: list[Any]) -> dict:
    """The twin's memo for this model object and these held-out images: a warm worker's
    next check of a site whose camera is kept runs no model pass for the twin."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for a in held:
        h.update(np.ascontiguousarray(a))
    for k in [k for k, (ref, _) in _TWIN_MEMOS.items() if ref() is None]:
        del _TWIN_MEMOS[k]  # models freed since
    entry = _TWIN_MEMOS.get(id(model))
    if entry is None or entry[0]() is not model:
        try:
            entry = (weakref.ref(model), {})
        except TypeError:  # not weak-referenceable: no memo
            return {}
        _TWIN_MEMOS[id(model)] = entry
    per = entry[1]
    if len(per) > 2:
        per.clear()
    return per.setdefault(h.hexdigest(), {})


def impact_of(site: Site, estimate: Estimate) -> str:
    return impact(estimate, site.drift.max_accuracy_drop)


def should_notify(site: Site, decision: str, impact_: str) -> bool:
    """E-mail and emit the drift event (which starts a re-adaptation)?"""
    if site.drift.alert_on == "drift":
        return decision == "drift"
    return impact_ == "harmful" or (impact_ == "unknown" and decision == "drift")


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def headline(site: Site, estimate: Estimate, impact_: str) -> str:
    """One line: "night-cam: accuracy ~0.31 [0.26, 0.36], was 0.53 - harmful"."""
    if not estimate.available:
        return f"{site.name}: accuracy not estimated - {impact_}"
    return (f"{site.name}: accuracy ~{_pct(estimate.accuracy)} [{_pct(estimate.low)}, "
            f"{_pct(estimate.high)}], was {_pct(estimate.source_accuracy)} - {impact_}")


def explanation(site: Site, estimate: Estimate, impact_: str) -> str:
    """What the impact means, in words, for e-mails and reports."""
    tol = site.drift.max_accuracy_drop
    if not estimate.available:
        return f"No accuracy estimate: {estimate.reason or 'unknown reason'}."
    drop = (f"estimated drop {100 * estimate.drop:+.1f} points (90% interval "
            f"{100 * estimate.drop_low:+.1f} to {100 * estimate.drop_high:+.1f})")
    if not estimate.verifiable:
        return (f"Impact unknown: the images are unlike anything the estimator was fitted on "
                f"({estimate.reason}); the {drop} cannot be trusted.")
    twin = (f" The site looks like the training images through this camera: "
            f"{estimate.twin.get('condition')} (its twin; residual "
            f"{estimate.twin.get('distance', 0):.2f})." if estimate.twin else "")
    if impact_ == "harmful":
        return f"Harmful: {drop}, above the site's tolerance of {100 * tol:.0f} points.{twin}"
    if impact_ == "harmless":
        return f"Harmless: {drop}, within the site's tolerance of {100 * tol:.0f} points.{twin}"
    return (f"Impact unknown: {drop}; the interval straddles the site's tolerance of "
            f"{100 * tol:.0f} points (more images narrow it).{twin}")


__all__ = ["NO_ESTIMATOR", "estimate_accuracy", "explanation", "headline", "impact_of",
           "should_notify", "twin_estimate"]
