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

import time
from typing import Any

from emowatch.sites import Site
from models.estimate.base import Estimate, impact, unavailable
from tasks.featurize import FeatureSet

NO_ESTIMATOR = ("this model version has no accuracy estimator (trained before emowatch "
                "estimated accuracy, or with --estimator-specs 0): retrain the source model "
                "to get one")


def estimate_accuracy(profile: Any, fs: FeatureSet) -> Estimate:
    """The estimate of the window's accuracy (``models.estimate.base.Estimate``, timed in
    ``ms``); an ``unavailable`` record with the reason when there is none."""
    from threadpoolctl import threadpool_limits

    from models.estimate.describe import Batch

    est = profile.accuracy_estimator() if hasattr(profile, "accuracy_estimator") else None
    n = len(fs)
    if est is None:
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
    if impact_ == "harmful":
        return f"Harmful: {drop}, above the site's tolerance of {100 * tol:.0f} points."
    if impact_ == "harmless":
        return f"Harmless: {drop}, within the site's tolerance of {100 * tol:.0f} points."
    return (f"Impact unknown: {drop}; the interval straddles the site's tolerance of "
            f"{100 * tol:.0f} points (more images narrow it).")


__all__ = ["NO_ESTIMATOR", "estimate_accuracy", "explanation", "headline", "impact_of",
           "should_notify"]
