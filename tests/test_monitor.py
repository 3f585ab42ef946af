"""tasks/monitor.py without Prefect: the drift decision on a synthetic reference, the window of
recent images, the check's record and its e-mail."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from emowatch.sites import Site
from models.profile import ReferenceProfile
from models.quality import STAT_NAMES
from tasks import monitor
from tasks.featurize import FeatureSet

CLASSES = ["a", "b", "c"]


def _quality(rng, n: int, brightness: float = 0.5) -> dict[str, np.ndarray]:
    q = {k: rng.normal(1.0, 0.1, n) for k in STAT_NAMES}
    q["brightness"] = rng.normal(brightness, 0.05, n)
    return q


def _profile(rng, n: int = 200) -> ReferenceProfile:
    return ReferenceProfile.from_arrays(rng.normal(size=(n, 16)), rng.dirichlet(np.ones(3), n),
                                        CLASSES, quality=_quality(rng, n))


def _batch(rng, n: int, shift: float = 0.0, brightness: float = 0.5) -> FeatureSet:
    return FeatureSet([f"{i:064x}" for i in range(n)],
                      (rng.normal(size=(n, 16)) + shift).astype(np.float32),
                      rng.dirichlet(np.ones(3), n).astype(np.float32), _quality(rng, n, brightness))


def _site(**drift) -> Site:
    return Site(name="s", inbox=Path("/tmp/in"), drift={"permutations": 99, **drift})


def test_the_decision_says_what_changed():
    rng = np.random.default_rng(0)
    prof = _profile(rng)
    same, phrases = monitor.check_drift(_site(), prof, _batch(rng, 80))
    assert same.decision == "no_drift" and same.method == "mmd+bbsd+quality" and phrases == []
    dark, phrases = monitor.check_drift(_site(), prof, _batch(rng, 80, brightness=0.25))
    q = dark.details["quality"]
    assert dark.decision == "drift" and q["p_value"] <= q["threshold"]  # the quality test fired
    assert any(p.startswith("darker") for p in phrases)
    # quality_test off: the same dark batch is tested on features and probabilities only
    off, _ = monitor.check_drift(_site(quality_test=False), prof, _batch(rng, 80, brightness=0.25))
    assert off.method == "mmd+bbsd" and off.decision == "no_drift"


def test_too_few_or_no_images_are_insufficient_data_never_no_drift():
    rng = np.random.default_rng(1)
    prof = _profile(rng)
    few, _ = monitor.check_drift(_site(min_samples=30, window=30), prof, _batch(rng, 12))
    empty, phrases = monitor.check_drift(_site(), prof, FeatureSet([], np.zeros((0, 16)),
                                                                   np.zeros((0, 3)), {}))
    assert few.decision == empty.decision == "insufficient_data" and few.n_cur == 12
    assert empty.p_value is None and phrases == []


def test_window_check_record_and_email(runtime, tmp_path):
    from db import inbox
    from db.models import DriftCheck
    from db.session import session_scope
    from models.estimate.base import Estimate
    from tasks.context import ServedModel

    ctx = runtime.site_context("s", sites={"s": Site(name="s", inbox=tmp_path)})
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with session_scope(ctx.engine) as s:
        inbox.insert_images(s, [{
            "site_id": ctx.site_id, "sha256": f"{i:064x}", "rel_path": f"{i}.jpg",
            "store_path": f"/store/{i}", "size_bytes": 1, "format": "JPEG", "width": 20,
            "height": 20, "mode": "RGB", "status": "ok", "meta": {},
            "ingested_at": t0 + dt.timedelta(minutes=i)} for i in range(5)])
    w = monitor.window_items(ctx, 3)
    assert [sha[-1] for sha, _ in w.items] == ["4", "3", "2"]  # the newest first
    assert (w.oldest, w.newest) == (t0 + dt.timedelta(minutes=2), t0 + dt.timedelta(minutes=4))
    assert w.ids_of([f"{2:064x}"]) == [w.ids[2]]

    rng = np.random.default_rng(2)
    result, phrases = monitor.check_drift(_site(), _profile(rng), _batch(rng, 80, shift=1.5))
    ctx = ctx.__class__(ctx.settings, ctx.site, ctx.site_id, ServedModel("emowatch-s", "3", "champion"))
    est = Estimate(accuracy=0.31, low=0.26, high=0.36, source_accuracy=0.53, drop=0.22,
                   drop_low=0.17, drop_high=0.27, method="meta-gbm", verifiable=True,
                   reason="", n=80)
    check_id = monitor.record_check.fn(ctx, result, phrases, w.ids, w, {"html": "/r.html"},
                                       est, "harmful")
    with session_scope(ctx.engine) as s:
        row = s.get(DriftCheck, check_id)
        assert (row.decision, row.model_version, row.n_cur, row.report_html) == (
            "drift", "3", 80, "/r.html")
        assert row.image_ids == w.ids and row.details["triggered_by"] == result.details["triggered_by"]
        assert (row.impact, row.estimate["accuracy"]) == ("harmful", 0.31)
    subject, body = monitor.drift_email(ctx.site, check_id, result, phrases, "emowatch-s/3",
                                        {"html": "/r.html"}, est, "harmful")
    # the subject and the first line lead with the impact and the estimate
    assert subject.startswith("[emowatch] s: accuracy ~0.31 [0.26, 0.36], was 0.53 - harmful")
    assert "n=80" in subject
    first, second = body.splitlines()[:2]
    assert first == "s: accuracy ~0.31 [0.26, 0.36], was 0.53 - harmful"
    assert second.startswith("Harmful: estimated drop +22.0 points")
    assert f"Drift check:   #{check_id}" in body and "/r.html" in body
    assert "Predicted classes now: " in body  # the softmax test's shares
    # without an estimate the e-mail says so instead of guessing
    subject, body = monitor.drift_email(ctx.site, check_id, result, phrases, "emowatch-s/3", {})
    assert "accuracy not estimated - unknown" in subject and "No accuracy estimate" in body


@pytest.mark.parametrize("views", [("features", "probs"), ("features", "probs", "quality")])
def test_the_profile_decides_which_tests_run(views):
    rng = np.random.default_rng(3)
    prof = _profile(rng)
    if "quality" not in views:
        prof.quality = None  # a profile saved before quality statistics existed
    r, _ = monitor.check_drift(_site(), prof, _batch(rng, 60))
    assert r.method == "+".join(("mmd", "bbsd", "quality")[:len(views)])
