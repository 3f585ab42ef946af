"""Exploratory: does adding the model's own early features to the twin's fit close the gap on
the conditions image statistics miss (JPEG, night noise, greyscale)?

    python -m bench.explore.twin_features [--seed 0] [--conditions jpeg:2 night:2 greyscale:2]

Same split, stand-in model (the Lite0 probe) and columns as ``bench/twin_estimate.py``; the
fit's ``embed`` is the frozen Lite0 part (stem + 12 blocks) on the grid images, channel means
(what its BN layers normalise), so the camera is chosen to move the model's early statistics
the way the site does. Prints paired drops: the truth's against the same truth photos clean,
the twin's against the held-out photos clean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.twin_estimate import emotion6_split
from models.estimate.twin import TwinConfig, fit_twin
from models.estimate.twin_estimator import TwinEstimator
from models.sim.conditions import apply_condition

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conditions", nargs="+", default=["jpeg:2", "night:2", "greyscale:2"])
    ap.add_argument("--feature-weight", type=float, default=2.0)
    args = ap.parse_args()
    sp = emotion6_split(args.data_dir, args.seed)
    probe, y, rng = sp.probe, sp.y, sp.rng
    held, truth_site = sp.held, sp.truth_site
    held_imgs, fit_imgs, truth_imgs = sp.held_imgs, sp.fit_imgs, sp.truth_imgs
    truth_clean = float((probe.predict(truth_imgs) == y[truth_site]).mean())

    def embed(images: list[np.ndarray]) -> np.ndarray:
        x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        x = (x - probe.mean) / probe.std
        with torch.no_grad():
            return probe.net.frozen_forward(x).mean((2, 3)).numpy()  # (N, C) channel means

    print("| site | embed | true drop | twin drop | error | condition found | residual | fit s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for spec in args.conditions:
        cond, sev = spec.split(":")
        def under(imgs, cond=cond, sev=int(sev)):
            return [np.asarray(apply_condition(im, cond, sev, rng)) for im in imgs]
        site = under(fit_imgs)
        truth = float((probe.predict(under(truth_imgs)) == y[truth_site]).mean())
        for use in (False, True):
            t0 = time.perf_counter()
            cfg = TwinConfig(seed=args.seed, feature_weight=args.feature_weight)
            fit = fit_twin(held_imgs, site, cfg, embed=embed if use else None)
            s = time.perf_counter() - t0
            est, _ = TwinEstimator(cfg).estimate_images(probe.predict, held_imgs, y[held],
                                                        site, fit=fit, seed=args.seed)
            td, wd = 100 * (truth - truth_clean), -100 * est.drop
            print(f"| {cond} {sev} | {'yes' if use else 'no'} | {td:+.1f} | {wd:+.1f} | "
                  f"{abs(td - wd):.1f} | {fit.describe()} | {fit.distance:.2f} | {s:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
