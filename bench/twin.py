"""The site twin's camera fit on real photos: which condition does it find, how much of the
site does it explain, and what does it cost?

    python -m bench.twin [--seed 0] [--n-site 120] [--n-held 120] [--out bench/results/twin.md]

Emotion6 photos, shuffled with the seed: ``--n-held`` of them are the labelled held-out images
the twin transforms; ``--n-site`` others become a site under each benchmark condition
(``models.sim.conditions``, never the camera model itself: the fit must reach conditions it
was not written from). "faces -> photos" fits CK+48 faces to clean photos: a change of
content, which no camera explains (its residual should stay large). Columns: the condition
found, in words; the residual distance and the untouched held-out set's distance, both in
resampling spreads (two samples of one camera: ~1); seconds of the fit on image statistics
only (no model features), default ``TwinConfig``. Prints a Markdown table (and writes it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.twin_estimate import load
from models.estimate.twin import TwinConfig, fit_twin
from models.sim.conditions import apply_condition

REPO = Path(__file__).resolve().parents[1]
SITES = [("clean", None, 0), ("night", "night", 1), ("night", "night", 2), ("blur", "blur", 2),
         ("jpeg", "jpeg", 2), ("colour cast", "colour_cast", 2), ("greyscale", "greyscale", 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-site", type=int, default=120)
    ap.add_argument("--n-held", type=int, default=120)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "twin.md")
    ap.add_argument("--cases", nargs="+", default=None,
                    help='only these rows, e.g. "clean" "faces -> photos" (default: all)')
    args = ap.parse_args()
    photos = sorted((args.data_dir / "emotion6" / "images").rglob("*.jpg"))
    faces = sorted((args.data_dir / "ckplus48").rglob("*.png"))
    rng = np.random.default_rng(args.seed)
    rng.shuffle(photos)
    rng.shuffle(faces)
    held = load(photos[:args.n_held], 128)
    site_src = load(photos[args.n_held:args.n_held + args.n_site], 128)
    cfg = TwinConfig(seed=args.seed)
    rows = [f"# Site twin: the camera fitted to a site (seed {args.seed}, {args.n_held} held-out, "
            f"{args.n_site} site photos, grid {cfg.grid}, image statistics only)", "",
            "| site | condition found | residual | untouched | seconds | evaluations |",
            "|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    cases = [(f"{label} {sev}" if cond else label, cond, sev) for label, cond, sev in SITES]
    for name, cond, sev in cases + [("faces -> photos", "faces", 0)]:
        if args.cases and name not in args.cases:
            continue
        if cond == "faces":
            held_set, site = load(faces[:args.n_held], 128), site_src
        else:
            held_set = held
            site = site_src if cond is None else [
                np.asarray(apply_condition(im, cond, sev, rng)) for im in site_src]
        t0 = time.perf_counter()
        fit = fit_twin(held_set, site, cfg)
        row = (f"| {name} | {fit.describe()} | {fit.distance:.2f} | {fit.neutral_distance:.2f} | "
               f"{time.perf_counter() - t0:.0f} | {fit.evaluations} |")
        rows.append(row)
        print(row, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")  # partial results kept


if __name__ == "__main__":
    main()
