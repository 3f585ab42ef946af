"""The ``twin`` estimator in ``bench.estimate``'s protocol (its sites, sizes and truth): the
twin is given images, not meta-sets, and its fit takes 20-130 s a site, so it runs at
``--twin-sizes`` (240) with ``--twin-trials`` (1) per condition."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import log


def draw_site(cname: str, y: np.ndarray, n: int, rng: np.random.Generator, acc_c: np.ndarray,
              truth_all: float) -> tuple[np.ndarray, float]:
    """(indices into the pool, truth) of one site of ``bench.estimate``: ``n`` images drawn
    at random; for a class-prior site ("prior_x3_<c>": class c three times as frequent;
    "prior_dirichlet") drawn with replacement under the new prior, whose truth is the
    prior-weighted per-class accuracy ``acc_c``; otherwise the pool's accuracy ``truth_all``."""
    if not cname.startswith("prior"):
        return rng.choice(len(y), size=min(n, len(y)), replace=False), truth_all
    pi = rng.dirichlet(np.full(6, 2.0)) if cname == "prior_dirichlet" else None
    if pi is None:
        pi = np.ones(6)
        pi[int(cname[-1])] = 3.0
        pi /= pi.sum()
    w = pi[y] / np.bincount(y, minlength=6)[y]
    return rng.choice(len(y), size=n, replace=True, p=w / w.sum()), float(pi @ acc_c)


def twin_sites(ckpt: Any, cal_imgs: list[np.ndarray], y_cal: np.ndarray,
               pool_imgs: list[np.ndarray], pool: dict[str, Any], y: np.ndarray, conds: list[str],
               trials: int, sizes: tuple[int, ...], rng: np.random.Generator,
               rows: list[dict[str, Any]], extra: dict[str, Any], out: Path,
               transform: Callable[[str, np.ndarray, int], np.ndarray]) -> None:
    """The ``twin`` estimator (product defaults: ``TwinEstimator``, the first
    ``EstimatorConfig.twin_images`` calibration images as its held-out set, as
    ``tasks.training.keep_twin_images`` keeps them) on the same sites as ``run_sites``: the
    pool under each condition (``transform``: bench.estimate's), ``sizes`` images drawn at random, the same truth."""
    from PIL import Image

    from models.estimate.fit import EstimatorConfig
    from models.estimate.twin import TwinConfig
    from models.estimate.twin_estimator import TwinEstimator
    from models.evaluate import extract_features
    from models.sim.camera import native_size

    prep = ckpt.preprocessing
    limit = EstimatorConfig().twin_images
    keep = sorted(np.random.default_rng(0).choice(len(cal_imgs), min(limit, len(cal_imgs)),
                                                  replace=False))
    held = [prep.to_array(Image.fromarray(cal_imgs[i])) for i in keep]
    y_held = y_cal[keep]

    def predict(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        z, p = extract_features(ckpt, np.stack(images))
        return p.argmax(1), z

    # as tasks.impact: the site camera's photo size (its noise and JPEG act there)
    native = native_size([(a.shape[1], a.shape[0]) for a in pool_imgs], prep.img_size)
    twin = TwinEstimator(TwinConfig(grid=prep.img_size, native=native))
    clean_right = pool["clean"].probs.argmax(1) == y
    acc_clean = float(clean_right.mean())
    acc_c = np.array([clean_right[y == c].mean() for c in range(6)])
    for cname in conds:
        base = "clean" if cname.startswith("prior") else cname
        grid = [prep.to_array(Image.fromarray(transform(base, a, i)))
                for i, a in enumerate(pool_imgs)]
        truth_all = float((pool[base].probs.argmax(1) == y).mean())
        for n in sizes:
            for t in range(trials):
                idx, truth = draw_site(cname, y, n, rng, acc_c, truth_all)
                site = [grid[i] for i in idx]
                t0 = time.perf_counter()
                est, _ = twin.estimate_images(predict, held, y_held, site, seed=t,
                                              site_features=predict(site)[1])
                rows.append({**extra, "cond": cname, "n": n, "trial": t, "est": "twin",
                             "truth": truth, "true_drop": acc_clean - truth,
                             "ms": 1000 * (time.perf_counter() - t0), **est.to_dict()})
                log(f"twin {cname} n={n}: est {est.accuracy:.3f} truth {truth:.3f} drop "
                    f"{est.drop:+.3f} [{est.drop_low:+.3f}, {est.drop_high:+.3f}] true "
                    f"{acc_clean - truth:+.3f} ({rows[-1]['ms'] / 1000:.0f} s)")
                out.write_text(json.dumps(rows, default=float))
