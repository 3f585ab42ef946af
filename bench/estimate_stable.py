"""A stable site checked hourly for 30 days: how many e-mails does it send?

    python -m bench.estimate_stable [--seed 0] [--days 30]

The site's camera is like the training domain's (clean photos of the benchmark's site pool,
never seen by the estimator). Every hour 24 new photos arrive and the check tests the newest
240 (overlapping windows: 10% new each hour), as ``emowatch serve`` would run it: the drift
test (``tasks.monitor.check_drift``, the site defaults), the accuracy estimate
(``tasks.impact``) and the e-mail rule (``tasks.impact.should_notify``) with the default
60-minute cool-down. Needs the caches of ``python -m bench.estimate`` (same seed).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bench.estimate import CACHE, E6_CLASSES, meta_for, outputs, photo_split


def simulate(seed: int, cfg: Any, days: int = 30, per_hour: int = 24, window: int = 240,
             cooldown_h: float = 1.0) -> str:
    from emowatch.sites import Site
    from models.catalog import DEFAULT_ESTIMATOR, load
    from models.estimate.describe import STAT_SCALE
    from models.images import load_rgb
    from models.profile import ReferenceProfile
    from tasks.featurize import FeatureSet
    from tasks.impact import estimate_accuracy, impact_of, should_notify
    from tasks.monitor import check_drift

    e6, y, cal, pool, ckpt = photo_split(seed)
    cal_imgs = [np.asarray(load_rgb(e6.records[i].path)) for i in cal]
    meta, _ = meta_for(f"photo{seed}", ckpt, cal_imgs, y[cal], cfg)
    est = load("estimator", DEFAULT_ESTIMATOR)(interval=cfg.interval).fit(meta)
    clean_cal = outputs(f"photo{seed}", ckpt, cal_imgs, "clean")
    profile = ReferenceProfile.from_arrays(
        clean_cal.z, clean_cal.probs, E6_CLASSES,
        quality={k: clean_cal.stats[:, i] for i, k in enumerate(STAT_SCALE)})
    profile.estimator = est.state()
    pool_b = outputs(f"photo{seed}", ckpt, [np.asarray(load_rgb(e6.records[i].path))
                                            for i in pool], "clean")
    rng = np.random.default_rng(500 + seed)
    arrivals = rng.integers(0, len(pool), size=days * 24 * per_hour + window)
    site = Site(name="stable", inbox=CACHE)
    every = Site.model_validate({"name": "stable", "inbox": CACHE, "drift": {"alert_on": "drift"}})
    counts = {"drift": 0, "harmful": 0, "harmless": 0, "unknown": 0}
    mails = {"harmful": 0, "drift": 0}
    last = {"harmful": -1e9, "drift": -1e9}
    for hour in range(days * 24):
        end = window + hour * per_hour
        idx = arrivals[end - window:end]
        b = pool_b.take(idx)
        fs = FeatureSet([str(i) for i in range(len(idx))], b.z, b.probs,
                        {k: b.stats[:, i] for i, k in enumerate(STAT_SCALE)})
        result, _ = check_drift(site, profile, fs)
        e = estimate_accuracy(profile, fs)
        imp = impact_of(site, e)
        counts["drift"] += result.decision == "drift"
        counts[imp] += 1
        for rule, s in (("harmful", site), ("drift", every)):
            if should_notify(s, result.decision, imp) and hour - last[rule] >= cooldown_h:
                mails[rule] += 1
                last[rule] = hour
    n = days * 24
    return "\n".join([
        f"Stable site, seed {seed}: {n} hourly checks of the newest {window} photos "
        f"({per_hour} new per hour), {days} days",
        "",
        "| | checks | share |",
        "|---|---|---|",
        *(f"| {k} | {v} | {100 * v / n:.1f}% |" for k, v in counts.items()),
        "",
        "| alert_on | e-mails in 30 days (60-minute cool-down) |",
        "|---|---|",
        f"| harmful (default) | {mails['harmful']} |",
        f"| drift | {mails['drift']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    from models.estimate.fit import EstimatorConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--specs", type=int, default=60)
    ap.add_argument("--interval", default="knn", choices=("knn", "bins"))
    args = ap.parse_args(argv)
    cfg = EstimatorConfig(interval=args.interval, specs_mild=round(2 * args.specs / 3),
                          specs_severe=args.specs - round(2 * args.specs / 3))
    print(simulate(args.seed, cfg, args.days))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
